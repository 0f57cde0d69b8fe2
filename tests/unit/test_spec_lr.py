"""restoration.lr: unset picks the method's default; a value given is kept."""

from __future__ import annotations

import pytest

from app.schemas import DEFAULT_LR, RestorationSpec


@pytest.mark.parametrize("method", ["restorelcc", "bias", "lora", "dora"])
def test_unset_lr_takes_the_methods_default(method):
    assert RestorationSpec(method=method).lr == DEFAULT_LR[method]
    assert RestorationSpec(method=method, lr=3e-4).lr == 3e-4


def test_offsets_and_adapters_default_to_different_rates():
    assert RestorationSpec(method="restorelcc").lr > RestorationSpec(method="lora").lr
    assert RestorationSpec(method="none").lr is None
    with pytest.raises(ValueError, match="lr"):
        RestorationSpec(method="lora", lr=0)
