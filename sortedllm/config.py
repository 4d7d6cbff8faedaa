"""Configuration: a YAML file plus `--field value` overrides of any field (TRL's convention).

Fields are those of `ScriptArguments` (model, data, ...) and of `SoFTConfig` (every transformers
`TrainingArguments` / TRL `SFTConfig` field plus exits and schedule). Parsing is TRL's `TrlParser`; this module
only turns its errors into one clear line.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from .errors import SortedError
from .models import DEFAULT_MODEL


@dataclass
class ScriptArguments:
    """What to train on: the model and the data (everything about *how* is in SoFTConfig)."""

    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "Hub id, local HF folder, .gguf file or built-in alias (smollm2-135m)."})
    data: str = field(default="gsm8k", metadata={
        "help": "Training data: gsm8k, alpaca, triviaqa (with :train/:test), a JSONL file, hf:<dataset>, or a+b."})
    data_limit: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    eval_data: str | None = field(default=None, metadata={
        "help": "Held-out data for the per-exit loss (default: the test split of a built-in task)."})
    eval_limit: int | None = field(default=200, metadata={"help": "Use only the first N held-out rows."})
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16 or float16."})
    base: str | None = field(default=None, metadata={
        "help": "--mode ict / draft: the frozen SFT (or SoFT) checkpoint whose per-exit heads (ict) or draft layer "
                "(draft) is trained (replaces --model)."})
    lora: str | None = field(default=None, metadata={
        "help": "Train a LoRA adapter instead of all weights: r=16,alpha=32,targets=q_proj,v_proj[,dropout=0.05] "
                "(targets default all-linear), or a YAML mapping."})
    resume: str | None = field(default=None, metadata={
        "help": "Continue an interrupted run: --resume alone (or 'latest') = the latest whole checkpoint-N in "
                "output_dir, 'auto' = the same or a fresh start if there is none, or a checkpoint folder. Same data "
                "order, RNG and exit schedule as the original run."})
    dry_run: bool = field(default=False, metadata={
        "help": "--dry-run: build the model on the meta device from its config (no weights, no data), check the "
                "exits, print parameters, memory per GPU per engine and FLOPs per step of SoFT vs SFT, and stop."})
    dry_run_gpus: int | None = field(default=None, metadata={
        "help": "GPUs the dry run plans for (default: the launched process count, else 8 as in the paper)."})


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises `SortedError` (one line, exit 2) instead of printing usage and exiting."""

    def error(self, message):
        raise SortedError(f"{message} (see --help)")


def _trl_parser(dataclasses):
    from trl import TrlParser

    class Parser(TrlParser):
        def error(self, message):
            raise SortedError(f"{message} (see --help)")

    return Parser(dataclasses)


def parse_config(dataclasses: tuple, argv: list[str], prog: str = "sortedllm train"):
    """Parse `--config file.yaml` plus `--field value` overrides into instances of `dataclasses`."""
    import yaml

    parser = _trl_parser(dataclasses)
    parser.prog = prog
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise SortedError("--config needs a YAML file path")
        path = argv[i + 1]
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except FileNotFoundError:
            raise SortedError(f"config file not found: {path}")
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise SortedError(f"malformed YAML in {path}{where}: {getattr(e, 'problem', e)}")
        if not isinstance(data, dict):
            raise SortedError(f"config file {path} must be a YAML mapping of field: value")
        known = {f for dc in dataclasses for f in dc.__dataclass_fields__} | {"env"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SortedError(f"unknown config field '{unknown[0]}' in {path}; see `{prog} --help` for the fields")
    try:
        *parsed, rest = parser.parse_args_and_config(argv, return_remaining_strings=True)
        unknown = [a for a in rest if a.startswith("--")]
        if rest:
            raise SortedError(f"unknown option {(unknown or rest)[0]}: see `{prog} --help` for the fields")
        return tuple(parsed)
    except SortedError:
        raise
    except (ValueError, TypeError) as e:
        raise SortedError(f"invalid configuration: {str(e).splitlines()[0]}") from e
    except ImportError as e:  # e.g. an accelerate DeepSpeed config launched without deepspeed installed
        raise SortedError(f"this configuration needs a package that is not installed ({str(e).splitlines()[0]}); "
                          f"pip install it (DeepSpeed: pip install deepspeed)") from e

