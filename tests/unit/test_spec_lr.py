"""restoration.lr takes the method's default when unset; restoration.directions is a fraction or a count."""

from __future__ import annotations

import pytest

from app.methods import default_lr, restoration_config


def R(**fields):  # noqa: N802 (reads like the config it makes)
    return restoration_config(fields)


@pytest.mark.parametrize("method", ["restorelcc", "bias", "lora", "dora"])
def test_unset_lr_takes_the_methods_default(method):
    assert R(method=method).lr == default_lr(method)
    assert R(method=method, lr=3e-4).lr == 3e-4


def test_offsets_and_adapters_default_to_different_rates():
    assert R(method="restorelcc").lr > R(method="lora").lr
    assert "lr" not in type(R(method="none")).model_fields  # nothing to train, no rate
    with pytest.raises(ValueError, match="lr"):
        R(method="lora", lr=0)


def test_directions_are_a_fraction_or_a_whole_count():
    assert R(directions=0.5).directions == 0.5
    assert R(directions=30).directions == 30 and R(directions=None).directions is None
    assert 0 < R().directions < 1  # the default is a fraction of head_dim: it fits any model
    for bad in (0, 2.5, -1):
        with pytest.raises(ValueError, match="directions"):
            R(directions=bad)


def test_the_default_run_is_the_measured_setting():
    """heads, directions, lr, steps and batching together: the setting search's winner (docs/search.md)."""
    r = R()
    assert (r.heads, r.directions, r.lr, r.lr_schedule) == (0.8, 0.66, 3e-3, "constant")
    assert (r.max_steps, r.batch_size, r.group_by_length) == (50, 8, True)


def test_epochs_alone_are_run_in_full_and_survive_a_round_trip():
    assert R(epochs=3).max_steps is None  # not cut short by the default step budget
    assert R(epochs=3, max_steps=10).max_steps == 10  # both given: max_steps wins, as documented
    assert R(max_steps=None).max_steps is None
    for r in (R(epochs=3), R(), R(epochs=2, max_steps=7)):
        again = restoration_config(r.model_dump(mode="json"))  # as the worker reads a stored spec
        assert (again.epochs, again.max_steps) == (r.epochs, r.max_steps)
