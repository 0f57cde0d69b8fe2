"""The schema refuses what the worker would ignore by the worker's own rules: which model ids are local paths
(``model.revision``; one function, app.fields.looks_local, used by both) and which name an evaluation file goes by
(``evaluation.limits``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.fields import looks_local
from app.schemas import eval_set_stem

LOCAL = ["/models/m", "./m", "../m", ".m", "~/m", "~user/m", "m.gguf", "org/m.GGUF", " /m", "/m.gguf "]
HUB = ["org/m", "m", "org/m-gguf", "org/gguf.m", "Org/M_1.5", "m.safetensors"]
EVAL_PATHS = ["/d/boolq.jsonl", "/d/x.tar.jsonl", "/d/noext", "/d/.hidden", "/d/dir/", "~/e/piqa.jsonl",
              "/d/a.b/c.jsonl", "/d/ünï.jsonl", "/d/trailing."]


@pytest.mark.parametrize("path", EVAL_PATHS)
def test_evaluation_set_stems_are_the_workers(path):
    assert eval_set_stem(path) == Path(path).stem  # worker.run.evaluate.evaluate_spec looks limits up by this


@pytest.mark.parametrize("model_id", LOCAL + HUB)
def test_local_model_ids(model_id):
    assert looks_local(model_id) == (model_id in LOCAL)
