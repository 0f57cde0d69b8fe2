"""Prune every Linear inside the decoder layers (embeddings and lm_head untouched), layer by layer."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from torch import nn

from app.schemas import PruningSpec
from worker.chunks import all_finite
from worker.errors import Cancelled, UnsupportedModelError
from worker.model.arch import DecoderAdapter, check_nm_fits
from worker.model.calibration import build_calibration_batches, calibrate_layerwise, inference_state
from worker.model.data import Batch
from worker.prune.registry import get_method
from worker.prune.sparsegpt import PERCDAMP

__all__ = ["build_calibration_batches", "prune_model"]

Progress = Callable[[float, str], None]
log = logging.getLogger(__name__)


def prune_model(
    model: nn.Module,
    adapter: DecoderAdapter,
    spec: PruningSpec,
    calibration: Sequence[Batch] | None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    layer_scope: Callable[[int], AbstractContextManager[Any]] | None = None,
    resume: tuple[int, list[Any]] | None = None,
    after_layer: Callable[[int, list[Any] | None], None] | None = None,
    damping_raised: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Prune ``model`` in place as ``spec`` says; returns a summary (method, pattern, target, seconds...).

    ``should_stop()`` is polled before each layer; when it returns True, :class:`Cancelled` is raised
    (layers already pruned stay pruned). ``layer_scope(layer)`` encloses each layer's work (a streamed model:
    worker.model.streaming.LayerStore.resident with ``write=True``). ``after_layer(layer, hidden)`` hears each
    finished layer with the next layer's calibration inputs (None for a method without calibration);
    ``resume=(start, hidden)`` goes on at layer ``start``, the layers before it pruned already. ``damping_raised``:
    where each module whose SparseGPT damping had to rise is recorded as it happens (the caller's report, which its
    checkpoints carry: a resumed run keeps what the layers before them took); in the summary when not empty.
    """
    t0 = time.monotonic()
    nm = spec.nm
    summary: dict[str, Any] = {
        "method": spec.method,
        "pattern": spec.pattern,
        "sparsity": spec.sparsity,
        "layers": len(adapter.layers),
        "modules": 0,
    }
    if spec.method == "none":
        summary["seconds"] = 0.0
        return summary
    raised = damping_raised if damping_raised is not None else {}
    method = get_method(spec.method)
    if nm is not None:
        check_nm_fits(adapter.info, nm[1])
    n_layers = len(adapter.layers)

    def before_layer(index: int) -> None:
        if should_stop is not None and should_stop():
            raise Cancelled(f"pruning cancelled before layer {index}")

    def on_layer(index: int, stats: dict[str, Any]) -> None:
        for name, lin in adapter.prunable_linears(index).items():
            stat = stats.pop(name, None)  # each module's statistics (a SparseGPT Hessian) go once it is pruned
            try:
                method.apply(lin, stat, spec.sparsity, nm)
            except ValueError as exc:
                failure = _non_finite(adapter, index, lin, stat)
                if failure is None:
                    raise ValueError(f"{_module_name(adapter, index, lin)}: {exc}") from exc
                raise failure from exc
            damping = getattr(stat, "damping", None)
            if damping is not None and damping != PERCDAMP:
                where = _module_name(adapter, index, lin)
                raised[where] = damping
                log.warning("SparseGPT: %s's Hessian factored only at damping %g (asked %g)", where, damping,
                            PERCDAMP)
        if progress is not None:
            progress((index + 1) / n_layers, f"{method.name}: pruned layer {index + 1}/{n_layers}")

    if method.needs_calibration:
        if not calibration:
            raise ValueError(f"pruning method '{method.name}' needs calibration batches")
        new_stats = method.new_stats
        assert new_stats is not None
        tokens = calibrate_layerwise(
            model, adapter, calibration, lambda _i, _n, lin: new_stats(lin), on_layer, before_layer, layer_scope,
            resume, after_layer,
        )
        summary["calibration"] = {
            "batches": len(calibration),
            "sequences": sum(int(b.input_ids.shape[0]) for b in calibration),
            "tokens": tokens,
        }
    else:
        with inference_state(model):
            for index in range(resume[0] if resume is not None else 0, n_layers):
                before_layer(index)
                with layer_scope(index) if layer_scope is not None else nullcontext():
                    on_layer(index, {})
                if after_layer is not None:
                    after_layer(index, None)
    summary["modules"] = sum(len(adapter.prunable_linears(i)) for i in range(n_layers))  # resumed: all the same
    if raised:
        summary["damping_raised"] = raised
    summary["guarantee"] = method.guarantee
    summary["seconds"] = round(time.monotonic() - t0, 3)
    return summary


def _module_name(adapter: DecoderAdapter, index: int, lin: nn.Linear) -> str:
    return next(n for n, m in adapter.layer_linears(index).items() if m is lin)


def _non_finite(adapter: DecoderAdapter, index: int, lin: nn.Linear, stats: Any) -> UnsupportedModelError | None:
    """Why pruning ``lin`` failed when its weights or its calibration inputs are not finite, else None (the pure
    tensor functions raise a plain ValueError; only here is it known which module of which model it was)."""
    name = _module_name(adapter, index, lin)
    if not all_finite(lin.weight):
        return UnsupportedModelError(f"the model's weights are not finite (NaN or infinite) in {name}", "model.id")
    if stats is not None and not stats.finite():
        return UnsupportedModelError(
            f"the calibration activations entering {name} are not finite (NaN or infinite): weights before it "
            "(embeddings, norms) are not finite, or the activations overflow model.dtype", "model.id")
    return None
