"""The benchmark harness without models: plans, fingerprints of every stored result, the pages from stored
results (byte for byte), the targets as data, and that bench's imports of app/ and worker/ resolve."""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import shlex
from pathlib import Path

import pytest

from app.schemas import JobSpec
from bench import compare, harness, plan, prune, restore, search, speed
from bench.__main__ import BENCHMARKS
from bench.__main__ import main as bench_main

DATA = plan.Data(train="/d/train.jsonl", wikitext="/d/wikitext_sentences.jsonl", alpaca_valid="/d/valid.jsonl",
                 tasks=("/d/boolq.jsonl", "/d/piqa.jsonl", "/d/openbookqa.jsonl"))
TARGETS = harness.TARGETS["compare"]
QUALITY = harness.RESULTS / "quality"


def _quality(root: Path, data: plan.Data = DATA) -> compare.Runner:
    return compare.Runner(plan.Budget(), data, None, harness.Store(root))


@pytest.fixture
def stored(monkeypatch: pytest.MonkeyPatch) -> compare.Runner:
    """The committed comparison results, read with the data folder they were measured with."""
    wikitext = json.loads((QUALITY / "dense.json").read_text())["fingerprint"]["evaluation"]["perplexity"][0]
    root = Path(wikitext).parents[1]  # <data>/eval/wikitext_sentences.jsonl
    monkeypatch.setattr(harness, "SHARED_DATA", root)
    data = plan.Data(train=str(root / "alpaca/train.jsonl"), wikitext=wikitext,
                     alpaca_valid=str(root / "alpaca/valid.jsonl"),
                     tasks=tuple(str(root / "eval" / f"{t}.jsonl") for t in ("boolq", "piqa", "openbookqa")))
    return _quality(QUALITY, data)


# ── stored results and the pages they feed ──────────────────────────────────────────────────────────────


def test_every_stored_result_has_the_fingerprint_todays_plan_computes(stored: compare.Runner) -> None:
    b, d = stored.budget, stored.data
    want: dict[Path, dict] = {QUALITY / "dense.json": {"evaluation": plan.evaluation(d, b)}}
    for s, m, seed in plan.plan(b, plan.Selection()):
        want[stored.result(s.key, m.key, seed)] = plan.expected_fingerprint(b, d, s.key, m.key, seed)
    for s in plan.SETTINGS:
        want[stored.result(s.key, "pruned", 0)] = plan.expected_fingerprint(b, d, s.key, "pruned", 0)
    # The search: its points are the ones the command in its manifest asks for, in the manifest's order.
    folder = QUALITY / "search" / "wanda-50"
    setting, manifest = plan.setting_by_key("wanda-50"), json.loads((folder / "manifest.json").read_text())
    ap = argparse.ArgumentParser()
    search.add_args(ap)
    points = search.points_of(ap.parse_args(shlex.split(manifest["command"])[4:]), b.steps)
    assert [f"{search.point_name(p)}.json" for p in points] == manifest["points"]
    ev = plan.evaluation(d, b, alpaca=str(QUALITY / "search" / "alpaca_select.jsonl"), alpaca_limit=300, tasks=False,
                         wikitext=False)
    want[folder / "pruned.json"] = {"evaluation": ev, "pruned_by": plan.pruning_spec(setting, b)}
    for p in points:
        want[folder / f"{search.point_name(p)}.json"] = plan.restore_fingerprint(
            setting, plan.method_by_key("restorelcc"), b, d, 0, ev, search.point_overrides(p))
    for n, name in manifest["lora"].items():
        want[folder / name] = plan.restore_fingerprint(setting, plan.method_by_key("lora"), b, d, 0, ev,
                                                       {"max_steps": int(n)})
    stored_files = {p for p in QUALITY.rglob("*.json") if p.name != "manifest.json" and "runs" not in p.parts
                    and not p.name.endswith(".stale.json")}
    assert stored_files == set(want)  # every stored result is checked, and every planned one is stored
    for path, fp in want.items():
        got = json.loads(path.read_text())["fingerprint"]
        assert harness.normalise(got) == harness.normalise(fp), path
    keep, other = stored.current_results()
    assert other == [] and len(keep) == 28


def test_render_only_rewrites_the_committed_pages_byte_for_byte(stored: compare.Runner, tmp_path: Path) -> None:
    compare.render(stored, tmp_path, "python -m bench compare", TARGETS)
    assert (tmp_path / "results.md").read_bytes() == (harness.DOCS / "results.md").read_bytes()
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    search.render(stored, tmp_path, plan.setting_by_key("wanda-50"), 300, 300, "not used: the manifest names it")
    assert (tmp_path / "search.md").read_bytes() == (harness.DOCS / "search.md").read_bytes()
    # The page closes with the notes stored next to the results, and its targets come from targets.json.
    text = (tmp_path / "results.md").read_text()
    assert text.endswith((QUALITY / "notes.md").read_text()) and "(target ≤ 1.05× with ≤ 5%: not met)" in text


def test_targets_are_data_the_pages_read() -> None:
    rows = compare.collect(_fake_results()[0])["wanda-50"]
    strict = "\n".join(compare.verdict(rows, TARGETS))
    loose = "\n".join(compare.verdict(rows, {**TARGETS, "ratio_vs_lora": 1.2, "params_vs_lora": 0.2}))
    assert "(target ≤ 1.05×: not met)" in strict and "(target ≤ 1.2×: met)" in loose
    assert "(target ≤ 20%: met)" in loose
    assert set(harness.TARGETS) == {"prune", "restore", "compare", "speed", "service"}


# ── the plan ─────────────────────────────────────────────────────────────────────────────────────────────


def test_plan_main_rows_run_every_seed_others_first_seed_only() -> None:
    runs = plan.plan(plan.Budget(seeds=(0, 1)), plan.Selection())
    count = {(s.key, m.key): 0 for s, m, _ in runs}
    for s, m, _ in runs:
        count[(s.key, m.key)] += 1
    assert count[("wanda-50", "restorelcc")] == 2 and count[("wanda-50", "lora")] == 2
    assert count[("sparsegpt-2-4", "bias-all")] == 2
    assert count[("wanda-50", "dora")] == 1 and count[("wanda-50", "restorelcc-random")] == 1
    assert count[("sparsegpt-2-4", "restorelcc-default")] == 2  # the recommended setting has a spread too
    assert count[("wanda-50", "restorelcc-default-random")] == count[("wanda-50", "bias-default")] == 1
    assert len(runs) == 2 * (4 * 2 + 5)
    assert {k for pair in plan.ABLATIONS.values() for k in pair} <= {m.key for m in plan.METHODS}


def test_only_selects_and_rejects_unknown_names() -> None:
    sel = plan.parse_only(["wanda-50/restorelcc,wanda-50/bias-*", "*/lora"])
    runs = {(s.key, m.key) for s, m, _ in plan.plan(plan.Budget(), sel)}
    assert runs == {("wanda-50", "restorelcc"), ("wanda-50", "bias-probe"), ("wanda-50", "bias-all"),
                    ("wanda-50", "bias-default"), ("wanda-50", "lora"), ("sparsegpt-2-4", "lora")}
    assert plan.parse_only(["sparsegpt-2-4"]).wants("sparsegpt-2-4", "dora")
    assert not plan.parse_only(["sparsegpt-2-4"]).wants("wanda-50", "dora")
    with pytest.raises(ValueError, match="no setting"):
        plan.parse_only(["wanda-60/lora"])
    with pytest.raises(ValueError, match="no method"):
        plan.parse_only(["wanda-50/lorax"])


