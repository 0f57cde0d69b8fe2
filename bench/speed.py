"""Speed of RestoreLCC's parts on SmolLM2-135M-Instruct, each side by side with its reference, in one run.

    python -m bench speed [--probe 64] [--repeats 3] [--heads-from restoration.safetensors] [--again]
    python -m bench speed --render-only          # rewrite docs/speed.md from bench/results/speed.json

1. capture (o_proj pre-hooks, last real token) vs plain batched forward passes over the same tokens
2. SVD + probing vs the captures they need
3. one RestoreLCC training step vs one LoRA (r=8, q_proj/v_proj) step on the same batch
4. merged restored model's tokens/s vs the pruned model's

The targets of each ratio are in bench/targets.json. Timings interleave the two sides and keep the median of
``--repeats`` rounds, so load from other processes hits both alike. The measurement is kept as
bench/results/speed.json and reused while its settings match; --again measures anew.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

from bench import harness

PATH = harness.RESULTS / "speed.json"
SETTINGS = ("probe", "batch_size", "max_len", "heads", "repeats", "heads_from")


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--probe", type=int, default=64, help="probe pairs")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--heads", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--heads-from", default=None, metavar="restoration.safetensors",
                    help="time the training step with the heads a full run chose (its restoration.safetensors) "
                         "instead of those this run's small probe set picks")
    ap.add_argument("--again", action="store_true", help="measure anew even when a measurement is stored")


def side_by_side(a, b, repeats: int) -> tuple[float, float]:
    """Median seconds of ``a`` and of ``b``, alternating which runs first."""
    times: dict[Any, list[float]] = {a: [], b: []}
    for i in range(repeats):
        for fn in (a, b) if i % 2 == 0 else (b, a):
            t0 = time.perf_counter()
            fn()
            times[fn].append(time.perf_counter() - t0)
    return statistics.median(times[a]), statistics.median(times[b])


def measure(a: dict[str, Any], model_dir: str) -> dict[str, Any]:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from app.schemas import PruningSpec
    from worker.model.arch import DecoderAdapter
    from worker.model.data import batch_pad_id, encode_pair, pad_batch, read_instructions
    from worker.model.load import load_model, resolve_source
    from worker.prune.runner import prune_model
    from worker.restore.offsets.heads import inject
    from worker.restore.offsets.merge import merge_into_o_proj, restoration_info
    from worker.restore.restorelcc import steps
    from worker.restore.restorelcc.capture import build_probe_inputs, capture_head_outputs
    from worker.restore.restorelcc.pairs import choose_negatives
    from worker.restore.train import frozen, response_loss_sum

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    model, tok = load_model(resolve_source(model_dir), "float32")
    adapter = DecoderAdapter(model)
    pairs = read_instructions(harness.data("alpaca/train.jsonl"), limit=a["probe"])
    negatives, backend = choose_negatives([r for _, r in pairs])
    probe = build_probe_inputs(tok, pairs, a["max_len"], a["batch_size"], negatives)
    r: dict[str, Any] = {}

    # 1. capture vs plain forward (same batches: prompt, prompt+response, prompt+negative).
    all_batches = probe.prompt + probe.positive + probe.negative

    def plain():
        with torch.no_grad():
            for b in all_batches:
                adapter.base(input_ids=b.input_ids, attention_mask=b.attention_mask)

    def capture():
        for batches in (probe.prompt, probe.positive, probe.negative):
            capture_head_outputs(model, adapter, batches)

    r["capture_s"], r["forward_s"] = side_by_side(capture, plain, a["repeats"])
    r["capture_tokens"] = sum(int(b.attention_mask.sum()) for b in all_batches)

    # 2. SVD + probing vs the captures they need (3 dense + 1 pruned).
    t0 = time.perf_counter()
    dense = steps.capture_dense(model, adapter, probe)
    t_dense = time.perf_counter() - t0
    prune_model(model, adapter, PruningSpec(method="magnitude", sparsity=0.5), None)
    t0 = time.perf_counter()
    pruned = steps.capture_pruned(model, adapter, probe)
    r["captures_s"] = t_dense + time.perf_counter() - t0
    t0 = time.perf_counter()
    comps = steps.extract_components(dense, pruned)
    r["svd_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = steps.score_heads(dense, pruned, comps, k=10, seed=0)
    r["probe_s"] = time.perf_counter() - t0

    # 3. one training step, RestoreLCC vs LoRA, on the same batch.
    heads = ([tuple(h) for h in restoration_info(a["heads_from"])["heads"]] if a["heads_from"]
             else steps.choose_heads(result, adapter.info, a["heads"], "probe", 0))
    offsets = steps.make_offsets(heads, adapter.info, comps, seed=0)
    train = read_instructions(harness.data("alpaca/train.jsonl"), limit=a["probe"] + a["batch_size"])[a["probe"]:]
    enc = [encode_pair(tok, p, resp, a["max_len"]) for p, resp in train]
    batch = pad_batch([e[0] for e in enc], batch_pad_id(tok), labels=[e[1] for e in enc])
    n_resp = int((batch.labels[:, 1:] != -100).sum())
    opt_r = torch.optim.AdamW(offsets.parameters(), lr=1e-2)
    lora_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16,
                                                                 target_modules=["q_proj", "v_proj"]))
    opt_l = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=1e-3)

    def step_restorelcc():
        with frozen(model), inject(adapter, offsets), torch.enable_grad():
            opt_r.zero_grad(set_to_none=True)
            (response_loss_sum(model, batch)[0] / n_resp).backward()
            opt_r.step()

    def step_lora():
        with torch.enable_grad():
            lora_model.train()
            opt_l.zero_grad(set_to_none=True)
            (response_loss_sum(lora_model, batch)[0] / n_resp).backward()
            opt_l.step()

    step_restorelcc()
    step_lora()  # warm-up
    r["step_restorelcc_s"], r["step_lora_s"] = side_by_side(step_restorelcc, step_lora, a["repeats"])
    r["lora_params"] = sum(p.numel() for p in lora_model.parameters() if p.requires_grad)
    r.update(restorelcc_params=offsets.num_trainable(), earliest_chosen_layer=min(layer for layer, _ in heads),
             chosen_heads=len(heads))

    # 4. merged restored model vs pruned model: tokens per second of batched forward passes.
    merged = copy.deepcopy(model)
    merged = merge_into_o_proj(merged, DecoderAdapter(merged), offsets)
    merged.eval()
    tokens = torch.randint(0, model.config.vocab_size, (a["batch_size"], a["max_len"]))

    def tput(m):
        def run():
            with torch.no_grad():
                for _ in range(2):
                    m(input_ids=tokens)
        return run

    t_m, t_p = side_by_side(tput(merged), tput(model), max(5, a["repeats"]))
    r.update(merged_tok_s=2 * tokens.numel() / t_m, pruned_tok_s=2 * tokens.numel() / t_p)
    return {"settings": a, "results": r, "backend": backend, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}


def _check(ratio: float, target: list) -> tuple[str, bool]:
    op, value = target
    return f"{'≤' if op == '<=' else '≥'} {value:g}", ratio <= value if op == "<=" else ratio >= value


def page(saved: dict[str, Any], command: str, targets: dict[str, list], results: str = "bench/results/speed.json"
         ) -> str:
    a, r = saved["settings"], saved["results"]
    ratios = {"capture": r["capture_s"] / r["forward_s"], "svd_probe": (r["svd_s"] + r["probe_s"]) / r["captures_s"],
              "train_step": r["step_restorelcc_s"] / r["step_lora_s"],
              "tokens_per_s": r["merged_tok_s"] / r["pruned_tok_s"]}
    checks = {k: _check(v, targets[k]) for k, v in ratios.items()}
    rows = [
        ["capture vs plain forward", f"{r['capture_s']:.2f} s", f"{r['forward_s']:.2f} s"],
        ["SVD + probing vs captures", f"{r['svd_s'] + r['probe_s']:.2f} s", f"{r['captures_s']:.2f} s"],
        [f"train step: RestoreLCC ({r['restorelcc_params']:,} p) vs LoRA ({r['lora_params']:,} p)",
         f"{r['step_restorelcc_s']:.2f} s", f"{r['step_lora_s']:.2f} s"],
        ["tokens/s: merged vs pruned", f"{r['merged_tok_s']:,.0f}", f"{r['pruned_tok_s']:,.0f}"],
    ]
    table = harness.markdown_table(["measure", "RestoreLCC side", "reference", "ratio", "target", "met"],
                           [[*row, ratios[k], checks[k][0], "yes" if checks[k][1] else "**no**"]
                            for row, k in zip(rows, ratios, strict=True)])
    heads_from = a.get("heads_from")
    heads_note = (f" The heads come from `{heads_from}`, which a real restoration run wrote (e.g. "
                  "`python -m bench compare`'s RestoreLCC run on Wanda 50%), so the step is timed with the heads that "
                  "probing on 256 pairs chooses." if heads_from else "")
    where_heads = (f"the {r.get('chosen_heads', '?')} heads chosen by the full run that wrote `{heads_from}`"
                   if heads_from else f"{a['heads']:g} of the heads, chosen by this run's probe")
    return f"""# Speed of RestoreLCC's parts (SmolLM2-135M-Instruct, CPU)

