"""Every bad path, name or file the API can know about at submit is a 4xx naming the field, never a job that
fails later (or a 500): names and paths over the OS limits, control characters, paths that exist but are not a
model or not a file. A path that does not exist is still accepted (the worker may see other mounts)."""

from __future__ import annotations

import json
import os

import pytest

from app.fields import NAME_MAX_BYTES, PATH_MAX_BYTES


def _post(api, **sections):
    body = api.spec(**sections)
    return api.client.post("/v1/jobs", json=body, headers=api.h())


def _refused(r, field: str, code: str) -> dict:
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert (err["field"], err["code"]) == (field, code), err
    assert err["message"].startswith(f"{field}: ")
    return err


def test_a_300_character_model_file_name_is_422_naming_model_id(api):
    name = "m" * 300 + ".gguf"
    err = _refused(_post(api, model={"id": str(api.root / "models" / name)}), "model.id", "invalid_spec")
    assert f"the limit is {NAME_MAX_BYTES} bytes per name" in err["message"]
    # Bytes count, not characters: 100 three-byte characters are 300 bytes.
    _refused(_post(api, model={"id": str(api.root / "models" / ("é" * 100 + "€" * 20))}), "model.id", "invalid_spec")


def test_a_path_over_path_max_is_422(api):
    deep = str(api.root / "data") + "/x" * (PATH_MAX_BYTES // 2)
    err = _refused(_post(api, data={"train": deep}), "data.train", "invalid_spec")
    assert str(PATH_MAX_BYTES) in err["message"]
    long_list = [str(api.root / "data" / "ok.jsonl"), str(api.root / "data" / ("n" * 256))]
    _refused(_post(api, evaluation={"tasks": long_list}), "evaluation.tasks.1", "invalid_spec")


@pytest.mark.parametrize("bad", ["a\x00b", "a\nb", "a\tb", "a\x1bb", "a\x7fb", "a\x85b"])
def test_control_characters_in_paths_and_names_are_422(api, bad):
    _refused(_post(api, data={"train": str(api.root / "data" / bad)}), "data.train", "invalid_spec")
    # a hub id: a revision with a local model.id is refused whatever it holds
    err = _refused(_post(api, model={"id": "org/m", "revision": bad}), "model.revision", "invalid_spec")
    assert "hub id only" not in err["message"]


def test_unpaired_surrogates_are_422_not_a_store_error(api):
    body = ('{"model": {"id": "org/m", "revision": "a\\ud800b"}, "pruning": {"method": "magnitude"},'
            ' "restoration": {"method": "none"}}')  # a hub id: with a local one any revision is refused
    r = api.client.post("/v1/jobs", content=body, headers={**api.h(), "Content-Type": "application/json"})
    assert "hub id only" not in _refused(r, "model.revision", "invalid_spec")["message"]


def test_unresolvable_paths_are_422_not_500(api):
    loop = api.root / "data" / "loop.jsonl"
    os.symlink(loop, loop)
    err = _refused(_post(api, data={"train": str(loop)}), "data.train", "path_not_allowed")
    assert "cannot be resolved" in err["message"]
    _refused(_post(api, model={"id": "~no-such-user-here/m"}), "model.id", "path_not_allowed")


def test_a_dangling_symlink_is_judged_by_where_it_points(api):
    os.symlink(api.root / "elsewhere" / "later.jsonl", api.root / "data" / "dangling.jsonl")
    _refused(_post(api, data={"train": str(api.root / "data" / "dangling.jsonl")}), "data.train", "path_not_allowed")


def test_a_model_path_that_exists_must_be_a_model(api):
    models = api.root / "models"
    (models / "weights.bin").write_bytes(b"\0" * 8)
    (models / "empty").mkdir()
    (models / "hf").mkdir()
    (models / "hf" / "config.json").write_text("{}")
    (models / "q").mkdir()
    (models / "q" / "a.gguf").write_bytes(b"GGUF")
    (models / "q" / "sub.gguf").mkdir()
    (models / "m.gguf").write_bytes(b"GGUF")
    os.mkfifo(models / "fifo")

    err = _refused(_post(api, model={"id": str(models / "weights.bin")}), "model.id", "not_a_model")
    assert "not a .gguf" in err["message"]
    _refused(_post(api, model={"id": str(models / "empty")}), "model.id", "not_a_model")
    _refused(_post(api, model={"id": str(models / "fifo")}), "model.id", "not_a_model")
    _refused(_post(api, model={"id": str(models / "q"), "gguf_file": "sub.gguf"}), "model.gguf_file", "not_a_model")
    _refused(_post(api, model={"id": str(models / "q"), "gguf_file": "a.bin"}), "model.gguf_file", "invalid_spec")
    _refused(_post(api, model={"id": str(models / "q"), "gguf_file": "../a.gguf"}), "model.gguf_file",
             "invalid_spec")
    _refused(_post(api, model={"id": str(models / "hf"), "dense": str(models / "weights.bin")}, pruning={
        "method": "none"}), "model.dense", "not_a_model")

    for model in ({"id": str(models / "hf")}, {"id": str(models / "q")}, {"id": str(models / "m.gguf")},
                  {"id": str(models / "q"), "gguf_file": "a.gguf"},
                  {"id": str(models / "not-there-yet")}):  # missing: the worker says model_not_found
        r = _post(api, model=model)
        assert r.status_code == 202, (model, r.text)


def test_a_data_path_that_exists_must_be_a_file(api):
    data = api.root / "data"
    (data / "train.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    (data / "adir").mkdir()
    os.mkfifo(data / "pipe.jsonl")
    restore = {"method": "bias", "head_selection": "random"}
    err = _refused(_post(api, restoration=restore, data={"train": str(data / "adir")}), "data.train", "not_a_file")
    assert "is a directory" in err["message"]
    _refused(_post(api, restoration=restore, data={"train": str(data / "pipe.jsonl")}), "data.train", "not_a_file")
    evaluation = {"perplexity": [str(data / "train.jsonl"), str(data / "adir")]}
    _refused(_post(api, evaluation=evaluation), "evaluation.perplexity.1", "not_a_file")
    ok = _post(api, restoration=restore, data={"train": str(data / "train.jsonl"), "calibration": str(data / "new")})
    assert ok.status_code == 202, ok.text


def test_hub_ids_over_the_hub_limit_are_422(tmp_path, db_url):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.conftest import api_settings

    with TestClient(create_app(api_settings(tmp_path, db_url, allow_hub_models=True))) as c:
        spec = {"model": {"id": "org/" + "n" * 93}, "pruning": {"method": "magnitude"},
                "restoration": {"method": "none"}}
        r = c.post("/v1/jobs", json=spec, headers={"Authorization": "Bearer key-alice-123"})
        _refused(r, "model.id", "path_not_allowed")
        spec["model"]["id"] = "org/" + "n" * 92
        assert c.post("/v1/jobs", json=spec, headers={"Authorization": "Bearer key-alice-123"}).status_code == 202


def test_ids_and_names_no_job_can_have_are_not_found_not_500(api):
    job = api.create()["id"]
    for url in ("/v1/jobs/ab%00cd", "/v1/jobs/ab%00cd/artifacts", "/v1/jobs/ab%00cd/events",
                f"/v1/jobs/{job}/artifacts/x%00y", "/v1/jobs/" + "a" * 37):
        r = api.client.get(url, headers=api.h())
        assert r.status_code == 404, (url, r.text)
    assert api.client.post("/v1/jobs/ab%00cd/cancel", headers=api.h()).status_code == 404
    assert api.client.delete("/v1/jobs/ab%00cd", headers=api.h()).status_code == 404
    r = api.client.get("/v1/jobs?after=ab%00cd", headers=api.h())
    assert r.status_code == 422 and r.json()["error"]["field"] == "after"


@pytest.mark.parametrize("number, field", [("1e999", "restoration.lora_alpha"), ("NaN", "restoration.heads"),
                                           ("-Infinity", "pruning.sparsity"), ("10000001", "restoration.max_steps")])
def test_numbers_a_job_cannot_use_are_422(api, number, field):
    section, key = field.split(".")
    spec = api.spec()
    if section == "restoration":  # a method that has the setting
        spec["restoration"] = {"method": "restorelcc" if key == "heads" else "lora"}
    spec.setdefault(section, {})[key] = "@"
    body = json.dumps(spec).replace('"@"', number)
    r = api.client.post("/v1/jobs", content=body, headers={**api.h(), "Content-Type": "application/json"})
    _refused(r, field, "invalid_spec")


def test_resolve_agrees_with_realpath(tmp_path):
    """The bounded resolver gives what os.path.realpath gives, through links to directories, files, chains of
    links, relative links and dangling ones, with and without names that do not exist after them."""
    from app.paths import resolve

    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f.jsonl").write_text("{}\n")
    os.symlink(tmp_path / "a" / "b", tmp_path / "abs")
    os.symlink("a/b/c", tmp_path / "rel")
    os.symlink(tmp_path / "abs", tmp_path / "chain")
    os.symlink(tmp_path / "nowhere" / "x", tmp_path / "dangling")
    os.symlink("../f.jsonl", tmp_path / "a" / "b" / "c" / "up")
    tails = ("", "/c", "/c/up", "/f.jsonl", "/missing", "/missing/deeper/still", "/f.jsonl/not-a-dir")
    for head in ("a/b", "abs", "rel", "chain", "dangling", "missing", "a//b/./c"):
        for tail in tails:
            p = f"{tmp_path}/{head}{tail}"
            assert resolve(p) == os.path.realpath(p), p
    deep = f"{tmp_path}/abs" + "/x" * 2000
    assert resolve(deep) == os.path.realpath(deep)