def test_jobs_are_valid_specs_with_equal_budgets() -> None:
    b = plan.Budget(steps=7, lr_offsets=0.02, lr_adapter=3e-4)
    ev = plan.evaluation(DATA, b)
    prune_spec = JobSpec.model_validate(plan.prune_job(plan.SETTINGS[1], b, DATA, "/m/dense", ev))
    assert prune_spec.pruning.pattern == "2:4" and prune_spec.restoration.method == "none" and prune_spec.seed == 0
    assert prune_spec.evaluation.limits == {"valid": 300, "boolq": 500, "piqa": 500, "openbookqa": 500}
    specs = {m.key: JobSpec.model_validate(plan.restore_job(m, b, DATA, "/m/pruned", "/m/dense", 3))
             for m in plan.METHODS}  # a field of another method would be refused here
    for s in specs.values():
        assert s.pruning.method == "none" and s.seed == 3 and s.model.dense == "/m/dense"
        assert (s.restoration.max_steps, s.restoration.batch_size, s.data.train) == (7, 8, DATA.train)
    assert specs["lora"].restoration.lr == 3e-4 and specs["bias-all"].restoration.lr == 0.02
    assert specs["bias-probe"].restoration.head_selection == "probe" and specs["dora"].output.format == "adapter"
    # The service-default row ignores the bench's budget for heads and lr: it is what an unset spec gets.
    unset = JobSpec.model_validate({"model": {"id": "m"}, "data": {"train": "t.jsonl"}}).restoration
    default = specs["restorelcc-default"].restoration
    assert (default.heads, default.lr, default.directions) == (unset.heads, unset.lr, unset.directions)
    assert default.max_steps == 7  # the step budget is still shared
    for key, method, selection in (("restorelcc-default-random", "restorelcc", "random"),
                                   ("bias-default", "bias", "probe")):
        r = specs[key].restoration
        assert (r.method, r.head_selection, r.heads, r.lr) == (method, selection, unset.heads, unset.lr)
    assert specs["restorelcc-default-random"].restoration.directions == unset.directions
    assert specs["restorelcc"].restoration.directions is None is specs["restorelcc-random"].restoration.directions


def test_jobs_carry_only_their_methods_fields_and_fingerprints_keep_the_flat_form() -> None:
    b, fields = plan.Budget(), plan.contract()["fields"]
    for m in plan.METHODS:
        r = plan.restoration_spec(m, b)
        assert set(r) <= set(fields[r["method"]]), m.key
        assert {"heads", "probe_samples", "lora_r", "lora_alpha", "lora_targets"} <= set(
            plan.restoration_spec(m, b, legacy=True))
    assert "lora_r" not in plan.restoration_spec(plan.method_by_key("restorelcc"), b)
    assert "heads" not in plan.restoration_spec(plan.method_by_key("lora"), b)
    point = plan.restoration_spec(plan.method_by_key("restorelcc"), b, {"method": "bias", "head_selection": "all"})
    assert point["method"] == "bias" and "directions" not in point
    # Model paths play no part; the legacy form is what the fingerprint is made of.
    lora, ev = plan.method_by_key("lora"), plan.evaluation(DATA, b)
    fp = plan.restore_fingerprint(plan.SETTINGS[0], lora, b, DATA, 0, ev)
    assert fp["job"]["restoration"]["heads"] == 0.1 and fp["pruned_by"]["method"] == "wanda"


def test_all_directions_keep_the_fingerprint_of_runs_stored_before_the_setting_existed() -> None:
    b, m = plan.Budget(), plan.method_by_key("restorelcc")
    job = plan.restore_job(m, b, DATA, "/a", "/d", 0)
    assert job["restoration"]["directions"] is None  # sent to the pipeline: all directions, not the default
    before = {**job, "restoration": {k: v for k, v in job["restoration"].items() if k != "directions"}}
    ev = plan.evaluation(DATA, b)
    assert plan.fingerprint(job, ev) == plan.fingerprint(before, ev)
    top = plan.restore_job(m, b, DATA, "/a", "/d", 0, overrides={"directions": 30})
    assert plan.fingerprint(top, ev) != plan.fingerprint(job, ev)


# ── the runner's store ───────────────────────────────────────────────────────────────────────────────────


def test_pages_show_only_results_todays_plan_would_reuse(tmp_path: Path) -> None:
    q = _quality(tmp_path)
    for key in ("lora", "restorelcc-default"):
        fp = plan.expected_fingerprint(q.budget, DATA, "wanda-50", key, 0)
        q.store.save(q.result("wanda-50", key, 0), {"setting": "wanda-50", "method": key, "seed": 0, "rows": {},
                                                    "fingerprint": fp})
    old = json.loads(q.result("wanda-50", "restorelcc-default", 0).read_text())
    old["fingerprint"]["job"]["restoration"]["heads"] = 0.123  # stored before the service default changed
    q.store.save(q.result("wanda-50", "restorelcc-default", 0), old)
    keep, other = q.current_results()
    assert [r["method"] for r in keep] == ["lora"] and other == ["wanda-50/restorelcc-default/seed0"]
    assert q.result("wanda-50", "restorelcc-default", 0).is_file()  # only left off the page, not moved
    assert plan.expected_fingerprint(q.budget, DATA, "wanda-50", "no-such-method", 0) is None


def test_store_reuses_matching_results_and_sets_aside_stale_ones(tmp_path: Path) -> None:
    store, b, m = harness.Store(tmp_path), plan.Budget(), plan.method_by_key("lora")

    def fp(budget: plan.Budget, pruned: str, dense: str) -> dict:
        return plan.fingerprint(plan.restore_job(m, budget, DATA, pruned, dense, 0), plan.evaluation(DATA, budget))

    path = tmp_path / "r.json"
    made = store.get(path, fp(b, "/a", "/d"), lambda: {"rows": {"x": 1}}, "r")
    assert made["rows"] == {"x": 1} and json.loads(path.read_text())["fingerprint"] == fp(b, "/a", "/d")
    again = store.get(path, fp(b, "/b", "/e"), lambda: pytest.fail("ran again"), "r")  # model paths: no part
    assert again == made
    b2 = plan.Budget(steps=51)
    assert store.read(path, fp(b2, "/a", "/d")) is None and path.is_file()  # read never moves anything
    assert store.load(path, fp(b2, "/a", "/d")) is None
    assert not path.exists() and path.with_suffix(".stale.json").is_file()


def test_a_result_stored_from_another_checkout_is_reused(tmp_path: Path) -> None:
    """The search's selection rows live in the checkout: a fingerprint naming them must not tie a stored
    result to the folder it was measured in."""
    store, path = harness.Store(tmp_path), tmp_path / "wanda-50" / "pruned.json"

    def fp(checkout: str, name: str = "select") -> dict:
        return {"evaluation": {"response_perplexity": [f"{checkout}/bench/results/quality/search/{name}.jsonl"]}}

    store.save(path, {"fingerprint": fp("/work/main"), "rows": {}})
    assert store.load(path, fp("/tmp/elsewhere/clone")) is not None
    assert store.load(path, fp("/tmp/elsewhere/clone", "other")) is None  # other rows are still other settings
    assert path.with_suffix(".stale.json").is_file()


# ── the comparison page ──────────────────────────────────────────────────────────────────────────────────


def _metrics(ppl: float, acc: float) -> dict:
    return {
        "wikitext_sentences": {"ppl": ppl * 2, "nll": 1.0, "tokens": 10},
        "valid": {"response_ppl": ppl, "nll": 1.0, "tokens": 10},
        "boolq": {"acc": acc, "acc_norm": acc, "n": 4},
        "piqa": {"acc": acc, "acc_norm": acc, "n": 4},
        "openbookqa": {"acc": acc, "acc_norm": acc, "n": 4},
        "mean_acc": acc,
    }


def _result(setting: str, method: str, seed: int, rows: dict, info: dict | None = None) -> dict:
    return {"setting": setting, "method": method, "seed": seed, "rows": rows, "info": info or {},
            "seconds": {"total": 12.0, "train": 3.0, "eval_merged": 5.0, "stages": {"probing": 1.0}}}


