#!/usr/bin/env bash
# Set up if needed, then run the whole test suite: the fast tests (tiny models) and the slow ones (RUN_SLOW=1: the
# real SmolLM2 model, multi-process training, CLI subprocesses), each under its pytest-timeout, with the 15 slowest
# listed at the end. `python -m pytest` alone runs the fast tests only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export RUN_SLOW=1
python -m pytest -q --durations=15 "$@"