Produced by `{command}` on {saved.get('date', '?')} (measurement: `{results}`; {saved.get('threads', '?')} threads;
both sides of each row timed alternately, median of {a['repeats']} rounds). {a['probe']} Alpaca probe pairs
(negatives by {saved.get('backend', '?')}), batch {a['batch_size']}, max length {a['max_len']}, magnitude 50% pruning,
{r['restorelcc_params']:,} RestoreLCC parameters ({where_heads}; earliest chosen layer {r['earliest_chosen_layer']})
vs LoRA r=8 on q_proj/v_proj ({r['lora_params']:,} parameters).

{table}

Reading the rows:
- Capture runs the decoder stack with pre-hooks on every `o_proj` and keeps one row per sample (the last real
  token); the reference is the same stack's forward over the same padded batches without hooks.
- SVD + probing is one batched SVD over all heads and one batched logistic-regression program for all heads.
- A training step is forward + backward + AdamW on one batch of {a['batch_size']}. Both methods back-propagate from
  the loss down to the earliest layer they change (here layer {r['earliest_chosen_layer']} for RestoreLCC, layer 0
  for LoRA), so RestoreLCC's step saves the backward pass through the layers below its earliest chosen head,
  besides parameters and optimizer state; the ratio therefore depends on where the chosen heads are, and comes near
  1 when a head in the first layers is chosen.{heads_note}
