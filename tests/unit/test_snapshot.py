"""Packing what a job holds between stages: exact round trips, and nothing but data is ever rebuilt."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file

from worker.model.data import Batch
from worker.restore.restorelcc.capture import ProbeInputs
from worker.run.snapshot import pack, unpack


def _through_file(tmp_path, obj):
    tensors, skeleton = pack(obj)
    save_file(tensors, str(tmp_path / "part.safetensors"))
    return unpack(load_file(str(tmp_path / "part.safetensors")), skeleton)


def test_nested_values_come_back_exactly(tmp_path):
    batch = Batch(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 1, 0]]), torch.tensor([[-100, 2, -100]]))
    obj = {
        "probe": ProbeInputs(prompt=[batch], positive=[batch], negative=None, n=1),
        "heads": [(0, 1), (2, 3)],
        "opt": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, dtype=torch.bfloat16)}},
                "param_groups": [{"lr": 0.1 + 0.2, "betas": (0.9, 0.999), "params": [0]}]},
        "curve": [1 / 3, 2.0e-9, -0.0],
        "flags": torch.tensor([True, False]),
        "none": None,
    }
    back = _through_file(tmp_path, obj)
    assert isinstance(back["probe"], ProbeInputs) and isinstance(back["probe"].prompt[0], Batch)
    assert torch.equal(back["probe"].positive[0].labels, batch.labels) and back["probe"].negative is None
    assert back["heads"] == [(0, 1), (2, 3)] and isinstance(back["heads"][0], tuple)
    state = back["opt"]["state"][0]
    assert list(back["opt"]["state"]) == [0]  # integer keys stay integers
    assert state["exp_avg"].dtype == torch.bfloat16 and torch.equal(state["exp_avg"], obj["opt"]["state"][0]["exp_avg"])
    assert back["opt"]["param_groups"][0]["lr"] == 0.1 + 0.2 and back["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert back["curve"] == obj["curve"]
    assert torch.equal(back["flags"], obj["flags"])


def test_copies_never_share_storage_unless_asked(tmp_path):
    base = torch.arange(10.0)
    tensors, _ = pack({"a": base[:5], "b": base[5:]})
    save_file(tensors, str(tmp_path / "views.safetensors"))  # refused for tensors that share memory
    weight = torch.randn(3, 4)
    tensors, _ = pack({"w": weight}, copy=False)
    assert tensors["0"].data_ptr() == weight.data_ptr()


def test_without_copies_only_a_tensor_sharing_an_earlier_ones_storage_is_copied(tmp_path):
    base, other = torch.arange(10.0), torch.randn(6)
    obj = {"a": base[:5], "b": base[5:], "c": other, "again": other}
    tensors, skeleton = pack(obj, copy=False)
    assert tensors["0"].data_ptr() == base.data_ptr() and tensors["2"].data_ptr() == other.data_ptr()
    assert tensors["1"].data_ptr() != base[5:].data_ptr() and tensors["3"].data_ptr() != other.data_ptr()
    save_file(tensors, str(tmp_path / "shared.safetensors"))  # refused if any two still shared memory
    back = unpack(load_file(str(tmp_path / "shared.safetensors")), skeleton)
    assert all(torch.equal(back[k], v) for k, v in obj.items())


@dataclass
class Foreign:
    x: int


def test_only_data_is_packed_and_only_worker_dataclasses_are_rebuilt():
    with pytest.raises(TypeError, match="cannot checkpoint"):
        pack({"module": torch.nn.Linear(2, 2)})
    _, skeleton = pack(Foreign(1))  # a test module's dataclass: packed, but never rebuilt from a checkpoint
    with pytest.raises(ValueError, match="outside the worker package"):
        unpack({}, skeleton)
    with pytest.raises(ValueError, match="outside the worker package"):
        unpack({}, {"c": "os:system", "v": {}})
    with pytest.raises(ValueError, match="not a dataclass"):
        unpack({}, {"c": "worker.run.snapshot:pack", "v": {}})
