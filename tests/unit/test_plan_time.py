"""The time part of the plan (app.plan_time): each stage's work counted from the shapes and the spec, the seconds
it takes at a device's rates, and a worker's measured rates (worker.run.speed)."""

from __future__ import annotations

import math

import pytest

from app.plan import Shapes, make_plan
from app.plan_time import (
    FILL,
    MATMUL_EFFICIENCY,
    NOMINAL,
    SORT_EFFICIENCY,
    STAGE_START_S,
    TRAIN_FLOPS,
    Speed,
    Work,
    format_seconds,
    stage_work,
)
from app.schemas import JobSpec, Stage
from tests.unit.test_plan import LLAMA_7B, spec
from worker.run.speed import device_speed

SHAPES = Shapes.from_config(LLAMA_7B)
RATES = Speed(matmul_flops=1e12, sort_elements=1e8, read_bytes=1e9, write_bytes=5e8, move_bytes=4e9, step_s=50e-6)


def work(s: JobSpec, streaming: bool = False) -> dict[Stage, Work]:
    return stage_work(s, SHAPES, file_bytes=13_000_000_000, dtype_bytes=2, out_bytes=2, streaming=streaming)


def test_seconds_are_each_unit_of_work_at_its_rate_plus_the_start_cost():
    w = Work(flops=3e12, sorted=2e8, read=4e9, written=1e9, moved=8e9, steps=1e5)
    expected = (STAGE_START_S + 3e12 / (MATMUL_EFFICIENCY * 1e12) + 2e8 / (SORT_EFFICIENCY * 1e8)
                + 4e9 / 1e9 + 1e9 / 5e8 + 8e9 / 4e9 + 1e5 * 50e-6)
    assert w.seconds(RATES) == pytest.approx(expected)
    assert Work().seconds(RATES) == STAGE_START_S


def test_training_counts_its_flops_per_token_and_two_more_when_streaming_recomputes():
    s = spec(restoration={"max_steps": 10, "batch_size": 4, "max_seq_len": 200})
    tokens = 10 * 4 * int(200 * FILL)
    assert work(s)[Stage.training].flops == TRAIN_FLOPS * SHAPES.params() * tokens
    assert work(s, streaming=True)[Stage.training].flops == (TRAIN_FLOPS + 2) * SHAPES.params() * tokens


def test_every_accumulated_batch_is_a_forward_and_a_backward():
    one = work(spec(restoration={"max_steps": 10, "batch_size": 4}))[Stage.training].flops
    assert work(spec(restoration={"max_steps": 10, "batch_size": 4, "grad_accum": 3}))[Stage.training].flops == 3 * one


def test_each_evaluation_is_counted_in_the_stage_that_runs_it():
    prune_only = work(spec(restoration={"method": "none"}))
    assert prune_only[Stage.evaluating] == Work()  # nothing is left to evaluate after pruning
    assert prune_only[Stage.loading].flops > 0 and prune_only[Stage.pruning].flops > 0
    given_pruned = work(spec(model={"id": "/m", "dense": "/d"}, pruning={"method": "none"}))
    assert given_pruned[Stage.pruning] == Work()
    assert given_pruned[Stage.probing].flops > work(spec())[Stage.probing].flops  # the pruned model's evaluation
    no_dense = work(spec(pruning={"method": "none"}, restoration={"method": "lora"}))
    assert no_dense[Stage.loading].flops == 0  # nothing dense to evaluate: only the given pruned model


def test_epochs_count_steps_from_the_training_samples():
    s = spec(restoration={"epochs": 2, "train_samples": 100, "batch_size": 8})
    tokens = 2 * math.ceil(100 / 8) * 8 * int(256 * FILL)
    assert work(s)[Stage.training].flops == TRAIN_FLOPS * SHAPES.params() * tokens