def _row(ppl: float, acc: float, params: int, seconds: float | None = None) -> dict:
    return {"metrics": _metrics(ppl, acc), "trainable_params": params,
            **({"train_seconds": seconds} if seconds is not None else {})}


def _fake_results() -> tuple[list[dict], dict]:
    dense = {"rows": {"dense": {"metrics": _metrics(10.0, 0.6)}}}
    res = [
        _result("wanda-50", "pruned", 0, {"pruned": _row(20.0, 0.5, 0)}, {"sparsity": 0.5}),
        _result("wanda-50", "restorelcc", 0, {"restorelcc": _row(15.0, 0.52, 100, 3.0)},
                {"chosen_heads": [[0, 1], [2, 3], [4, 5]]}),
        _result("wanda-50", "restorelcc", 1, {"restorelcc": _row(17.0, 0.54, 100, 5.0)}, {"chosen_heads": [[0, 1]]}),
        _result("wanda-50", "bias-probe", 0, {"bias-probe": _row(16.0, 0.5, 10, 1.0)},
                {"chosen_heads": [[0, 1], [2, 3], [9, 9]]}),
        _result("wanda-50", "lora", 0, {"lora/unmerged": _row(14.0, 0.55, 999, 4.0),
                                        "lora/merged": _row(18.0, 0.51, 999, 4.0)},
                {"unmerged_inference_overhead": {"extra_params": 999, "extra_matmuls_per_token": 4,
                                                 "extra_flops_per_token": 3996, "extra_flops_per_token_rel": 0.01},
                 "remask_update_lost_rel": 0.5, "remasked_weights": 7}),
    ]
    return res, dense


def test_fmt_shows_mean_and_spread() -> None:
    assert compare.fmt([0.5], "acc") == "50.0" and compare.fmt([0.5, 0.6], "acc") == "55.0 ± 7.1"
    assert compare.fmt([10.0, 12.0], "ppl") == "11.00 ± 1.41" and compare.fmt([1234.0], "int") == "1,234"
    assert compare.fmt([], "ppl") == "—"


def test_table_has_every_row_in_order_with_seeds_spread_and_missing_rows() -> None:
    res, dense = _fake_results()
    lines = compare.table(compare.collect(res)["wanda-50"], dense["rows"]["dense"]).splitlines()
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == [label for _, label in compare.row_order()]
    by = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in lines[2:]}
    rlcc = by["RestoreLCC (probed heads)"]
    assert rlcc[0] == "2" and rlcc[2] == "16.00 ± 1.41" and rlcc[-1] == "-20.0%"
    assert by["pruned"][2] == "20.00" and by["dense"][2] == "10.00" and by["dense"][-3] == "—"
    assert by["LoRA r=8 q,v, unmerged adapter"][2] == "14.00"
    assert by["LoRA r=8 q,v, merged, mask re-applied"][-1] == "-10.0%"
    assert by["DoRA r=8 q,v, merged, mask re-applied"][0] == "0"  # not run: shown, empty


def test_notes_report_head_overlap_and_adapter_overhead() -> None:
    res, _ = _fake_results()
    assert compare.head_overlap(res, "wanda-50") == [("restorelcc", 0, 2, 3)]
    text = "\n".join(compare.notes(res, "wanda-50"))
    assert "Heads of bias only (RestoreLCC's heads) vs RestoreLCC (probed heads), seed 0: 2 of 3 shared" in text
    assert "999 extra parameters" in text and "+1.00%" in text and "50.0%" in text
    res += [_result("wanda-50", "restorelcc-default", 0, {}, {"chosen_heads": [[0, 1], [2, 3], [4, 5], [6, 7]]}),
            _result("wanda-50", "bias-default", 0, {}, {"chosen_heads": [[0, 1], [2, 3], [4, 5], [6, 7]]})]
    assert compare.head_overlap(res, "wanda-50") == [("restorelcc", 0, 2, 3), ("restorelcc-default", 0, 4, 4)]


def test_verdict_compares_restorelcc_with_pruned_and_lora() -> None:
    rows = compare.collect(_fake_results()[0])["wanda-50"]
    text = "\n".join(compare.verdict(rows, TARGETS))
    assert "Alpaca response ppl: 16.00 vs 20.00 — **better**" in text
    assert "WikiText ppl: 32.00 vs 40.00 — **better**" in text and "mean acc: 53.0 vs 50.0 — **better**" in text
    assert "**1.143×** (target ≤ 1.05×: not met)" in text  # 16 / 14
    assert "**10.01%** of LoRA's (target ≤ 2%: not met)" in text  # 100 / 999
    assert ("vs bias only on the same heads (no directions): Alpaca response ppl 16.00 vs 16.00 (equal); "
            "WikiText ppl 32.00 vs 32.00 (equal); mean acc 53.0 vs 50.0 (better).") in text
    text = "\n".join(compare.verdict({**rows, "restorelcc": [_row(25.0, 0.4, 10)]}, TARGETS))
    assert "Alpaca response ppl 25.00 vs 16.00 (**worse**)" in text and text.count("**not better**") == 3
    assert "**1.786×** (target ≤ 1.05×: not met)" in text and "**1.00%** of LoRA's (target ≤ 2%: met)" in text
    # numbers that look equal at two decimals get the decimals that tell them apart beside 'worse'
    text = "\n".join(compare.verdict({**rows, "restorelcc": [_row(16.0004, 0.53, 10)]}, TARGETS))
    assert "Alpaca response ppl 16.0004 vs 16.0000 (**worse**)" in text and "service default vs pruned" not in text
    assert compare.verdict({"pruned": rows["pruned"]}, TARGETS) == ["RestoreLCC vs pruned: not measured yet."]
    default = [_row(12.0, 0.45, 40), _row(14.0, 0.47, 40)]
    text = "\n".join(compare.verdict({**rows, "restorelcc-default": default}, TARGETS))
    assert ("RestoreLCC at the service default vs pruned: Alpaca response ppl 13.00 vs 20.00 (better); "
            "WikiText ppl 26.00 vs 40.00 (better); mean acc 46.0 vs 50.0 (**worse**).") in text
    assert "service default / unmerged LoRA, Alpaca response ppl: **0.929×** with 4.00% of LoRA's" in text
    assert "Ablation, RestoreLCC at the service default" not in text  # its ablations are not measured here


def test_coverage_names_what_is_missing() -> None:
    text = compare.coverage(_fake_results()[0])
    total = len(plan.plan(plan.Budget(), plan.Selection()))
    assert f"4 of the {total} restoration runs" in text and "partial" in text
    assert "`wanda-50/lora/seed1`" in text and "`wanda-50/restorelcc/seed0`" not in text
    full = [_result(s.key, m.key, seed, {}) for s, m, seed in plan.plan(plan.Budget(), plan.Selection())]
    assert compare.coverage(full) == f"**Coverage.** All {total} restoration runs of the full plan are measured."


def test_markdown_and_chart(tmp_path: Path) -> None:
    res, dense = _fake_results()
    png = compare.chart(res, dense, tmp_path / "results.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = compare.markdown(res, dense, plan.Budget().as_dict(), "python -m bench compare", TARGETS,
                            notes_text="## Reading the results\n\nBy hand.\n")
    assert "## Wanda 50% unstructured" in text and "## SparseGPT 2:4" in text and "Not run yet." in text
    assert "(results.png)" in text and "| wanda-50 | restorelcc | 1 | ? | 12 |" in text
    assert text.endswith("| — |\n\n## Reading the results\n\nBy hand.\n")
    assert compare.chart([], None, tmp_path / "none.png") is None


