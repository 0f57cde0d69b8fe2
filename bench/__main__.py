"""Every benchmark, one entry point (run from the repository root; data from ../shared/data or
$RESTORELCC_SHARED_DATA):

    python -m bench prune    magnitude vs Wanda vs SparseGPT, 50% and 2:4            docs/pruning.md
    python -m bench restore  one RestoreLCC run after Wanda 50% (--model)           docs/restoration[-MODEL].md
    python -m bench compare  RestoreLCC vs LoRA / DoRA / bias, Wanda 50%, 2:4       docs/results.md, results.png
    python -m bench search   RestoreLCC's setting on rows never evaluated          docs/search.md
    python -m bench objective  sft vs distill, two training sets, gap closed         docs/objective.md
    python -m bench speed    capture, SVD + probing, a training step, tokens/s      docs/speed.md
    python -m bench service  checkpoint writes per stage, polling under 16 clients  docs/speed.md (below)
    python -m bench scaling  time and memory against model size, the memory plan   docs/scaling.md
    python -m bench precision  bfloat16 against float32 on SmolLM2, over seeds      docs/scaling.md (below)
    python -m bench calibration  calibration windows with or without BOS first (Gemma 3) docs/calibration.md
    python -m bench mergedepth  the merge check's logit difference against depth     docs/scaling.md (below)
    python -m bench stop     training with or without the EOS after each response   docs/stopping.md

Each runs what its stored results (JSON under bench/results/, each with the fingerprint of what made it) do not
hold yet, then renders its page from the stored results; --render-only runs nothing. The targets a page checks
are data: bench/targets.json.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Benchmark name -> module with add_args(parser) and main(args, argv). A new benchmark is one more line.
BENCHMARKS = {
    "prune": "bench.prune",
    "restore": "bench.restore",
    "compare": "bench.compare",
    "search": "bench.search",
    "objective": "bench.objective",
    "speed": "bench.speed",
    "service": "bench.service",
    "scaling": "bench.scaling",
    "precision": "bench.precision",
    "calibration": "bench.calibration",
    "mergedepth": "bench.mergedepth",
    "stop": "bench.stop",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    raw = argparse.RawDescriptionHelpFormatter
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=raw)
    sub = ap.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    modules = {name: importlib.import_module(path) for name, path in BENCHMARKS.items()}
    for name, mod in modules.items():
        first = mod.__doc__.splitlines()[0].replace("%", "%%")
        p = sub.add_parser(name, help=first, description=mod.__doc__, formatter_class=raw)
        p.add_argument("--render-only", action="store_true", help="run nothing: rewrite the page from stored results")
        mod.add_args(p)
    args = ap.parse_args(argv)
    return modules[args.benchmark].main(args, argv[argv.index(args.benchmark) + 1:])


if __name__ == "__main__":
    sys.exit(main())
