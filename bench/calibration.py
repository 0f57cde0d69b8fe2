"""Calibration windows with and without the model's BOS at position 0, on Gemma 3 270M (which expects one there).

    python -m bench calibration [--only wanda-50,sparsegpt-2-4]
    python -m bench calibration --render-only

The service cuts calibration windows from one token stream (worker.model.calibration.build_calibration_batches):
only the first starts with BOS, as in the Wanda and SparseGPT papers. The other variant puts the tokenizer's BOS
first in every window that lacks it (the window's last token gives way). Both prune the dense model with the
service's own functions (Wanda 50% unstructured, SparseGPT 2:4; 128 windows of 256 Alpaca tokens, seed 0) and are
scored on WikiText sentences, held-out Alpaca responses, BoolQ, PIQA and OpenBookQA (fixed prefixes). Results are kept
in bench/results/calibration/; the page is docs/calibration.md.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench import harness

PAGE = harness.DOCS / "calibration.md"
ROOT = harness.RESULTS / "calibration"
MODEL = "gemma3-270m"
SETTINGS = {"wanda-50": {"method": "wanda", "pattern": "unstructured", "sparsity": 0.5},
            "sparsegpt-2-4": {"method": "sparsegpt", "pattern": "2:4"}}
VARIANTS = ("stream", "bos-first")
ROWS = {"wikitext": 200, "alpaca": 100, "tasks": 200}
WINDOWS, SEQ_LEN = 128, 256


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--only", default=None, help=f"comma-separated settings (default all: {', '.join(SETTINGS)})")


def bos_first(batches: list[Any], tokenizer: Any) -> list[Any]:
    """The same windows with the tokenizer's leading special tokens first where a window lacks them (its last tokens
    give way, so every window keeps its length)."""
    from worker.model.data import batch_pad_id, leading_specials, pad_batch, token_ids

    k = leading_specials(tokenizer)
    lead = token_ids(tokenizer, "a")[:k]
    rows = [ids if ids[:k] == lead else lead + ids[: len(ids) - k] for b in batches for ids in b.input_ids.tolist()]
    size = int(batches[0].input_ids.shape[0])
    return [pad_batch(rows[i : i + size], batch_pad_id(tokenizer)) for i in range(0, len(rows), size)]


def measure(setting: str | None, variant: str) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.schemas import PruningSpec
    from worker.model.arch import DecoderAdapter
    from worker.model.data import read_calibration_texts, read_choices, read_instructions, read_texts
    from worker.prune.runner import build_calibration_batches, prune_model
    from worker.run.evaluate import multiple_choice, perplexity, response_perplexity

    path = harness.model_path(MODEL)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    first_tokens: list[int] = []
    if setting is not None:
        batches = build_calibration_batches(tok, read_calibration_texts(harness.data("alpaca/train.jsonl")),
                                            WINDOWS, SEQ_LEN, 8, 0)
        if variant == "bos-first":
            batches = bos_first(batches, tok)
        first_tokens = sorted({int(t) for b in batches for t in b.input_ids[:, 0]})
        prune_model(model, DecoderAdapter(model), PruningSpec(**SETTINGS[setting]), batches)
    prune_s = time.perf_counter() - t0
    metrics: dict[str, Any] = {
        "wikitext_ppl": perplexity(model, tok, read_texts(harness.data("eval/wikitext_sentences.jsonl"),
                                                          ROWS["wikitext"])),
        "alpaca_resp_ppl": response_perplexity(model, tok, read_instructions(harness.data("alpaca/valid.jsonl"),
                                                                             ROWS["alpaca"]))}
    for task in ("boolq", "piqa", "openbookqa"):
        metrics[task] = multiple_choice(model, tok, read_choices(harness.data(f"eval/{task}.jsonl"), ROWS["tasks"]))
    return {**metrics, "windows_starting_with": len(first_tokens), "prune_s": prune_s,
            "total_s": time.perf_counter() - t0, "machine": harness.machine()}


def _cell(m: dict[str, Any]) -> list[str]:
    tasks = [m[t]["acc"] for t in ("boolq", "piqa", "openbookqa")]
    return [f"{m['wikitext_ppl']['ppl']:.1f}", f"{m['alpaca_resp_ppl']['ppl']:.2f}",
            *(f"{100 * a:.1f}%" for a in tasks), f"{100 * sum(tasks) / 3:.1f}%"]


def render(results: dict[tuple[str, str], dict[str, Any]], command: str) -> str:
    rows = [["dense", "—", *_cell(results[("dense", "stream")])]] if ("dense", "stream") in results else []
    for setting in SETTINGS:
        for variant in VARIANTS:
            if (setting, variant) in results:
                r = results[(setting, variant)]
                rows.append([setting, f"{variant} ({r['windows_starting_with']} distinct first tokens)", *_cell(r)])
    verdict = []
    for setting in SETTINGS:
        a, b = results.get((setting, "stream")), results.get((setting, "bos-first"))
        if a and b:
            wt, ap = (b["wikitext_ppl"]["ppl"], a["wikitext_ppl"]["ppl"]), (b["alpaca_resp_ppl"]["ppl"],
                                                                            a["alpaca_resp_ppl"]["ppl"])
            verdict.append(f"- {setting}: BOS first gives WikiText {wt[0]:.1f} against {wt[1]:.1f} and Alpaca "
                           f"{ap[0]:.2f} against {ap[1]:.2f} ({'better' if wt[0] < wt[1] else 'worse'} on WikiText).")
    made = sorted({r["made_by"] for r in results.values() if "made_by" in r})
    return "\n".join([
        "# Calibration windows: BOS first or not", "",
        f"Produced by `{command}` (results: `bench/results/calibration/`). google/gemma-3-270m (the GGUF the service "
        f"fetches, dequantized to float32), pruned by the service's own functions from {WINDOWS} windows of "
        f"{SEQ_LEN} tokens cut from alpaca/train.jsonl (seed 0). 'stream': the windows as the service cuts them, "
        "consecutive pieces of one token stream, so only the first starts with BOS (the others start mid-text, the "
        "Wanda and SparseGPT papers' practice). 'bos-first': the same windows with BOS put first where it is "
        "missing (the window's last token gives way). Scored on the first "
        f"{ROWS['wikitext']} WikiText sentences, {ROWS['alpaca']} held-out Alpaca responses and {ROWS['tasks']} rows "
        "each of BoolQ, PIQA and OpenBookQA (at 200 rows an accuracy moves about ±3.5 points by chance).", "",
        harness.markdown_table(["model", "windows", "WikiText ppl", "Alpaca resp. ppl", "BoolQ", "PIQA", "OpenBookQA",
                                "mean acc"], rows), "",
        *verdict, "",
        *[f"The stored results were made by {m}." for m in made], *([""] if made else []),
        "One model, one seed: the service keeps the stream, since a BOS in every window did not measure better here "
        "(SparseGPT's response perplexity aside).", ""])


def main(args: argparse.Namespace, argv: list[str]) -> int:
    store = harness.Store(ROOT)
    only = args.only.split(",") if args.only else list(SETTINGS)
    unknown = sorted(set(only) - set(SETTINGS))
    if unknown:
        raise SystemExit(f"unknown settings: {', '.join(unknown)} (known: {', '.join(SETTINGS)})")
    runs: list[tuple[str | None, str]] = [(None, "stream"), *((s, v) for s in only for v in VARIANTS)]
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for setting, variant in runs:
        name = setting or "dense"
        path = ROOT / f"{name}-{variant}.json"
        fp = {"model": MODEL, "setting": SETTINGS.get(setting or ""), "variant": variant, "windows": WINDOWS,
              "seq_len": SEQ_LEN, "rows": ROWS}
        found = store.read(path, fp) if args.render_only else store.get(
            path, fp, lambda s=setting, v=variant: measure(s, v), f"{name} {variant}")
        if found is not None:
            results[(name, variant)] = found
    flags = [f"--only={args.only}"] if args.only else []
    harness.write_page(PAGE, render(results, harness.page_command("calibration", flags)))
    return 0