- The merged model adds a bias to each attention projection (zeros for q/k/v) and nothing else.
- Timings on a shared two-core machine move by several percent between runs; rows near their target should be
  re-measured (`--again`) on a quiet machine before reading anything into them.
"""


def main(args: argparse.Namespace, argv: list[str]) -> int:
    settings = {k: getattr(args, k) for k in SETTINGS}
    if not args.render_only:
        if args.again:
            PATH.unlink(missing_ok=True)
        model = harness.model_path(harness.models()[0])
        harness.Store(PATH.parent).get(PATH, {"settings": settings}, lambda: measure(settings, model), "speed")
    return render()


def _flags(settings: dict[str, Any]) -> list[str]:
    return [f"--{k.replace('_', '-')}={v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')}={v}"
            for k, v in settings.items() if v is not None]


def render() -> int:
    """docs/speed.md's speed rows from the stored measurement; what follows them on the page (the service's costs,
    bench/service.py) is kept."""
    saved = harness.Store(PATH.parent).read(PATH)
    if saved is None:
        raise SystemExit(f"{PATH}: nothing measured yet")
    text = page(saved, harness.page_command("speed", _flags(saved["settings"])), harness.TARGETS["speed"],
                harness.relative(PATH))
    harness.write_part(harness.DOCS / "speed.md", None, text)
    return 0
