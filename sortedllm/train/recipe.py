"""The SoFT / SFT training recipe, top to bottom: load model, exits, data, train, save.

    sortedllm train --config configs/quickstart.yaml [--mode sft] [--field value ...]
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..checkpoint import writable_folder
from ..config import ScriptArguments, parse_config
from ..data import default_eval_data, encode_dataset, load_examples
from ..errors import SortedError
from ..exits import SortedConfig, SortedModel, resolve_exits
from ..models import load_model
from . import ict, lora, resume
from .schedules import make_schedule
from .trainer import SoFTConfig, SoFTTrainer, trained_exits

log = logging.getLogger("sortedllm")


def train(script: ScriptArguments, args: SoFTConfig) -> Path:
    """Fine-tune `script.model` on `script.data` with SoFT (or SFT) and save `<output_dir>/final`."""
    # 0. Fail fast, before any loading: an unwritable output folder, processes that did not join one run.
    writable_folder(args.output_dir)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and args.world_size == 1:  # e.g. `accelerate launch` of several processes with no GPU
        raise SortedError(f"{launched} processes were launched but they did not join one training run (no GPU "
                          f"found); on CPUs add --use_cpu true to train over gloo")

    # 1. Model and exits (validated against the model before any data is read). ICT: the frozen --base model.
    source = ict.model_source(script, args)
    checkpoint = resume.find_checkpoint(args.output_dir, script.resume)  # missing/damaged: refused before loading
    model, tokenizer = load_model(source, dtype=script.dtype, trust_remote_code=args.trust_remote_code)
    num_layers = SortedModel(model).num_layers
    exits = resolve_exits(args.exits, num_layers)
    if trained_exits(args.mode, exits):  # (ICT with only the last exit is refused by its trainer, clearly)
        make_schedule(args.exit_schedule, trained_exits(args.mode, exits), args.exit_weights)  # fail before the data
    sorted_config = SortedConfig(exits=exits, num_hidden_layers=num_layers, mode=args.mode, base_model=source,
                                 data=script.data, exit_schedule=args.exit_schedule)
    peft_config = lora.lora_config(script.lora, model)  # None unless --lora
    if peft_config is not None:
        sorted_config.extra["lora"] = lora.describe(peft_config)

    # 2. Data: prompt/completion rows -> token ids with the prompt masked out of the loss.
    rows = load_examples(script.data, limit=script.data_limit)
    train_set = encode_dataset(tokenizer, rows, args.max_length, script.data)
    eval_source = script.eval_data if script.eval_data is not None else default_eval_data(script.data)
    eval_set = None
    if eval_source and args.eval_strategy != "no":  # periodic per-exit eval loss during training
        eval_set = encode_dataset(tokenizer, load_examples(eval_source, limit=script.eval_limit), args.max_length,
                                  eval_source)
    log.info("SoFT mode=%s exits=%s train rows=%d eval rows=%d", args.mode, exits, len(train_set),
             len(eval_set) if eval_set is not None else 0)

    # 3. Train: TRL's SFTTrainer with the multi-exit loss.
    model.train()
    trainer_class = ict.ICTTrainer if args.mode == "ict" else SoFTTrainer
    trainer = trainer_class(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                            processing_class=tokenizer, sorted_config=sorted_config, peft_config=peft_config)
    resume.train(trainer, checkpoint)  # checks a resumed checkpoint is this run's (model, data order, exits)

    # 4. Save a plain HF model + sorted_config.json (atomically); with --lora only the adapter, with ICT only the heads.
    model = trainer.model.eval()  # the peft-wrapped model with --lora
    final = Path(args.output_dir) / "final"
    sm = SortedModel(model, tokenizer, config=trainer.sorted_config)
    sm.exit_heads = getattr(trainer, "exit_heads", None)
    # Several processes: the main one writes; under FSDP / DeepSpeed every rank first helps gather the shards.
    if (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled) and not sm.exit_heads:
        trainer.save_model(str(final))
    elif trainer.is_world_process_zero():
        sm.save_pretrained(final)
    trainer.accelerator.wait_for_everyone()
    log.info("saved %s", final)
    return final


def main(argv: list[str]) -> int:
    script, args = parse_config((ScriptArguments, SoFTConfig), resume.flag_value(argv))
    if script.dry_run:  # the plan only: no weights, no data (train/dry_run.py)
        from .dry_run import dry_run

        dry_run(script, args)
        return 0
    if args.mode == "draft":  # a draft layer on the frozen --base model: its own short loop (train/draft_layer.py)
        from .draft_layer import train as train_draft_layer

        final = train_draft_layer(script, args)
    else:
        final = train(script, args)
    print(f"saved {final}")
    return 0
