"""Atomic training checkpoints and `--resume`.

transformers' Trainer already saves and restores everything a run needs (weights, optimizer, scheduler, RNG
states, trainer_state with the log history) and skips the batches already seen, so a resumed run continues with
the same data order, RNG and schedule. What it lacks, this adds:
- `checkpoint-N` is written into a temp folder and renamed only once whole, with a manifest (size + SHA-256 per
  file, and this run's fingerprint) written last, so a kill mid-save never leaves a checkpoint that looks usable;
- `--resume` picks the latest *whole* checkpoint (or checks the one named) and refuses, in one line, a missing,
  truncated or foreign one (another model or another data order / seed / exits) before any weight is read.
"""

from __future__ import annotations

import logging
import pickle
import re
import shutil
from pathlib import Path

from ..checkpoint import atomic_dir, manifest_problem, read_manifest, stale_temp_folders, write_manifest
from ..errors import SortedError

log = logging.getLogger("sortedllm")

TRAINER_STATE = "trainer_state.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# What fixes a run's data order, randomness and loss: a checkpoint from a run that differs in any of these is
# foreign (resuming it would not reproduce either run). max_steps / epochs may change (extending a run).
RUN_FIELDS = ("seed", "data_seed", "per_device_train_batch_size", "gradient_accumulation_steps", "world_size",
              "max_length", "exit_weights", "distill_alpha", "distill_temperature")
MODEL_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "vocab_size")
LATEST = {"true", "latest", "yes", "1"}
NEVER = {"", "false", "no", "none", "0"}


def fingerprint(trainer) -> dict:
    """This run's identity as stored in every checkpoint's manifest (`run`)."""
    args, cfg = trainer.args, trainer.sorted_config
    run = {f: getattr(args, f, None) for f in RUN_FIELDS}
    run.update(exits=list(cfg.exits), mode=cfg.mode, exit_schedule=cfg.exit_schedule, data=cfg.data)
    dataset = getattr(trainer, "train_dataset", None)
    run["train_rows"] = len(dataset) if hasattr(dataset, "__len__") else None
    return run


def save_checkpoint(trainer, save, model, trial) -> None:
    """Run HF's `_save_checkpoint` (`save`) into a temp folder, then manifest + rename (see module doc)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

    args, state = trainer.args, trainer.state
    run_dir = Path(trainer._get_output_dir(trial=trial))
    name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    meta = {"run": fingerprint(trainer), "global_step": state.global_step}
    if args.world_size > 1:
        # Every rank writes its own RNG file into the same folder, so the folder cannot be one process's temp
        # folder: keep HF's layout and mark the checkpoint whole with the manifest once all ranks are done.
        save(model, trial)
        trainer.accelerator.wait_for_everyone()
        if args.should_save:
            write_manifest(run_dir / name, meta)
        trainer.accelerator.wait_for_everyone()
        return
    with atomic_dir(run_dir / name, meta=meta) as tmp:
        # HF writes to `_get_output_dir()/checkpoint-N` inside one long method with no hook for the folder:
        # point it at the temp folder for this call instead of copying that method.
        trainer._get_output_dir = lambda trial=None: str(tmp)
        try:
            save(model, trial)
        finally:
            del trainer._get_output_dir
        inner = tmp / name
        for p in inner.iterdir():
            p.rename(tmp / p.name)
        inner.rmdir()
        if state.best_model_checkpoint and state.best_model_checkpoint.startswith(str(tmp)):
            state.best_model_checkpoint = str(run_dir / name)
            if args.should_save:
                state.save_to_json(str(tmp / TRAINER_STATE))
    if args.should_save:
        rotate_checkpoints(output_dir=str(run_dir), save_total_limit=args.save_total_limit,
                           best_model_checkpoint=state.best_model_checkpoint, use_mtime=False)


# ----------------------------------------------------------------------------------------------------------------
# Finding and checking the checkpoint to resume from


def checkpoints(output_dir: str | Path) -> list[Path]:
    """`checkpoint-N` folders in `output_dir`, oldest step first (temp folders never match)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def damage(path: Path) -> str | None:
    """Why `path` cannot be resumed from as a training checkpoint, or None if it is one and whole."""
    if not path.exists():
        return "it does not exist"
    if not path.is_dir() or not (path / TRAINER_STATE).is_file():
        if path.is_dir() and read_manifest(path) is None and any(path.iterdir()) and CHECKPOINT.match(path.name):
            return manifest_problem(path)  # a checkpoint-N cut short before its trainer_state.json
        return f"it is not a training checkpoint (no {TRAINER_STATE})"
    return manifest_problem(path)


