"""Layer-by-layer calibration: feed each decoder layer the outputs of the (already pruned) layers before it.

One model forward per calibration batch records layer 0's input hidden states and every layer's call
kwargs (attention masks, position embeddings, position ids — these differ between layers in models that
alternate sliding and full attention, such as Gemma 3). Each layer in ``adapter.layers`` is temporarily
replaced by a catcher that records its call and returns the hidden states unchanged; the real layers are
always put back. The driver then, for each layer l:

1. runs layer l on the stored inputs with forward hooks on its Linears, handing each Linear's inputs at
   real (non-padding) tokens to a statistics accumulator;
2. calls back so the caller can prune layer l from those statistics;
3. re-runs the (pruned) layer l on the stored inputs; its outputs replace them as layer l+1's inputs.

Peak memory: the model plus one layer's activations for all calibration samples. Statistics for all
Linears of a layer come from the layer's inputs before any of its Linears is pruned.
The captured inputs start on the device of the model's input embeddings; on a model split over GPUs each layer's
hook moves them to that layer's GPU, where its outputs (the next layer's inputs) and its statistics stay.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from worker.errors import DataError
from worker.model.arch import DecoderAdapter
from worker.model.data import Batch, pad_batch, token_ids


class Accumulator(Protocol):
    def add(self, x: torch.Tensor) -> None:
        """Add a (tokens, in_features) matrix of one Linear's inputs."""


@dataclass
class LayerInputs:
    """What one decoder layer is called with, for every calibration batch."""

    hidden: list[torch.Tensor]  # per batch: (B, T, hidden) inputs of the current layer
    args: list[list[tuple[Any, ...]]]  # [layer][batch]: extra positional arguments (usually empty)
    kwargs: list[list[dict[str, Any]]]  # [layer][batch]: keyword arguments of the call
    token_masks: list[torch.Tensor]  # per batch: (B, T) bool, True = real token

    @property
    def tokens(self) -> int:
        return int(sum(int(m.sum()) for m in self.token_masks))


class _Catcher(nn.Module):
    """Stands in for a decoder layer: records its call, returns the hidden states unchanged."""

    def __init__(self, layer: nn.Module, store: list[tuple[torch.Tensor, tuple, dict]]):
        super().__init__()
        # Plain attributes (not submodules), so the real layer is not registered twice.
        self.__dict__["_wrapped"] = layer
        self.__dict__["_store"] = store

    def __getattr__(self, name: str) -> Any:
        # Models may read attributes of their layers (e.g. ``attention_type``); answer from the real one.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_wrapped"], name)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            hidden, extra = args[0], tuple(args[1:])
        else:
            hidden, extra = kwargs.pop("hidden_states"), ()
        self._store.append((hidden, extra, kwargs))
        return hidden


def _input_device(adapter: DecoderAdapter) -> torch.device:
    return adapter.base.get_input_embeddings().weight.device


@contextmanager
def inference_state(model: nn.Module) -> Iterator[None]:
    """eval mode, no KV cache and no autograd; restores train/eval mode and ``config.use_cache``."""
    was_training = model.training
    config = getattr(model, "config", None)
    had_use_cache = config is not None and hasattr(config, "use_cache")
    use_cache = getattr(config, "use_cache", None)
    try:
        model.eval()
        if had_use_cache:
            config.use_cache = False
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if had_use_cache:
            config.use_cache = use_cache


