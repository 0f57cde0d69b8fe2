#!/usr/bin/env bash
# The default test run: sets up .venv if needed, then unit, API and integration tests on tiny models
# (real Redis, PostgreSQL and Celery workers). Real-model tests are marked slow: `scripts/test.sh -m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${RESTORELCC_SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check app worker tests bench
exec python -m pytest "$@"
