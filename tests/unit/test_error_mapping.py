"""Every bad input a user controls ends as a specific job failure naming its field, never as internal_error.

Each case drives a real bad file (or name) in tmp_path through the worker's own code path: ``check_job`` (data
files, model location, config, GGUF header), ``load_model`` (weights and tokenizer), the readers, and, for files
that change after the check, ``run_pipeline``. Nothing here mocks the filesystem; as root chmod cannot deny a
read, so an unreadable file is a symlink to /proc/self/mem (it opens, and reading it fails with EIO).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from app.schemas import JobSpec, Stage
from tests.tiny import instruction_rows, save_tiny, write_jsonl
from worker.errors import DataError, JobFailure
from worker.run.check import check_job

Build = Callable[[Path, Path], dict[str, Any]]  # (tmp dir, a good tiny model dir) → spec sections to replace


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def train(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", instruction_rows(8))


def job(model: str, train: Path, **sections: dict[str, Any]) -> JobSpec:
    """A valid spec, then ``sections`` set without validation: the worker must cope with whatever a stored
    spec or `restorelcc run` hands it, whatever the API would have refused."""
    spec = JobSpec.model_validate({
        "model": {"id": model}, "pruning": {"method": "magnitude"}, "restoration": {"method": "none"},
        "data": {"train": str(train)},
    })
    for section, values in sections.items():
        for name, value in values.items():
            setattr(getattr(spec, section), name, value)
    return spec


def failure(fn: Callable[[], Any]) -> tuple[str, str | None]:
    """(code, field) of the JobFailure ``fn`` raises; any other exception fails the test (it would be
    internal_error)."""
    with pytest.raises(JobFailure) as err:
        fn()
    return err.value.code, err.value.field


# ── files and names that cannot be opened ────────────────────────────────────────────────────────────


def long_name(tmp: Path, suffix: str = ".jsonl") -> str:
    return str(tmp / ("n" * (300 - len(suffix)) + suffix))


def long_path(tmp: Path) -> str:
    return str(tmp.joinpath(*["p" * 200] * 21))  # every component fits, the whole path is over 4096 bytes


def a_directory(tmp: Path) -> str:
    (tmp / "folder").mkdir()
    return str(tmp / "folder")


def a_fifo(tmp: Path, name: str = "fifo") -> str:
    os.mkfifo(tmp / name)  # opening it for reading would block until a writer comes
    return str(tmp / name)


def dangling(tmp: Path, name: str = "dangling") -> str:
    (tmp / name).symlink_to(tmp / "nowhere")
    return str(tmp / name)


def symlink_loop(tmp: Path) -> str:
    (tmp / "loop").symlink_to(tmp / "loop")
    return str(tmp / "loop")


def unreadable(tmp: Path, name: str = "unreadable") -> str:
    (tmp / name).symlink_to("/proc/self/mem")  # a regular file that opens; read() fails with EIO
    return str(tmp / name)


def write(tmp: Path, name: str, content: str | bytes) -> str:
    p = tmp / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    return str(p)


BAD_FILES: dict[str, Callable[[Path], str]] = {
    "name_300": long_name,
    "path_over_4096": long_path,
    "directory": a_directory,
    "fifo": a_fifo,
    "dangling_symlink": dangling,
    "unreadable": unreadable,
    "not_utf8": lambda tmp: write(tmp, "latin1.jsonl", b'{"text": "caf\xe9", "prompt": "caf\xe9"}\n'),
    "empty": lambda tmp: write(tmp, "empty.jsonl", ""),
    "deep_nesting": lambda tmp: write(tmp, "deep.jsonl", "[" * 100_000 + "]" * 100_000 + "\n"),
    "huge_integer": lambda tmp: write(tmp, "big.jsonl", '{"text": ' + "9" * 5000 + "}\n"),
}

DATA_FIELDS = ["data.train", "data.calibration", "evaluation.perplexity", "evaluation.response_perplexity",
               "evaluation.tasks"]


def data_job(fld: str, path: str, tiny: Path, train: Path) -> tuple[JobSpec, str]:
    """A job naming ``path`` at ``fld``; returns it with the field the failure must name."""
    section, name = fld.split(".")
    if section == "data":
        return job(str(tiny), train, data={name: path}), fld
    return job(str(tiny), train, evaluation={name: [path]}), f"{fld}.0"


@pytest.mark.parametrize("bad", list(BAD_FILES))
@pytest.mark.parametrize("fld", DATA_FIELDS)
def test_a_data_file_that_cannot_be_read_is_invalid_data(fld, bad, tmp_path, tiny, train):
    spec, named = data_job(fld, BAD_FILES[bad](tmp_path), tiny, train)
    assert failure(lambda: check_job(spec)) == ("invalid_data", named)


# ── rows of the wrong shape or type ──────────────────────────────────────────────────────────────────

OK_CHOICE = {"context": "Is it?", "choices": [" no", " yes"], "label": 1}
BAD_ROWS: dict[str, tuple[str, list[Any]]] = {
    # name: (field, rows: dicts, or raw lines as str)
    "prompt_int": ("data.train", [{"prompt": 5, "response": "x"}] * 4),
    "response_null": ("data.train", [{"prompt": "p", "response": None}] * 4),
    "prompt_list": ("data.train", [{"prompt": ["p"], "response": "x"}] * 4),
    "every_response_empty": ("data.train", [{"prompt": "p", "response": ""}] * 4),
    "empty_row": ("data.train", [{"prompt": "p", "response": "x"}] * 3 + [{"prompt": "", "response": ""}]),
    "lone_surrogate": ("data.train", ['{"prompt": "p", "response": "\\ud800"}'] * 4),
    "calibration_text_int": ("data.calibration", [{"text": 5}]),
    "calibration_all_empty": ("data.calibration", [{"text": ""}] * 3),
    "calibration_pair_types": ("data.calibration", [{"prompt": {}, "response": "x"}]),
    "text_list": ("evaluation.perplexity", [{"text": ["a"]}]),
    "text_all_empty": ("evaluation.perplexity", [{"text": ""}] * 2),
    "text_nan": ("evaluation.perplexity", ['{"text": NaN}']),
    "response_int": ("evaluation.response_perplexity", [{"prompt": "p", "response": 5}]),
    "choices_string": ("evaluation.tasks", [{**OK_CHOICE, "choices": "abc"}]),
    "choices_ints": ("evaluation.tasks", [{**OK_CHOICE, "choices": [1, 2]}]),
    "choice_empty": ("evaluation.tasks", [{**OK_CHOICE, "choices": ["", " yes"]}]),
    "context_object": ("evaluation.tasks", [{**OK_CHOICE, "context": {}}]),
    "label_string": ("evaluation.tasks", [{**OK_CHOICE, "label": "x"}]),
    "label_digit_string": ("evaluation.tasks", [{**OK_CHOICE, "label": "1"}]),
    "label_float": ("evaluation.tasks", [{**OK_CHOICE, "label": 1.5}]),
    "label_bool": ("evaluation.tasks", [{**OK_CHOICE, "label": True}]),
    "label_null": ("evaluation.tasks", [{**OK_CHOICE, "label": None}]),
    "label_nan": ("evaluation.tasks", ['{"context": "c", "choices": ["a", "b"], "label": NaN}']),
    "label_infinity": ("evaluation.tasks", ['{"context": "c", "choices": ["a", "b"], "label": 1e400}']),
    "label_out_of_range": ("evaluation.tasks", [{**OK_CHOICE, "label": 2}]),
    "not_an_object": ("evaluation.tasks", ["[1, 2]"]),
    "missing_key": ("evaluation.tasks", [{"context": "c", "choices": ["a", "b"]}]),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_rows_of_the_wrong_shape_are_invalid_data(case, tmp_path, tiny, train):
    fld, rows = BAD_ROWS[case]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    spec, named = data_job(fld, str(path), tiny, train)
    assert failure(lambda: check_job(spec)) == ("invalid_data", named)


def test_a_reader_failure_is_a_job_failure_wherever_it_is_read(tmp_path):
    """A stage that reads a data file again (after it changed) fails the job as invalid_data, not internal."""
    from worker.model.data import read_calibration_texts, read_choices, read_instructions, read_texts

    bad = write(tmp_path, "bad.jsonl", "not json\n")
    for reader in (read_texts, read_instructions, read_choices, read_calibration_texts):
        with pytest.raises(DataError, match="not valid JSON"):
            reader(bad)


# ── the model: location, config, GGUF header ─────────────────────────────────────────────────────────


def gguf_bytes(version: int = 3, n_tensors: int = 0, n_kv: int = 0, tail: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + tail


def gguf_with(tmp: Path, **kv: Any) -> str:
    """A header-only llama GGUF whose metadata holds ``kv`` (written by the gguf package)."""
    import gguf

    path = tmp / "meta.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in kv.items():
        if isinstance(value, str):
            w.add_string(f"llama.{key}", value)
        else:
            w.add_uint32(f"llama.{key}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def gguf_layers_a_string(tmp: Path, tiny: Path) -> str:
    return gguf_with(tmp, block_count="x", embedding_length=64, feed_forward_length=128,
                     **{"attention.head_count": 4})


def model_dir(tmp: Path, tiny: Path, config: str | bytes | None = None) -> str:
    """A copy of the tiny model, with ``config.json`` replaced when given."""
    d = tmp / "model"
    shutil.copytree(tiny, d)
    if config is not None:
        write(d, "config.json", config)
    return str(d)


def llama_config(**changes: Any) -> str:
    config = {"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 4, "hidden_size": 64,
              "num_hidden_layers": 2, "intermediate_size": 128}
    config.update(changes)
    return json.dumps({k: v for k, v in config.items() if v is not None})


def config_is_dir(tmp: Path, tiny: Path) -> str:
    d = Path(model_dir(tmp, tiny))
    (d / "config.json").unlink()
    (d / "config.json").mkdir()
    return str(d)


def config_unreadable(tmp: Path, tiny: Path) -> str:
    d = Path(model_dir(tmp, tiny))
    (d / "config.json").unlink()
    unreadable(d, "config.json")
    return str(d)


def only_a_fifo_gguf(tmp: Path, tiny: Path) -> str:
    (tmp / "m").mkdir()
    a_fifo(tmp / "m", "model.gguf")
    return str(tmp / "m")


def two_ggufs(tmp: Path, tiny: Path) -> str:
    (tmp / "m").mkdir()
    for name in ("a.gguf", "b.gguf"):
        write(tmp / "m", name, gguf_bytes())
    return str(tmp / "m")


def no_config(tmp: Path, tiny: Path) -> str:
    (tmp / "m").mkdir()
    return str(tmp / "m")


def as_model(make: Callable[[Path, Path], str]) -> Build:
    return lambda tmp, tiny: {"model": {"id": make(tmp, tiny)}}


def as_dense(make: Callable[[Path, Path], str]) -> Build:
    """The bad model given as model.dense of an already-pruned model.id (which is fine)."""
    return lambda tmp, tiny: {"model": {"dense": make(tmp, tiny)}, "pruning": {"method": "none"},
                              "restoration": {"method": "restorelcc"}}


def gguf_file(name: Callable[[Path], str]) -> Build:
    """model.gguf_file ``name(d)`` inside ``d``, a copy of the tiny model directory."""

    def build(tmp: Path, tiny: Path) -> dict[str, Any]:
        d = model_dir(tmp, tiny)
        return {"model": {"id": d, "gguf_file": name(Path(d))}}

    return build


def sub_directory(d: Path) -> str:
    (d / "sub.gguf").mkdir()
    return "sub.gguf"


MODEL_CASES: dict[str, tuple[Build, str, str]] = {
    # name: (what to change, code, field)
    "id_name_300_gguf": (as_model(lambda t, _: long_name(t, ".gguf")), "model_not_found", "model.id"),
    "id_name_300_dir": (as_model(lambda t, _: long_name(t, "")), "model_not_found", "model.id"),
    "id_path_over_4096": (as_model(lambda t, _: long_path(t)), "model_not_found", "model.id"),
    "id_unknown_user_home": (as_model(lambda t, _: "~no-such-user-9f3/model"), "model_not_found", "model.id"),
    "id_fifo": (as_model(lambda t, _: a_fifo(t, "m.gguf")), "model_not_found", "model.id"),
    "id_dangling_symlink": (as_model(lambda t, _: dangling(t)), "model_not_found", "model.id"),
    "id_symlink_loop": (as_model(lambda t, _: symlink_loop(t)), "model_not_found", "model.id"),
    "id_not_a_gguf_file": (as_model(lambda t, _: write(t, "model.bin", "x")), "model_not_found", "model.id"),
    "id_dir_without_model": (as_model(no_config), "model_not_found", "model.id"),
    "id_dir_with_only_a_fifo_gguf": (as_model(only_a_fifo_gguf), "model_not_found", "model.id"),
    "id_dir_with_two_ggufs": (as_model(two_ggufs), "model_not_found", "model.gguf_file"),
    "gguf_empty": (as_model(lambda t, _: write(t, "e.gguf", b"")), "model_not_found", "model.id"),
    "gguf_unreadable": (as_model(lambda t, _: unreadable(t, "u.gguf")), "model_not_found", "model.id"),
    "gguf_bad_magic": (as_model(lambda t, _: write(t, "b.gguf", b"hello" * 10)), "model_not_found", "model.id"),
    "gguf_truncated_header": (as_model(lambda t, _: write(t, "t.gguf", gguf_bytes()[:12])),
                              "unsupported_model", "model.id"),
    "gguf_truncated_kv": (as_model(lambda t, _: write(t, "kv.gguf", gguf_bytes(n_kv=3, tail=b"\x05" * 9))),
                          "unsupported_model", "model.id"),
    "gguf_string_past_the_end": (as_model(lambda t, _: write(t, "s.gguf", gguf_bytes(
        n_kv=1, tail=struct.pack("<Q", 1 << 40) + b"k"))), "unsupported_model", "model.id"),
    "gguf_version_9": (as_model(lambda t, _: write(t, "v.gguf", gguf_bytes(version=9))),
                       "unsupported_model", "model.id"),
    "gguf_layers_a_string": (as_model(gguf_layers_a_string), "unsupported_model", "model.id"),
    "gguf_file_name_300": (gguf_file(lambda d: "g" * 295 + ".gguf"), "model_not_found", "model.gguf_file"),
    "gguf_file_missing": (gguf_file(lambda d: "none.gguf"), "model_not_found", "model.gguf_file"),
    "gguf_file_is_a_directory": (gguf_file(sub_directory), "model_not_found", "model.gguf_file"),
    "gguf_file_a_fifo": (gguf_file(lambda d: Path(a_fifo(d, "f.gguf")).name), "model_not_found", "model.gguf_file"),
    "config_is_a_directory": (as_model(config_is_dir), "model_not_found", "model.id"),
    "config_unreadable": (as_model(config_unreadable), "model_not_found", "model.id"),
    "config_not_json": (as_model(lambda t, tiny: model_dir(t, tiny, "{nope")), "unsupported_model", "model.id"),
    "config_not_utf8": (as_model(lambda t, tiny: model_dir(t, tiny, b'{"model_type": "\xff"}')),
                        "unsupported_model", "model.id"),
    "config_a_list": (as_model(lambda t, tiny: model_dir(t, tiny, "[1]")), "unsupported_model", "model.id"),
    "config_unknown_model_type": (as_model(lambda t, tiny: model_dir(t, tiny, llama_config(model_type="zzz"))),
                                  "unsupported_model", "model.id"),
    "config_model_type_a_list": (as_model(lambda t, tiny: model_dir(t, tiny, llama_config(model_type=["llama"]))),
                                 "unsupported_model", "model.id"),
    "config_without_geometry": (as_model(lambda t, tiny: model_dir(t, tiny, '{"model_type": "llama"}')),
                                "unsupported_model", "model.id"),
    "config_heads_a_string": (as_model(lambda t, tiny: model_dir(t, tiny, llama_config(num_attention_heads="x"))),
                              "unsupported_model", "model.id"),
    "config_zero_heads": (as_model(lambda t, tiny: model_dir(t, tiny, llama_config(num_attention_heads=0))),
                          "unsupported_model", "model.id"),
    "dense_name_300": (as_dense(lambda t, _: long_name(t, "")), "model_not_found", "model.dense"),
    "dense_dir_without_model": (as_dense(no_config), "model_not_found", "model.dense"),
    "dense_config_not_json": (as_dense(lambda t, tiny: model_dir(t, tiny, "{nope")), "unsupported_model",
                              "model.dense"),
    "hub_gguf_file_escaping": (lambda t, _: {"model": {"id": "some-org/some-model", "gguf_file": "../x.gguf"}},
                               "model_not_found", "model.gguf_file"),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_a_bad_model_fails_the_check_with_a_specific_code(case, tmp_path, tiny, train, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    build, code, fld = MODEL_CASES[case]
    sections = build(tmp_path, tiny)
    spec = job(str(tiny), train)
    for section, values in sections.items():
        for name, value in values.items():
            setattr(getattr(spec, section), name, value)
    assert failure(lambda: check_job(spec)) == (code, fld)


def test_a_revision_missing_from_the_cache_names_model_revision(tmp_path, tiny, monkeypatch):
    from worker.model.load import resolve_source

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--tiny-org--tiny-llama"
    shutil.copytree(tiny, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    assert resolve_source("tiny-org/tiny-llama", cache_dir=tmp_path).kind == "hf_dir"
    for revision in ("v9", "r" * 300, "../../../etc"):
        assert failure(lambda r=revision: resolve_source("tiny-org/tiny-llama", revision=r, cache_dir=tmp_path)) == (
            "model_not_found", "model.revision")


# ── the model's weights and tokenizer (load time) ────────────────────────────────────────────────────

WEIGHTS = "model.safetensors"


def truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def edit_config(d: Path, **changes: Any) -> None:
    config = json.loads((d / "config.json").read_text())
    config.update(changes)
    (d / "config.json").write_text(json.dumps(config))


def remove_tokenizer(d: Path) -> None:
    for p in d.glob("*"):
        if p.name.startswith(("tokenizer", "special_tokens")):
            p.unlink()


LOAD_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "weights_truncated": (lambda d: truncate(d / WEIGHTS, 0.5), "unsupported_model"),
    "weights_header_garbage": (lambda d: (d / WEIGHTS).write_bytes(b"\x00" * 1000), "unsupported_model"),
    "weights_empty": (lambda d: (d / WEIGHTS).write_bytes(b""), "unsupported_model"),
    "weights_missing": (lambda d: (d / WEIGHTS).unlink(), "model_not_found"),
    "weights_a_fifo": (lambda d: ((d / WEIGHTS).unlink(), os.mkfifo(d / WEIGHTS)), "model_not_found"),
    "tokenizer_missing": (remove_tokenizer, "unsupported_model"),
    "tokenizer_not_json": (lambda d: (d / "tokenizer.json").write_text("{bad"), "unsupported_model"),
    "tokenizer_config_not_json": (lambda d: (d / "tokenizer_config.json").write_text("{bad"), "unsupported_model"),
    "config_disagrees_with_weights": (lambda d: edit_config(d, hidden_size=128, intermediate_size=64),
                                      "unsupported_model"),
    "config_value_of_wrong_type": (lambda d: edit_config(d, rms_norm_eps="x"), "unsupported_model"),
    "config_heads_do_not_divide_hidden": (lambda d: edit_config(d, hidden_size=66), "unsupported_model"),
}


@pytest.mark.parametrize("fld", ["model.id", "model.dense"])
@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_corrupt_model_files_fail_the_load_with_a_specific_code(case, fld, tmp_path, tiny):
    from worker.model.load import load_model, resolve_source

    spoil, code = LOAD_CASES[case]
    d = Path(model_dir(tmp_path, tiny))
    spoil(d)
    assert failure(lambda: load_model(resolve_source(str(d), field=fld))) == (code, fld)


def test_a_truncated_gguf_fails_the_load_as_unsupported_model(tmp_path):
    from tests.unit.test_load import write_tiny_gguf
    from worker.model.load import load_model, resolve_source

    write_tiny_gguf(tmp_path / "tiny.gguf")
    truncate(tmp_path / "tiny.gguf", 0.99)  # the header is whole: preflight passes, the tensors are cut
    source = resolve_source(str(tmp_path / "tiny.gguf"))
    assert failure(lambda: load_model(source)) == ("unsupported_model", "model.id")


# ── files that change after the check ────────────────────────────────────────────────────────────────


class Spoiler:
    """A quiet reporter that spoils a file when a stage starts: the file changed after ``check_job``."""

    def __init__(self, at: Stage, spoil: Callable[[], None]):
        self.at, self.spoil = at, spoil

    def stage(self, stage: Stage) -> None:
        if stage is self.at:
            self.spoil()

    def progress(self, fraction: float, message: str = "") -> None:
        pass

    def metrics(self, metrics: dict[str, Any]) -> None:
        pass

    def event(self, kind: str, data: dict[str, Any]) -> None:
        pass

    def cancel_requested(self) -> bool:
        return False


def test_files_spoiled_after_the_check_fail_with_the_field_they_belong_to(tmp_path, tiny, train):
    from worker.run.pipeline import run_pipeline

    d = Path(model_dir(tmp_path, tiny))
    calibration = write_jsonl(tmp_path / "calibration.jsonl", [{"text": "Some text to calibrate on."}] * 4)
    spec = job(str(d), train, pruning={"method": "wanda", "calibration_samples": 2, "seq_len": 8},
               data={"calibration": str(calibration)})
    spoil_calibration = Spoiler(Stage.pruning, lambda: calibration.write_text("not json\n"))
    assert failure(lambda: run_pipeline(spec, tmp_path / "out1", spoil_calibration)) == (
        "invalid_data", "data.calibration")
    spoil_weights = Spoiler(Stage.loading, lambda: truncate(d / WEIGHTS, 0.5))
    assert failure(lambda: run_pipeline(job(str(d), train), tmp_path / "out2", spoil_weights)) == (
        "unsupported_model", "model.id")


def test_too_little_calibration_text_fails_naming_calibration_samples(tmp_path, tiny, train):
    """Never quietly fewer calibration sequences than the spec asks for: the field to change is named, the message
    names the data file too."""
    from worker.reporting import NullReporter
    from worker.run.pipeline import run_pipeline

    spec = job(str(tiny), train, pruning={"method": "wanda", "calibration_samples": 64, "seq_len": 64})
    with pytest.raises(DataError) as err:
        run_pipeline(spec, tmp_path / "out", NullReporter())
    assert (err.value.code, err.value.field) == ("invalid_data", "pruning.calibration_samples")
    assert err.value.message.startswith("data.train: pruning.calibration_samples asks for 64 sequences")
