"""`restorelcc demo`: its job spec, the reading printed under the table, the filter on the service's log."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from app.schemas import JobSpec
from worker.cli.demo import HEADLINE, demo_spec, forward_log, is_service_info, read_gap, reading


def _metrics(rows: dict[str, tuple[float, float, float]], n: int | None = None) -> dict[str, dict]:
    """{"set.key": (dense, pruned, restored)} → a report's metrics."""
    out: dict[str, dict] = {"dense": {}, "pruned": {}, "restored": {}}
    for label, values in rows.items():
        set_name, key = label.split(".")
        for col, v in zip(("dense", "pruned", "restored"), values, strict=True):
            entry = out[col].setdefault(set_name, {})
            entry[key] = v
            if n is not None:
                entry["n"] = n
    return out


def test_spec_is_valid_and_uses_the_service_defaults(tmp_path):
    spec = JobSpec.model_validate(demo_spec(tmp_path / "m", tmp_path / "d", 40))
    r = spec.restoration
    assert (r.heads, r.directions, r.lr) == (0.8, 0.66, 3e-3) and r.max_steps == 40
    assert r.response_eos is False  # passages continued: no EOS where the text does not end as an answer would
    assert spec.data.train == str(tmp_path / "d" / "instructions" / "train.jsonl")
    stems = {Path(p).stem for p in spec.evaluation.perplexity + spec.evaluation.response_perplexity}
    assert stems == {h.split(".")[0] for h in HEADLINE}  # every headline metric is measured
    assert "train" not in stems  # and none on the rows it trains on


def test_gap_closed_for_perplexity_and_accuracy():
    g = read_gap("wikitext_sentences.ppl", dense=356, pruned=636, restored=590)
    assert g.closed == pytest.approx(46 / 280) and g.between and not g.higher_is_better
    acc = read_gap("piqa.acc", dense=0.66, pruned=0.60, restored=0.63)
    assert acc.closed == pytest.approx(0.5) and acc.higher_is_better
    assert read_gap("x.ppl", 10, 20, 25).closed == pytest.approx(-0.5)  # worse than pruned
    assert not read_gap("x.ppl", 10, 20, 25).between
    assert read_gap("x.ppl", 10, 20, 8).closed == pytest.approx(1.2)  # past dense
    assert read_gap("x.ppl", 10, 9, 9.5).closed is None  # pruning did not hurt: no gap


def test_accuracy_noise_needs_rows():
    assert read_gap("piqa.acc", 0.66, 0.60, 0.63).noise is None
    small = read_gap("piqa.acc", 0.66, 0.60, 0.63, n=100)
    assert small.noise == pytest.approx(2 * (2 * 0.63 * 0.37 / 100) ** 0.5) and small.within_noise
    assert not read_gap("piqa.acc", 0.66, 0.60, 0.63, n=100_000).within_noise


def test_reading_between_everywhere():
    lines = reading(_metrics({"wikitext_sentences.ppl": (356, 636, 590),
                              "wikipedia_heldout.response_ppl": (10, 20, 15)}))
    assert lines[0] == ("- wikitext_sentences.ppl (WikiText sentences, plain text): pruned 636 → restored 590, "
                        "dense 356: 16% of the gap closed")
    assert lines[1].endswith("50% of the gap closed")
    assert lines[-1] == ("On all 2 headline metrics (the perplexities) the restored model lies between the pruned and "
                         "the dense model.")


def test_reading_says_plainly_where_not_between_and_why():
    lines = reading(_metrics({
        "wikitext_sentences.ppl": (356, 636, 712),  # worse than pruned
        "wikipedia_heldout.response_ppl": (10, 20, 8),  # past dense on the training source
        "multilexsum.response_ppl": (30, 60, 50),
    }))
    assert "worse than the pruned model" in lines[0] and "-27% of the gap closed" in lines[0]
    assert "past the dense model: the restoration was trained on this source" in lines[1]
    assert lines[2].endswith("33% of the gap closed")
    assert lines[-1] == ("Not between pruned and dense on 2 of 3 headline metrics: wikitext_sentences.ppl, "
                         "wikipedia_heldout.response_ppl (see above).")


def test_reading_accuracy_is_not_headline_and_carries_its_noise():
    lines = reading(_metrics({"wikitext_sentences.ppl": (356, 636, 590), "piqa.acc": (0.66, 0.60, 0.70)}, n=100))
    assert "pruned and dense differ by less than the sampling noise" in lines[1]
    assert lines[-1].startswith("On all 1 headline metrics")  # PIQA off the line is not a headline miss
    between = reading(_metrics({"piqa.acc": (0.66, 0.60, 0.62)}, n=100))
    assert between[0].endswith("33% of the gap closed (within the sampling noise of 100 rows, ±0.14: read it loosely)")
    past = reading(_metrics({"piqa.acc": (0.66, 0.40, 0.70)}, n=1000))
    assert "past the dense model on a source it never trained on" in past[0]
    worse = reading(_metrics({"wikipedia_heldout.response_ppl": (10, 20, 21)}))
    assert "worse than the pruned model even on its own training source" in worse[0]


def test_reading_no_gap_missing_columns_and_mean_acc():
    metrics = _metrics({"multilexsum.response_ppl": (30, 28, 29)})
    metrics["dense"]["boolq"] = {"acc": 0.6}  # no pruned/restored value: not read
    for col, v in zip(("dense", "pruned", "restored"), (0.6, 0.57, 0.61), strict=True):
        metrics[col]["mean_acc"] = v  # a number, not a set: the mean of task rows, not read again
    lines = reading(metrics)
    assert lines[0].endswith("pruning did not make this worse, so there is no gap to close")
    assert not any("boolq" in line or "mean_acc" in line for line in lines) and len(lines) == 1


def test_service_info_lines_are_dropped_and_everything_else_forwarded():
    info = [
        "2026-12-01 10:00:00,001 INFO alembic.runtime.plugins: setup plugin alembic.autogenerate.schemas\n",
        "2026-12-01 10:00:00,002 INFO alembic.runtime.migration: Context impl SQLiteImpl.\n",
        "2026-12-01 10:00:00,003 INFO alembic.runtime.migration: Will assume non-transactional DDL.\n",
        "2026-12-01 10:00:01,000 INFO restorelcc.worker: embedded worker polling sqlite:////x/jobs.db\n",
    ]
    kept = [
        "2026-12-01 10:00:00,004 WARNING alembic.runtime.migration: something odd\n",
        "2026-12-01 10:00:02,000 ERROR restorelcc.worker: job 1 failed\n",
        "Embedded worker started (pid 18002)\n",
        "INFO alembic.runtime.migration: a line of another format is not ours to judge\n",
        "Traceback (most recent call last):\n",
    ]
    assert all(is_service_info(line) for line in info)
    assert not any(is_service_info(line) for line in kept)
    src = io.BytesIO("".join(info[:1] + kept[:2] + info[1:] + kept[2:]).encode() + b"caf\xc3\xa9 \xff\n")
    dst = io.StringIO()
    forward_log(src, dst)
    assert dst.getvalue() == "".join(kept) + "caf\u00e9 \ufffd\n"
