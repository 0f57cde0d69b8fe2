"""Placing a model split over several GPUs: the plan's layer → GPU assignment (app.plan.split_layers) as the device
map transformers and accelerate load by.

Every decoder layer goes to its GPU; the input embeddings and whatever else sits before the layers (rotary
embeddings) to the first GPU; the final norm and the LM head together to the GPU the plan put them on (the last
one, or the first when the head is tied to the embeddings). Accelerate's hooks then move each module's inputs to
its GPU, and the model's outputs back to the first: the stages run unchanged, an activation crossing from one GPU
to the next once per run of layers.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from worker.model.arch import DecoderAdapter


def split_device_map(model: nn.Module, layer_devices: list[int], devices: list[str]) -> dict[str, str]:
    """Module name → device for ``model`` (its structure only: a model on the meta device will do)."""
    adapter = DecoderAdapter(model)
    prefix = adapter._layers_prefix()
    if len(layer_devices) != len(adapter.layers):
        raise ValueError(f"a placement for {len(layer_devices)} layers, but the model has {len(adapter.layers)}")
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    head_device = devices[0] if tied else devices[-1]
    final_norm = getattr(adapter.base, "norm", None)
    out: dict[str, str] = {f"{prefix}.{i}": devices[d] for i, d in enumerate(layer_devices)}

    def place(module: nn.Module, name: str) -> None:
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if full == prefix:
                continue
            if prefix.startswith(full + "."):  # holds the layers: place its other children one by one
                place(child, full)
            elif child is head or child is final_norm:
                out[full] = head_device
            elif any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
                out[full] = devices[0]

    place(model, "")
    return out


def meta_model(config: Any) -> nn.Module:
    """The model's structure without weights (to name its modules); ``config``: transformers' or config.json's."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from worker.model.load import transformers_config

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(transformers_config(config))
    model.tie_weights()  # as loading ties them (an empty model is left untied): shared weights show as shared
    return model
