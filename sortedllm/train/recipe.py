"""The SoFT / SFT training recipe, top to bottom: load model, exits, data, train, save.

    sortedllm train --config configs/quickstart.yaml [--mode sft] [--field value ...]
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import ScriptArguments, parse_config
from ..data import default_eval_data, encode_dataset, load_examples
from ..exits import SortedConfig, SortedModel, resolve_exits
from ..models import load_model
from .trainer import SoFTConfig, SoFTTrainer

log = logging.getLogger("sortedllm")


def train(script: ScriptArguments, args: SoFTConfig) -> Path:
    """Fine-tune `script.model` on `script.data` with SoFT (or SFT) and save `<output_dir>/final`."""
    # 1. Model and exits (validated against the model before any data is read).
    model, tokenizer = load_model(script.model, dtype=script.dtype, trust_remote_code=args.trust_remote_code)
    num_layers = SortedModel(model).num_layers
    exits = resolve_exits(args.exits, num_layers)
    sorted_config = SortedConfig(exits=exits, num_hidden_layers=num_layers, mode=args.mode, base_model=script.model,
                                 data=script.data, exit_schedule=args.exit_schedule)

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
                          processing_class=tokenizer, sorted_config=sorted_config)
    trainer.train()

    # 4. Save a plain HF model + sorted_config.json (atomically).
    model.eval()
    final = Path(args.output_dir) / "final"
    SortedModel(model, tokenizer, config=trainer.sorted_config).save_pretrained(final)
    log.info("saved %s", final)
    return final


def main(argv: list[str]) -> int:
    script, args = parse_config((ScriptArguments, SoFTConfig), argv)
    final = train(script, args)
    print(f"saved {final}")
    return 0
