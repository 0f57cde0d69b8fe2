"""A job's checkpoint store on a real local artifact store: parts accumulate, replaced files go, and a checkpoint
that is half-written, corrupted or made for another spec is never read."""

from __future__ import annotations

import json

import torch

from app.store.artifacts import LocalStore
from worker.run.checkpoints import MANIFEST, CheckpointStore

PREFIX = "jobs/j1/checkpoints/"


def _store(tmp_path, fingerprint="fp", prefix=PREFIX, **kw):
    return CheckpointStore(LocalStore(tmp_path / "artifacts"), prefix, fingerprint, tmp_path / "scratch", **kw)


def _keys(tmp_path, prefix=PREFIX):
    return [k for k, _ in LocalStore(tmp_path / "artifacts").list_prefix(prefix)]


def test_parts_accumulate_and_replaced_files_are_deleted(tmp_path):
    usage = []
    ck = _store(tmp_path, on_usage=usage.append)
    weights = {"layers.0.q": torch.randn(4, 4)}
    assert ck.save("pruned", {"report": {"a": 1}}, {"weights": weights, "method": {"heads": [(0, 1)]}},
                   copy=("weights",))
    assert ck.save("selected", {"report": {"a": 2}}, {"method": {"heads": [(1, 2)]}})
    assert sorted(_keys(tmp_path)) == [PREFIX + MANIFEST, PREFIX + "method-00002.safetensors",
                                       PREFIX + "weights-00001.safetensors"]
    assert usage[-1] == ck.usage() == sum(s for k, s in LocalStore(tmp_path / "artifacts").list_prefix(PREFIX)
                                          if not k.endswith(MANIFEST))
    back = _store(tmp_path).load()
    assert back.point == "selected" and back.meta == {"report": {"a": 2}}
    assert torch.equal(back.part("weights")["layers.0.q"], weights["layers.0.q"])
    assert back.part("method") == {"heads": [(1, 2)]}
    assert _store(tmp_path).clear() == 3 and _keys(tmp_path) == []


def test_another_spec_or_a_corrupt_part_is_never_read(tmp_path):
    ck = _store(tmp_path)
    ck.save("pruned", {"report": {}}, {"weights": {"w": torch.ones(3)}})
    other = _store(tmp_path, fingerprint="other")
    assert other.load() is None and "another spec" in other.ignored[0]
    part = tmp_path / "artifacts" / PREFIX / "weights-00001.safetensors"
    part.write_bytes(part.read_bytes()[:-1] + b"\x00")
    reader = _store(tmp_path)
    assert reader.load() is None and "sha256" in reader.ignored[0]


def test_a_part_written_without_its_manifest_is_never_read_and_is_cleaned_up(tmp_path):
    ck = _store(tmp_path)
    ck.save("pruned", {"report": {"n": 1}}, {"weights": {"w": torch.ones(3)}})
    # a run killed after writing a new part but before the manifest naming it
    (tmp_path / "artifacts" / PREFIX / "method-00002.safetensors").write_bytes(b"half")
    back = _store(tmp_path).load()
    assert back.point == "pruned" and set(back.files) == {"weights"}
    assert PREFIX + "method-00002.safetensors" not in _keys(tmp_path)


def test_a_retry_resumes_from_its_predecessor_and_copies_what_it_read(tmp_path):
    _store(tmp_path, prefix="jobs/old/checkpoints/").save("training", {"report": {}, "step": 40},
                                                          {"train": {"x": torch.arange(3)}})
    retry = _store(tmp_path, prefix="jobs/new/checkpoints/", sources=("jobs/old/checkpoints/",))
    back = retry.load()
    assert back.point == "training" and back.meta["step"] == 40 and back.source == "jobs/old/checkpoints/"
    manifest = json.loads((tmp_path / "artifacts" / "jobs/new/checkpoints" / MANIFEST).read_text())
    assert all(p["key"].startswith("jobs/new/") for p in manifest["parts"].values())
    assert _store(tmp_path, prefix="jobs/new/checkpoints/").load().meta["step"] == 40  # readable on its own


def test_a_run_that_lost_its_job_writes_nothing(tmp_path):
    ck = _store(tmp_path, may_write=lambda: False)
    assert not ck.save("pruned", {"report": {}}, {"weights": {"w": torch.ones(3)}})
    assert _keys(tmp_path) == []


