"""ICT: train one (norm, LM head) copy per intermediate exit on a frozen base model, and its recipe.

SFT+ICT is the paper's early-exit baseline (the SFT model frozen, a head per exit trained for one epoch); the same
code on a SoFT checkpoint is "ICT after SoFT". Every parameter of the base stays bit-identical; the exits' copies
start from the shared norm and head (real copies: the head may be tied to the input embeddings).

    sortedllm train --config configs/ict.yaml --base runs/sft/final [--ict_train norm]

The result, `<output_dir>/final`, is an ICT-heads adapter folder (adapters/ict.py): `exit_heads.safetensors` (only
the copies) + `sorted_adapter.json` (the base and its fingerprint) + `sorted_config.json` (mode "ict") +
`draft_vocab.json`. `SortedModel.from_pretrained(folder)` loads the base and attaches the heads.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..adapters.base import base_reference
from ..adapters.ict import TRAIN_CHOICES, ICTHeads
from ..adapters.vocab import count_vocab
from ..checkpoint import writable_folder
from ..data import default_eval_data, encode_dataset, load_examples
from ..errors import SortedError
from ..exits import SortedConfig, SortedModel, resolve_exits
from ..models import Architecture, unwrap
from .dry_run import model_config
from .trainer import SoFTTrainer

log = logging.getLogger("sortedllm")

ATTR = "sortedllm_exit_heads"  # where the copies sit inside the model while the Trainer trains them

# The paper's setting, for the extra-parameter figure: LLaMA-2 13B with exits 12, 16, ..., 40.
PAPER_MODEL, PAPER_EXITS = "meta-llama/Llama-2-13b-hf", [12, 16, 20, 24, 28, 32, 36, 40]


def extra_parameters(config, exits, train: str = "head") -> int:
    """Parameters ICT adds, from a model config: per intermediate exit an RMSNorm (hidden) and, unless only the norm
    is trained, an LM head (hidden x vocab)."""
    num_layers = config.num_hidden_layers
    heads = sum(1 for k in resolve_exits(exits, num_layers) if k < num_layers)
    per_exit = config.hidden_size + (config.hidden_size * config.vocab_size if train == "head" else 0)
    return heads * per_exit


def paper_extra_parameters(train: str = "head") -> int:
    """The same count for the paper's LLaMA-2 13B with exits 12, 16, ..., 40 (~1.15B with norm + head)."""
    config, _ = model_config(PAPER_MODEL)  # the dry run's copy of the published config.json: nothing downloaded
    return extra_parameters(config, PAPER_EXITS, train)


def check_base(script) -> str:
    """`--base` must be given and be a full model (not an ICT folder); `--lora` and `--resume` do not apply."""
    if not script.base:
        raise SortedError("--mode ict needs --base <checkpoint>: the SFT (or SoFT) model whose per-exit heads to train")
    if script.lora:
        raise SortedError("--lora trains adapters in the body, which ICT keeps frozen: drop --lora or use --mode soft/sft")
    if script.resume:
        raise SortedError("--resume is not supported with --mode ict (it trains only the heads, one short epoch): "
                          "re-run it without --resume")
    base_config = SortedConfig.load(script.base) if Path(script.base).is_dir() else None
    if base_config is not None and base_config.mode == "ict":
        raise SortedError(f"--base {script.base} is itself an ICT checkpoint (heads only); pass the model it was "
                          f"trained on: {base_config.base_model}")
    return script.base


