"""A job's memory and time plan, from the model's config and the spec alone: no weights, no torch.

For every stage the plan predicts the peak memory on the compute device and on the host, and the seconds it takes
(app.plan_time: the stage's work at the device's speed), and for the job the bytes the worker reads and writes.
The API makes one at submit when it can read the model's config (a local directory or GGUF file), the worker makes
one before any weight loads and refuses a job whose plan does not fit (``insufficient_memory``).

Each stage's peak is what stays resident (runtime, weights, what the method keeps) plus that stage's largest
transient, and each transient is a count of tensors of a known shape:

- evaluation: the logits of one batch in the model's dtype, and one row of them in float32 twice (the loss is
  taken row by row);
- pruning: per weight matrix, the float32 scores and a stable sort's values and int64 indices (≈18 bytes an
  element); SparseGPT also holds the layer's Hessian and its inverse Cholesky factor (≈3 copies of in² in float64
  on the CPU, float32 on a GPU);
- training: autograd's saved activations per token and layer (four intermediate-width and eight hidden-width
  tensors in the compute dtype) and the logits with their gradient;
- probing: forward passes over probe batches, no gradients (a few intermediate-width activations); on the host,
  the per-head captures of the probe rows (float32, N × layers × heads × head_dim each: the dense model's prompt,
  response and negative from loading on, the pruned model's prompt from probing) and, while extracting, the
  probe's features or the SVD's inputs and factors (about four captures more);
- merging: the merge check's logits and o_proj's weights in float64; an adapter's merge also copies its largest
  weight three times (kept before, peft's safe copy, the update);
- exporting: the safetensors writer's buffers.

The constants below were read off the code and checked against measured peaks of Llama-shaped models from 135M to
7B parameters (bench: ``python -m bench scaling``, docs/scaling.md), where each stage's prediction and measurement
stand side by side.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from app.gguf import GgufError, config_fields, local_gguf, read_header
from app.methods import PRUNING_METHODS, restoration_method
from app.plan_time import NOMINAL, Speed, distilled_samples, stage_work
from app.schemas import JobSpec, Stage
from app.shapes import PlanError, Shapes

__all__ = ["GiB", "LocalModel", "MiB", "Plan", "PlanError", "Shapes", "StagePlan", "make_plan", "read_local_model",
           "split_layers", "submit_plan"]

MiB = 2**20
GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}

# Resident before any weight loads: Python, torch, transformers and the worker (measured on CPU).
RUNTIME_HOST = 380 * MiB
# Extra host memory of a process that has initialised CUDA (context, kernels' host side).
RUNTIME_HOST_CUDA = 1200 * MiB
# The CUDA context and allocator slack on the device.
RUNTIME_DEVICE_CUDA = 600 * MiB
# Tokenizer, data rows, captured activations and the method's state while a job runs.
JOB_STATE = 120 * MiB
# The sentence-embedding model contrastive probing loads for its negatives (restoration.negatives "minilm").
EMBEDDING_MODEL = 130 * MiB
EVAL_ROW_COPIES = 2  # scoring: one row's logits in float32 and its log-softmax, beside the batch's logits
# Pruning one Linear, per weight: its float32 scores (or SparseGPT's float32 copy), the mask and the temporaries of
# choosing it, at most 8 measured (tests/unit/test_masks.py); beside them, a chunk of the groups being sorted (float32
# values, int64 indices and the sort's buffers: 25 bytes per score by RSS), or for a whole tensor larger than
# SORT_MAX_ELEMENTS, chosen by threshold, a chunk of int32 ranks.
PRUNE_BYTES_PER_ELEMENT = 9
SORT_BYTES_PER_ELEMENT = 25
SORT_MAX_ELEMENTS = 1 << 22
MASK_CHUNK_ELEMENTS = 1 << 22
HESSIAN_COPIES = 3  # the Hessian (damped in place), its Cholesky factor or inverse, the inverse's factor
CALIBRATION_BATCH = 8  # sequences a calibration forward runs at once (the worker's pruning stage) ...
CALIBRATION_BATCH_TOKENS = 8 * 2048  # ... fewer when they are longer: at most this many tokens, one sequence at least
CALIBRATION_INTERMEDIATE_COPIES = 3  # a calibration batch through one layer's MLP: gate, up and their product
STAT_CHUNK_ELEMENTS = 2**24  # a pruning statistic upcasts its inputs this many at a time (worker.chunks)
STAT_CHUNK_COPIES = 2  # ... the upcast chunk and its square, in float64
TRAIN_INTERMEDIATE_COPIES = 4
TRAIN_HIDDEN_COPIES = 8
TRAIN_LOGIT_BYTES = 16  # per logit: compute-dtype logits, float32 upcast, log-softmax, gradient
DISTILL_LOGIT_BYTES = 8  # distill adds per logit: the float32 log-softmax kept for the KL and the rest bucket's copy


EXPORT_BUFFER_SHARE = 16  # the safetensors writer's buffers: about 1/16 of the weights
ADAPTER_MERGE_COPIES = 3  # merging an adapter into one weight: the weight kept before, peft's safe copy, the delta
# Eager attention (Gemma 2: softcapped scores, which SDPA cannot do) holds batch × heads × seq² scores; the other
# models' SDPA kernels never do. Measured on a tiny Gemma 2 (float32 and bfloat16; tests/unit/test_plan.py):
EAGER_KEPT_BYTES = 8  # per score element and layer, what a training forward keeps for the backward
EAGER_LAYER_BYTES = 12  # per score element, one layer's scores being computed (capped copies, float32 softmax): 10-11
EAGER_MASKS = 2  # causal and sliding-window masks, batch × seq² each in the compute dtype, for the whole forward
EXTRACT_CAPTURE_COPIES = 4  # extracting: the probe features (2N rows × 2 head_dim) or the SVD's copies, in captures


def captured_activations(spec: JobSpec, shapes: Shapes) -> dict[Stage, int]:
    """Host bytes of the per-head captures the method keeps, by stage (none once extracted)."""
    r = spec.restoration
    if not r.needs_activations():
        return {}
    one = getattr(r, "probe_samples", 0) * shapes.layers * shapes.heads * shapes.head_dim * 4
    dense = 3 if getattr(r, "head_selection", None) == "probe" else 1  # prompt (+ response and negative)
    return {Stage.loading: dense * one, Stage.pruning: dense * one, Stage.probing: (dense + 1) * one,
            Stage.extracting: (dense + 1 + EXTRACT_CAPTURE_COPIES) * one}


def calibration_batch(samples: int, seq_len: int) -> int:
    """Sequences a calibration forward runs at once: CALIBRATION_BATCH, fewer for long sequences (a batch's MLP
    activations grow with its tokens: at 8 × 8192 tokens a 70B layer's would be 11 GB)."""
    return max(1, min(CALIBRATION_BATCH, samples, CALIBRATION_BATCH_TOKENS // seq_len))


def attention_scores(shapes: Shapes, batch: int, seq: int, dtype_bytes: int, kept_layers: int = 0) -> int:
    """Bytes of a forward's attention scores at ``batch`` × ``seq`` with ``kept_layers`` layers' kept for a backward:
    0 unless the model attends eagerly (:data:`EAGER_KEPT_BYTES`)."""
    if not shapes.eager_attention:
        return 0
    scores = batch * shapes.heads * seq * seq * (EAGER_LAYER_BYTES + EAGER_KEPT_BYTES * kept_layers)
    return scores + EAGER_MASKS * batch * seq * seq * dtype_bytes


def eval_logits(batch: int, seq: int, vocab: int) -> int:
    """Bytes of one batch's logits in float32."""
    return batch * seq * vocab * 4


def eval_scoring(batch: int, seq: int, vocab: int, dtype_bytes: int, softcap: bool = False) -> int:
    """Bytes of scoring one evaluation batch: its logits in the model's dtype (twice with a logit soft-cap, whose
    division and tanh each make a copy), and one row at a time in float32."""
    return (2 if softcap else 1) * batch * seq * vocab * dtype_bytes + EVAL_ROW_COPIES * seq * vocab * 4


@dataclass(frozen=True)
class StagePlan:
    device_bytes: int
    host_bytes: int
    seconds: float


@dataclass(frozen=True)
class Plan:
    device: str  # "cpu" or "cuda"
    mode: str  # "whole" (the model on one device), "split" (its layers spread over ``devices`` GPUs: model.split)
    # or "streaming" (one decoder layer at a time: model.streaming)
    dtype: str
    params: int
    weight_bytes: int
    stages: dict[str, StagePlan]
    read_bytes: int
    write_bytes: int
    seconds: float  # the whole job's, at ``speed``
    speed: dict[str, Any]  # the device's rates the seconds assume (app.plan_time.Speed)
    devices: int = 1  # GPUs the model is spread over; ``stages[...].device_bytes`` is the fullest one's
    layer_devices: list[int] | None = None  # split: each decoder layer's GPU (index into the worker's devices)

    def peak(self, which: str = "device") -> tuple[str, int]:
        """(stage, bytes) of the largest prediction on the device or the host."""
        key = "device_bytes" if which == "device" else "host_bytes"
        stage = max(self.stages, key=lambda s: getattr(self.stages[s], key))
        return stage, getattr(self.stages[stage], key)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        dev, host = self.peak("device"), self.peak("host")
        out["peak"] = {"device_bytes": dev[1], "device_stage": dev[0], "host_bytes": host[1], "host_stage": host[0]}
        return out


def planned_stages(spec: JobSpec) -> list[Stage]:
    """The stages this spec runs, in order."""
    stages = [Stage.loading]
    if spec.pruning.method != "none":
        stages.append(Stage.pruning)
    if spec.restoration.needs_activations():
        stages += [Stage.probing, Stage.extracting]
    if restoration_method(spec.restoration.method).trains:
        stages += [Stage.training, Stage.merging]
    stages += [Stage.evaluating, Stage.exporting]
    return stages


def compute_dtype(spec: JobSpec, shapes: Shapes, gguf: bool = False) -> str:
    if spec.model.dtype != "auto":
        return spec.model.dtype
    return "float32" if gguf or shapes.dtype not in DTYPE_BYTES else shapes.dtype


def _outside_layers(shapes: Shapes, devices: int) -> list[int]:
    """Parameters each GPU holds besides decoder layers: the embeddings on the first, the final norm and LM head
    on the last (on the first when the head is tied to the embeddings)."""
    load = [0] * devices
    load[0] += shapes.vocab * shapes.hidden
    load[0 if shapes.tied else devices - 1] += shapes.hidden + (0 if shapes.tied else shapes.vocab * shapes.hidden)
    return load


def split_layers(shapes: Shapes, devices: int) -> list[int]:
    """Each decoder layer's device when the model is spread over ``devices`` GPUs: contiguous runs of layers (an
    activation crosses from one GPU to the next once per run), balanced by parameters with the embeddings on the
    first GPU and the final norm and LM head on the last (on the first when they are tied to the embeddings)."""
    if devices < 1:
        raise ValueError("devices must be at least 1")
    layer = shapes.layer_params()
    load = _outside_layers(shapes, devices)
    target = (sum(load) + shapes.layers * layer) / devices
    out, d = [], 0
    for i in range(shapes.layers):
        remaining_layers, remaining_devices = shapes.layers - i, devices - d
        # move on when this GPU is full, or when the later GPUs need at least one layer each
        if d < devices - 1 and (load[d] + layer / 2 > target or remaining_layers < remaining_devices):
            d += 1
        load[d] += layer
        out.append(d)
    return out


def device_params(shapes: Shapes, layer_devices: list[int], devices: int) -> list[int]:
    """Parameters each GPU holds under :func:`split_layers`' placement."""
    load = _outside_layers(shapes, devices)
    for d in layer_devices:
        load[d] += shapes.layer_params()
    return load


def make_plan(spec: JobSpec, shapes: Shapes, device: str = "cpu", gguf: bool = False,
              file_bytes: int | None = None, streaming: bool = False, speed: Speed | None = None,
              devices: int = 1) -> Plan:
    """The plan of ``spec`` on a model of ``shapes``, run on ``device`` ("cpu" or "cuda"): the whole model on one
    device, spread over ``devices`` GPUs (more than 1: layer by layer, :func:`split_layers`), or (``streaming``)
    its decoder layers one at a time; ``speed``: the device's measured rates (default: the nominal ones of its
    kind)."""
    dtype = compute_dtype(spec, shapes, gguf)
    b = DTYPE_BYTES[dtype]
    cuda = device.startswith("cuda")
    params = shapes.params()
    weights = params * b
    masks = shapes.linear_params() // 8 if spec.pruning.method != "none" else 0
    ev = spec.evaluation
    evaluates = bool(ev.perplexity or ev.response_perplexity or ev.tasks)
    eval_t = eval_scoring(ev.batch_size, ev.max_seq_len, shapes.vocab, b, shapes.logit_softcap) \
        + attention_scores(shapes, ev.batch_size, ev.max_seq_len, b) if evaluates else 0
    r = spec.restoration
    max_elems = max(o * i for o, i in shapes.linear_shapes())
    max_in = max(i for _, i in shapes.linear_shapes())
    prune_t = 0
    method = PRUNING_METHODS[spec.pruning.method]
    if spec.pruning.method != "none":
        prune_t = PRUNE_BYTES_PER_ELEMENT * max_elems + SORT_BYTES_PER_ELEMENT * min(max_elems, MASK_CHUNK_ELEMENTS)
        if spec.pruning.method == "sparsegpt":
            prune_t += HESSIAN_COPIES * max_in * max_in * (4 if cuda else 8)
        if method.needs_calibration:  # a layer's inputs and outputs for every calibration sequence
            prune_t += 2 * spec.pruning.calibration_samples * spec.pruning.seq_len * shapes.hidden * b
            # ... and one batch of them through the layer, its statistics upcast chunk by chunk
            batch = calibration_batch(spec.pruning.calibration_samples, spec.pruning.seq_len)
            batch_tokens = batch * spec.pruning.seq_len
            chunk = min(STAT_CHUNK_ELEMENTS, batch_tokens * max_in)
            prune_t += CALIBRATION_INTERMEDIATE_COPIES * batch_tokens * shapes.intermediate * b
            prune_t += STAT_CHUNK_COPIES * chunk * 8
            prune_t += attention_scores(shapes, batch, spec.pruning.seq_len, b)
    trains = restoration_method(r.method).trains
    batch = getattr(r, "batch_size", 8)
    seq = getattr(r, "max_seq_len", 256)
    tokens = batch * seq
    per_token_layer = (TRAIN_INTERMEDIATE_COPIES * shapes.intermediate + TRAIN_HIDDEN_COPIES * shapes.hidden) * b
    split = devices > 1
    if split and (streaming or not cuda):
        raise PlanError("a model is split over several GPUs only, and never streamed as well")
    layer_devices = split_layers(shapes, devices) if split else None
    # streaming keeps each layer's input and recomputes one layer's activations at a time; split, each GPU keeps
    # its own layers' activations (the fullest GPU's count)
    layers_kept = max(layer_devices.count(d) for d in range(devices)) if layer_devices else shapes.layers
    per_token = shapes.layers * shapes.hidden * b + per_token_layer if streaming else layers_kept * per_token_layer
    distill = trains and r.needs_dense_targets()
    # distill: the student's float32 log-softmax and the rest-bucket's masked copy, beside the logits
    logit_bytes = TRAIN_LOGIT_BYTES + (DISTILL_LOGIT_BYTES if distill else 0) + (2 * b if shapes.logit_softcap else 0)
    train_t = tokens * (per_token + shapes.vocab * logit_bytes) \
        + attention_scores(shapes, batch, seq, b, kept_layers=1 if streaming else layers_kept) if trains else 0
    # the dense targets' capture (loading): a batch's logits in the model's dtype, one row's in float32 twice
    capture_t = batch * seq * shapes.vocab * b + 2 * seq * shapes.vocab * 4 \
        + attention_scores(shapes, batch, seq, b) if distill else 0
    # ... and the targets kept from then on: at most every token of the samples training sees, 6k + 8 bytes each
    targets_b = distilled_samples(spec) * seq * (6 * getattr(r, "distill_top_k", 0) + 8) if distill else 0
    probe_t = 4 * batch * seq * shapes.intermediate * b + attention_scores(shapes, batch, seq, b) \
        if r.needs_activations() else 0
    # the merge check: logits of a check batch, and o_proj's weights in float64, before and after
    merge_t = int(1.5 * eval_logits(batch, seq, shapes.vocab)) + 2 * shapes.hidden * shapes.attn * 8
    if restoration_method(r.method).exports_adapter:  # an adapter's merge: the weight before, peft's copy, the delta
        merge_t += ADAPTER_MERGE_COPIES * max_elems * b

    transient = {
        Stage.loading: max(eval_t if ev.dense else 0, probe_t, capture_t),
        Stage.pruning: max(prune_t, eval_t),
        Stage.probing: probe_t,
        Stage.extracting: probe_t,
        Stage.training: train_t,
        Stage.merging: merge_t,
        Stage.evaluating: eval_t,
        Stage.exporting: weights // EXPORT_BUFFER_SHARE,
    }
    runtime_host = RUNTIME_HOST + (RUNTIME_HOST_CUDA if cuda else 0)
    job_state = JOB_STATE + (EMBEDDING_MODEL if getattr(r, "negatives", None) == "minilm" else 0)
    captures = captured_activations(spec, shapes)
    if streaming:  # the resident tensors and the layers in memory at once (two while training recomputes one)
        layer_b = shapes.layer_params() * b
        resident_b = shapes.resident_params() * b
        held = {s: resident_b + (2 if s == Stage.training else 1) * layer_b for s in Stage}
    elif layer_devices:  # the fullest GPU's share
        held = dict.fromkeys(Stage, max(device_params(shapes, layer_devices, devices)) * b)
    else:
        held = dict.fromkeys(Stage, weights)
    read = file_bytes if file_bytes is not None else params * DTYPE_BYTES.get(shapes.dtype, 4)
    out_b = DTYPE_BYTES[dtype if spec.output.dtype == "auto" else spec.output.dtype]
    speed = speed or NOMINAL["cuda" if cuda else "cpu"]
    work = stage_work(spec, shapes, read, b, out_b, streaming=streaming)
    stages: dict[str, StagePlan] = {}
    for stage in planned_stages(spec):
        kept = job_state + (masks if stage not in (Stage.loading, Stage.pruning) else 0) + targets_b + \
            captures.get(stage, 0)
        if cuda:  # weights and transients on the device; the host keeps the runtime, the job's state and masks
            device_b = RUNTIME_DEVICE_CUDA + held[stage] + transient[stage]
            # exporting gathers the model's tensors on the host (all of them, when it was spread over GPUs)
            host_b = runtime_host + kept + ((weights if split else held[stage]) if stage == Stage.exporting else 0)
        else:
            device_b = host_b = runtime_host + held[stage] + kept + transient[stage]
        stages[stage.value] = StagePlan(device_b, host_b, round(work[stage].seconds(speed), 1))
    return Plan(device="cuda" if cuda else "cpu",
                mode="streaming" if streaming else "split" if split else "whole", dtype=dtype,
                params=params, weight_bytes=weights, stages=stages, read_bytes=read, write_bytes=params * out_b,
                seconds=round(sum(s.seconds for s in stages.values()), 1), speed=speed.to_dict(), devices=devices,
                layer_devices=layer_devices)


SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float32"}
MAX_HEADER = 100 * MiB  # safetensors' own limit on a header


def _safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size <= MAX_HEADER:
            raise ValueError(f"{path.name}: not a safetensors header")
        header = json.loads(f.read(size))
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: not a safetensors header")
    return header


def _indexed_files(d: Path) -> dict[str, Path] | None:
    """Tensor name → shard of a sharded directory's index (None: no index; {}: shards outside the directory or not
    files, nothing to read). Raises OSError or ValueError/KeyError for an index that cannot be read."""
    index = d / "model.safetensors.index.json"
    if not index.is_file():
        return None
    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    files = {name: d / file for name, file in weight_map.items()}
    if not all(f.resolve().parent == d.resolve() and f.is_file() for f in set(files.values())):
        return {}
    return files


def stored_dtype(model_dir: str | Path) -> str | None:
    """The dtype of the first floating-point weight (by name) in a directory's safetensors, read from their headers
    alone — what loading with ``dtype="auto"`` picks when the config names none (float64 is loaded as float32).
    None when there are no readable safetensors."""
    d = Path(model_dir)
    try:
        files = _indexed_files(d)
        if files is None:
            if not (d / "model.safetensors").is_file():
                return None
            files = dict.fromkeys(_safetensors_header(d / "model.safetensors"), d / "model.safetensors")
        elif not files:
            return None
        headers: dict[Path, dict[str, Any]] = {}
        for name in sorted(n for n in files if n != "__metadata__"):
            if files[name] not in headers:
                headers[files[name]] = _safetensors_header(files[name])
            entry = headers[files[name]].get(name)
            if isinstance(entry, dict) and entry.get("dtype") in SAFETENSORS_DTYPES:
                return SAFETENSORS_DTYPES[entry["dtype"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
    return None


@dataclass(frozen=True)
class LocalModel:
    """What the API reads of a local model at submit, no weights: its config (config.json, or a GGUF header's
    geometry in config.json's terms), whether it is a GGUF file, and its weight files' dtype and bytes."""

    config: dict[str, Any]
    gguf: bool = False
    stored: str | None = None
    file_bytes: int | None = None


def _read_config(model_dir: str) -> dict[str, Any] | None:
    path = Path(model_dir) / "config.json"
    try:
        if not path.is_file():  # never open a FIFO or a device: the request would wait on it
            return None
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return raw if isinstance(raw, dict) else None


def safetensors_bytes(model_dir: str | Path) -> int | None:
    """The bytes of the safetensors files loading reads: those the index names (a directory may hold others, such as
    Mistral's consolidated.safetensors, a second copy of the weights), else model.safetensors; None when there are
    none, or the index cannot be read."""
    model_dir = Path(model_dir)
    try:
        indexed = _indexed_files(model_dir)
        files = set(indexed.values()) if indexed is not None else {model_dir / "model.safetensors"}
        files = {f for f in files if f.is_file()}
        return sum(f.stat().st_size for f in files) if files else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None


def read_local_model(path: str, gguf_file: str | None = None) -> LocalModel | None:
    """A local Hugging Face directory's config.json, or a local GGUF file's header; None when ``path`` is neither
    or it cannot be read here (the worker decides then)."""
    try:
        gguf = local_gguf(path, gguf_file)
        if gguf is not None:
            return LocalModel(config_fields(*read_header(gguf)), gguf=True, file_bytes=gguf.stat().st_size)
        if gguf_file or Path(path).is_file():  # a GGUF the API cannot read here: the worker decides
            return None
        config = _read_config(path)
        if config is None:
            return None
        return LocalModel(config, stored=stored_dtype(path), file_bytes=safetensors_bytes(path))
    except (GgufError, OSError, ValueError, TypeError):  # whatever the header holds, the worker gives the verdict
        return None


def submit_plan(spec: JobSpec, model: LocalModel | None) -> dict[str, Any] | None:
    """The plan the API stores at submit, for both device kinds (it does not know which worker will run the job);
    None without a local model it could read (a hub id) or with a config it does not understand. The worker checks
    its own plan before loading weights either way."""
    if model is None:
        return None
    try:
        shapes = Shapes.from_config(model.config, model.stored)
        return {"source": "submit", "devices": {d: make_plan(spec, shapes, d, gguf=model.gguf,
                                                             file_bytes=model.file_bytes).to_dict()
                                                for d in ("cpu", "cuda")}}
    except (PlanError, KeyError, ArithmeticError):
        return None


def format_bytes(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"