def test_a_ratio_just_over_the_target_never_prints_as_the_target() -> None:
    assert compare.ratio_text(1.0503, 1.05) == "1.0503" and compare.ratio_text(1.0496, 1.05) == "1.0496"
    assert compare.ratio_text(1.0506, 1.05) == "1.051" and compare.ratio_text(1.05, 1.05) == "1.050"
    assert compare.ratio_text(1.0503, 1.1) == "1.050"  # the target is data: only its own value is guarded


def test_machine_line_names_every_cpu_the_runs_came_from() -> None:
    env = {"device": "cpu", "cpu": "Xeon", "cpus": 2, "threads": 2, "python": "3.11.7", "torch": "2.13.0"}
    res, _ = _fake_results()
    assert compare.machines(res) == ""  # no run says where it ran
    res = [{**r, "environment": env} for r in res]
    assert compare.machines(res) == "**Machine.** cpu (Xeon, 2 CPUs, 2 torch threads), Python 3.11.7, torch 2.13.0."
    res[0] = {**res[0], "environment": {**env, "cpu": "EPYC"}}
    line = compare.machines(res)
    assert line.startswith("**Machines.**") and "on 2 kinds of machine" in line
    assert "(EPYC, 2 CPUs, 2 torch threads), Python 3.11.7, torch 2.13.0: 1 runs." in line
    assert "| EPYC |" in compare.timings(res) and "| Xeon |" in compare.timings(res)


# ── the search ───────────────────────────────────────────────────────────────────────────────────────────


def test_selection_rows_never_overlap_evaluated_rows_and_points_parse(tmp_path: Path) -> None:
    src = tmp_path / "valid.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"p{i}", "response": f" r{i}"}) + "\n" for i in range(10)))
    path = search.write_selection(str(src), tmp_path, 6, 3, eval_rows=6)
    assert [json.loads(x)["prompt"] for x in path.read_text().splitlines()] == ["p6", "p7", "p8"]
    with pytest.raises(ValueError, match="inside the evaluated rows"):
        search.write_selection(str(src), tmp_path, 5, 3, eval_rows=6)
    with pytest.raises(ValueError, match="do not exist"):
        search.write_selection(str(src), tmp_path, 8, 3, eval_rows=6)
    scored = tmp_path / "search" / "wanda-50" / "lora.json"
    scored.parent.mkdir()
    scored.write_text("{}")
    search.write_selection(str(src), tmp_path, 6, 3, eval_rows=6)  # the same rows: scores kept
    assert scored.is_file()
    search.write_selection(str(src), tmp_path, 7, 3, eval_rows=6)  # other rows: scores set aside
    assert not scored.is_file() and scored.with_suffix(".stale.json").is_file()
    assert len(search.grid([0.1, 0.2], [1e-2], [10, 20])) == 4
    parse, name = search.parse_point, search.point_name
    assert parse("0.6:1e-2:100") == {"heads": 0.6, "lr": 0.01, "max_steps": 100}
    cosine = parse("0.66:6e-3:50:cosine:5")
    assert cosine == {"heads": 0.66, "lr": 0.006, "max_steps": 50, "lr_schedule": "cosine", "warmup_steps": 5}
    assert name(cosine) == "h0.66-lr0.006-s50-cosine-w5" and search.schedule_text(cosine) == "cosine, 5 warm-up"
    assert parse("0.6:3e-3:50:constant:0") == parse("0.6:3e-3:50") and name(parse("0.6:3e-3:50")) == "h0.6-lr0.003-s50"
    assert parse("heads=0.66,lr=6e-3,steps=50,schedule=cosine,warmup=5") == cosine
    top = parse("heads=0.9,lr=3e-3,steps=50,directions=30")
    assert name(top) == "h0.9-lr0.003-s50-d30" and search.point_overrides(top) == top
    bias_all = parse("heads=all,lr=3e-3,steps=50,method=bias")
    assert name(bias_all) == "bias-hall-lr0.003-s50"
    assert search.point_overrides(bias_all) == {"head_selection": "all", "lr": 0.003, "max_steps": 50,
                                                "method": "bias"}
    for bad, why in (("0.6:1e-2", "HEADS:LR:STEPS"), ("0.6:1e-2:50:step", "schedule 'step'"),
                     ("0.6:1e-2:50:cosine:50", "warm-up"), ("heads=0.9,lr=3e-3", "grid point"),
                     ("heads=0.9,lr=3e-3,steps=50,colour=red", "grid point"),
                     ("heads=all,lr=3e-3,steps=50,method=bias,directions=4", "grid point"),
                     ("heads=0.9,lr=3e-3,steps=50,directions=0", "grid point")):
        with pytest.raises(ValueError, match=why):
            parse(bad)


def _point(heads: float, lr: float, ppl: float, params: int, steps: int = 50) -> dict:
    row = {"metrics": {"alpaca_select": {"response_ppl": ppl}}, "trainable_params": params, "train_seconds": 1.0}
    return {"point": {"heads": heads, "lr": lr, "max_steps": steps}, "rows": {"restorelcc": row}}


def _lora(ppl: float, steps: int = 50) -> dict:
    row = {"metrics": {"alpaca_select": {"response_ppl": ppl}}, "trainable_params": 1000}
    merged = {**row, "metrics": {"alpaca_select": {"response_ppl": ppl * 1.04}}}
    return {"rows": {"lora/unmerged": row, "lora/merged": merged},
            "fingerprint": {"job": {"restoration": {"lr": 1e-3, "max_steps": steps}}}}


def test_search_winner_respects_the_parameter_cap_and_says_whether_it_meets_the_target() -> None:
    lora = {50: _lora(10.0)}
    points = [_point(0.1, 1e-2, 11.0, 20), _point(0.3, 1e-2, 10.4, 50), _point(0.9, 1e-2, 10.1, 60)]
    found = search.Search(points, pruned_ppl=15.0, lora_at=lora, steps=50)
    assert search.winner(found, 0.05)["point"]["heads"] == 0.3  # 0.9 scores better but trains 6% of LoRA's
    assert search.winner(found, 0.06)["point"]["heads"] == 0.9  # the cap is data

    def page(pts: list[dict], cmd: str = "c") -> str:
        return search.search_markdown(search.Search(pts, 15.0, lora, 50), plan.SETTINGS[0], cmd, 300, 300, 300,
                                      TARGETS)

    text = page(points)
    assert "1.040× unmerged LoRA at 50 steps, which meets the 1.05× target" in text
    assert '"restoration": {"heads": 0.3, "lr": 0.01}` with `"max_steps": 50`' in text
    assert "| 1 | 0.9 | all | 0.01 | constant |" in text and "several sessions" not in text
    text = page([{**points[0], "environment": {"cpu": "AMD EPYC"}}, *points[1:]])
    assert "in several sessions on 2 CPUs (column cpu; ?, AMD EPYC)" in text and "| 1 | AMD EPYC |" in text
    assert "does **not** meet" in page(points[:1])
    top = _point(0.3, 3e-3, 10.0, 50)
    top["point"]["directions"] = 20
    text = page([*points, top])
    assert ('Best: heads 0.3, directions 20, lr 0.003 (constant), 50 steps. In a job: `"restoration": {"heads": '
            '0.3, "lr": 0.003, "directions": 20}`') in text and search.BIAS_ROWS not in text
    bias = _point(0.3, 3e-3, 10.3, 50)
    bias["point"]["method"] = "bias"
    text = page([*points, bias])
    assert "| 2 | 0.3 | none (bias only) | 0.003 | constant |" in text and search.BIAS_ROWS in text
    assert "none is recommended" in page(points[2:])


