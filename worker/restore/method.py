"""The lifecycle the runner drives for every restoration method, and what it hands a method.

One :class:`RestoreMethod` instance per job. The runner calls, in order:

- ``preflight`` — config only, before any weight loads (raise a JobFailure naming the field);
- ``prepare`` — in the loading stage, while the dense model is in memory (dense and pruned never are at once);
- ``probe`` and ``select`` — the probing and extracting stages, planned only when the config needs activations
  (``RestorationConfig.needs_activations``);
- ``train`` and ``merge`` — planned when the method trains (``app.methods.RestorationMethod.trains``); the
  runner builds the training batches and the merge-check batch, the method folds itself into the weights;
- ``export`` — the method's own artifacts, next to the exported model.

The runner never names a method: what a method is and needs comes from the catalogue (app.methods), what it does
from its implementation, registered in worker.restore.registry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from app.methods import RestorationConfig
from app.schemas import JobSpec
from worker.model.arch import ArchInfo, DecoderAdapter
from worker.model.data import Batch, batch_pad_id, encode_text, pad_batch, read_instructions
from worker.restore.train import TrainControl

Progress = Callable[[float, str], None]  # (fraction of the stage, message)
TrainStats = dict[str, Any]  # worker.restore.train.train_parameters' result; "report": the method's own fields


@dataclass(frozen=True)
class Preflight:
    """What is known before any weight loads."""

    info: ArchInfo
    model_config: Any  # the checkpoint's config (as read: worker.model.load.transformers_config completes it)
    train_rows: int | None  # rows of data.train (None: no training data)


class Job(Protocol):
    """The runner's state a method reads, and updates where it says so."""

    spec: JobSpec
    model: Any  # the pruned model (merge may replace it)
    tokenizer: Any
    adapter: DecoderAdapter  # (merge may replace it)
    report: dict[str, Any]  # the job's report.json
    zero_masks: Mapping[str, torch.Tensor] | None  # pruned zeros per Linear (True = pruned), packed: ZeroMasks
    scope: Any  # None, or for a layer-streamed model scope(layer, write) holding that layer in memory


class RestoreMethod:
    """A method that changes nothing (``none``); real methods override the steps they need."""

    def __init__(self, config: RestorationConfig, seed: int):
        self.config = config
        self.seed = seed
        self.report: dict[str, Any] = {}  # the method's part of report.json ("restoration")
        self.dense_targets: Any = None  # the distill objective's (worker.restore.objective), from the loading stage

    def preflight(self, pre: Preflight) -> None:
        """Config-only checks, before any weight loads."""

    def prepare(self, spec: JobSpec, model: Any, tokenizer: Any, adapter: DecoderAdapter, progress: Progress) -> None:
        """Capture what the method needs from the dense model (loading stage)."""

    def probe(self, job: Job, progress: Progress) -> None:
        """The pruned model's activations (probing stage)."""

    def select(self, job: Job, progress: Progress, checkpoint: Callable[[], None]) -> None:
        """What to restore (extracting stage); ``checkpoint()`` raises Cancelled when the job was cancelled."""

    def train(self, job: Job, batches: Any, control: TrainControl) -> TrainStats:
        """Train on ``batches`` (epoch → batches) through worker.restore.train.train_parameters, passing it
        ``control.options()`` (progress, stop requests, the state to resume from, checkpoints); returns its stats.
        Resuming from a finished state must leave the method exactly as the finished run did."""
        raise NotImplementedError(f"{type(self).__name__} does not train")

    def merge(self, job: Job, check: Batch, progress: Progress) -> None:
        """Fold the restoration into ``job.model`` (checked on ``check``), keeping every pruned zero."""

    def export(self, job: Job, out_dir: Path) -> None:
        """Write the method's own artifacts into ``out_dir``."""

    def state(self) -> dict[str, Any]:
        """What the method holds between stages (before training), for a checkpoint: tensors, plain values and the
        dataclasses worker.run.snapshot packs. Training state is checkpointed by the training loop itself."""
        return {k: v for k, v in vars(self).items() if k not in ("config", "seed")}

    def load_state(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state` gave (a job resumed after its worker was lost)."""
        for k, v in state.items():
            setattr(self, k, v)


def check_batch(tokenizer: Any, train_path: str, max_len: int = 64) -> Batch:
    """Two training texts: what merged logits are compared on."""
    pairs = read_instructions(train_path, limit=2)
    pad = batch_pad_id(tokenizer)
    return pad_batch([encode_text(tokenizer, p + r, max_len) for p, r in pairs], pad)


@torch.no_grad()
def logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
    return out.logits.float().cpu()


def batch_progress(progress: Progress, start: float, end: float, label: str) -> Callable[[int, int], None]:
    """(done, total) batch counts → a stage fraction between ``start`` and ``end``."""

    def report(done: int, total: int) -> None:
        frac = done / total if total else 0.0
        progress(start + (end - start) * frac, f"{label} activations: batch {done}/{total}")

    return report
