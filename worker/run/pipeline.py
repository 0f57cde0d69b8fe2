"""The job runner: load → prune → probe → extract → train → merge → evaluate → export.

Each stage measures the model it produced: the loading stage also measures the dense baseline (and, when
restoring, lets the method take what it needs from the dense model), so the dense and the pruned model are never in
memory at once. Stages that a spec does not need are skipped; the rest are reported in this order, with
overall progress rising monotonically and a cancellation checkpoint between stages (and inside long ones).
With a :class:`~worker.run.resume.Resumer` the runner saves checkpoints at stage boundaries and during training,
and a run that finds one continues from it (stages before it are skipped, their results taken back).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.methods import PRUNING_METHODS, restoration_method
from app.plan import calibration_batch, planned_stages
from app.schemas import JobSpec, Stage
from worker.errors import (
    DataError,
    ExportCheckError,
    InsufficientMemoryFailure,
    JobFailure,
    OutOfMemoryFailure,
    SpecError,
)
from worker.reporting import Reporter, checkpoint
from worker.run import failpoints
from worker.run.check import check_job, data_field, hub_commits
from worker.run.resume import Resumer
from worker.run.stagemeter import StageMeter, return_large_frees

# Rough share of a job's time per stage, for the overall progress fraction.
STAGE_WEIGHTS: dict[Stage, float] = {
    Stage.loading: 0.10,
    Stage.pruning: 0.20,
    Stage.probing: 0.08,
    Stage.extracting: 0.02,
    Stage.training: 0.35,
    Stage.merging: 0.02,
    Stage.evaluating: 0.18,
    Stage.exporting: 0.05,
}

REPORT_VERSION = 1


class StageProgress:
    """Turns a stage-local fraction into the job's overall progress."""

    def __init__(self, reporter: Reporter, stages: list[Stage]):
        self.reporter = reporter
        total = sum(STAGE_WEIGHTS[s] for s in stages)
        self._span: dict[Stage, tuple[float, float]] = {}
        acc = 0.0
        for s in stages:
            w = STAGE_WEIGHTS[s] / total
            self._span[s] = (acc, w)
            acc += w
        self._current: Stage | None = None
        self._last = 0.0

    def enter(self, stage: Stage) -> None:
        self._current = stage
        self.reporter.stage(stage)
        self(0.0, stage.value)

    def __call__(self, fraction: float, message: str = "") -> None:
        assert self._current is not None
        start, width = self._span[self._current]
        overall = max(self._last, min(1.0, start + width * max(0.0, min(1.0, fraction))))
        self._last = overall
        self.reporter.progress(overall, message)

    def done(self) -> None:
        self._last = 1.0
        self.reporter.progress(1.0, "done")


@dataclass
class RunState:
    """What flows between stages."""

    spec: JobSpec
    out_dir: Path
    model: Any = None
    tokenizer: Any = None
    adapter: Any = None
    source: Any = None
    report: dict[str, Any] = field(default_factory=dict)
    checked: Any = None  # CheckedJob: resolved sources and geometry
    method: Any = None  # the job's RestoreMethod (worker.restore.method)
    prepared: bool = False  # the method has seen the dense model
    zero_masks: Any = None  # ZeroMasks of the pruned model (worker.prune.measure)
    resumer: Resumer = field(default_factory=Resumer)
    device: str = "cpu"
    devices: tuple[str, ...] = ()  # the GPUs a split model is spread over (the first is ``device``)
    device_map: dict[str, str] | None = None  # a split model's modules → GPUs, made at its first load
    store: Any = None  # LayerStore of a layer-streamed model (worker.model.streaming), else None

    def layer_scope(self, layer: int, write: bool = False) -> Any:
        """A streamed model's layer held in memory (``write``: saved when released); only while streaming."""
        return self.store.resident(layer, write)

    @property
    def scope(self) -> Any:
        """:meth:`layer_scope` when streaming, else None (what the stages' functions take)."""
        return self.layer_scope if self.store is not None else None

    @property
    def streaming(self) -> bool:
        return (self.report.get("plan") or {}).get("mode") == "streaming"


