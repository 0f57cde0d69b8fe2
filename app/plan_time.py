"""The time part of a job's plan: each stage's work, counted from the config's shapes and the spec, and the seconds
it takes at a device's speed. No weights, no torch.

A stage's work is counted in six units, each with the rate that limits it:

- ``flops``: matrix-multiply floating-point operations (forward passes 2 per parameter and token; training
  :data:`TRAIN_FLOPS` per parameter and token, 2 more when streaming recomputes each layer; SparseGPT's Hessians,
  their inverses and its column updates);
- ``sorted``: weight elements ranked by a sort (Wanda's and magnitude's per-row or per-group selection,
  SparseGPT's mask choice);
- ``read`` and ``written``: bytes of weights read from and written to storage;
- ``moved``: in layer streaming, the decoder layers' bytes brought to the compute device, once per pass over the
  layers (every batch's forward; training's backward recomputes each layer once more);
- ``steps``: steps of a loop of small dependent tensor operations, one per input column of every Linear that
  SparseGPT prunes (each column's update waits for the previous one). On a GPU a step costs the latency of its
  kernel launches, not its arithmetic: for a 7B model these steps, not the flops, are most of SparseGPT's time.

Token counts: calibration sequences are windows of ``seq_len`` tokens; instruction rows and evaluation rows are
counted at :data:`FILL` of their limit (``max_seq_len``: padded batches run at their longest row's length, most
rows end well short of the limit), every evaluation set at its ``limit`` rows (or :data:`ROWS_WHEN_UNLIMITED`).
Data much shorter or longer than that moves the prediction with it. A job's time is the sum of its stages'; each
stage also pays a fixed start cost (imports, tokenization, hooks).

:class:`Speed` holds the rates. A worker measures on its own device the matrix-multiply rate in the job's dtype,
the sort rate in float32 (what pruning sorts) and the seconds of one SparseGPT column step
(worker.run.speed.device_speed), and applies the efficiencies below, fitted to measured stage times of
Llama-shaped models from 135M to 7B parameters on a CPU (``python -m bench scaling``, docs/scaling.md, where every
prediction stands beside its measurement). On an H200 at 7B and 8B they predict well under the measured times
(whole jobs about half; stages of a few seconds, which are mostly fixed costs, less): the time plan is not yet
fitted to a GPU. The API, which cannot measure the worker's device, uses :data:`NOMINAL` for each device kind.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from app.methods import PRUNING_METHODS, restoration_method

if TYPE_CHECKING:
    from app.schemas import JobSpec, Stage
    from app.shapes import Shapes

FILL = 0.5  # an instruction or evaluation batch's length, as a share of max_seq_len
ROWS_WHEN_UNLIMITED = 1000  # evaluation.limit null: every row of a set, counted as this many
CHOICES_PER_TASK_ROW = 3  # a multiple-choice row scores each choice (BoolQ and PIQA 2, OpenBookQA 4)
# Fitted (bench scaling), each with what it stands for:
# the weights are frozen, so the backward computes input gradients only (2 flops per parameter and token, like the
# forward); measured, a step costs about 1.5× that much: autograd's elementwise work and the optimizer's
TRAIN_FLOPS = 6
PROMPT_FILL = 0.15  # an instruction's prompt alone, as a share of max_seq_len (probing captures at its last token)
MERGE_CHECK_PASSES = 1
# the share of the measured matrix-multiply and sort rates a stage reaches, and each stage's fixed start cost
MATMUL_EFFICIENCY = 0.5
SORT_EFFICIENCY = 0.5
STAGE_START_S = 0.5


@dataclass(frozen=True)
class Speed:
    """A device's rates in the job's compute dtype."""

    matmul_flops: float  # floating-point operations per second (measured: one large matrix multiply)
    sort_elements: float  # elements per second of a stable sort along rows, float32
    read_bytes: float  # storage → memory, bytes per second
    write_bytes: float  # memory → storage
    move_bytes: float  # a streamed layer's tensors from the (cached) file onto the compute device
    step_s: float  # seconds per step of a loop of small dependent operations (measured: SparseGPT's columns)
    source: str = "nominal"  # "measured" (on this worker's device) or "nominal" (a typical device of its kind)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# A typical device of each kind, for plans made where the worker's device cannot be measured (the API at submit).
# The CPU figures are those of the bench machine (docs/scaling.md; its column step measured as a worker does, at 64
# rows: taller matrices cost more per column on a CPU); the CUDA ones a data-centre GPU's. The CUDA column step is an
# H200's (docs/scaling.md): 162 µs while SparseGPT's loop still checked every N:M group for NaN; without the check,
# a rerun of the same job (the model built anew) had not ended about 230 s in (273 s before), so at least about 127 µs.
NOMINAL: dict[str, Speed] = {
    "cpu": Speed(matmul_flops=0.8e12, sort_elements=35e6, read_bytes=400e6, write_bytes=400e6, move_bytes=4e9,
                 step_s=250e-6),
    "cuda": Speed(matmul_flops=400e12, sort_elements=4e9, read_bytes=2e9, write_bytes=1e9, move_bytes=10e9,
                  step_s=150e-6),
}


@dataclass(frozen=True)
class Work:
    flops: float = 0.0
    sorted: float = 0.0
    read: float = 0.0
    written: float = 0.0
    moved: float = 0.0
    steps: float = 0.0

    def __add__(self, other: Work) -> Work:
        return Work(self.flops + other.flops, self.sorted + other.sorted, self.read + other.read,
                    self.written + other.written, self.moved + other.moved, self.steps + other.steps)

    def seconds(self, speed: Speed) -> float:
        return (STAGE_START_S + self.flops / (MATMUL_EFFICIENCY * speed.matmul_flops)
                + self.sorted / (SORT_EFFICIENCY * speed.sort_elements)
                + self.read / speed.read_bytes + self.written / speed.write_bytes + self.moved / speed.move_bytes
                + self.steps * speed.step_s)


def _eval_tokens(spec: JobSpec) -> int:
    ev = spec.evaluation
    rows = ev.limit or ROWS_WHEN_UNLIMITED
    sets = len(ev.perplexity) + len(ev.response_perplexity) + CHOICES_PER_TASK_ROW * len(ev.tasks)
    return int(sets * rows * ev.max_seq_len * FILL)


def _micro_batches(spec: JobSpec) -> int:
    """Forward and backward passes of training: ``max_steps`` optimizer steps of ``grad_accum`` batches each, or
    ``epochs`` passes over the training samples."""
    r = spec.restoration
    if getattr(r, "max_steps", None) is not None:
        return int(r.max_steps) * int(getattr(r, "grad_accum", 1))
    return int(getattr(r, "epochs", 1)) * math.ceil(getattr(r, "train_samples", 0) / max(1, r.batch_size))


def distilled_samples(spec: JobSpec) -> int:
    """The training samples whose dense targets the loading stage captures: those training will see (with
    ``max_steps``, its batches' samples; at most every sample). 0 without the distill objective."""
    r = spec.restoration
    if not restoration_method(r.method).trains or not r.needs_dense_targets():
        return 0
    return min(getattr(r, "train_samples", 0), _micro_batches(spec) * getattr(r, "batch_size", 8))


def _sparsegpt_flops(shapes: Shapes, tokens: int) -> float:
    """Per prunable Linear (out × in): the Hessian from the calibration inputs (2·in²·tokens), its inverse's
    Cholesky factor (≈in³) and the column-by-column updates of the weights (2·out·in²)."""
    per_layer = sum(2 * i * i * tokens + i**3 + 2 * o * i * i for o, i in shapes.linear_shapes())
    return shapes.layers * per_layer


def sparsegpt_columns(shapes: Shapes) -> int:
    """SparseGPT's sequential steps: one per input column of every prunable Linear."""
    return shapes.layers * sum(i for _, i in shapes.linear_shapes())


def stage_work(spec: JobSpec, shapes: Shapes, file_bytes: int, dtype_bytes: int, out_bytes: int,
               streaming: bool = False) -> dict[Stage, Work]:
    """Each stage's work (see the module docstring); ``dtype_bytes``: the compute dtype's, ``out_bytes``: the
    exported weights'. Evaluations are counted where the pipeline runs them: the dense model's while loading
    (when there is a dense model), the pruned model's after pruning (in the first stage after loading when the
    model came pruned), the restored model's in evaluating (when restoration trained)."""
    from app.schemas import Stage

    params = shapes.params()
    stack = shapes.layers * shapes.layer_params()  # the decoder layers: what captures run (no LM head)
    layers_b = stack * dtype_bytes if streaming else 0  # what streaming moves per pass (the whole model: nothing)
    r, p, ev = spec.restoration, spec.pruning, spec.evaluation
    method = restoration_method(r.method)
    seq = int(getattr(r, "max_seq_len", 256) * FILL)
    batch = getattr(r, "batch_size", 8)
    eval_t = _eval_tokens(spec) if (ev.perplexity or ev.response_perplexity or ev.tasks) else 0
    # probing captures the pruned model on the prompts, the dense model also on prompt + response and prompt +
    # negative response when it scores heads by probing (restorelcc's default)
    probes = getattr(r, "probe_samples", 0) if r.needs_activations() else 0
    prompt_t = int(probes * getattr(r, "max_seq_len", 256) * PROMPT_FILL)
    contrastive = getattr(r, "head_selection", None) == "probe"
    dense_probe_t = prompt_t + (2 * probes * seq if contrastive else 0)
    micro = _micro_batches(spec) if method.trains else 0
    capture_t = distilled_samples(spec) * seq
    has_dense = p.method != "none" or bool(spec.model.dense)

    def passes(tokens: int, per_batch: int) -> int:
        return math.ceil(tokens / per_batch) if tokens else 0

    eval_passes = passes(eval_t, int(ev.batch_size * ev.max_seq_len * FILL))
    evaluation = Work(flops=2 * params * eval_t, moved=layers_b * eval_passes)
    dense_eval = ev.dense and has_dense
    loading = Work(flops=2 * params * ((eval_t if dense_eval else 0) + capture_t) + 2 * stack * dense_probe_t,
                   read=file_bytes,
                   moved=layers_b * ((eval_passes if dense_eval else 0) + passes(capture_t, batch * seq)
                                     + passes(probes, batch) * (3 if contrastive else 1)))
    pruning = Work()
    if p.method != "none":
        cal_t = p.calibration_samples * p.seq_len if PRUNING_METHODS[p.method].needs_calibration else 0
        # each layer runs twice over the calibration inputs: once to collect statistics, once for the next input
        flops = 2 * 2 * stack * cal_t + evaluation.flops
        steps = 0
        if p.method == "sparsegpt":
            flops += _sparsegpt_flops(shapes, cal_t)
            steps = sparsegpt_columns(shapes)
        # streamed: each layer comes in once, is pruned and written to scratch, then the pruned model is evaluated
        pruning = Work(flops=flops, sorted=shapes.linear_params(), moved=layers_b + evaluation.moved,
                       written=layers_b, steps=steps)
    merge_t = MERGE_CHECK_PASSES * batch * seq
    stages = {
        Stage.loading: loading,
        Stage.pruning: pruning,
        Stage.probing: Work(flops=2 * stack * prompt_t, moved=layers_b * passes(probes, batch)),
        Stage.extracting: Work(),
        # forward and backward; streaming recomputes each layer's forward in the backward
        Stage.training: Work(flops=(TRAIN_FLOPS + (2 if streaming else 0)) * params * micro * batch * seq,
                             moved=layers_b * 2 * micro),
        Stage.merging: Work(flops=2 * params * merge_t, moved=layers_b * (1 + MERGE_CHECK_PASSES), written=layers_b),
        Stage.evaluating: evaluation if method.trains else Work(),
        Stage.exporting: Work(written=params * out_bytes, read=layers_b),
    }
    if p.method == "none":  # the given pruned model is measured in the first stage after loading
        first = Stage.probing if r.needs_activations() else Stage.training if method.trains else Stage.evaluating
        stages[first] = stages[first] + evaluation
    return stages


def format_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"