def test_layer_files_are_saved_as_they_are_and_put_back_by_name(tmp_path):
    """A streamed run's layer files travel as file parts (the bytes unchanged, never unpacked); a resumed run puts
    the weights they hold back by module name, and refuses to go on when one it needs is not there."""
    import pytest
    from safetensors.torch import save_file

    from worker.errors import JobFailure
    from worker.run.resume import Resumer

    weights = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(3, 4) for i in range(2)}
    files = {}
    for i, (name, w) in enumerate(weights.items()):
        save_file({name: w, f"model.layers.{i}.input_layernorm.weight": torch.ones(4)}, str(tmp_path / f"l{i}.st"))
        files[f"layer-{i:04d}"] = tmp_path / f"l{i}.st"
    store = _store(tmp_path)
    assert all(store.stage(name, path) for name, path in files.items())
    assert store.save("pruned", {"report": {}}, {"method": {"k": 1}})
    resumer = Resumer(_store(tmp_path))
    resumer.checkpoint = resumer.store.load()
    back = resumer.layer_files()
    assert list(back) == ["layer-0000", "layer-0001"]
    assert [p.read_bytes() for p in back.values()] == [p.read_bytes() for p in files.values()]
    assert resumer.checkpoint.part("method") == {"k": 1}
    linears = {n.removesuffix(".weight"): torch.nn.Linear(4, 3, bias=False) for n in weights}
    resumer.apply_weights(linears)
    assert all(torch.equal(linears[n.removesuffix(".weight")].weight, w) for n, w in weights.items())
    with pytest.raises(JobFailure, match=r"no pruned weights for 1 module\(s\).*model\.layers\.2\.mlp\.down_proj"):
        resumer.apply_weights({**linears, "model.layers.2.mlp.down_proj": torch.nn.Linear(4, 3, bias=False)})


def test_a_whole_model_weights_part_of_an_earlier_release_is_put_back_by_name(tmp_path):
    from worker.run.resume import Resumer

    weights = {"model.layers.0.mlp.up_proj": torch.randn(3, 4)}
    assert _store(tmp_path).save("pruned", {"report": {}}, {"weights": weights}, copy=("weights",))
    resumer = Resumer(_store(tmp_path))
    resumer.checkpoint = resumer.store.load()
    assert resumer.layer_files() == {} and resumer.pruned_layers(2) == range(2)
    linear = torch.nn.Linear(4, 3, bias=False)
    resumer.apply_weights({"model.layers.0.mlp.up_proj": linear})
    assert torch.equal(linear.weight, weights["model.layers.0.mlp.up_proj"])


def test_pruning_checkpoints_come_by_layer_count_by_time_and_on_a_stop(tmp_path):
    """Inside pruning every finished layer is uploaded at once and a checkpoint naming them is due every
    `every_layers` layers, after `every_s` seconds, or on a stop; the last layer is left to `pruned`, which names
    every layer and drops the calibration inputs."""
    from worker.run.resume import CheckpointPolicy, Resumer

    stop = []
    part = lambda i: {f"l{i}.weight": torch.full((2,), float(i))}  # noqa: E731
    resumer = Resumer(_store(tmp_path), CheckpointPolicy(every_s=1e9, every_layers=2))
    saver = resumer.pruning_saver(6, part, lambda: {"r": 1}, lambda: bool(stop), "d1")
    hidden = [torch.ones(1, 2, 3)]
    saver(0, hidden)
    assert _store(tmp_path).load() is None  # 1 layer done: uploaded, not yet named by any checkpoint
    saver(1, hidden)
    assert (ck := _store(tmp_path).load()).point == "pruning" and ck.meta["step"] == 2
    assert set(ck.files) == {"layer-0000", "layer-0001", "calibration", "rng"}
    stop.append(True)
    saver(2, [torch.zeros(1, 2, 3)])  # asked to stop: due at once
    resumed = Resumer(_store(tmp_path))
    resumed.checkpoint = resumed.store.load()
    step, back, digest = resumed.pruning_resume()
    assert (step, digest, resumed.pruned_layers(6)) == (3, "d1", range(3))
    assert torch.equal(back[0], torch.zeros(1, 2, 3))
    assert set(resumed.layer_files()) == {"layer-0000", "layer-0001", "layer-0002"}
    stop.clear()
    for i in (3, 4, 5):
        saver(i, hidden)  # 4 is due by count; 5, the last layer, is left to the pruned checkpoint
    manifest = json.loads((tmp_path / "artifacts" / PREFIX / MANIFEST).read_text())  # (a load would tidy up)
    assert manifest["meta"]["step"] == 4 and "layer-0005" not in manifest["parts"]
    resumer.save("pruned", {"r": 2}, drop=("calibration",))
    ck = _store(tmp_path).load()
    assert ck.point == "pruned" and set(ck.file_parts("layer-")) == {f"layer-{i:04d}" for i in range(6)}
    assert "calibration" not in ck.files
    assert not [k for k in _keys(tmp_path) if "calibration" in k]  # its file went with it
    timed = Resumer(_store(tmp_path, prefix="jobs/j2/checkpoints/"), CheckpointPolicy(every_s=0.0))
    timed.pruning_saver(6, part, dict, lambda: False, "d")(0, hidden)  # the time limit passed
    assert _store(tmp_path, prefix="jobs/j2/checkpoints/").load().meta["step"] == 1