def run_pipeline(spec: JobSpec, out_dir: Path, reporter: Reporter, resumer: Resumer | None = None) -> dict[str, Any]:
    """Run one job; write ``out_dir/{model/, report.json, ...}``; return the report. With ``resumer``, save
    checkpoints and continue from the one it finds."""
    planned: list[MemoryChoice] = []
    try:  # worker.run.check, before the heavy imports: a bad job, or one that cannot fit, is refused in seconds
        pins = resumer.hub_commits() if resumer is not None else {}  # a resumed job reads its hub models as before
        checked = check_job(spec, on_config=lambda c: planned.append(plan_memory(spec, c, reporter)), pins=pins)
    except JobFailure:
        if resumer is not None:
            resumer.close()
        raise
    memory = planned[0]
    import torch
    import transformers

    from worker.model.data import DataFormatError

    transformers.utils.logging.disable_progress_bar()  # the reporter shows progress
    return_large_frees()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = planned_stages(spec)
    progress = StageProgress(reporter, stages)
    meter = StageMeter(memory.device, memory.available.devices if memory.plan.mode == "split" else ())
    state = RunState(spec=spec, out_dir=out_dir, checked=checked, method=checked.method,
                     resumer=resumer or Resumer(), device=memory.device, devices=memory.available.devices)

    runners: dict[Stage, Callable[[RunState, StageProgress, Reporter], None]] = {
        Stage.loading: _stage_loading,
        Stage.pruning: _stage_pruning,
        Stage.probing: _restoration_stage(_probe),
        Stage.extracting: _restoration_stage(_select),
        Stage.training: _restoration_stage(_train),
        Stage.merging: _restoration_stage(_merge),
        Stage.evaluating: _stage_evaluating,
        Stage.exporting: _stage_exporting,
    }
    torch.manual_seed(spec.seed)
    _start_report(state, meter, reporter)
    t0 = time.perf_counter()
    try:
        _record_inputs(state)
        _record_memory(state, memory)
        for stage in stages:
            checkpoint(reporter)
            progress.enter(stage)
            with meter.measure(stage.value):
                runners[stage](state, progress, reporter)
    except torch.OutOfMemoryError as exc:
        raise OutOfMemoryFailure(f"out of memory during {progress._current}: {exc}".strip()) from exc
    except MemoryError as exc:
        raise OutOfMemoryFailure(f"out of host memory during {progress._current}") from exc
    except DataFormatError as exc:  # a data file that changed after check_job: name its field
        raise DataError(exc.message, field=exc.field or data_field(spec, exc.path)) from exc
    finally:
        state.resumer.close()
        _drop_streamed_layers(state)
    state.report["seconds_total"] = round(time.perf_counter() - t0, 3)
    state.report["attempts"][-1]["checkpoints"] = state.resumer.writes
    _write_report(state)
    progress.done()
    return state.report


def _drop_streamed_layers(state: RunState) -> None:
    """A streamed job's scratch layer files, whether it ended or failed (the exported model has been written)."""
    import shutil

    if state.store is not None:
        state.store.close()
    for name in ("model", "dense"):
        shutil.rmtree(state.out_dir / f".{name}-layers", ignore_errors=True)


def _new_report(spec: JobSpec) -> dict[str, Any]:
    import torch
    import transformers

    return {
        "version": REPORT_VERSION,
        "spec": spec.model_dump(mode="json"),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
        "metrics": {},
    }


def _start_report(state: RunState, meter: StageMeter, reporter: Reporter) -> None:
    """A new report, or the one saved with the checkpoint this run resumes from (its metrics reported again);
    either way this run is listed under ``attempts`` with where it started."""
    saved = state.resumer.load(reporter)
    state.report = saved if saved is not None else _new_report(state.spec)
    if saved is not None:
        if saved.get("attempts"):  # the stage times of the run that wrote the checkpoint, up to it
            saved["attempts"][-1]["stages"] = saved.get("stages", {})
        metrics = {k: v for k, v in saved.get("metrics", {}).items() if v}
        if "sparsity" in saved:
            metrics["sparsity"] = saved["sparsity"]["overall"]
        if metrics:
            reporter.metrics(metrics)
    state.report["stages"] = meter.stages
    state.report.setdefault("attempts", []).append(
        {"attempt": state.resumer.attempt, "resumed_from": state.resumer.resumed_from()})


