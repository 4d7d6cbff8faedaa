"""`sortedllm <command> ...`: parse, call the library, print. User errors become one line and exit code 2."""

from __future__ import annotations

import importlib
import logging
import os
import sys

from .checkpoint import io_problem
from .errors import SortedError

# command -> (module with `main(argv) -> int`, one-line description)
COMMANDS = {
    "train": ("sortedllm.train.recipe", "SoFT / SFT fine-tuning, ICT heads or a draft layer, from a YAML config plus --field overrides"),
    "evaluate": ("sortedllm.evaluate.cli", "per-exit evaluation of a checkpoint (loss, tasks, report)"),
    "export": ("sortedllm.export", "write sub-models (first k layers) as ordinary HF models, optionally GGUF"),
    "generate": ("sortedllm.inference.cli", "generate text: static exit, self-speculative decoding, early exit"),
    "bench": ("sortedllm.bench", "benchmarks: bench train | decode | batch | kernels (JSON under benchmarks/results)"),
}

USAGE = "usage: sortedllm <command> [--debug] [options]\n\ncommands:\n" + "\n".join(
    f"  {name:<10} {desc}" for name, (_, desc) in COMMANDS.items()) + "\n\nRun `sortedllm <command> --help` for options."


def quiet_libraries() -> None:
    """Keep stderr for our progress bars and errors: no weight-loading bars or advisory warnings from libraries."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars only; the Trainer's own bar stays
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*pin_memory.*")


def report(exc: BaseException, message: str, code: int, debug: bool) -> int:
    """One line on stderr (with --debug, the traceback first)."""
    if debug:
        import traceback

        traceback.print_exception(exc)
    print("error: " + " ".join(message.split()), file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("SORTEDLLM_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command '{command}'; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_libraries()
    try:
        module = importlib.import_module(COMMANDS[command][0])
        return module.main(rest) or 0
    except SortedError as e:
        return report(e, str(e), e.exit_code, debug)
    except OSError as e:  # the environment (disk full, read-only, permissions), not a bug: one line too
        problem = io_problem(e)
        if problem is None:
            raise
        where = f": {e.filename}" if e.filename else ""
        return report(e, f"{problem}{where} (free space or fix permissions, then retry)", 2, debug)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
