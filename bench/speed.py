"""Speed of RestoreLCC's parts on SmolLM2-135M-Instruct, each side by side with its reference, in one run.

    python bench/speed.py [--probe 64] [--repeats 3]

1. capture (o_proj pre-hooks, last real token) vs plain batched forward passes over the same tokens (≤ 1.2×)
2. SVD + probing vs the captures they need (≤ 10%)
3. one RestoreLCC training step vs one LoRA (r=8, q_proj/v_proj) step on the same batch (≤ 0.9×)
4. merged restored model's tokens/s vs the pruned model's (≥ 0.99×)

Timings interleave the two sides and keep the median of ``--repeats`` rounds, so load from other
processes hits both alike. Writes bench/results/speed.json and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, data, demo_model, markdown_table, save_json  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def side_by_side(a, b, repeats: int) -> tuple[float, float]:
    """Median seconds of ``a`` and of ``b``, alternating which runs first."""
    ta, tb = [], []
    for i in range(repeats):
        if i % 2 == 0:
            ta.append(timed(a))
            tb.append(timed(b))
        else:
            tb.append(timed(b))
            ta.append(timed(a))
    return statistics.median(ta), statistics.median(tb)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probe", type=int, default=64, help="probe pairs")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--heads", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--heads-from", default=None, metavar="restoration.safetensors",
                    help="time the training step with the heads a full run chose (its restoration.safetensors) "
                         "instead of those this run's small probe set picks")
    ap.add_argument("--docs", action="store_true", help="also write docs/speed.md")
    ap.add_argument("--from-json", action="store_true",
                    help="measure nothing: render the last run's bench/results/speed.json (with --docs)")
    args = ap.parse_args()
    if args.from_json:
        saved = json.loads((RESULTS / "speed.json").read_text())
        print(saved["table"])
        if args.docs:
            write_docs(saved)
        return 0

    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from app.schemas import PruningSpec
    from worker.model.arch import DecoderAdapter
    from worker.model.data import encode_pair, ensure_pad_token, pad_batch, read_instructions
    from worker.model.load import load_model, resolve_source
    from worker.prune.runner import prune_model
    from worker.restore.capture import capture_head_outputs
    from worker.restore.heads import inject
    from worker.restore.merge import merge_into_o_proj
    from worker.restore.pairs import choose_negatives
    from worker.restore.restorelcc import (
        build_probe_inputs,
        capture_dense,
        capture_pruned,
        choose_heads,
        extract_components,
        make_offsets,
        score_heads,
    )
    from worker.restore.train import frozen, response_loss_sum

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    model, tok = load_model(resolve_source(demo_model()), "float32")
    adapter = DecoderAdapter(model)
    pairs = read_instructions(data("alpaca/train.jsonl"), limit=args.probe)
    negatives, backend = choose_negatives([r for _, r in pairs])
    probe = build_probe_inputs(tok, pairs, args.max_len, args.batch_size, negatives)
    rows: list[list] = []
    results: dict[str, float] = {}

    # 1. capture vs plain forward (same batches: prompt, prompt+response, prompt+negative).
    all_batches = probe.prompt + probe.positive + probe.negative
    n_tokens = sum(int(b.attention_mask.sum()) for b in all_batches)

    def plain():
        with torch.no_grad():
            for b in all_batches:
                adapter.base(input_ids=b.input_ids, attention_mask=b.attention_mask)

    def capture():
        for batches in (probe.prompt, probe.positive, probe.negative):
            capture_head_outputs(model, adapter, batches)

    t_cap, t_fwd = side_by_side(capture, plain, args.repeats)
    results.update(capture_s=t_cap, forward_s=t_fwd, capture_tokens=n_tokens)
    rows.append(["capture vs plain forward", f"{t_cap:.2f} s", f"{t_fwd:.2f} s", t_cap / t_fwd, "≤ 1.2"])

    # 2. SVD + probing vs the captures they need (3 dense + 1 pruned).
    t0 = time.perf_counter()
    dense = capture_dense(model, adapter, probe)
    t_dense = time.perf_counter() - t0
    prune_model(model, adapter, PruningSpec(method="magnitude", sparsity=0.5), None)
    t0 = time.perf_counter()
    pruned = capture_pruned(model, adapter, probe)
    t_captures = t_dense + time.perf_counter() - t0
    t0 = time.perf_counter()
    comps = extract_components(dense, pruned)
    t_svd = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = score_heads(dense, pruned, comps, k=10, seed=0)
    t_probe = time.perf_counter() - t0
    results.update(svd_s=t_svd, probe_s=t_probe, captures_s=t_captures)
    rows.append(["SVD + probing vs captures", f"{t_svd + t_probe:.2f} s", f"{t_captures:.2f} s",
                 (t_svd + t_probe) / t_captures, "≤ 0.10"])

    # 3. one training step, RestoreLCC vs LoRA, on the same batch.
    if args.heads_from:
        from worker.restore.merge import restoration_info

        heads = [tuple(h) for h in restoration_info(args.heads_from)["heads"]]
    else:
        heads = choose_heads(result, adapter.info, args.heads, "probe", 0)
    offsets = make_offsets(heads, adapter.info, comps, seed=0)
    train = read_instructions(data("alpaca/train.jsonl"), limit=args.probe + args.batch_size)[args.probe:]
    enc = [encode_pair(tok, p, r, args.max_len) for p, r in train]
    batch = pad_batch([e[0] for e in enc], ensure_pad_token(tok), labels=[e[1] for e in enc])
    n_resp = int((batch.labels[:, 1:] != -100).sum())
    opt_r = torch.optim.AdamW(offsets.parameters(), lr=1e-2)

    lora_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj",
                                                                                                     "v_proj"]))
    opt_l = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=1e-3)

    def step_restorelcc():
        with frozen(model), inject(adapter, offsets), torch.enable_grad():
            opt_r.zero_grad(set_to_none=True)
            loss, _ = response_loss_sum(model, batch)
            (loss / n_resp).backward()
            opt_r.step()

    def step_lora():
        with torch.enable_grad():
            lora_model.train()
            opt_l.zero_grad(set_to_none=True)
            loss, _ = response_loss_sum(lora_model, batch)
            (loss / n_resp).backward()
            opt_l.step()

    step_restorelcc()
    step_lora()  # warm-up
    t_r, t_l = side_by_side(step_restorelcc, step_lora, args.repeats)
    n_lora = sum(p.numel() for p in lora_model.parameters() if p.requires_grad)
    results.update(step_restorelcc_s=t_r, step_lora_s=t_l, lora_params=n_lora,
                   restorelcc_params=offsets.num_trainable())
    rows.append([f"train step: RestoreLCC ({offsets.num_trainable():,} p) vs LoRA ({n_lora:,} p)",
                 f"{t_r:.2f} s", f"{t_l:.2f} s", t_r / t_l, "≤ 0.9"])
    earliest = min(layer for layer, _ in heads)
    results["earliest_chosen_layer"] = earliest

    # 4. merged restored model vs pruned model: tokens per second of batched forward passes.
    merged_model = copy.deepcopy(model)
    merged_model = merge_into_o_proj(merged_model, DecoderAdapter(merged_model), offsets)
    merged_model.eval()
    tokens = torch.randint(0, model.config.vocab_size, (args.batch_size, args.max_len))

    def tput(m):
        def run():
            with torch.no_grad():
                for _ in range(2):
                    m(input_ids=tokens)
        return run

    t_m, t_p = side_by_side(tput(merged_model), tput(model), max(5, args.repeats))
    ratio = t_p / t_m  # tokens/s ratio = inverse time ratio
    n = 2 * tokens.numel()
    results.update(merged_tok_s=n / t_m, pruned_tok_s=n / t_p)
    rows.append(["tokens/s: merged vs pruned", f"{n / t_m:,.0f}", f"{n / t_p:,.0f}", ratio, "≥ 0.99"])

    table = markdown_table(["measure", "RestoreLCC side", "reference", "ratio", "target"], rows)
    print(f"\nSmolLM2-135M-Instruct, {args.probe} probe pairs, batch {args.batch_size}, max len {args.max_len}, "
          f"{torch.get_num_threads()} threads, negatives by {backend}; earliest chosen layer {earliest}.\n")
    print(table)
    results["chosen_heads"] = len(heads)
    saved = {"args": vars(args), "results": results, "table": table, "backend": backend,
             "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    save_json(RESULTS / "speed.json", saved)
    if args.docs:
        write_docs(saved)
    return 0


def write_docs(saved: dict) -> None:
    a, r = saved["args"], saved["results"]
    step = r["step_restorelcc_s"] / r["step_lora_s"]
    step_verdict = (f"Measured {step:.2f}× LoRA's step: the ≤ 0.9× target is "
                    + ("met." if step <= 0.9 else "not met in this run."))
    tput = r["merged_tok_s"] / r["pruned_tok_s"]
    tput_verdict = (f"Measured {tput:.3f}× the pruned model's tokens/s: the ≥ 0.99× target is "
                    + ("met." if tput >= 0.99 else "not met in this run."))
    heads_from = a.get("heads_from")
    heads_note = (f" The heads come from `{heads_from}`, which a real restoration run wrote (here "
                  "`python -m bench.quality`'s RestoreLCC run on Wanda 50%), so the step is timed with the heads "
                  "that probing on 256 pairs chooses." if heads_from else "")
    flag = f" --heads-from {heads_from}" if heads_from else ""
    where_heads = (f"the {r.get('chosen_heads', '?')} heads chosen by the full run that wrote `{heads_from}`"
                   if heads_from else f"{a['heads']:g} of the heads, chosen by this run's probe")
    text = f"""# Speed of RestoreLCC's parts (SmolLM2-135M-Instruct, CPU)

