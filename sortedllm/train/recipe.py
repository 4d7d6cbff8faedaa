"""`sortedllm train`: the SoFT / SFT recipe, top to bottom (load model, exits, data, train, save), and the dispatch to
the other modes' recipes: ICT heads (train/ict.py) and a draft layer (train/draft_layer.py), each with its own config.

    sortedllm train --config configs/quickstart.yaml [--mode sft] [--field value ...]
    sortedllm train --config configs/ict.yaml --base runs/sft/final
    sortedllm train --config configs/draft.yaml --base runs/quickstart/final
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..adapters import lora
from ..adapters.vocab import add_draft_vocab, count_vocab
from ..checkpoint import writable_folder
from ..config import ScriptArguments, parse_config
from ..data import default_eval_data, encode_dataset, load_examples
from ..errors import SortedError
from ..exits import SortedConfig, SortedModel, resolve_exits
from ..models import load_model
from . import draft_layer, ict, resume
from .dry_run import dry_run
from .schedules import make_schedule
from .trainer import SoFTConfig, SoFTTrainer, trained_exits

log = logging.getLogger("sortedllm")

RECIPES = {"ict": ict.train, "draft": draft_layer.train}  # mode -> recipe; soft and sft: `train` below


def train(script: ScriptArguments, args: SoFTConfig) -> Path:
    """Fine-tune `script.model` on `script.data` with SoFT (or SFT) and save `<output_dir>/final`."""
    # 0. Fail fast, before any loading: an unwritable output folder, processes that did not join one run.
    writable_folder(args.output_dir)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and args.world_size == 1:  # e.g. `accelerate launch` of several processes with no GPU
        raise SortedError(f"{launched} processes were launched but they did not join one training run (no GPU "
                          f"found); on CPUs add --use_cpu true to train over gloo")
    if script.base:
        raise SortedError(f"--base is for --mode ict or draft (heads or a draft layer on a frozen model); to "
                          f"fine-tune {script.base} with --mode {args.mode}, pass it as --model")

    # 1. Model and exits (validated against the model before any data is read).
    checkpoint = resume.find_checkpoint(args.output_dir, script.resume)  # missing/damaged: refused before loading
    model, tokenizer = load_model(script.model, dtype=script.dtype, trust_remote_code=args.trust_remote_code)
    num_layers = SortedModel(model).num_layers
    exits = resolve_exits(args.exits, num_layers)
    make_schedule(args.exit_schedule, trained_exits(args.mode, exits), args.exit_weights)  # fail before the data
    sorted_config = SortedConfig(exits=exits, num_hidden_layers=num_layers, mode=args.mode, base_model=script.model,
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
    trainer = SoFTTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                          processing_class=tokenizer, sorted_config=sorted_config, peft_config=peft_config)
    resume.train(trainer, checkpoint)  # checks a resumed checkpoint is this run's (model, data order, exits)

    # 4. Save a plain HF model + sorted_config.json + the draft vocabulary of the training rows (atomically); with
    # --lora only the adapter.
    final = Path(args.output_dir) / "final"
    sm = SortedModel(trainer.model.eval(), tokenizer, config=trainer.sorted_config)  # peft-wrapped with --lora
    if args.draft_vocab:
        sm.draft_vocab, sm.draft_vocab_info = count_vocab(tokenizer, sm.model, train_set["input_ids"],
                                                          args.draft_vocab, script.data)
    # Several processes: the main one writes; under FSDP / DeepSpeed every rank first helps gather the shards.
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        trainer.save_model(str(final))
        if trainer.is_world_process_zero() and sm.draft_vocab is not None:
            add_draft_vocab(final, sm.draft_vocab, sm.draft_vocab_info)
    elif trainer.is_world_process_zero():
        sm.save_pretrained(final)
    trainer.accelerator.wait_for_everyone()
    return final


def main(argv: list[str]) -> int:
    script, args = parse_config((ScriptArguments, SoFTConfig), resume.flag_value(argv))
    if script.dry_run:  # the plan only: no weights, no data (train/dry_run.py)
        dry_run(script, args)
        return 0
    final = RECIPES.get(args.mode, train)(script, args)
    print(f"saved {final}")
    return 0
