"""Where a job can resume, what each resume point saves, and how a resumed run takes it back.

Resume points, in pipeline order (each includes everything before it):

- ``prepared``: end of loading — the dense metrics and what the method took from the dense model;
- ``pruning``: inside a pruning method that calibrates layer by layer, at a layer boundary every ``every_layers``
  layers or ``every_s`` seconds and when the job is asked to stop — the pruned layers so far and the next layer's
  calibration inputs (``step``: the layers done);
- ``pruned``: the pruned Linears' weights (only those) and the pruning summary. Pruned weights are saved once, layer
  by layer as they are done (part ``layer-NNNN``: that layer's pruned weights under their own names; a layer-streamed
  run saves the layer's scratch file as it is);
- ``pruned-evaluated``: the pruned model's sparsity and metrics;
- ``probed``, ``selected``: the method's state after probing and after choosing what to restore;
- ``training``: every ``every_steps`` optimizer steps or ``every_s`` seconds, at a stop request and at the end —
  the training loop's whole state (worker.restore.train.TrainState);
- ``evaluated``: the restored model's metrics.

Merging and exporting are redone from the last checkpoint: both are deterministic and cheap. A resumed run gives
the same bytes as an uninterrupted one because every saved value is exact (safetensors, JSON floats) and the
random states are saved with it — where the kernels themselves are deterministic (CPU; CUDA's attention backward is
not, so on a GPU two uninterrupted runs already differ by as much).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.schemas import JobSpec, Stage
from worker.errors import ModelNotFoundError
from worker.reporting import Reporter
from worker.restore.train import SaveHook, TrainState
from worker.run import failpoints
from worker.run.checkpoints import Checkpoint, CheckpointStore
from worker.run.lineage import START_OVER

LAYER_PART = "layer-"  # a pruned layer's part: layer-0000, layer-0001, ...
POINTS: tuple[str, ...] = ("prepared", "pruning", "pruned", "pruned-evaluated", "probed", "selected", "training",
                           "evaluated")
POINT_STAGE: dict[str, Stage] = {
    "prepared": Stage.loading, "pruning": Stage.pruning, "pruned": Stage.pruning, "pruned-evaluated": Stage.pruning,
    "probed": Stage.probing, "selected": Stage.extracting, "training": Stage.training, "evaluated": Stage.evaluating,
}


@dataclass(frozen=True)
class CheckpointPolicy:
    every_steps: int = 50  # training: a checkpoint every this many optimizer steps ...
    every_s: float = 600.0  # ... and at least this often (pruning too)
    every_layers: int = 0  # pruning: a checkpoint every this many layers as well (0: by time only)


class Resumer:
    """The pipeline's side of checkpoints. Without a store it saves nothing and resumes nothing."""

    def __init__(self, store: CheckpointStore | None = None, policy: CheckpointPolicy = CheckpointPolicy()):
        self.store = store
        self.policy = policy
        self.attempt = 1  # this run's number: one more than the runs the checkpoint's report lists
        self.checkpoint: Checkpoint | None = None
        self.writes: list[dict[str, Any]] = []  # {"point", "bytes", "seconds"} of every checkpoint written
        self._last: tuple[str, int | None] | None = None  # the point and step of the newest checkpoint

    def load(self, reporter: Reporter) -> dict[str, Any] | None:
        """Read the job's checkpoint; returns the report saved with it (None: start from the beginning)."""
        if self.store is None:
            return None
        self.checkpoint = self.store.load()
        for reason in self.store.ignored:
            reporter.event("warning", {"message": f"checkpoint not used, starting over: {reason}"})
        if self.checkpoint is None:
            return None
        ck = self.checkpoint
        self.attempt = len(ck.meta["report"].get("attempts", [])) + 1
        step = ck.meta.get("step")
        reporter.event("resumed", {"checkpoint": ck.point, "stage": POINT_STAGE[ck.point].value, "step": step,
                                   "attempt": self.attempt})
        if ck.has("rng"):
            torch.set_rng_state(ck.part("rng"))
        self._last = (ck.point, step)
        return ck.meta["report"]

    def hub_commits(self) -> dict[str, str]:
        """Field → the hub commit the checkpoint's model was read at (its report's ``model.commits``), read before
        the checkpoint itself: a resumed run loads the model at that commit (worker.run.check.check_job's
        ``pins``)."""
        meta = self.store.saved_meta() if self.store is not None else None
        commits = ((meta or {}).get("report") or {}).get("model", {}).get("commits")
        return {k: v for k, v in commits.items() if isinstance(v, str)} if isinstance(commits, dict) else {}

    def close(self) -> None:
        """Remove the local copies of the checkpoint read (the checkpoints themselves stay in the store)."""
        if self.store is not None:
            self.store.discard_local()

    def reached(self, point: str) -> bool:
        """Whether the checkpoint resumed from was taken at or after ``point``."""
        return self.checkpoint is not None and POINTS.index(self.checkpoint.point) >= POINTS.index(point)

    def resumed_from(self) -> dict[str, Any] | None:
        ck = self.checkpoint
        if ck is None:
            return None
        return {"checkpoint": ck.point, "stage": POINT_STAGE[ck.point].value, "step": ck.meta.get("step")}

    def save(self, point: str, report: dict[str, Any], parts: dict[str, Any] | None = None,
             copy: tuple[str, ...] = (), step: int | None = None, drop: tuple[str, ...] = ()) -> None:
        if self.store is None or (self.checkpoint is not None and not self.reached(point)):
            return  # never behind the checkpoint this run resumed from
        parts = {**(parts or {}), "rng": torch.get_rng_state()}
        if self.store.save(point, {"report": report, "step": step}, parts, copy=copy, drop=drop):
            self.writes.append(dict(self.store.last_write))
            self._last = (point, step)
            failpoints.reach(f"checkpoint:{point}")
            if step is not None:
                failpoints.reach(f"checkpoint:{point}:{step}")

    def note(self, report: dict[str, Any]) -> None:
        """Record progress made since the newest checkpoint (a finished evaluation set) in its report, without a
        new resume point; nothing before the first checkpoint."""
        if self.store is not None and self._last is not None:
            point, step = self._last
            self.store.save(point, {"report": report, "step": step})

    # what a resumed run takes back -----------------------------------------------------------------------
    def method_state(self) -> dict[str, Any] | None:
        ck = self.checkpoint
        return ck.part("method") if ck is not None and ck.has("method") else None

    def train_state(self) -> TrainState | None:
        ck = self.checkpoint
        return ck.part("train") if ck is not None and self.reached("training") and ck.has("train") else None

    def pruning_step(self) -> int:
        """The layers a checkpoint taken inside pruning had done (0 otherwise)."""
        ck = self.checkpoint
        return int(ck.meta["step"]) if ck is not None and ck.point == "pruning" else 0

    def pruning_resume(self) -> tuple[int, list[torch.Tensor], str] | None:
        """(layers done, the next layer's calibration inputs, the digest of the calibration tokens they came from)
        when the checkpoint was taken inside pruning."""
        step = self.pruning_step()
        if not step:
            return None
        saved = self.checkpoint.part("calibration")  # type: ignore[union-attr]
        return step, saved["hidden"], saved["digest"]

    def pruned_layers(self, n_layers: int) -> range:
        """The layers whose pruned weights the checkpoint holds."""
        return range(n_layers) if self.reached("pruned") else range(self.pruning_step())

    def pruning_saver(self, n_layers: int, layer_parts: Callable[[int], Any], report: Callable[[], dict[str, Any]],
                      should_stop: Callable[[], bool], digest: str) -> PruningSaver:
        return PruningSaver(self, n_layers, layer_parts, report, should_stop, digest)

    def layer_files(self) -> dict[str, Path]:
        """A streamed run's pruned layers, saved as the files it read them from (part ``layer-NNNN`` each)."""
        ck = self.checkpoint
        return ck.file_parts(LAYER_PART) if ck is not None else {}

    @torch.no_grad()
    def apply_weights(self, linears: dict[str, torch.nn.Linear]) -> None:
        """Copy the checkpoint's pruned weights into those of ``linears`` it holds, one tensor at a time: from the
        ``weights`` part a whole-model run saved, or from the layer files a streamed run saved."""
        from safetensors import safe_open

        ck = self.checkpoint
        assert ck is not None
        filled: set[str] = set()
        if ck.has("weights"):
            with safe_open(str(ck.files["weights"]), framework="pt") as fh:
                for name_skel, ref in ck.skeletons["weights"]["d"]:
                    if name_skel in linears:
                        linears[name_skel].weight.copy_(fh.get_tensor(ref["t"]))
                        filled.add(name_skel)
        else:
            for file in self.layer_files().values():
                with safe_open(str(file), framework="pt") as fh:
                    for key in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                        name = key.removesuffix(".weight")
                        if key.endswith(".weight") and name in linears:
                            linears[name].weight.copy_(fh.get_tensor(key))
                            filled.add(name)
        missing = sorted(set(linears) - filled)
        if missing:  # never go on with dense weights where pruned ones belong
            raise ModelNotFoundError(
                f"the checkpoint taken at {ck.point} holds no pruned weights for {len(missing)} module(s) of this "
                f"model (e.g. {missing[0]}): model.id is not the model it was made from; restore that model, or start "
                f"over: {START_OVER}", field="model.id")

    def train_saver(self, report: Callable[[], dict[str, Any]]) -> SaveHook | None:
        """The training loop's save hook: a checkpoint every ``every_steps`` steps or ``every_s`` seconds, and
        whenever the loop forces one (stopping, or done)."""
        if self.store is None:
            return None
        last = time.monotonic()

        def save(step: int, state: Callable[[], TrainState], force: bool) -> None:
            nonlocal last
            if force or step % max(1, self.policy.every_steps) == 0 or time.monotonic() - last >= self.policy.every_s:
                self.save("training", report(), {"train": state()}, step=step)
                last = time.monotonic()

        return save