def test_a_stored_search_is_summarised_on_the_results_page(tmp_path: Path) -> None:
    folder = tmp_path / "search" / "wanda-50"
    folder.mkdir(parents=True)
    assert search.load(tmp_path, "wanda-50") is None
    (folder / "lora.json").write_text(json.dumps(_lora(10.0)))
    (folder / "pruned.json").write_text(json.dumps({"metrics": {"alpaca_select": {"response_ppl": 15.0}}}))
    for i, (h, ppl, n) in enumerate([(0.1, 12.0, 20), (0.3, 11.0, 40), (0.2, 9.0, 30)]):
        (folder / f"h{h}-{i}.json").write_text(json.dumps(_point(h, 1e-2, ppl, n)))
    assert search.load(tmp_path, "wanda-50") is None  # no manifest: the search has not finished
    (folder / "manifest.json").write_text(json.dumps({"points": ["h0.1-0.json", "h0.3-1.json"],
                                                      "lora": {"50": "lora.json"}, "steps": 50}))
    found, command = search.load(tmp_path, "wanda-50")  # h0.2-2.json is a leftover of another search
    assert len(found.points) == 2 and found.pruned_ppl == 15.0 and command is None
    lines = search.summary(found, TARGETS)
    assert "lr schedules constant; directions per head all;" in lines[0]
    assert "heads 0.3, lr 0.01 (constant), 50 steps (40 trainable parameters, 4.00% of LoRA's)" in lines[1]
    assert "**1.100×** LoRA (target ≤ 1.05×: **not met**)" in lines[1]
    results, dense = _fake_results()
    text = compare.markdown(results, dense, plan.Budget().as_dict(), "cmd", TARGETS, search=lines)
    assert "## RestoreLCC's recommended setting" in text and lines[1] in text
    # A later grid with a longer step budget: its points are compared with LoRA trained as long.
    (folder / "h0.3-s100.json").write_text(json.dumps(_point(0.3, 1e-2, 8.4, 40, steps=100)))
    (folder / "lora-s100.json").write_text(json.dumps(_lora(8.0, steps=100)))
    (folder / "manifest.json").write_text(json.dumps({
        "points": ["h0.3-1.json", "h0.3-s100.json"], "lora": {"50": "lora.json", "100": "lora-s100.json"},
        "steps": 50, "command": "python -m bench search --grid-steps 100"}))
    found, command = search.load(tmp_path, "wanda-50")
    assert found.lora is found.lora_at[50] and command == "python -m bench search --grid-steps 100"
    won = search.winner(found, 0.05)  # 8.4 / 8.0 = 1.05 beats 11.0 / 10.0 = 1.10, though LoRA at 50 scores 10.0
    assert won["point"]["max_steps"] == 100 and search.ratio(found, won) == pytest.approx(1.05)
    assert "unmerged LoRA's 8.000 at the same steps, **1.050×**" in search.summary(found, TARGETS)[1]


# ── the other pages, from stored results ─────────────────────────────────────────────────────────────────


def _pruned(label_ppl: float, sparsity: float = 0.5, nm_ok: bool | None = None) -> dict:
    return {"rows": {"pruned": {"metrics": _metrics(label_ppl, 0.4)}},
            "info": {"sparsity": sparsity, "nm_ok": nm_ok, "pruning": {"seconds": 7.06}},
            "environment": {"device": "cpu", "cpu": "Xeon", "cpus": 2, "threads": 2, "python": "3.11.7",
                            "torch": "2.13.0"}}


def test_the_pruning_page_checks_its_targets_from_the_stored_results() -> None:
    results = {"magnitude-50%": _pruned(1000.0), "wanda-50%": _pruned(200.0), "sparsegpt-2:4": _pruned(300.0,
                                                                                                     nm_ok=True)}
    text = prune.page(results, {"rows": {"dense": {"metrics": _metrics(150.0, 0.4)}}}, plan.Budget(),
                      "python -m bench prune", [1, 1, 0, 1], harness.TARGETS["prune"])
    assert text.startswith("# Pruning quality: SmolLM2-135M-Instruct\n\nProduced by `python -m bench prune`")
    assert "| magnitude-50% | 50.00% | 2,000 | 1,000 |" in text and "| 7.1 |" in text and "| dense | — | 300 |" in text
    assert "- wanda-50% WikiText ppl / magnitude-50%'s = **0.200** (target ≤ 0.25)" in text
    assert "- sparsegpt-2:4: every pruned Linear has the exact 2:4 pattern: **True**" in text
    assert "\"yes\" in 75% of these 4 rows" in text and "**Machine.** cpu (Xeon, 2 CPUs" in text
    assert [s.key for s in prune.SETTINGS][:2] == ["magnitude-50", "wanda-50"]


def _report(directions: int | None) -> dict:
    metrics = {label: {"wikitext_sentences": {"ppl": ppl * 30}, "valid": {"response_ppl": ppl}}
               for label, ppl in (("dense", 6.0), ("pruned", 20.0), ("restored", 12.0))}
    rest = {"probe_samples": 256, "negatives_backend": "tfidf", "chosen_heads": [[0, 1], [2, 3]], "steps": 50,
            "trainable_params": 850, **({"directions_per_head": directions} if directions else {})}
    return {"metrics": metrics, "restoration": rest, "model": {"arch": {"head_dim": 256}},
            "stages": {"training": {"seconds": 1.0, "peak_rss_mb": 10}},
            "checks": {"merged_vs_hooked_max_abs_diff": 1e-6, "zeros_identical": True},
            "environment": {"device": "cpu", "threads": 2, "torch": "2.13.0"}}


