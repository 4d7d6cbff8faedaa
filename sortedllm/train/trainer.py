"""`SoFTTrainer`: TRL's `SFTTrainer` with the multi-exit loss. Switching from SFT to SoFT is one class name:

    trainer = SoFTTrainer(model=model, args=SoFTConfig(output_dir="out", exits="count:8"), train_dataset=ds)
    trainer.train()

Everything else (datasets, collator, checkpoints, accelerate launch, peft) is TRL's and transformers'.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import SFTConfig, SFTTrainer

from ..exits import SortedConfig, resolve_exits
from ..models import Architecture
from .loss import multi_exit_loss
from .schedules import make_schedule

MODES = ("soft", "sft")


@dataclass
class SoFTConfig(SFTConfig):
    """SFTConfig plus the exits and how they are weighted. Paper defaults: lr 2e-5, cosine schedule."""

    exits: str | None = field(default=None, metadata={
        "help": "Exit layers: a list like 9,18,30, 'every:3' or 'count:8' (default count:8 from 30% depth)."})
    mode: str = field(default="soft", metadata={
        "help": "soft (mean loss over all exits) or sft (last exit only: the paper's SFT baseline)."})
    exit_schedule: str = field(default="uniform", metadata={
        "help": "Which exits contribute each step: uniform (all, the paper), weights, sample:n or rotate."})
    exit_weights: str | None = field(default=None, metadata={
        "help": "Per-exit loss weights for exit_schedule=weights, comma-separated in exit order."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule (paper: cosine)."})
    bf16: bool | None = field(default=None, metadata={
        "help": "bf16 mixed precision; default: on when a bf16-capable GPU is present, off on CPU."})

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        if self.mode not in MODES:
            from ..errors import SortedError

            raise SortedError(f"unknown mode '{self.mode}': use one of {', '.join(MODES)}")
        super().__post_init__()


class SoFTTrainer(SFTTrainer):
    """SFTTrainer whose loss is the mean over exits of each exit's next-token cross-entropy.

    Each exit's loss is logged as `loss_exit_<k>` (and `eval_loss_exit_<k>`). The model goes through its own
    forward (so DDP/FSDP/peft wrappers work) with `output_hidden_states=True`; the shared norm and head are
    applied only at labelled positions.
    """

    def __init__(self, model=None, args: SoFTConfig | None = None, *pos, sorted_config: SortedConfig | None = None,
                 **kwargs):
        super().__init__(model, args, *pos, **kwargs)
        self.arch = Architecture(self.model)
        exits = resolve_exits(args.exits if sorted_config is None else sorted_config.exits, self.arch.num_layers)
        self.sorted_config = sorted_config or SortedConfig(exits=exits, num_hidden_layers=self.arch.num_layers)
        self.sorted_config.exits, self.sorted_config.mode = exits, args.mode
        self.sorted_config.exit_schedule = args.exit_schedule
        trained = exits[-1:] if args.mode == "sft" else exits
        self.schedule = make_schedule(args.exit_schedule, trained, args.exit_weights, seed=args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                        output_hidden_states=True, logits_to_keep=1, use_cache=False)
        weights = self.schedule.weights(self.state.global_step) if mode == "train" else self.schedule.eval_weights()
        result = multi_exit_loss(outputs.hidden_states, inputs["labels"], weights, self.arch,
                                 exit_heads=getattr(self, "exit_heads", None), num_items_in_batch=num_items_in_batch)
        loss = result.loss
        # As transformers' Trainer: the token count spans all ranks and DDP averages gradients across them.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        for k, v in result.per_exit.items():
            self._metrics[mode][f"loss_exit_{k}"].append(self.accelerator.gather_for_metrics(v).mean().item())
        return (loss, outputs) if return_outputs else loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            self.sorted_config.save(output_dir or self.args.output_dir)