Produced by `python bench/speed.py --probe {a['probe']} --repeats {a['repeats']}{flag} --docs` on
{saved.get('date', '?')} ({saved.get('threads', '?')} threads; both sides of each row timed alternately, median of
the rounds). {a['probe']} Alpaca probe pairs, batch {a['batch_size']}, max length {a['max_len']}, magnitude 50%
pruning, {r['restorelcc_params']:,} RestoreLCC parameters ({where_heads}; earliest chosen layer
{r['earliest_chosen_layer']}) vs LoRA r=8 on q_proj/v_proj ({r['lora_params']:,} parameters).

{saved['table']}

Reading the rows:
- Capture runs the decoder stack with pre-hooks on every `o_proj` and keeps one row per sample (the last real
  token); the reference is the same stack's forward over the same padded batches without hooks.
- SVD + probing is one batched SVD over all heads and one batched logistic-regression program for all heads.
- A training step is forward + backward + AdamW on one batch of 8. Both methods back-propagate from the loss down
  to the earliest layer they change (here layer {r['earliest_chosen_layer']} for RestoreLCC, layer 0 for LoRA), so
  RestoreLCC's step saves the backward pass through the layers below its earliest chosen head, besides
  parameters and optimizer state; the ratio therefore depends on where the chosen heads are, and comes near 1
  when a head in the first layers is chosen. {step_verdict}{heads_note}
- The merged model adds a bias to each attention projection (zeros for q/k/v) and nothing else. {tput_verdict}
- Timings on a shared two-core machine move by several percent between runs; rows near their target should be
  re-measured on a quiet machine before reading anything into them.
"""
    path = Path(__file__).resolve().parents[1] / "docs" / "speed.md"
    path.write_text(text, encoding="utf-8")
    print(f"written: {path}")


if __name__ == "__main__":
    sys.exit(main())