def test_the_restoration_page_names_the_model_its_settings_and_the_target(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    demo, known = harness.models()
    settings = {"heads": 0.8, "lr": 3e-3, "steps": 50, "batch_size": 8, "probe": 256, "max_len": 256,
                "directions": 0.66, "group_by_length": False, "alpaca_limit": 300}
    text = restore.page(_report(169), settings, "python -m bench restore --model gemma3-270m",
                        "bench/results/restore/x.json", known["gemma3-270m"], 0.25)
    assert text.startswith("# RestoreLCC on gemma-3-270m (Wanda 50% unstructured)")
    assert "licence: Gemma Terms of Use" in text and "2 heads, β over each head's top 169 of 256 lost" in text
    assert "restored / pruned = **0.600** (40.0% lower; target ≥ 25%)" in text
    text = restore.page(_report(None), {**settings, "directions": None}, "c", "r", known[demo], 0.25)
    assert text.startswith("# RestoreLCC on SmolLM2-135M-Instruct") and "β over all lost directions" in text
    args = argparse.Namespace(model="gemma3-270m", heads=0.8, lr=3e-3, steps=50, batch_size=8, probe=256,
                              directions=0.66, group_by_length=False, max_len=256, alpaca_limit=300)
    assert restore.run_name(args) == "gemma3-270m-wanda50-h0.8-lr0.003-s50-b8-p256-d0.66"
    for name in ("alpaca/train.jsonl", "alpaca/valid.jsonl", "eval/wikitext_sentences.jsonl"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    monkeypatch.setattr(harness, "SHARED_DATA", tmp_path)
    spec = JobSpec.model_validate(restore.job(args, "/m"))
    assert (spec.restoration.method, spec.restoration.heads, spec.restoration.directions) == ("restorelcc", 0.8, 0.66)


def test_the_speed_page_is_rendered_from_the_stored_measurement() -> None:
    saved = {"settings": {"probe": 16, "batch_size": 8, "max_len": 256, "heads": 0.1, "repeats": 5,
                          "heads_from": None},
             "results": {"capture_s": 9.41, "forward_s": 9.25, "svd_s": 0.06, "probe_s": 0.3, "captures_s": 9.87,
                         "step_restorelcc_s": 6.52, "step_lora_s": 8.51, "restorelcc_params": 3456,
                         "lora_params": 460800, "earliest_chosen_layer": 11, "chosen_heads": 27,
                         "merged_tok_s": 610.0, "pruned_tok_s": 617.0},
             "backend": "minilm", "threads": 2, "date": "2026-11-28"}
    text = speed.page(saved, "python -m bench speed --probe=16", harness.TARGETS["speed"])
    assert "| capture vs plain forward | 9.41 s | 9.25 s | 1.017 | ≤ 1.2 | yes |" in text
    assert "| train step: RestoreLCC (3,456 p) vs LoRA (460,800 p) | 6.52 s | 8.51 s | 0.7662 | ≤ 0.9 | yes |" in text
    assert "| tokens/s: merged vs pruned | 610 | 617 | 0.9887 | ≥ 0.99 | **no** |" in text
    assert "0.1 of the heads, chosen by this run's probe; earliest chosen layer 11" in text


def test_benchmarks_sharing_a_page_each_rewrite_only_their_part(tmp_path: Path) -> None:
    page = tmp_path / "speed.md"
    page.write_text("# Speed\n\nold rows\n")
    harness.write_part(page, "service", "## The service\n\nfirst\n")
    harness.write_part(page, None, "# Speed\n\nnew rows\n")
    assert "new rows" in page.read_text() and "old rows" not in page.read_text()
    assert page.read_text().endswith("bench service -->\n## The service\n\nfirst\n")
    harness.write_part(page, "service", "## The service\n\nsecond\n")
    text = page.read_text()
    assert text.startswith("# Speed\n\nnew rows\n") and "first" not in text and text.count("## The service") == 1


def test_the_service_section_is_rendered_from_the_stored_measurements() -> None:
    from bench import service

    machine = {"threads": 2, "cpus": 2}
    checkpoints = {"settings": {"samples": 64, "eval_limit": 32}, "steps": 50, "machine": machine, "date": "d",
                   "stages": {"pruning": {"writes": 2, "bytes": 3 * 2**20, "seconds": 0.5, "stage_seconds": 20.0},
                              "training": {"writes": 1, "bytes": 2**20, "seconds": 0.3, "stage_seconds": 3.0}}}
    polling = {"settings": {"seconds": 20, "pollers": 16}, "machine": machine, "date": "d",
               "job": {"per_s": 812.0, "median_ms": 18.0, "p99_ms": 61.0, "errors": 0},
               "healthz": {"per_s": 1500.0, "median_ms": 9.0, "p99_ms": 30.0, "errors": 0},
               "write_quiet": {"median_ms": 2.0, "p99_ms": 4.0}, "write_polled": {"median_ms": 3.0, "p99_ms": 9.0}}
    text = service.section(checkpoints, polling, "python -m bench service")
    assert "| pruning | 2 | 3.0 MiB | 0.50 s | 20.0 s | 2.50 % | yes |" in text
    assert "| training | 1 | 1.0 MiB | 0.30 s | 3.0 s | 10.00 % | **no** |" in text
    assert "| GET /v1/jobs/{id} | 812 | 18.0 ms | 61.0 ms | 0 | **no** |" in text
    assert "at 0.54× its rate, so most of a status request's cost is the HTTP stack" in text
    assert "median 2.00 ms without pollers, 3.00 ms under them (1.50×" in text
    assert "not measured yet" in service.section(None, None, "c")


# ── one entry point, imports in one place ────────────────────────────────────────────────────────────────


def test_one_entry_point_for_every_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    assert set(BENCHMARKS) == {"prune", "restore", "compare", "search", "speed", "service", "scaling", "precision",
                               "objective", "calibration", "mergedepth", "stop"}
    for name in BENCHMARKS:
        with pytest.raises(SystemExit) as exit_:
            bench_main([name, "--help"])
        assert exit_.value.code == 0 and "--render-only" in capsys.readouterr().out
    argv = ["--only", "wanda-50/lora", "--seeds", "0", "--render-only", "--only=x"]
    assert harness.page_command("compare", argv) == "python -m bench compare --seeds 0"
    bench_dir = Path(harness.__file__).parent
    assert not any("sys.path" in p.read_text() for p in bench_dir.glob("*.py"))


def test_every_app_and_worker_import_in_bench_resolves() -> None:
    seen = []
    for path in sorted(Path(harness.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("app", "worker"):
                module = importlib.import_module(node.module)
                for alias in node.names:  # a name in the module, or a submodule of it
                    assert hasattr(module, alias.name) or importlib.import_module(f"{node.module}.{alias.name}"), (
                        f"{path.name}: {node.module}.{alias.name}")
                seen.append(node.module)
    assert "worker.run.pipeline" in seen and "app.methods" in seen


def test_the_runner_runs_a_tiny_plan_and_reuses_what_it_stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    """A tiny random model through the comparison's runner and the search (the --quick budget): every result is
    stored with its fingerprint, a second pass runs nothing, and the pages render from what was stored."""
    from dataclasses import replace

    from tests.tiny import choice_rows, instruction_rows, save_tiny, text_rows, write_jsonl

    d = tmp_path / "data"
    d.mkdir()
    data = plan.Data(train=str(write_jsonl(d / "train.jsonl", instruction_rows(32))),
                     wikitext=str(write_jsonl(d / "wikitext_sentences.jsonl", text_rows(8))),
                     alpaca_valid=str(write_jsonl(d / "valid.jsonl", instruction_rows(8))),
                     tasks=tuple(str(write_jsonl(d / f"{t}.jsonl", choice_rows(4))) for t in ("boolq", "piqa",
                                                                                              "openbookqa")))
    b = replace(plan.Budget(), **plan.QUICK, seeds=(0,))
    q = compare.Runner(b, data, str(save_tiny("llama", tmp_path / "tiny")), harness.Store(tmp_path / "quality"))
    q.run(plan.parse_only(["wanda-50/lora"]))
    select = search.write_selection(data.alpaca_valid, q.store.root, 4, 4, b.alpaca_limit)
    point = search.parse_point("heads=all,lr=1e-2,steps=3,method=bias")  # no probing: no embedding model
    search.run_search(q, plan.SETTINGS[0], [point], select, 4, "python -m bench search --quick")
    stored = sorted(str(p.relative_to(q.store.root)) for p in q.store.root.rglob("*.json") if "runs" not in p.parts)
    assert stored == ["dense.json", "search/wanda-50/bias-hall-lr0.01-s3.json", "search/wanda-50/lora.json",
                      "search/wanda-50/manifest.json", "search/wanda-50/pruned.json", "wanda-50/lora/seed0.json",
                      "wanda-50/pruned/seed0.json"]
    monkeypatch.setattr(harness, "run_job", lambda *a: pytest.fail("ran again"))
    monkeypatch.setattr(harness, "evaluate", lambda *a, **k: pytest.fail("evaluated again"))
    q.run(plan.parse_only(["wanda-50/lora"]))
    search.run_search(q, plan.SETTINGS[0], [point], select, 4, "python -m bench search --quick")
    compare.render(q, tmp_path / "docs", "python -m bench compare --quick", TARGETS)
    search.render(q, tmp_path / "docs", plan.SETTINGS[0], 4, 4, "not used")
    page = (tmp_path / "docs" / "results.md").read_text()
    assert "| LoRA r=8 q,v, unmerged adapter | 1 |" in page and "1 of the 26 restoration runs" in page
    assert "Produced by `python -m bench search --quick`" in (tmp_path / "docs" / "search.md").read_text()
    lora = json.loads((q.store.root / "wanda-50" / "lora" / "seed0.json").read_text())
    assert set(lora["rows"]) == {"lora/unmerged", "lora/merged"} and "lora_r" in lora["fingerprint"]["job"][
        "restoration"] and "heads" in lora["fingerprint"]["job"]["restoration"]  # the legacy flat form


def test_speed_measures_every_row_on_a_tiny_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The speed measurement runs against the worker's own functions (a tiny model, a few pairs, one round)."""
    from tests.tiny import instruction_rows, save_tiny, write_jsonl

    (tmp_path / "alpaca").mkdir()
    write_jsonl(tmp_path / "alpaca" / "train.jsonl", instruction_rows(12))
    monkeypatch.setattr(harness, "SHARED_DATA", tmp_path)
    settings = {"probe": 8, "batch_size": 4, "max_len": 128, "heads": 0.5, "repeats": 1, "heads_from": None}
    saved = speed.measure(settings, str(save_tiny("llama", tmp_path / "tiny")))
    r = saved["results"]
    assert saved["settings"] == settings and r["chosen_heads"] >= 1 and r["restorelcc_params"] < r["lora_params"]
    assert all(r[k] > 0 for k in ("capture_s", "forward_s", "captures_s", "step_restorelcc_s", "merged_tok_s"))
    assert "| tokens/s: merged vs pruned |" in speed.page(saved, "c", harness.TARGETS["speed"])


# ── scaling ──────────────────────────────────────────────────────────────────────────────────────────────


def _scaling_result(shape: str, params: int, peak_mb: float, plan_mb: float, device: str = "cpu") -> dict:
    stage = {"seconds": params / 1e8, "peak_rss_mb": peak_mb, "start_rss_mb": 0.0, "peak_gpu_mb": peak_mb}
    plan = {"stages": {"training": {"device_bytes": plan_mb * 2**20, "host_bytes": plan_mb * 2**20}},
            "dtype": "bfloat16", "weight_bytes": 2 * params}
    return {"shape": shape, "params": params, "prune": "wanda", "stages": {"training": stage}, "plan": plan,
            "environment": {"device": device, "device_name": device}, "seconds": 1.0, "date": "2026-11-30",
            "tokens": {"training": 2048}}


def test_scaling_fits_the_exponent_and_flags_a_plan_off_by_more_than_a_fifth() -> None:
    from bench import scaling

    assert scaling.fit_exponent([1e8, 1e9, 1e10], [3.0, 30.0, 300.0]) == pytest.approx(1.0)
    assert scaling.fit_exponent([1e8, 1e9], [5.0, 5.0]) == pytest.approx(0.0)
    assert scaling.fit_exponent([1e8], [1.0]) is None
    good = [_scaling_result("a", 10**8, 1000, 1100), _scaling_result("b", 10**9, 4000, 3700)]
    page = scaling.render(good, "python -m bench scaling")
    assert "Largest deviation of the plan from a measured stage peak: **10%**" in page
    assert "**no**" not in page and "No GPU has run" in page
    bad = scaling.render([*good, _scaling_result("c", 7 * 10**9, 10000, 13000, device="cuda:0")], "c")
    assert "**no**" in bad and "No GPU has run" not in bad and "**30%**" in bad


@pytest.fixture
def scaling_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The data files a scaling job's spec names (nothing reads them): a fresh clone may have no shared data."""
    for name in ("alpaca/train.jsonl", "eval/wikitext_sentences.jsonl"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text('{"text": "x"}\n')
    monkeypatch.setattr(harness, "SHARED_DATA", tmp_path)


def test_scaling_runs_the_default_objective_on_a_path_and_heading_of_its_own(scaling_data) -> None:
    from app.schemas import JobSpec
    from bench import scaling

    a = {"samples": 8, "steps": 4, "seq_len": 128, "dtype": "bfloat16", "objective": "mixed"}
    r = JobSpec.model_validate(scaling.job_spec(Path("model"), "wanda", a)).restoration
    assert (r.objective, r.sft_weight) == ("distill", 0.5)
    sft_spec = scaling.job_spec(Path("m"), "wanda", {**a, "objective": "sft"})
    assert JobSpec.model_validate(sft_spec).restoration.objective == "sft"
    store = Path("s")
    assert scaling._path(store, "1b", "sparsegpt:2:4", "cuda", "bfloat16", objective="mixed").name \
        == "scaling-1b-sparsegpt24-cuda-bfloat16-mixed.json"
    assert scaling._path(store, "1b", "wanda", "cpu", "bfloat16").name == "scaling-1b-wanda-cpu-bfloat16.json"
    sft = [_scaling_result("a", 10**8, 1000, 1100), _scaling_result("b", 10**9, 4000, 3700)]
    mixed = {**_scaling_result("b", 10**9, 4000, 4000), "fingerprint": {"objective": "mixed"},
             "dense_targets": {"tokens": 2048, "top_k": 64, "bytes": 2**20, "bytes_per_token": 512.0, "seconds": 3.0}}
    page = scaling.render([mixed, *sft], "c")
    assert "### b (1.00B parameters, bfloat16, wanda, objective mixed)" in page
    assert "Dense targets: 2,048 tokens at top-64, 1.0 MiB (512 bytes per token), captured in 3.0 s" in page
    assert page.index("### b (1.00B parameters, bfloat16, wanda) ") < page.index("wanda, objective mixed")
    assert "| s @ a | s @ b | k" in page  # the growth fit takes the sft runs only, one per size


def test_the_objective_page_measures_the_gap_on_a_log_scale() -> None:
    from bench.objective import gap_closed

    assert gap_closed(400.0, 600.0, 400.0) == pytest.approx(1.0)
    assert gap_closed(600.0, 600.0, 400.0) == pytest.approx(0.0)
    assert gap_closed((600.0 * 400.0) ** 0.5, 600.0, 400.0) == pytest.approx(0.5)  # the geometric midpoint
    assert gap_closed(700.0, 600.0, 400.0) < 0 < 1 < gap_closed(300.0, 600.0, 400.0)
    assert gap_closed(0.40, 0.30, 0.50, higher_better=True) == pytest.approx(0.5)
    assert gap_closed(1.0, 2.0, 2.0) is None


def test_a_gap_closed_over_two_seeds_shows_the_range_of_the_single_seeds() -> None:
    from bench.objective import ACC, PPL_COLUMNS, gap_cell

    ppl = PPL_COLUMNS[0]
    assert gap_cell(ppl, 500.0, [500.0], 400.0, 600.0) == "45%"  # one seed: no range
    assert gap_cell(ppl, (600.0 * 400.0) ** 0.5, [600.0, 400.0], 400.0, 600.0) == "50% (0 to 100)"
    assert gap_cell(ACC, 0.45, [0.40, 0.50], 0.50, 0.40) == "50% (0 to 100)"
    assert gap_cell(ACC, 0.45, [0.44, 0.46], 0.41, 0.40).startswith("n/a (dense − pruned +1.0 points)")
    assert gap_cell(ppl, None, [], 400.0, 600.0) == "—"
    assert gap_cell(ppl, 605.0, [600.5, 609.5], 400.0, 600.0) == "-2% (-4 to 0)"  # a seed a hair worse: never "-0"


def test_the_default_objective_is_the_one_whose_worse_gap_share_is_largest() -> None:
    from bench.objective import choose_objective

    shares = {"sft": {"alpaca": 0.54, "wikitext": 0.44}, "distill": {"alpaca": 0.39, "wikitext": 0.50},
              "mixed": {"alpaca": 0.52, "wikitext": 0.50}}
    assert choose_objective(shares) == "mixed"  # worse shares 0.44, 0.39, 0.50
    shares["mixed"]["wikitext"] = 0.44
    assert choose_objective(shares) == "sft"  # a tie keeps the incumbent
    assert choose_objective({"distill": {"alpaca": 0.1, "wikitext": 0.2}}) == "distill"


def test_the_selection_averages_each_objective_over_its_seeds_and_waits_for_every_seed(tmp_path) -> None:
    from bench import objective

    alpaca, wikitext = objective.SELECT_METRICS["alpaca"], objective.SELECT_METRICS["wikitext"]

    def result(seed: int, alpaca_ppl: float, wikitext_ppl: float) -> dict:
        return {"seed": seed, "metrics": {alpaca[0]: {alpaca[1]: alpaca_ppl}, wikitext[0]: {wikitext[1]: wikitext_ppl}}}

    folder = tmp_path / "objective" / "select"
    store = objective.harness.Store(tmp_path / "objective")
    (folder / objective.SELECT_SETTING).mkdir(parents=True)
    (folder / "dense.json").write_text(json.dumps(result(0, 6.0, 300.0)))
    (folder / objective.SELECT_SETTING / "pruned.json").write_text(json.dumps(result(0, 14.0, 600.0)))

    def put(obj: str, seed: int, a: float, w: float) -> None:
        path = folder / objective.SELECT_SETTING / objective.run_key("restorelcc-default", obj, "alpaca")
        path.mkdir(exist_ok=True)
        (path / f"seed{seed}.json").write_text(json.dumps(result(seed, a, w)))

    put("sft", 0, 9.0, 500.0), put("distill", 0, 10.0, 450.0), put("mixed", 0, 9.5, 470.0)
    put("sft", 1, 11.0, 520.0)
    runs = objective.selection_runs(folder / objective.SELECT_SETTING)
    assert [r["seed"] for r in runs["sft"]] == [0, 1]
    assert objective.mean_metrics(runs["sft"]) == {alpaca[0]: {alpaca[1]: 10.0}, wikitext[0]: {wikitext[1]: 510.0}}
    page = "\n".join(objective.render_selection(store))
    assert "no choice yet" in page and "Chosen" not in page  # sft has two seeds, the others one
    put("distill", 1, 10.0, 450.0), put("mixed", 1, 9.5, 470.0)
    page = "\n".join(objective.render_selection(store))
    # worse shares, from the means: sft's WikiText (ln 600/510 / ln 2 = 23%), distill's Alpaca (ln 14/10 / ln 14/6 =
    # 40%), mixed's WikiText (35%)
    assert "| sft | 0, 1 | 10 | 510 | 40% | 23% | 23% | 26% / 21% |" in page
    assert "Chosen: **distill**" in page


def test_the_selection_rows_are_never_rows_the_page_scores(tmp_path, monkeypatch) -> None:
    from bench import objective

    root = tmp_path / "data"
    for source, _, _ in objective.SELECT_ROWS.values():
        (root / source).parent.mkdir(parents=True, exist_ok=True)
        (root / source).write_text("".join(f'{{"row": {i}}}\n' for i in range(1000)))
    monkeypatch.setattr(objective.harness, "SHARED_DATA", root)
    files = objective.selection_files(tmp_path)
    first = {name: json.loads(Path(path).read_text().splitlines()[0])["row"] for name, path in files.items()}
    assert first == {"alpaca": 300, "wikitext": 200}
    assert first["alpaca"] >= objective.Limits.responses and first["wikitext"] >= objective.Limits.wikitext
    monkeypatch.setitem(objective.SELECT_ROWS, "wikitext", ("eval/wikitext_sentences.jsonl", 100, 200))
    with pytest.raises(ValueError, match="inside the scored rows"):
        objective.selection_files(tmp_path)



def test_scaling_predicts_a_run_whose_worker_did_not_measure_the_sparsegpt_step_at_the_nominal(scaling_data) -> None:
    from app.plan_time import NOMINAL
    from bench import scaling

    # an H200 run made before workers measured SparseGPT's column step
    r = json.loads((harness.RESULTS / "scaling-llama3-8b-sparsegpt24-cuda-bfloat16-mixed.json").read_text())
    assert "step_s" not in r["plan"]["speed"]
    assert scaling.stored_speed(r)["step_s"] == NOMINAL["cuda"].step_s
    columns = 32 * (6 * 4096 + 14336)  # Llama-3-8B: q, k, v, o, gate and up take 4096 inputs, down 14336
    measured = {**r, "plan": {**r["plan"], "speed": {**r["plan"]["speed"], "step_s": 1e-6}}}
    assert scaling.predicted_seconds(r)["pruning"] - scaling.predicted_seconds(measured)["pruning"] == pytest.approx(
        columns * (NOMINAL["cuda"].step_s - 1e-6), abs=0.2)
    section = "\n".join(scaling._section([r], "cuda"))
    assert "per SparseGPT column step, nominal: not measured by that worker" in section
    assert f"SparseGPT's {columns:,} column steps" in section
    assert "nominal" not in "\n".join(scaling._section([measured], "cuda"))


def test_bos_first_windows_keep_their_length_and_put_bos_first_once() -> None:
    """The calibration benchmark's other variant: the service's windows with BOS first where missing (the window's
    last token gives way); a window that starts with BOS already is left alone."""
    from bench.calibration import bos_first
    from tests.tiny import instruction_rows, make_tokenizer
    from worker.model.calibration import build_calibration_batches
    from worker.model.data import leading_specials

    tok = make_tokenizer()
    tok.add_bos_token = True
    assert leading_specials(tok) == 1
    texts = [r["prompt"] + r["response"] for r in instruction_rows(24)]
    windows = build_calibration_batches(tok, texts, n_samples=6, seq_len=16, batch_size=4, seed=0)
    moved = bos_first(windows, tok)
    before = [ids for b in windows for ids in b.input_ids.tolist()]
    after = [ids for b in moved for ids in b.input_ids.tolist()]
    bos = tok.bos_token_id
    assert [len(b.input_ids) for b in moved] == [len(b.input_ids) for b in windows]
    assert before[0][0] == bos and after[0] == before[0]  # the stream's first window starts with BOS already
    assert all(a[0] == bos and a[1:] == b[:-1] for a, b in zip(after[1:], before[1:], strict=True) if b[0] != bos)
    assert all(len(a) == 16 for a in after)


def test_the_merge_depth_part_sets_each_depths_difference_beside_its_tolerance() -> None:
    from bench import mergedepth

    text = mergedepth.render({"eps": {"80": [5.0, 6.5], "30": [3.5, 3.9]}}, "python -m bench mergedepth")
    assert "| 30 | 3.5, 3.9 | 3.9 | 16.0 |" in text and "| 80 | 5.0, 6.5 | 6.5 | 42.7 |" in text
    assert text.index("| 30 |") < text.index("| 80 |")


def test_stop_page_shows_dense_pruned_and_both_eos_settings_with_each_seed(tmp_path: Path) -> None:
    from bench import stop

    store = harness.Store(tmp_path)

    def result(alpaca_top1: float, wiki_ppl: float, seed: int | None = None) -> dict:
        sets = {"valid": {"response_ppl": 4.0, "stop_nll": 2.5, "stop_top1": alpaca_top1},
                "wikipedia_heldout": {"response_ppl": 9.0, "stop_nll": None, "stop_top1": None},
                "wikitext_sentences": {"ppl": wiki_ppl}}
        return {"metrics": sets, "environment": {"cpu": "cpu", "torch": "t"}} | ({} if seed is None else {"seed": seed})

    store.save(tmp_path / "dense.json", result(0.5, 20.0))
    store.save(tmp_path / stop.SETTING / "pruned.json", result(0.1, 40.0))
    for seed, top1 in ((0, 0.3), (1, 0.4)):
        store.save(stop.run_path(store, True, seed), result(top1, 30.0, seed))
    store.save(stop.run_path(store, False, 0), result(0.05, 31.0, 0))
    text = stop.render(store, [0, 1], "python -m bench stop")
    assert "| dense | 4.00 | 2.50 | 50% | 9.00 | — | — | 20.00 |" in text
    assert "| pruned | 4.00 | 2.50 | 10% | 9.00 | — | — | 40.00 |" in text
    assert ("| restored, response_eos true (seeds 0, 1) | 4.00 (4.00 / 4.00) | 2.50 (2.50 / 2.50) | 35% (30% / 40%) |"
            in text)
    assert "| restored, response_eos false (seeds 0) | 4.00 | 2.50 | 5% | 9.00 | — | — | 31.00 |" in text
    assert "Not run yet." in stop.render(harness.Store(tmp_path / "empty"), [0], "c")
