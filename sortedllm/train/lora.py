"""Merge a LoRA adapter folder into a plain Hugging Face model folder (with its sorted_config.json):

    python -m sortedllm.train.lora --model runs/lora/final --out runs/lora/merged

The adapter itself (the `--lora` option, loading, `merge`) is `sortedllm.adapters.lora`; `sortedllm export` of an
adapter folder merges on the fly too.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..adapters.lora import merge
from ..config import ArgumentParser
from ..errors import SortedError
from ..exits import SortedModel


def main(argv: list[str]) -> int:
    """Merge a LoRA adapter folder into a plain HF model folder (with its sorted_config.json)."""
    p = ArgumentParser(prog="python -m sortedllm.train.lora", description="Merge a LoRA adapter into the model.")
    p.add_argument("--model", required=True, help="adapter folder written by `sortedllm train --lora ...`")
    p.add_argument("--out", required=True, help="folder for the merged plain Hugging Face model")
    p.add_argument("--trust_remote_code", action="store_true")
    a = p.parse_args(argv)
    merged = merge(SortedModel.from_pretrained(a.model, trust_remote_code=a.trust_remote_code))
    out = merged.save_pretrained(Path(a.out))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except SortedError as e:  # as `sortedllm <command>` does: one line, exit code 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
