"""The old entry point of `sortedllm bench train` (sortedllm/bench/train.py), kept so earlier commands still work."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's sortedllm, installed or not
from sortedllm.cli import main  # noqa: E402  (the CLI turns bad input into one `error:` line, exit 2)

sys.exit(main(["bench", "train", *sys.argv[1:]]))