def test_pruning_sorts_every_prunable_weight_and_sparsegpt_adds_its_updates():
    wanda = work(spec())[Stage.pruning]
    sparsegpt = work(spec(pruning={"method": "sparsegpt"}))[Stage.pruning]
    assert wanda.sorted == SHAPES.linear_params()
    assert sparsegpt.flops > wanda.flops
    # SparseGPT's column updates grow as out × in² per Linear: 7B's are tens of teraflops
    assert sparsegpt.flops - wanda.flops > 2 * SHAPES.layers * sum(o * i * i for o, i in SHAPES.linear_shapes())
    already_pruned = spec(model={"id": "/m", "dense": "/d"}, pruning={"method": "none"})
    assert work(already_pruned)[Stage.pruning] == Work()


def test_sparsegpt_takes_one_sequential_step_per_input_column_of_every_linear():
    # 7B: 32 layers × (4096 columns each for q, k, v, o, gate and up, 11008 for down)
    assert work(spec(pruning={"method": "sparsegpt"}))[Stage.pruning].steps == 32 * (6 * 4096 + 11008)
    assert work(spec())[Stage.pruning].steps == 0  # Wanda chooses each matrix's mask at once
    plan = make_plan(spec(pruning={"method": "sparsegpt"}), SHAPES, "cuda", speed=RATES)
    slower = make_plan(spec(pruning={"method": "sparsegpt"}), SHAPES, "cuda",
                       speed=Speed(**RATES.to_dict() | {"step_s": 150e-6}))
    # on a GPU the steps are most of SparseGPT's time: 1.1M columns at 100 µs more each
    assert slower.stages["pruning"].seconds - plan.stages["pruning"].seconds == pytest.approx(
        32 * (6 * 4096 + 11008) * 100e-6, abs=0.2)


def test_streaming_moves_the_layers_once_per_pass_and_the_whole_model_moves_nothing():
    s = spec(restoration={"max_steps": 10})
    layers_b = SHAPES.layers * SHAPES.layer_params() * 2
    assert work(s, streaming=True)[Stage.training].moved == 2 * 10 * layers_b  # forward and recomputation
    assert all(w.moved == 0 for w in work(s).values())


def test_loading_reads_the_files_and_exporting_writes_the_output_dtype():
    w = stage_work(spec(), SHAPES, file_bytes=123, dtype_bytes=2, out_bytes=4)
    assert w[Stage.loading].read == 123
    assert w[Stage.exporting].written == SHAPES.params() * 4


def test_the_plan_carries_each_stages_seconds_its_total_and_the_rates_used():
    plan = make_plan(spec(), SHAPES, "cuda", speed=RATES)
    assert plan.speed == RATES.to_dict()
    assert plan.seconds == pytest.approx(sum(p.seconds for p in plan.stages.values()), abs=0.1)
    assert set(plan.to_dict()["stages"]["training"]) == {"device_bytes", "host_bytes", "seconds"}
    faster = make_plan(spec(), SHAPES, "cuda", speed=Speed(**RATES.to_dict() | {"matmul_flops": 1e13}))
    assert faster.stages["training"].seconds < plan.stages["training"].seconds / 5
    nominal = make_plan(spec(), SHAPES, "cpu")
    assert nominal.speed["source"] == "nominal"
    assert make_plan(spec(), SHAPES, "cuda").seconds < nominal.seconds


def test_a_worker_measures_its_own_rates_once():
    first = device_speed("cpu", "float32")
    assert first.source == "measured"
    assert all(math.isfinite(v) and v > 0
               for v in (first.matmul_flops, first.sort_elements, first.move_bytes, first.step_s))
    assert first.read_bytes == NOMINAL["cpu"].read_bytes  # storage is not measured
    assert device_speed("cpu", "float32") is first


def test_a_measurement_that_fails_leaves_the_nominal_rates_labelled_so():
    speed = device_speed("cpu", "no_such_dtype")
    assert speed.source.startswith("nominal: measuring cpu failed")
    assert speed.matmul_flops == NOMINAL["cpu"].matmul_flops


@pytest.mark.parametrize(("seconds", "text"), [(12.3, "12 s"), (150, "2 min"), (5400, "1.5 h")])
def test_seconds_read_as_a_person_would_say_them(seconds, text):
    assert format_seconds(seconds) == text
