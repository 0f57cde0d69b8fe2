#!/usr/bin/env bash
# Creates .venv and installs torch first (from the configured package index: PyPI's Linux wheel is the CUDA build;
# a torch already in .venv is kept if it is this version), then restorelcc with its development extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -d .venv ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install --quiet -e ".[dev]"
echo "restorelcc installed in .venv ($(python -c 'import torch; print("torch", torch.__version__)'))"