def local_resumer(directory: Path, spec: JobSpec, policy: CheckpointPolicy = CheckpointPolicy()) -> Resumer:
    """Checkpoints in a local directory (``restorelcc run --checkpoints DIR``), one folder per spec."""
    from app.store.artifacts import LocalStore
    from worker.run.checkpoints import spec_fingerprint

    fingerprint = spec_fingerprint(spec.model_dump(mode="json"))
    store = CheckpointStore(LocalStore(directory), f"{fingerprint[:16]}/", fingerprint,
                            Path(directory) / f".scratch-{fingerprint[:16]}")
    return Resumer(store, policy)


class PruningSaver:
    """``after_layer`` of worker.prune.runner.prune_model. Each finished layer's pruned weights are uploaded at once
    (part ``layer-NNNN`` = ``layer_parts(layer)``: a file or named tensors), so a checkpoint has only the small
    rest to write; a ``pruning`` checkpoint — naming the layers so far and holding the next layer's calibration
    inputs — comes at a layer boundary every ``every_layers`` layers, at least every ``every_s`` seconds, and when
    ``should_stop()`` (the job is stopped to go on later: preempted, out of time). The ``pruned`` checkpoint that
    follows pruning names the last layers."""

    def __init__(self, resumer: Resumer, n_layers: int, layer_parts: Callable[[int], Any],
                 report: Callable[[], dict[str, Any]], should_stop: Callable[[], bool], digest: str):
        self.resumer, self.n_layers, self.layer_parts = resumer, n_layers, layer_parts
        self.report, self.should_stop, self.digest = report, should_stop, digest
        self._last = time.monotonic()

    def __call__(self, index: int, hidden: list[torch.Tensor] | None) -> None:
        store = self.resumer.store
        if store is None:
            return
        store.stage(f"{LAYER_PART}{index:04d}", self.layer_parts(index))
        done = index + 1
        if hidden is None or done >= self.n_layers:
            return  # nothing to resume into (no calibration), or the pruned checkpoint follows
        policy = self.resumer.policy
        due = ((policy.every_layers > 0 and done % policy.every_layers == 0)
               or time.monotonic() - self._last >= policy.every_s or self.should_stop())
        if due:
            self.resumer.save("pruning", self.report(), {"calibration": {"hidden": hidden, "digest": self.digest}},
                              copy=("calibration",), step=done)
            self._last = time.monotonic()
