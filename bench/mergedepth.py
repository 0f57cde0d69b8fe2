"""The merge check's end-to-end difference against depth, beside the tolerance it is held to (bfloat16).

    python -m bench mergedepth [--layers 30,80] [--seeds 3]
    python -m bench mergedepth --render-only

After folding the offsets into o_proj biases, the worker compares the merged model's logits with the hooked model's:
per token, the largest difference relative to that token's largest logit, allowed 16 bfloat16 eps at up to 30 layers
and proportionally more beyond (worker.restore.offsets.merge.token_rel_tolerance). Here random-weight Llama-shaped
models of a narrow width (hidden 256, 8 heads) and growing depth, half their decoder weights zeroed at random and 20%
of their heads given random constants (as the tolerance was first measured on SmolLM2), are merged in bfloat16 and
compared. Results: bench/results/mergedepth.json; written to its part of docs/scaling.md.
"""

from __future__ import annotations

import argparse
from typing import Any

from bench import harness

PAGE = harness.DOCS / "scaling.md"
PATH = harness.RESULTS / "mergedepth.json"


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--layers", default="30,80", help="comma-separated depths (default 30,80: SmolLM2's, 70B's)")
    ap.add_argument("--seeds", type=int, default=3)


def measure_one(layers: int, seed: int) -> float:
    """The merged-vs-hooked difference per token relative to its largest logit, in bfloat16 eps."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from worker.model.arch import DecoderAdapter
    from worker.restore.offsets.heads import HeadOffsets, inject
    from worker.restore.offsets.merge import logit_differences, merge_into_o_proj

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    config = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    adapter = DecoderAdapter(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.06, generator=g)
        for _, lin in adapter.named_prunable_linears():
            lin.weight.mul_((torch.rand(lin.weight.shape, generator=g) >= 0.5).to(lin.weight.dtype))
    model.to(torch.bfloat16)
    info = adapter.info
    total = info.num_layers * info.num_heads
    flat = torch.randperm(total, generator=g)[: round(0.2 * total)].tolist()
    heads = [(i // info.num_heads, i % info.num_heads) for i in flat]
    q, _ = torch.linalg.qr(torch.randn(len(heads), info.head_dim, info.head_dim, generator=g))
    offsets = HeadOffsets(heads, info.num_heads, info.head_dim, q.transpose(-1, -2), seed=seed, init_std=0.3)
    ids = torch.randint(0, config.vocab_size, (4, 64), generator=g)
    with torch.no_grad(), inject(adapter, offsets):
        hooked = model(input_ids=ids).logits
    merged = merge_into_o_proj(model, adapter, offsets)
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    return logit_differences(hooked, got, torch.ones_like(ids))[1] / torch.finfo(torch.bfloat16).eps


def render(result: dict[str, Any], command: str) -> str:
    import torch

    from worker.restore.offsets.merge import token_rel_tolerance

    eps = torch.finfo(torch.bfloat16).eps
    rows = [[layers, ", ".join(f"{x:.1f}" for x in values), f"{max(values):.1f}",
             f"{token_rel_tolerance(torch.bfloat16, int(layers)) / eps:.1f}"]
            for layers, values in sorted(result["eps"].items(), key=lambda kv: int(kv[0]))]
    return "\n".join([
        "## The merge check against depth (bfloat16, random weights)", "",
        f"Made by `{command}`: narrow random-weight Llama-shaped models (hidden 256, 8 heads), half of every decoder "
        "weight zeroed at random, 20% of the heads given random constants, merged in bfloat16; the merged model's "
        "logits against the hooked model's, per token relative to its largest logit, in bfloat16 eps, beside the "
        "tolerance the worker applies at that depth (a difference above it fails the job `merge_check_failed`).", "",
        harness.markdown_table(["layers", "difference per seed (eps)", "largest", "tolerance (eps)"], rows), ""])


def main(args: argparse.Namespace, argv: list[str]) -> int:
    store = harness.Store(harness.RESULTS)
    fp = {"layers": args.layers, "seeds": args.seeds, "width": 256}

    def make() -> dict[str, Any]:
        return {"eps": {layers: [measure_one(int(layers), s) for s in range(args.seeds)]
                        for layers in args.layers.split(",")}, "machine": harness.machine()}

    result = store.read(PATH, fp) if args.render_only else store.get(PATH, fp, make, "merge depth")
    if result is not None:
        flags = [f"--layers={args.layers}", f"--seeds={args.seeds}"]
        harness.write_part(PAGE, "mergedepth", render(result, harness.page_command("mergedepth", flags)))
    return 0