def capture_layer_inputs(model: nn.Module, adapter: DecoderAdapter, batches: Sequence[Batch]) -> LayerInputs:
    """Layer 0's input hidden states and every layer's call kwargs, one model forward per batch."""
    if not batches:
        raise ValueError("layer-by-layer calibration needs at least one batch")
    layers = adapter.layers
    originals = list(layers)
    stores: list[list[tuple[torch.Tensor, tuple, dict]]] = [[] for _ in originals]
    device = _input_device(adapter)
    masks: list[torch.Tensor] = []
    with inference_state(model):
        try:
            for i, layer in enumerate(originals):
                layers[i] = _Catcher(layer, stores[i])
            for batch in batches:
                b = batch.to(device)
                masks.append(b.attention_mask.bool())
                adapter.base(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
        finally:
            for i, layer in enumerate(originals):
                layers[i] = layer
    for i, store in enumerate(stores):
        if len(store) != len(batches):
            raise RuntimeError(f"decoder layer {i} was called {len(store)} times for {len(batches)} batches")
    return LayerInputs(
        hidden=[h for h, _, _ in stores[0]],
        args=[[a for _, a, _ in store] for store in stores],
        kwargs=[[k for _, _, k in store] for store in stores],
        token_masks=masks,
    )


def _call_layer(layer: nn.Module, inputs: LayerInputs, index: int, batch: int) -> torch.Tensor:
    out = layer(inputs.hidden[batch], *inputs.args[index][batch], **inputs.kwargs[index][batch])
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def linear_input_hooks(
    linears: Mapping[str, nn.Module],
    sink: Callable[[str, torch.Tensor], None],
    token_mask: Callable[[], torch.Tensor | None],
) -> Iterator[None]:
    """Forward hooks handing ``sink(name, x)`` each Linear's inputs at real tokens, (tokens, in_features).
    ``token_mask()``: the current batch's (B, T) real tokens, or None when all are (a view then, not a copy: at 2048
    tokens a 70B down_proj's inputs are 0.9 GB a batch)."""

    def make(name: str) -> Callable[..., None]:
        def hook(_mod: nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            x = args[0]
            mask = token_mask()
            whole = mask is None or x.dim() != 3
            sink(name, x.reshape(-1, x.shape[-1]) if whole else x[mask.to(x.device)])  # type: ignore[union-attr]

        return hook

    handles = [mod.register_forward_hook(make(name)) for name, mod in linears.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def collect_layer_stats(
    layer: nn.Module,
    inputs: LayerInputs,
    index: int,
    linears: Mapping[str, nn.Module],
    stats: Mapping[str, Accumulator],
) -> None:
    """Run layer ``index`` on every stored batch; each Linear's real-token inputs go to ``stats[name]``."""
    current: list[torch.Tensor | None] = []
    padded = [None if bool(m.all()) else m for m in inputs.token_masks]  # calibration windows have no padding
    with linear_input_hooks(linears, lambda name, x: stats[name].add(x), lambda: current[0]):
        for b in range(len(inputs.hidden)):
            current[:] = [padded[b]]
            _call_layer(layer, inputs, index, b)


def advance(layer: nn.Module, inputs: LayerInputs, index: int) -> None:
    """Replace the stored inputs by layer ``index``'s outputs (batch by batch, freeing as it goes)."""
    for b in range(len(inputs.hidden)):
        inputs.hidden[b] = _call_layer(layer, inputs, index, b)


def calibrate_layerwise(
    model: nn.Module,
    adapter: DecoderAdapter,
    batches: Sequence[Batch],
    new_stats: Callable[[int, str, nn.Linear], Accumulator],
    on_layer: Callable[[int, dict[str, Accumulator]], None],
    before_layer: Callable[[int], None] | None = None,
    layer_scope: Callable[[int], AbstractContextManager[Any]] | None = None,
    resume: tuple[int, list[torch.Tensor]] | None = None,
    after_layer: Callable[[int, list[torch.Tensor]], None] | None = None,
) -> int:
    """Drive layer-by-layer calibration over every decoder layer; returns the real tokens seen per layer.

    ``new_stats(layer, name, linear)`` makes an accumulator for each Linear of the layer;
    ``on_layer(layer, stats)`` is called with them filled (prune there); ``before_layer(layer)`` runs first
    (raise there to stop). The layer is re-run after ``on_layer`` to produce the next layer's inputs.
    ``layer_scope(layer)`` encloses all of that for one layer (a streamed model holds the layer in memory there
    and saves what ``on_layer`` changed). ``after_layer(layer, hidden)`` hears the next layer's inputs once a
    layer is done (a checkpoint saves them); ``resume=(start, hidden)`` starts at layer ``start`` with those inputs
    (taken: the list is emptied), the layers before it already done.
    """
    inputs = capture_layer_inputs(model, adapter, batches)
    start = 0
    if resume is not None:
        start, hidden = resume
        if [h.shape for h in hidden] != [h.shape for h in inputs.hidden]:
            raise ValueError("the saved calibration inputs do not match these calibration batches")
        inputs.hidden = [h.to(device=old.device, dtype=old.dtype) for h, old in zip(hidden, inputs.hidden,
                                                                                    strict=True)]
        hidden.clear()  # one copy of the inputs, not two
    with inference_state(model):
        for index in range(start, len(adapter.layers)):
            if before_layer is not None:
                before_layer(index)
            with layer_scope(index) if layer_scope is not None else nullcontext():
                layer = adapter.layers[index]
                linears = adapter.prunable_linears(index)
                stats = {name: new_stats(index, name, lin) for name, lin in linears.items()}
                collect_layer_stats(layer, inputs, index, linears, stats)
                on_layer(index, stats)
                del stats  # what on_layer left of them goes before the layer re-runs, not beside the next layer's
                if index + 1 < len(adapter.layers):
                    advance(layer, inputs, index)
            if after_layer is not None:
                after_layer(index, inputs.hidden)
    return inputs.tokens


def build_calibration_batches(
    tokenizer: Any, texts: Sequence[str], n_samples: int, seq_len: int, batch_size: int, seed: int
) -> list[Batch]:
    """Calibration sequences cut from one token stream.

    The texts are shuffled (seeded), tokenised one by one (each with the tokenizer's special tokens and
    an EOS separator) and concatenated until ``n_samples · seq_len`` tokens are there; the stream is cut into
    consecutive non-overlapping sequences of exactly ``seq_len`` tokens, so no padding is needed. Too little
    text for ``n_samples`` sequences is a :class:`DataError` naming ``pruning.calibration_samples`` (never
    quietly fewer sequences than the spec asks for).
    """
    if n_samples < 1 or seq_len < 1 or batch_size < 1:
        raise ValueError("n_samples, seq_len and batch_size must be positive")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    eos = getattr(tokenizer, "eos_token_id", None)
    need = n_samples * seq_len
    stream: list[int] = []
    for i in order:
        if not texts[i].strip():  # a blank row would put a stray BOS and EOS into the stream
            continue
        ids = token_ids(tokenizer, texts[i])
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        stream.extend(ids)
        if len(stream) >= need:
            break
    if not stream:
        raise DataError("calibration texts produced no tokens")
    if len(stream) < need:
        raise DataError(
            f"pruning.calibration_samples asks for {n_samples} sequences of {seq_len} tokens ({need} tokens), but "
            f"the calibration text holds {len(stream)} tokens, enough for {len(stream) // seq_len}: give more text, "
            "or lower pruning.calibration_samples or pruning.seq_len", field="pruning.calibration_samples")
    seqs = [stream[k * seq_len : (k + 1) * seq_len] for k in range(n_samples)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    return [pad_batch(seqs[k : k + batch_size], pad_id) for k in range(0, len(seqs), batch_size)]
