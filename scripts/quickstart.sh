#!/usr/bin/env bash
# Set up, SoFT-tune the default model on a small GSM8K slice, then evaluate every exit against the untuned model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
sortedllm train --config configs/quickstart.yaml "$@"
sortedllm evaluate --model runs/quickstart/final --compare smollm2-135m --names soft,untuned --tasks loss --limit 100 \
    --output_dir runs/quickstart/eval