def find_checkpoint(output_dir: str | Path, resume) -> Path | None:
    """The checkpoint `--resume` asks for, checked to be whole; None to start fresh. Fails before any model load.

    `resume` is None/false (start fresh: refused if `output_dir` already holds checkpoints, which a new run would
    mix with), true/"latest" (the latest whole checkpoint in `output_dir`), "auto" (the same, or start fresh when
    there is none yet: one command line for every restart of a preemptible job) or a checkpoint folder.
    """
    out = Path(output_dir)
    text = str(resume).strip().lower() if resume is not None else ""
    if resume is False or text in NEVER:
        existing = checkpoints(out)
        if existing:
            raise SortedError(f"{out} already holds {existing[-1].name} from an earlier run: pass --resume to "
                              "continue it, or choose a new --output_dir")
        return None
    for stale in stale_temp_folders(out):  # left by a save that was killed; nothing reads them
        log.info("removing %s (left by an interrupted save)", stale)
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    if resume is True or text in LATEST or text == "auto":
        found = checkpoints(out)
        if not found and text == "auto":
            return None
        if not found:
            raise SortedError(f"--resume: no checkpoint-N folder in {out}; train without --resume, or pass "
                              "--resume <checkpoint folder>")
        skipped = []
        for ckpt in reversed(found):
            problem = damage(ckpt)
            if problem is None:
                for name, why in skipped:
                    log.warning("skipping %s: %s", name, why)
                return ckpt
            skipped.append((ckpt.name, problem))
        name, why = skipped[0]
        raise SortedError(f"--resume: no whole checkpoint in {out} ({name}: {why}); start a new run")
    path = Path(str(resume)).expanduser()
    if not path.exists():
        raise SortedError(f"resume checkpoint not found: {path}; pass a checkpoint-N folder of an earlier run, "
                          "or --resume alone for the latest one in --output_dir")
    problem = damage(path)
    if problem:
        raise SortedError(f"cannot resume from {path}: {problem}; pass a whole checkpoint-N folder written during "
                          "training (--resume alone picks the latest whole one in --output_dir)")
    return path


def foreign(path: Path, trainer) -> str | None:
    """How checkpoint `path` differs from the run `trainer` would make (model or data order), or None."""
    import json

    config = path / "config.json"
    if config.is_file():
        saved = json.loads(config.read_text())
        current = trainer.model.config.to_dict() if hasattr(trainer.model, "config") else {}
        for f in MODEL_FIELDS:
            if f in saved and f in current and saved[f] != current[f]:
                return f"it is a checkpoint of a different model ({f} {saved[f]} there, {current[f]} here)"
    saved_run = (read_manifest(path) or {}).get("run")
    if not isinstance(saved_run, dict):
        return "its manifest does not say which run wrote it"
    run = fingerprint(trainer)
    for f, v in run.items():
        if f in saved_run and saved_run[f] != v:
            return f"it was written by a run with {f}={saved_run[f]!r}, this run has {f}={v!r}"
    return None


def train(trainer, checkpoint: Path | None):
    """`trainer.train()`, resumed from `checkpoint` (from `find_checkpoint`) after checking it is this run's."""
    if checkpoint is None:
        return trainer.train()
    problem = foreign(checkpoint, trainer)
    if problem:
        raise SortedError(f"cannot resume from {checkpoint}: {problem}; resume with the run's own config, or "
                          "choose a new --output_dir")
    log.info("resuming from %s", checkpoint)
    try:
        return trainer.train(resume_from_checkpoint=str(checkpoint))
    except pickle.UnpicklingError as e:  # torch.load(weights_only=True) refused a file holding arbitrary objects
        raise SortedError(f"cannot resume from {checkpoint}: a state file holds objects other than tensors "
                          f"({str(e).splitlines()[0][:120]}); it is not loaded, since unpickling can run code") from e


def flag_value(argv: list[str]) -> list[str]:
    """`--resume` given alone means `--resume latest` (argparse needs a value for a string field)."""
    out = list(argv)
    for i, a in enumerate(out):
        if a == "--resume" and (i + 1 == len(out) or out[i + 1].startswith("--")):
            out.insert(i + 1, "latest")
    return out