class ICTTrainer(SoFTTrainer):
    """SoFTTrainer on a frozen model: only the per-exit copies train, on the mean of the intermediate exits' losses.

    The copies (`self.adapter`, an `ICTHeads`) sit inside the model (`ATTR`) while `train()` runs, so the Trainer's
    optimizer, gradient clipping and DDP see them with no extra code; the body's forward records no graph since
    nothing in it needs a gradient. `exit_heads` is what the multi-exit loss reads.
    """

    def __init__(self, model=None, args=None, *pos, sorted_config: SortedConfig | None = None, **kwargs):
        if args.ict_train not in TRAIN_CHOICES:
            raise SortedError(f"unknown ict_train '{args.ict_train}': use head (norm + LM head) or norm")
        if args.gradient_checkpointing:  # nothing in the body is trained: no activations to save memory on
            log.info("ICT: gradient checkpointing off (the base is frozen)")
            args.gradient_checkpointing = False
        num_layers = Architecture(model).num_layers
        exits = resolve_exits(sorted_config.exits if sorted_config else args.exits, num_layers)
        if len(exits) < 2:
            raise SortedError(f"ICT trains heads for intermediate exits, but the only exit is the last layer "
                              f"({exits[0]}); give --exits, e.g. count:8")
        super().__init__(model, args, *pos, sorted_config=sorted_config, **kwargs)
        for p in self.model.parameters():
            p.requires_grad_(False)
        cfg = self.sorted_config
        self.adapter = ICTHeads.new(self.arch, exits, args.ict_train)
        self.adapter.set_base(self.model, cfg.base_model)
        self.exit_heads = self.adapter.pairs(self.arch)
        base_params = sum(p.numel() for p in {id(p): p for p in self.arch.model.parameters()}.values())
        extra = extra_parameters(self.arch.config, exits, args.ict_train)
        cfg.mode = "ict"
        if cfg.base_model:
            cfg.base_model = base_reference(cfg.base_model)
        base_config = SortedConfig.load(cfg.base_model) if cfg.base_model and Path(cfg.base_model).is_dir() else None
        cfg.extra = {**cfg.extra, "ict": {"train": args.ict_train, "heads": sorted(self.exit_heads),
                                          "base_mode": base_config.mode if base_config else "untuned",
                                          "extra_parameters": extra}}
        log.info("ICT: %d exit heads (%s) on a frozen base: %s extra parameters (%.0f%% of the base's %s); the paper's "
                 "LLaMA-2 13B with 8 exits: %s", len(self.exit_heads), args.ict_train, f"{extra:,}",
                 100 * extra / base_params, f"{base_params:,}", f"{paper_extra_parameters(args.ict_train):,}")

    def train(self, *args, **kwargs):
        model = unwrap(self.model)
        model.add_module(ATTR, self.adapter.to(self.arch.head.weight.device))
        try:
            return super().train(*args, **kwargs)
        finally:
            delattr(model, ATTR)  # the model is the plain base again

    def _save(self, output_dir: str | None = None, state_dict=None):
        """checkpoint-N holds the heads only (sorted_config.json is written by `save_model`)."""
        folder = Path(output_dir or self.args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.adapter.write(folder, folder)


def train(script, args) -> Path:
    """`sortedllm train --mode ict --base B`: per-exit heads on the frozen base B, saved to `<output_dir>/final`."""
    # 0. Fail fast, before any loading: the output folder, --base and the options ICT does not take.
    writable_folder(args.output_dir)
    base = check_base(script)

    # 1. The frozen base (any checkpoint or adapter folder but ICT heads) and the exits to give heads.
    sm = SortedModel.from_pretrained(base, dtype=script.dtype, trust_remote_code=args.trust_remote_code)
    exits = resolve_exits(args.exits, sm.num_layers)
    config = SortedConfig(exits=exits, num_hidden_layers=sm.num_layers, mode="ict", base_model=base,
                          data=script.data, exit_schedule=args.exit_schedule)

    # 2. Data: prompt/completion rows -> token ids with the prompt masked out of the loss.
    train_set = encode_dataset(sm.tokenizer, load_examples(script.data, limit=script.data_limit), args.max_length,
                               script.data)
    eval_source = script.eval_data if script.eval_data is not None else default_eval_data(script.data)
    eval_set = None
    if eval_source and args.eval_strategy != "no":
        eval_set = encode_dataset(sm.tokenizer, load_examples(eval_source, limit=script.eval_limit),
                                  args.max_length, eval_source)
    log.info("ICT exits=%s train rows=%d", exits, len(train_set))

    # 3. Train the heads: the SoFT trainer with the body frozen.
    trainer = ICTTrainer(model=sm.model.train(), args=args, train_dataset=train_set, eval_dataset=eval_set,
                         processing_class=sm.tokenizer, sorted_config=config)
    trainer.train()

    # 4. Save the heads (an adapter folder naming the base), the config and the draft vocabulary of the data.
    sm.model.eval()
    sm.attach(trainer.adapter.eval())
    sm.use_config(trainer.sorted_config)
    if args.draft_vocab:
        sm.draft_vocab, sm.draft_vocab_info = count_vocab(sm.tokenizer, sm.model, train_set["input_ids"],
                                                          args.draft_vocab, script.data)
    final = Path(args.output_dir) / "final"
    if trainer.is_world_process_zero():
        sm.save_pretrained(final)
    trainer.accelerator.wait_for_everyone()
    return final