def _record_inputs(state: RunState) -> None:
    """The data files' digests and the local models' identities in the report; a resumed run goes on only with the
    files and models its checkpoint came from."""
    from worker.run.lineage import changed_since, data_digests, model_changed_since, model_identities

    now = data_digests(state.spec)
    models = model_identities((state.checked.source, state.checked.dense_source))
    ck = state.resumer.checkpoint
    if ck is not None:
        changed = (changed_since(state.report.get("data"), now, ck.point)
                   or model_changed_since(state.report.get("model_files"), models, ck.point))
        if changed is not None:
            raise changed
    state.report["data"] = now
    state.report["model_files"] = models


def _save(state: RunState, point: str, parts: dict[str, Any] | None = None, copy: tuple[str, ...] = (),
          drop: tuple[str, ...] = ()) -> None:
    state.resumer.save(point, state.report, parts, copy=copy, drop=drop)


def _write_report(state: RunState) -> None:
    path = state.out_dir / "report.json"
    path.write_text(json.dumps(state.report, indent=2, sort_keys=False) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class MemoryChoice:
    device: str
    available: Any  # DeviceBudget
    plan: Any  # app.plan.Plan


def plan_memory(spec: JobSpec, checked: Any, reporter: Reporter) -> MemoryChoice:
    """Pick the device and plan the job's memory (whole, split over the worker's GPUs, or streamed), sent as a
    ``plan`` event; a plan that does not fit fails the job here, before any weight loads
    (InsufficientMemoryFailure)."""
    from worker.run.check import streaming_problem
    from worker.run.device import budget, choose_plan, job_devices, plan_job

    devices = job_devices()
    device = devices[0]
    available = budget(device, devices=devices)
    problem = streaming_problem(spec, checked.source, checked.dense_source)
    event = {"source": "worker", "device": device, "device_name": available.name,
             "available_bytes": {"device": available.device_bytes, "host": available.host_bytes}}
    if len(devices) > 1:
        event["gpus"] = devices
    try:
        plan = choose_plan(spec, checked.source, checked.config, available, problem)
    except InsufficientMemoryFailure:  # the plan refused: the split or streamed one when that was asked for
        refused = plan_job(spec, checked.source, checked.config, device, streaming=spec.model.streaming == "on",
                           devices=len(devices) if spec.model.split == "on" else 1)
        reporter.event("plan", event | {"devices": {refused.device: refused.to_dict()}})
        raise
    reporter.event("plan", event | {"devices": {plan.device: plan.to_dict()}})
    return MemoryChoice(device, available, plan)


def _record_memory(state: RunState, memory: MemoryChoice) -> None:
    """The plan and the device in the report."""
    state.report["plan"] = memory.plan.to_dict()
    state.report["environment"].update(device=memory.device, device_name=memory.available.name,
                                       device_memory_bytes=memory.available.device_bytes)
    if memory.plan.mode == "split":
        state.report["environment"]["devices"] = list(memory.available.devices)



# ── loading ──────────────────────────────────────────────────────────────────────────────────────────


def _stage_loading(state: RunState, progress: StageProgress, reporter: Reporter) -> None:
    spec = state.spec
    source, info, dense_source = state.checked.source, state.checked.info, state.checked.dense_source
    state.report["model"] = {"id": spec.model.id, "source": str(source), "arch": info.__dict__}
    if commits := hub_commits(state.checked):
        state.report["model"]["commits"] = commits
    checkpoint(reporter)
    if state.resumer.reached("prepared"):
        _resume_model(state, source, progress)
        return

    if dense_source is not None:
        progress(0.05, "loading the dense reference")
        tokenizer = _tokenizer(source)  # the dense model is measured on the ids the job trains and exports with
        _same_vocabulary(tokenizer, _tokenizer(dense_source))  # before any of its weights load
        model, _, store = _load(state, dense_source, "dense")
        try:
            _measure_dense(state, model, tokenizer, store.adapter if store else _adapter(model, "model.dense"),
                           progress, reporter)
        finally:  # its hooks go whatever happens (a failure, a cancellation)
            if store is not None:
                store.close()
        del model, store
        _free_memory()

    progress(0.4, "loading the model")
    state.model, state.tokenizer, state.store = _load(state, source, "model")
    state.adapter = state.store.adapter if state.store is not None else _adapter(state.model)
    state.source = source
    if dense_source is None and spec.pruning.method != "none":
        _measure_dense(state, state.model, state.tokenizer, state.adapter, progress, reporter)
    elif not state.prepared:  # already pruned, and the method needs nothing from a dense model
        _prepare(state, state.model, state.tokenizer, state.adapter, progress)
    _save(state, "prepared", {"method": state.method.state()}, copy=("method",))


def _tokenizer(source: Any) -> Any:
    from worker.model.load import load_tokenizer

    return load_tokenizer(source)


def _same_vocabulary(tokenizer: Any, dense_tokenizer: Any) -> None:
    """model.dense is refused when its tokenizer maps tokens to other ids than model.id's: its next-token
    distributions would be targets for other tokens (no error, a silently wrong restoration)."""
    from worker.model.load import vocabulary_difference

    difference = vocabulary_difference(tokenizer, dense_tokenizer)
    if difference is not None:
        raise SpecError(f"model.dense's tokenizer is not model.id's: {difference}; give the dense model the pruned "
                        "one was made from", field="model.dense")


def _load(state: RunState, source: Any, name: str) -> tuple[Any, Any, Any]:
    """(model, tokenizer, LayerStore or None): the whole model, or its layers streamed as the plan chose."""
    from worker.model.load import load_model, load_streamed_model

    if state.streaming:
        return load_streamed_model(source, state.spec.model.dtype, state.device, state.out_dir / f".{name}-layers")
    model, tokenizer = load_model(source, state.spec.model.dtype, device=state.device, device_map=_device_map(state))
    return model, tokenizer, None


def _device_map(state: RunState) -> dict[str, str] | None:
    """Where each module goes when the plan split the model over several GPUs (worker.model.placement); the dense
    reference and the model share it."""
    plan = state.report.get("plan") or {}
    if plan.get("mode") != "split":
        return None
    if state.device_map is None:
        from worker.model.placement import meta_model, split_device_map

        state.device_map = split_device_map(meta_model(state.checked.config), plan["layer_devices"],
                                            list(state.devices))
    return state.device_map


def _resume_model(state: RunState, source: Any, progress: StageProgress) -> None:
    """The model as the checkpoint left it: loaded (whole or streamed, as this run's plan says: the run that wrote
    the checkpoint may have chosen the other), its pruned weights put back, the method's state taken back."""
    progress(0.4, "loading the model to resume")
    state.model, state.tokenizer, state.store = _load(state, source, "model")
    state.adapter = state.store.adapter if state.store is not None else _adapter(state.model)
    state.source = source
    layers = state.resumer.pruned_layers(len(state.adapter.layers))
    if layers and state.spec.pruning.method != "none":
        progress(0.8, "putting back the pruned weights")
        if state.store is None:
            state.resumer.apply_weights({n: lin for i in layers for n, lin in state.adapter.layer_linears(i).items()})
        elif files := state.resumer.layer_files():  # the layers' files: a streamed run reads its layers from them
            state.store.read_from(list(files.values()))
        else:  # a whole-model weights part (an earlier release): put in layer by layer, each written to scratch
            for i in layers:
                with state.layer_scope(i, write=True):
                    state.resumer.apply_weights(state.adapter.layer_linears(i))
    saved = state.resumer.method_state()
    if saved is not None:
        state.method.load_state(saved)
    state.prepared = True


def _adapter(model, field: str = "model.id"):
    from worker.errors import UnsupportedModelError
    from worker.model.arch import DecoderAdapter, UnsupportedArchitectureError

    try:
        return DecoderAdapter(model)
    except UnsupportedArchitectureError as exc:
        raise UnsupportedModelError(str(exc), field=field) from exc


def _measure_dense(state: RunState, model, tokenizer, adapter, progress: StageProgress, reporter) -> None:
    """Dense-model measurements taken while it is in memory: baseline metrics, restoration inputs."""
    spec = state.spec
    if spec.evaluation.dense and _has_evaluation(spec):
        metrics = _evaluate(model, tokenizer, spec, lambda f, m: progress(0.45 + 0.35 * f, f"dense: {m}"))
        state.report["metrics"]["dense"] = metrics
        reporter.metrics({"dense": metrics})
    checkpoint(reporter)
    _prepare(state, model, tokenizer, adapter, lambda f, m: progress(0.8 + 0.1 * f, m))
    checkpoint(reporter)
    _capture_dense_targets(state, model, tokenizer, lambda f, m: progress(0.9 + 0.1 * f, m))


def _capture_dense_targets(state: RunState, model, tokenizer, progress: Callable[[float, str], None]) -> None:
    """The distill objective's targets: the dense model's next-token distributions on the training samples, taken
    now while it is in memory. Kept with the method's state, so every later checkpoint carries them."""
    import time

    from worker.model.data import batch_pad_id
    from worker.restore.batches import training_batches, training_samples
    from worker.restore.objective import capture_dense_targets

    r = state.spec.restoration
    if not r.needs_dense_targets():
        return
    assert state.spec.data.train is not None
    start = time.monotonic()
    pad = batch_pad_id(tokenizer)
    samples, _ = training_samples(tokenizer, state.spec.data.train, r)
    # only the samples training will see: with max_steps, its first max_steps × grad_accum batches
    batches = training_batches(tokenizer, state.spec.data.train, r, state.spec.seed)
    used = batches.samples_used(r.max_steps * r.grad_accum if r.max_steps is not None else None)
    targets = capture_dense_targets(
        model, samples, pad, r.distill_top_k, r.distill_tokens, batch_size=r.batch_size, only=used,
        progress=lambda done, total: progress(done / total, f"dense targets: batch {done}/{total}"))
    state.method.dense_targets = targets
    state.report["dense_targets"] = {
        "samples": len(used), "of_samples": len(samples), "tokens": targets.rows, "top_k": r.distill_top_k,
        "positions": r.distill_tokens,
        "bytes": targets.nbytes, "bytes_per_token": round(targets.nbytes / max(1, targets.rows), 1),
        "seconds": round(time.monotonic() - start, 3),
    }


def _prepare(state: RunState, model, tokenizer, adapter, progress: Callable[[float, str], None]) -> None:
    state.method.prepare(state.spec, model, tokenizer, adapter, progress)
    state.prepared = True


def _has_evaluation(spec: JobSpec) -> bool:
    ev = spec.evaluation
    return bool(ev.perplexity or ev.response_perplexity or ev.tasks)


def _evaluate(model, tokenizer, spec: JobSpec, progress: Callable[[float, str], None],
              state: RunState | None = None, key: str = "") -> dict[str, Any]:
    """The spec's evaluation. With ``state``, each finished set is noted in the checkpoint (under
    ``report["partial_metrics"][key]``), so a resumed run evaluates only the sets that were not finished."""
    from worker.run.evaluate import evaluate_spec

    if state is None:
        return evaluate_spec(model, tokenizer, spec.evaluation, progress=progress)
    partial = state.report.setdefault("partial_metrics", {})

    def note(results: dict[str, Any]) -> None:
        partial[key] = dict(results)
        state.resumer.note(state.report)
        failpoints.reach(f"evaluated:{key}:{len(results)}")

    metrics = evaluate_spec(model, tokenizer, spec.evaluation, progress=progress, done=partial.get(key), on_set=note)
    partial.pop(key, None)
    if not partial:
        del state.report["partial_metrics"]
    return metrics


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ── pruning ──────────────────────────────────────────────────────────────────────────────────────────


def _stage_pruning(state: RunState, progress: StageProgress, reporter: Reporter) -> None:
    from worker.model.data import read_calibration_texts
    from worker.prune.runner import build_calibration_batches, prune_model
    from worker.run.lineage import START_OVER

    spec = state.spec
    if state.resumer.reached("pruned"):  # the weights came back with the model
        _after_pruned(state, progress, reporter)
        return
    calibration = None
    if PRUNING_METHODS[spec.pruning.method].needs_calibration:
        path = spec.data.calibration or spec.data.train
        assert path is not None  # the spec validator guarantees it
        texts = read_calibration_texts(path)
        try:
            calibration = build_calibration_batches(
                state.tokenizer,
                texts,
                n_samples=spec.pruning.calibration_samples,
                seq_len=spec.pruning.seq_len,
                batch_size=calibration_batch(spec.pruning.calibration_samples, spec.pruning.seq_len),
                seed=spec.seed,
            )
        except DataError as exc:  # the file it read, unless it names a field of its own (calibration_samples)
            field = "data.calibration" if spec.data.calibration else "data.train"
            raise DataError(f"{field}: {exc.message}", field=exc.field or field) from exc
    digest = _calibration_digest(calibration)
    resume = state.resumer.pruning_resume()
    if resume is not None and resume[2] != digest:
        field = "data.calibration" if spec.data.calibration else "data.train"
        raise DataError(f"{field} changed since this job's pruning checkpoint was written; the calibration inputs "
                        f"it saved no longer match: restore the file, or start over: {START_OVER}", field=field)
    saver = state.resumer.pruning_saver(len(state.adapter.layers), lambda layer: _layer_part(state, layer),
                                        lambda: state.report, lambda: _stopped_to_go_on(reporter), digest)
    summary = prune_model(
        state.model,
        state.adapter,
        spec.pruning,
        calibration,
        progress=lambda f, m: progress(0.75 * f, m),
        should_stop=reporter.cancel_requested,
        layer_scope=(lambda i: state.layer_scope(i, write=True)) if state.store is not None else None,
        resume=resume[:2] if resume is not None else None,
        after_layer=saver,
        damping_raised=state.report.setdefault("pruning", {}).setdefault("damping_raised", {}),
    )
    state.report["pruning"] = summary
    _save(state, "pruned", drop=("calibration",))  # names the layers uploaded as they were done
    _after_pruned(state, progress, reporter)


def _layer_part(state: RunState, layer: int) -> Any:
    """A pruned layer's checkpoint part: a streamed layer's scratch file as it is, else its pruned weights under
    their own names."""
    if state.store is not None:
        return state.store.written(layer)
    return {f"{n}.weight": lin.weight for n, lin in state.adapter.layer_linears(layer).items()}


def _calibration_digest(batches: Any) -> str:
    """What a pruning checkpoint's calibration inputs were computed from: the calibration tokens."""
    import hashlib

    h = hashlib.sha256()
    for b in batches or []:
        h.update(b.input_ids.cpu().numpy().tobytes())
        h.update(b.attention_mask.cpu().numpy().tobytes())
    return h.hexdigest()


def _stopped_to_go_on(reporter: Reporter) -> bool:
    """Asked to stop so that the job goes on later — preempted, or out of time (a retry resumes) — not cancelled:
    worth a checkpoint."""
    return reporter.cancel_requested() and bool(getattr(reporter, "preempted", False)
                                                or getattr(reporter, "timed_out", False))


def _after_pruned(state: RunState, progress: StageProgress, reporter: Reporter) -> None:
    """Sparsity and metrics of the pruned model (given already pruned, or just pruned)."""
    from worker.prune.measure import measure_sparsity, zero_masks

    state.report["sparsity"] = measure_sparsity(state.adapter, nm=state.spec.pruning.nm, layer_scope=state.scope)
    state.zero_masks = zero_masks(state.adapter, state.scope)
    reporter.metrics({"sparsity": state.report["sparsity"]["overall"]})
    checkpoint(reporter)
    if state.resumer.reached("pruned-evaluated"):  # its metrics came back with the report
        return
    if _has_evaluation(state.spec):
        metrics = _evaluate(state.model, state.tokenizer, state.spec,
                            lambda f, m: progress(0.75 + 0.25 * f, f"pruned: {m}"), state, "pruned")
        state.report["metrics"]["pruned"] = metrics
        reporter.metrics({"pruned": metrics})
    _save(state, "pruned-evaluated")


# ── restoration (probe, extract, train, merge) ───────────────────────────────────────────────────────


def _restoration_stage(step: Callable[[RunState, StageProgress, Reporter], None]
                       ) -> Callable[[RunState, StageProgress, Reporter], None]:
    def run(state: RunState, progress: StageProgress, reporter: Reporter) -> None:
        if state.zero_masks is None:  # given already pruned: measure it before restoring
            _after_pruned(state, progress, reporter)
        step(state, progress, reporter)

    return run


def _probe(state: RunState, progress: StageProgress, reporter: Reporter) -> None:
    if state.resumer.reached("probed"):
        progress(1.0, "probed before the job resumed")
        return
    state.method.probe(state, progress)
    _save(state, "probed", {"method": state.method.state()}, copy=("method",))


def _select(state: RunState, progress: StageProgress, reporter: Reporter) -> None:
    if state.resumer.reached("selected"):
        progress(1.0, "extracted before the job resumed")
        return
    state.method.select(state, progress, lambda: checkpoint(reporter))
    _save(state, "selected", {"method": state.method.state()}, copy=("method",))


def _train(state: RunState, progress: StageProgress, reporter: Reporter) -> None:
    from worker.restore.batches import training_batches
    from worker.restore.objective import make_objective
    from worker.restore.train import TrainControl

    spec, method = state.spec, state.method
    assert spec.data.train is not None

    def step_progress(step: int, total: int, loss: float) -> None:
        progress(step / total if total else 0.0, f"step {step}/{total or '?'} · loss {loss:.4f}")

    batches = training_batches(state.tokenizer, spec.data.train, spec.restoration, spec.seed)
    objective = make_objective(spec.restoration, method.dense_targets)
    control = TrainControl(progress=step_progress, should_stop=reporter.cancel_requested,
                           resume=state.resumer.train_state(), save=state.resumer.train_saver(lambda: state.report),
                           objective=objective, max_grad_norm=spec.restoration.max_grad_norm)
    if state.store is not None:  # each layer recomputed from its input in the backward, one at a time
        from worker.model.streaming import checkpointed_layers

        with checkpointed_layers(state.store):
            stats = method.train(state, batches, control)
    else:
        stats = method.train(state, batches, control)
    method.report.update(
        method=spec.restoration.method,
        trainable_params=stats["trainable_params"],
        loss_curve=[round(float(x), 5) for x in stats["loss_curve"]],
        grad_norm_curve=[round(float(x), 5) for x in stats["grad_norm_curve"]],  # before clipping (max_grad_norm)
        clipped_steps=stats["clipped_steps"],
        steps=stats["steps"],
        objective=objective.name,
        train_tokens=stats["tokens"],
        train_seconds=round(stats["seconds"], 3),
        train_samples=batches.n,
        train_rows_without_response=batches.left_out,  # prompts that fill max_seq_len: nothing to learn from
    )
    method.report.update(stats.get("report", {}))
    reporter.metrics({"trainable_params": stats["trainable_params"], "train_steps": stats["steps"]})


def _merge(state: RunState, progress: StageProgress, reporter: Reporter) -> None:
    """Fold the restoration into the weights (the method checks merged logits against the unmerged model's)."""
    from worker.restore.method import check_batch

    assert state.spec.data.train is not None
    state.method.merge(state, check_batch(state.tokenizer, state.spec.data.train), progress)
    progress(1.0, "merged")


# ── evaluating and exporting ─────────────────────────────────────────────────────────────────────────


def _stage_evaluating(state: RunState, progress: StageProgress, reporter: Reporter) -> None:
    spec = state.spec
    if state.zero_masks is None:
        _after_pruned(state, progress, reporter)
        return
    if not restoration_method(spec.restoration.method).trains or not _has_evaluation(spec):
        progress(1.0, "nothing more to evaluate")
        return
    if state.resumer.reached("evaluated"):  # its metrics came back with the report
        progress(1.0, "evaluated before the job resumed")
        return
    metrics = _evaluate(state.model, state.tokenizer, spec, lambda f, m: progress(f, f"restored: {m}"), state,
                        "restored")
    state.report["metrics"]["restored"] = metrics
    reporter.metrics({"restored": metrics})
    _save(state, "evaluated")


def _stage_exporting(state: RunState, progress: StageProgress, reporter: Reporter) -> None:
    from worker.run.export import copy_tokenizer_files, export_model, reload_problem, write_plots

    progress(0.1, "checking sparsity")
    identical = state.zero_masks is not None and not state.zero_masks.differs(state.adapter, state.scope)
    state.report.setdefault("checks", {})["zeros_identical"] = identical
    if not identical:
        raise ExportCheckError("internal check failed: the restored model lost pruned zeros (a bug: please report "
                               "it)")
    state.report["output"] = {"primary": "model/", "dtype": state.spec.output.dtype}
    progress(0.3, "saving the model")
    if state.store is not None:
        from worker.restore.offsets.merge import export_config
        from worker.run.export import export_streamed

        merged = restoration_method(state.spec.restoration.method).trains
        config = export_config(state.model.config) if merged else None
        export_streamed(state.model, state.store, state.tokenizer, state.out_dir / "model", state.spec.output.dtype,
                        config)
    else:
        export_model(state.model, state.tokenizer, state.out_dir / "model", state.spec.output.dtype)
    own_dir = state.checked.source.kind == "hf_dir"  # a GGUF's folder may be shared: nothing copied from it
    if own_dir:
        copy_tokenizer_files(Path(state.checked.source.path), state.out_dir / "model")
    if state.spec.output.dtype != "auto":  # a cast can flush tiny weights to zero or large ones to infinity
        progress(0.6, "checking the saved weights")
        problem = _saved_weights_problem(state.out_dir / "model", state.zero_masks)
        if problem is not None:
            raise SpecError(f"output.dtype {state.spec.output.dtype} {problem}; export in a wider dtype",
                            field="output.dtype")
    problem = reload_problem(state.out_dir / "model")
    if problem is not None:
        raise ExportCheckError(f"internal check failed: the exported model would not load as restored: {problem} "
                               "(a bug: please report it)")
    state.method.export(state, state.out_dir)
    if restoration_method(state.spec.restoration.method).trains:
        state.report["restoration"] = state.method.report
    progress(0.75, "writing the model card")
    from worker.run.model_card import source_dir, write_model_card

    write_model_card(state.out_dir / "model", state.spec, state.report, source_dir(state.checked.source),
                     copy_files=own_dir)
    progress(0.8, "writing the report")
    _write_report(state)
    write_plots(state.report, state.out_dir)
    _write_report(state)


def _saved_weights_problem(directory: Path, masks: dict[str, Any]) -> str | None:
    """What the cast to the output dtype broke in the saved tensors (kept weights flushed to zero, values beyond
    the dtype's range turned infinite: bfloat16's range is float32's, float16's ends at 65504), or None."""
    from safetensors import safe_open

    from worker.chunks import all_finite

    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = fh.get_tensor(key)
                if tensor.is_floating_point() and not all_finite(tensor):
                    return f"turns values of {key} infinite"
                name = key.removesuffix(".weight")
                if key.endswith(".weight") and name in masks and not bool(((tensor == 0) == masks[name]).all()):
                    return f"turns kept weights of {key} into zeros"
    return None


__all__ = ["run_pipeline", "planned_stages", "check_job", "StageProgress"]
