"""The quality benchmark's pure parts: the plan, --only, resume fingerprints, the table and the chart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.schemas import JobSpec
from bench.quality import plan, render
from bench.quality.runner import Store
from bench.quality.search import grid, parse_point, point_name, point_overrides, schedule_text, write_selection

DATA = plan.Data(train="/d/train.jsonl", wikitext="/d/wikitext_sentences.jsonl", alpaca_valid="/d/valid.jsonl",
                 tasks=("/d/boolq.jsonl", "/d/piqa.jsonl", "/d/openbookqa.jsonl"))


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


def _fake_results() -> tuple[list[dict], dict]:
    dense = {"rows": {"dense": {"metrics": _metrics(10.0, 0.6)}}}
    res = [
        _result("wanda-50", "pruned", 0, {"pruned": {"metrics": _metrics(20.0, 0.5), "trainable_params": 0}},
                {"sparsity": 0.5}),
        _result("wanda-50", "restorelcc", 0, {"restorelcc": {"metrics": _metrics(15.0, 0.52),
                                                             "trainable_params": 100, "train_seconds": 3.0}},
                {"chosen_heads": [[0, 1], [2, 3], [4, 5]]}),
        _result("wanda-50", "restorelcc", 1, {"restorelcc": {"metrics": _metrics(17.0, 0.54),
                                                             "trainable_params": 100, "train_seconds": 5.0}},
                {"chosen_heads": [[0, 1]]}),
        _result("wanda-50", "bias-probe", 0, {"bias-probe": {"metrics": _metrics(16.0, 0.5),
                                                             "trainable_params": 10, "train_seconds": 1.0}},
                {"chosen_heads": [[0, 1], [2, 3], [9, 9]]}),
        _result("wanda-50", "lora", 0, {
            "lora/unmerged": {"metrics": _metrics(14.0, 0.55), "trainable_params": 999, "train_seconds": 4.0},
            "lora/merged": {"metrics": _metrics(18.0, 0.51), "trainable_params": 999, "train_seconds": 4.0},
        }, {"unmerged_inference_overhead": {"extra_params": 999, "extra_matmuls_per_token": 4,
                                            "extra_flops_per_token": 3996, "extra_flops_per_token_rel": 0.01},
            "remask_update_lost_rel": 0.5, "remasked_weights": 7}),
    ]
    return res, dense


def test_plan_main_rows_run_every_seed_others_first_seed_only() -> None:
    b = plan.Budget(seeds=(0, 1))
    runs = plan.plan(b, plan.Selection())
    count = {(s.key, m.key): 0 for s, m, _ in runs}
    for s, m, _ in runs:
        count[(s.key, m.key)] += 1
    assert count[("wanda-50", "restorelcc")] == 2 and count[("wanda-50", "lora")] == 2
    assert count[("sparsegpt-2-4", "bias-all")] == 2
    assert count[("wanda-50", "dora")] == 1 and count[("wanda-50", "restorelcc-random")] == 1
    assert count[("sparsegpt-2-4", "restorelcc-default")] == 2  # the recommended setting has a spread too
    assert count[("wanda-50", "restorelcc-default-random")] == count[("wanda-50", "bias-default")] == 1
    assert len(runs) == 2 * (4 * 2 + 5)
    # every RestoreLCC row's ablations are planned methods
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
    prune = JobSpec.model_validate(plan.prune_job(plan.SETTINGS[1], b, DATA, "/m/dense", ev))
    assert prune.pruning.pattern == "2:4" and prune.restoration.method == "none" and prune.seed == 0
    assert prune.evaluation.limits == {"valid": 300, "boolq": 500, "piqa": 500, "openbookqa": 500}
    specs = {m.key: JobSpec.model_validate(plan.restore_job(m, b, DATA, "/m/pruned", "/m/dense", 3))
             for m in plan.METHODS}
    for s in specs.values():
        assert s.pruning.method == "none" and s.seed == 3
        assert (s.restoration.max_steps, s.restoration.batch_size, s.data.train) == (7, 8, DATA.train)
    assert all(s.model.dense == "/m/dense" for s in specs.values())  # the pipeline needs it for every method
    assert specs["restorelcc"].evaluation.dense is False
    assert specs["lora"].restoration.lr == 3e-4 and specs["bias-all"].restoration.lr == 0.02
    assert specs["bias-probe"].restoration.head_selection == "probe"
    assert specs["dora"].output.format == "adapter"
    # The service-default row ignores the bench's budget for heads and lr: it is what an unset spec gets.
    unset = JobSpec.model_validate({"model": {"id": "m"}, "data": {"train": "t.jsonl"}}).restoration
    default = specs["restorelcc-default"].restoration
    assert (default.heads, default.lr, default.directions) == (unset.heads, unset.lr, unset.directions)
    assert default.max_steps == 7  # the step budget is still shared
    # Its ablations differ from it in one thing each: random heads, or bias only (no directions).
    for key, method, selection in (("restorelcc-default-random", "restorelcc", "random"),
                                   ("bias-default", "bias", "probe")):
        r = specs[key].restoration
        assert (r.method, r.head_selection, r.heads, r.lr) == (method, selection, unset.heads, unset.lr)
    assert specs["restorelcc-default-random"].restoration.directions == unset.directions
    # The paper-style rows learn β over all directions whatever the service default is.
    assert specs["restorelcc"].restoration.directions is None is specs["restorelcc-random"].restoration.directions


def test_pages_show_only_results_todays_plan_would_reuse(tmp_path: Path) -> None:
    store, b = Store(tmp_path), plan.Budget()
    for key in ("lora", "restorelcc-default"):
        fp = plan.expected_fingerprint(b, DATA, "wanda-50", key, 0)
        store.save(store.result("wanda-50", key, 0), {"setting": "wanda-50", "method": key, "seed": 0, "rows": {},
                                                      "fingerprint": fp})
    old = json.loads(store.result("wanda-50", "restorelcc-default", 0).read_text())
    old["fingerprint"]["job"]["restoration"]["heads"] = 0.123  # stored before the service default changed
    store.save(store.result("wanda-50", "restorelcc-default", 0), old)
    keep, other = store.current_results(b, DATA)
    assert [r["method"] for r in keep] == ["lora"] and other == ["wanda-50/restorelcc-default/seed0"]
    assert store.result("wanda-50", "restorelcc-default", 0).is_file()  # only left off the page, not moved
    assert plan.expected_fingerprint(b, DATA, "wanda-50", "no-such-method", 0) is None


def test_all_directions_keep_the_fingerprint_of_runs_stored_before_the_setting_existed() -> None:
    b, m = plan.Budget(), plan.method_by_key("restorelcc")
    job = plan.restore_job(m, b, DATA, "/a", "/d", 0)
    assert job["restoration"]["directions"] is None  # sent to the pipeline: all directions, not the default
    before = {**job, "restoration": {k: v for k, v in job["restoration"].items() if k != "directions"}}
    ev = plan.evaluation(DATA, b)
    assert plan.fingerprint(job, ev) == plan.fingerprint(before, ev)
    top = plan.restore_job(m, b, DATA, "/a", "/d", 0, overrides={"directions": 30})
    assert plan.fingerprint(top, ev) != plan.fingerprint(job, ev)


def test_store_reuses_matching_results_and_sets_aside_stale_ones(tmp_path: Path) -> None:
    store = Store(tmp_path)
    b = plan.Budget()
    m = plan.method_by_key("lora")
    fp = plan.fingerprint(plan.restore_job(m, b, DATA, "/a", "/d", 0), plan.evaluation(DATA, b), {"x": 1})
    path = store.result("wanda-50", "lora", 0)
    store.save(path, {"setting": "wanda-50", "method": "lora", "seed": 0, "rows": {}, "fingerprint": fp})
    # model paths do not matter; anything else does
    fp_other_path = plan.fingerprint(plan.restore_job(m, b, DATA, "/b", "/e", 0), plan.evaluation(DATA, b), {"x": 1})
    assert store.load(path, fp_other_path) is not None
    assert [r["method"] for r in store.all_results()] == ["lora"]
    b2 = plan.Budget(steps=51)
    fp2 = plan.fingerprint(plan.restore_job(m, b2, DATA, "/a", "/d", 0), plan.evaluation(DATA, b2), {"x": 1})
    assert store.load(path, fp2) is None
    assert not path.exists() and path.with_suffix(".stale.json").is_file()
    assert store.all_results() == []


def test_fmt_shows_mean_and_spread() -> None:
    assert render.fmt([0.5], "acc") == "50.0"
    assert render.fmt([0.5, 0.6], "acc") == "55.0 ± 7.1"
    assert render.fmt([10.0, 12.0], "ppl") == "11.00 ± 1.41"
    assert render.fmt([1234.0], "int") == "1,234"
    assert render.fmt([], "ppl") == "—"


def test_table_has_every_row_in_order_with_seeds_spread_and_missing_rows() -> None:
    res, dense = _fake_results()
    rows = render.collect(res)["wanda-50"]
    text = render.table(rows, dense["rows"]["dense"])
    lines = text.splitlines()
    labels = [ln.split("|")[1].strip() for ln in lines[2:]]
    assert labels == [r.label for r in render.row_order()]
    by = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in lines[2:]}
    rlcc = by["RestoreLCC (probed heads)"]
    assert rlcc[0] == "2" and rlcc[2] == "16.00 ± 1.41" and rlcc[-1] == "-20.0%"
    assert by["pruned"][2] == "20.00" and by["dense"][2] == "10.00" and by["dense"][-3] == "—"
    assert by["LoRA r=8 q,v, unmerged adapter"][2] == "14.00"
    assert by["LoRA r=8 q,v, merged, mask re-applied"][-1] == "-10.0%"
    assert by["DoRA r=8 q,v, merged, mask re-applied"][0] == "0"  # not run: shown, empty


def test_notes_report_head_overlap_and_adapter_overhead() -> None:
    res, _ = _fake_results()
    assert render.head_overlap(res, "wanda-50") == [("restorelcc", 0, 2, 3)]
    text = "\n".join(render.notes(res, "wanda-50"))
    assert "Heads of bias only (RestoreLCC's heads) vs RestoreLCC (probed heads), seed 0: 2 of 3 shared" in text
    res += [_result("wanda-50", "restorelcc-default", 0, {}, {"chosen_heads": [[0, 1], [2, 3], [4, 5], [6, 7]]}),
            _result("wanda-50", "restorelcc-default", 1, {}, {"chosen_heads": [[0, 1]]}),
            _result("wanda-50", "bias-default", 0, {}, {"chosen_heads": [[0, 1], [2, 3], [4, 5], [6, 7]]})]
    assert render.head_overlap(res, "wanda-50") == [("restorelcc", 0, 2, 3), ("restorelcc-default", 0, 4, 4)]
    assert "the service default's heads" in "\n".join(render.notes(res, "wanda-50"))
    assert "999 extra parameters" in text and "+1.00%" in text and "50.0%" in text


def test_verdict_compares_restorelcc_with_pruned_and_lora() -> None:
    res, _ = _fake_results()
    rows = render.collect(res)["wanda-50"]
    text = "\n".join(render.verdict(rows))
    # RestoreLCC mean response ppl 16 vs pruned 20; WikiText 32 vs 40; mean acc 53% vs 50%
    assert "Alpaca response ppl: 16.00 vs 20.00 — **better**" in text
    assert "WikiText ppl: 32.00 vs 40.00 — **better**" in text and "mean acc: 53.0 vs 50.0 — **better**" in text
    assert "**1.143×** (target ≤ 1.05×: not met)" in text  # 16 / 14
    assert "**10.01%** of LoRA's (target ≤ 2%: not met)" in text  # 100 / 999
    assert ("vs bias only on the same heads (no directions): Alpaca response ppl 16.00 vs 16.00 (equal); "
            "WikiText ppl 32.00 vs 32.00 (equal); mean acc 53.0 vs 50.0 (better).") in text
    worse = {**rows, "restorelcc": [{"metrics": _metrics(25.0, 0.4), "trainable_params": 10}]}
    text = "\n".join(render.verdict(worse))
    assert "Alpaca response ppl 25.00 vs 16.00 (**worse**)" in text
    assert text.count("**not better**") == 3 and "**1.786×** (target ≤ 1.05×: not met)" in text
    assert "**1.00%** of LoRA's (target ≤ 2%: met)" in text
    # numbers that look equal at two decimals get the decimals that tell them apart beside 'worse'
    close = {**rows, "restorelcc": [{"metrics": _metrics(16.0004, 0.53), "trainable_params": 10}]}
    text = "\n".join(render.verdict(close))
    assert "Alpaca response ppl 16.0004 vs 16.0000 (**worse**)" in text
    assert render.verdict({"pruned": rows["pruned"]}) == ["RestoreLCC vs pruned: not measured yet."]
    assert "service default vs pruned" not in text
    default = [{"metrics": _metrics(12.0, 0.45), "trainable_params": 40},
               {"metrics": _metrics(14.0, 0.47), "trainable_params": 40}]
    text = "\n".join(render.verdict({**rows, "restorelcc-default": default}))
    assert ("RestoreLCC at the service default vs pruned: Alpaca response ppl 13.00 vs 20.00 (better); "
            "WikiText ppl 26.00 vs 40.00 (better); mean acc 46.0 vs 50.0 (**worse**).") in text
    assert "service default / unmerged LoRA, Alpaca response ppl: **0.929×** with 4.00% of LoRA's" in text
    assert "Ablation, RestoreLCC at the service default" not in text  # its ablations are not measured here
    bias_default = [{"metrics": _metrics(15.0, 0.5), "trainable_params": 8}]
    text = "\n".join(render.verdict({**rows, "restorelcc-default": default, "bias-default": bias_default}))
    assert ("Ablation, RestoreLCC at the service default vs bias only on the same heads (no directions): "
            "Alpaca response ppl 13.00 vs 15.00 (better); WikiText ppl 26.00 vs 30.00 (better); "
            "mean acc 46.0 vs 50.0 (**worse**).") in text


def test_coverage_names_what_is_missing() -> None:
    res, _ = _fake_results()
    text = render.coverage(res)
    total = len(plan.plan(plan.Budget(), plan.Selection()))
    assert f"4 of the {total} restoration runs" in text and "partial" in text
    assert "`wanda-50/lora/seed1`" in text and "`wanda-50/restorelcc/seed0`" not in text
    full = [_result(s.key, m.key, seed, {}) for s, m, seed in plan.plan(plan.Budget(), plan.Selection())]
    assert render.coverage(full) == f"**Coverage.** All {total} restoration runs of the full plan are measured."


def test_markdown_and_chart(tmp_path: Path) -> None:
    res, dense = _fake_results()
    png = render.chart(res, dense, tmp_path / "results.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = render.markdown(res, dense, plan.Budget().as_dict(), "python -m bench.quality", {"device": "cpu"})
    assert "## Wanda 50% unstructured" in text and "## SparseGPT 2:4" in text and "Not run yet." in text
    assert "(results.png)" in text and "| wanda-50 | restorelcc | 1 | ? | 12 |" in text
    assert render.chart([], None, tmp_path / "none.png") is None


def test_a_ratio_just_over_the_target_never_prints_as_the_target() -> None:
    assert render.ratio_text(1.0503) == "1.0503" and render.ratio_text(1.0496) == "1.0496"
    assert render.ratio_text(1.0506) == "1.051"
    assert render.ratio_text(1.05) == "1.050" and render.ratio_text(1.0672) == "1.067"


def test_machine_line_names_every_cpu_the_runs_came_from() -> None:
    env = {"device": "cpu", "cpu": "Xeon", "cpus": 2, "threads": 2, "python": "3.11.7", "torch": "2.13.0"}
    res, _ = _fake_results()
    assert render.machines(res, env) == ("**Machine.** cpu (Xeon, 2 CPUs, 2 torch threads), Python 3.11.7, "
                                         "torch 2.13.0.")  # no run says where it ran: the current machine
    assert render.machines([], None) == ""
    res = [{**r, "environment": env} for r in res]
    assert render.machines(res, None).startswith("**Machine.** cpu (Xeon,")
    res[0] = {**res[0], "environment": {**env, "cpu": "EPYC"}}
    line = render.machines(res, None)
    assert line.startswith("**Machines.**") and "on 2 kinds of machine" in line
    assert f"(Xeon, 2 CPUs, 2 torch threads), Python 3.11.7, torch 2.13.0: {len(res) - 1} runs; " in line
    assert "(EPYC, 2 CPUs, 2 torch threads), Python 3.11.7, torch 2.13.0: 1 runs." in line
    assert "| EPYC |" in render.timings(res) and "| Xeon |" in render.timings(res)


def test_selection_rows_never_overlap_evaluated_rows(tmp_path: Path) -> None:
    src = tmp_path / "valid.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"p{i}", "response": f" r{i}"}) + "\n" for i in range(10)))
    path = write_selection(str(src), tmp_path, 6, 3, eval_rows=6)
    assert [json.loads(x)["prompt"] for x in path.read_text().splitlines()] == ["p6", "p7", "p8"]
    with pytest.raises(ValueError, match="inside the evaluated rows"):
        write_selection(str(src), tmp_path, 5, 3, eval_rows=6)
    with pytest.raises(ValueError, match="do not exist"):
        write_selection(str(src), tmp_path, 8, 3, eval_rows=6)
    scored = tmp_path / "search" / "wanda-50" / "lora.json"
    scored.parent.mkdir()
    scored.write_text("{}")
    write_selection(str(src), tmp_path, 6, 3, eval_rows=6)  # the same rows: scores kept
    assert scored.is_file()
    write_selection(str(src), tmp_path, 7, 3, eval_rows=6)  # other rows: scores set aside
    assert not scored.is_file() and scored.with_suffix(".stale.json").is_file()
    assert len(grid([0.1, 0.2], [1e-2], [10, 20])) == 4
    assert parse_point("0.6:1e-2:100") == {"heads": 0.6, "lr": 0.01, "max_steps": 100}
    with pytest.raises(ValueError, match="HEADS:LR:STEPS"):
        parse_point("0.6:1e-2")
    cosine = parse_point("0.66:6e-3:50:cosine:5")
    assert cosine == {"heads": 0.66, "lr": 0.006, "max_steps": 50, "lr_schedule": "cosine", "warmup_steps": 5}
    assert point_name(cosine) == "h0.66-lr0.006-s50-cosine-w5" and schedule_text(cosine) == "cosine, 5 warm-up"
    # the defaults stay out of the point, so points stored before schedules existed keep their names
    assert parse_point("0.6:3e-3:50:constant:0") == parse_point("0.6:3e-3:50")
    assert point_name(parse_point("0.6:3e-3:50")) == "h0.6-lr0.003-s50"
    with pytest.raises(ValueError, match="schedule 'step'"):
        parse_point("0.6:1e-2:50:step")
    with pytest.raises(ValueError, match="warm-up"):
        parse_point("0.6:1e-2:50:cosine:50")
    # key=value: the same point, or one with settings the positional form has no place for
    assert parse_point("heads=0.66,lr=6e-3,steps=50,schedule=cosine,warmup=5") == cosine
    top = parse_point("heads=0.9,lr=3e-3,steps=50,directions=30")
    assert top == {"heads": 0.9, "lr": 0.003, "max_steps": 50, "directions": 30}
    assert point_name(top) == "h0.9-lr0.003-s50-d30" and point_overrides(top) == top
    bias_all = parse_point("heads=all,lr=3e-3,steps=50,method=bias")
    assert point_name(bias_all) == "bias-hall-lr0.003-s50"
    assert point_overrides(bias_all) == {"head_selection": "all", "lr": 0.003, "max_steps": 50, "method": "bias"}
    for bad in ("heads=0.9,lr=3e-3", "heads=0.9,lr=3e-3,steps=50,colour=red",
                "heads=all,lr=3e-3,steps=50,method=bias,directions=4", "heads=0.9,lr=3e-3,steps=50,directions=0"):
        with pytest.raises(ValueError, match="grid point"):
            parse_point(bad)


def _point(heads: float, lr: float, ppl: float, params: int, steps: int = 50) -> dict:
    row = {"metrics": {"alpaca_select": {"response_ppl": ppl}}, "trainable_params": params, "train_seconds": 1.0}
    return {"point": {"heads": heads, "lr": lr, "max_steps": steps}, "rows": {"restorelcc": row}}


def _lora(ppl: float, steps: int = 50) -> dict:
    row = {"metrics": {"alpaca_select": {"response_ppl": ppl}}, "trainable_params": 1000}
    merged = {**row, "metrics": {"alpaca_select": {"response_ppl": ppl * 1.04}}}
    return {"rows": {"lora/unmerged": row, "lora/merged": merged},
            "fingerprint": {"job": {"restoration": {"lr": 1e-3, "max_steps": steps}}}}


def test_search_winner_respects_the_parameter_cap_and_says_whether_it_meets_the_target() -> None:
    from bench.quality.search import BIAS_ROWS, Search, search_markdown, winner

    lora = {50: _lora(10.0)}
    points = [_point(0.1, 1e-2, 11.0, 20), _point(0.3, 1e-2, 10.4, 50), _point(0.9, 1e-2, 10.1, 60)]
    found = Search(points, pruned_ppl=15.0, lora_at=lora, steps=50)
    assert winner(found)["point"]["heads"] == 0.3  # 0.9 scores better but trains 6% of LoRA's parameters
    text = search_markdown(found, plan.SETTINGS[0], "python -m bench.quality --search", 300, 300, 300)
    assert "1.040× unmerged LoRA at 50 steps, which meets the 1.05× target" in text
    assert '"restoration": {"heads": 0.3, "lr": 0.01}` with `"max_steps": 50`' in text
    assert "| 1 | 0.9 | all | 0.01 | constant |" in text  # still ranked, shown with its share of LoRA's parameters
    assert "several sessions" not in text and "| 1 | ? |" in text  # one CPU (unknown here): no caveat
    other = {**points[0], "environment": {"cpu": "AMD EPYC"}}
    text = search_markdown(Search([other, *points[1:]], 15.0, lora, 50), plan.SETTINGS[0], "c", 300, 300, 300)
    assert "in several sessions on 2 CPUs (column cpu; ?, AMD EPYC)" in text and "| 1 | AMD EPYC |" in text
    found = Search(points[:1], pruned_ppl=15.0, lora_at=lora, steps=50)
    assert "does **not** meet" in search_markdown(found, plan.SETTINGS[0], "cmd", 300, 300, 300)
    cosine = _point(0.3, 6e-3, 10.2, 50)
    cosine["point"].update(lr_schedule="cosine", warmup_steps=5)
    text = search_markdown(Search([*points, cosine], 15.0, lora, 50), plan.SETTINGS[0], "c", 300, 300, 300)
    assert "| 1 | 0.9 | all | 0.01 | constant |" in text
    assert "| 2 | 0.3 | all | 0.006 | cosine, 5 warm-up |" in text
    assert ('Best: heads 0.3, lr 0.006 (cosine, 5 warm-up), 50 steps. In a job: `"restoration": {"heads": 0.3, '
            '"lr": 0.006, "lr_schedule": "cosine", "warmup_steps": 5}`') in text
    top = _point(0.3, 3e-3, 10.0, 50)
    top["point"]["directions"] = 20
    text = search_markdown(Search([*points, top], 15.0, lora, 50), plan.SETTINGS[0], "c", 300, 300, 300)
    assert "| 1 | 0.3 | 20 | 0.003 | constant |" in text
    assert ('Best: heads 0.3, directions 20, lr 0.003 (constant), 50 steps. In a job: `"restoration": {"heads": '
            '0.3, "lr": 0.003, "directions": 20}`') in text
    assert "none (bias only)" not in text and BIAS_ROWS not in text
    bias = _point(0.3, 3e-3, 10.3, 50)
    bias["point"]["method"] = "bias"
    text = search_markdown(Search([*points, bias], 15.0, lora, 50), plan.SETTINGS[0], "c", 300, 300, 300)
    assert "| 2 | 0.3 | none (bias only) | 0.003 | constant |" in text and BIAS_ROWS in text
    found = Search(points[2:], pruned_ppl=15.0, lora_at=lora, steps=50)
    assert winner(found) is None and "none is recommended" in search_markdown(found, plan.SETTINGS[0], "c", 300,
                                                                              300, 300)


def test_a_stored_search_is_summarised_on_the_results_page(tmp_path: Path) -> None:
    from bench.quality.search import load, ratio, summary, winner

    folder = tmp_path / "search" / "wanda-50"
    folder.mkdir(parents=True)
    assert load(tmp_path, "wanda-50") is None
    (folder / "lora.json").write_text(json.dumps(_lora(10.0)))
    (folder / "pruned.json").write_text(json.dumps({"metrics": {"alpaca_select": {"response_ppl": 15.0}}}))
    for i, (h, ppl, n) in enumerate([(0.1, 12.0, 20), (0.3, 11.0, 40), (0.2, 9.0, 30)]):
        (folder / f"h{h}-{i}.json").write_text(json.dumps(_point(h, 1e-2, ppl, n)))
    assert load(tmp_path, "wanda-50") is None  # no manifest: the search has not finished
    (folder / "manifest.json").write_text(json.dumps({"points": ["h0.1-0.json", "h0.3-1.json"]}))
    found = load(tmp_path, "wanda-50")  # h0.2-2.json is a leftover of another search
    assert found is not None and len(found.points) == 2 and found.pruned_ppl == 15.0
    lines = summary(found)
    assert "lr schedules constant; directions per head all;" in lines[0]
    assert "heads 0.3, lr 0.01 (constant), 50 steps (40 trainable parameters, 4.00% of LoRA's)" in lines[1]
    assert "**1.100×** LoRA (target ≤ 1.05×: **not met**)" in lines[1]
    results, dense = _fake_results()
    text = render.markdown(results, dense, plan.Budget().as_dict(), "cmd", None, search=lines)
    assert "## RestoreLCC's recommended setting" in text and lines[1] in text
    # A later grid with a longer step budget: its points are compared with LoRA trained as long.
    (folder / "h0.3-s100.json").write_text(json.dumps(_point(0.3, 1e-2, 8.4, 40, steps=100)))
    (folder / "lora-s100.json").write_text(json.dumps(_lora(8.0, steps=100)))
    (folder / "manifest.json").write_text(json.dumps({
        "points": ["h0.3-1.json", "h0.3-s100.json"], "lora": {"50": "lora.json", "100": "lora-s100.json"},
        "steps": 50}))
    found = load(tmp_path, "wanda-50")
    assert found is not None and found.lora is found.lora_at[50]
    won = winner(found)  # 8.4 / 8.0 = 1.05 beats 11.0 / 10.0 = 1.10, though LoRA at 50 steps scores 10.0
    assert won["point"]["max_steps"] == 100 and ratio(found, won) == pytest.approx(1.05)
    assert "unmerged LoRA's 8.000 at the same steps, **1.050×**" in summary(found)[1]


def test_a_result_stored_from_another_checkout_is_reused(tmp_path: Path) -> None:
    """The search's selection rows live in the checkout: a fingerprint naming them must not tie a stored
    result to the folder it was measured in."""
    store = Store(tmp_path)
    path = tmp_path / "wanda-50" / "pruned.json"

    def fp(checkout: str) -> dict:
        return {"evaluation": {"response_perplexity": [f"{checkout}/bench/results/quality/search/select.jsonl"]}}

    store.save(path, {"fingerprint": fp("/work/main"), "rows": {}})
    assert store.load(path, fp("/tmp/elsewhere/clone")) is not None
    other = {"evaluation": {"response_perplexity": ["/tmp/elsewhere/clone/bench/results/quality/search/other.jsonl"]}}
    assert store.load(path, other) is None  # other rows are still other settings
    assert path.with_suffix(".stale.json").is_file()
