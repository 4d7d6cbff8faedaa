#!/usr/bin/env bash
# Set up if needed, then run the whole test suite (unit tests on tiny models + integration tests on SmolLM2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q "$@"
