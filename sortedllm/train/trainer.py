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

MODES = ("soft", "sft", "ict", "draft")


@dataclass
class SoFTConfig(SFTConfig):
    """SFTConfig plus the exits and how they are weighted. Paper defaults: lr 2e-5, cosine schedule."""

    # no percent sign in help texts: argparse reads it as a format and `--help` fails
    exits: str | None = field(default=None, metadata={
        "help": "Exit layers: a list like 9,18,30, 'every:3' or 'count:8' (default count:8 from 30 percent depth)."})
    mode: str = field(default="soft", metadata={
        "help": "soft (mean loss over all exits), sft (last exit only: the paper's SFT baseline), ict (per-exit "
                "heads on the frozen --base model: the paper's SFT+ICT baseline, or ICT after SoFT) or draft (a draft "
                "layer for self-speculative decoding on the frozen --base model: train/draft_layer.py)."})
    draft_shared: int | None = field(default=None, metadata={
        "help": "--mode draft: layers the draft shares with the model (default: the base's first exit minus "
                "draft_layers, so the draft costs what that exit costs)."})
    draft_layers: int = field(default=2, metadata={
        "help": "--mode draft: the draft's own decoder layers (default 2: at exit 9's cost, 7 shared + 2 own agreed "
                "with the last layer more often than 8 + 1 on the default model, docs/draft-quality.md)."})
    draft_vocab: int | None = field(default=8192, metadata={
        "help": "--mode draft: the draft head's tokens (the most frequent N; 0 = all)."})
    draft_head_lr: float = field(default=2e-4, metadata={
        "help": "--mode draft: learning rate of the draft head's rows (the layers use learning_rate)."})
    ict_train: str = field(default="head", metadata={
        "help": "--mode ict: what each intermediate exit gets its own trained copy of: head (norm + LM head, the "
                "paper) or norm (norm only; the LM head stays shared)."})
    exit_schedule: str = field(default="uniform", metadata={
        "help": "Which exits contribute each step: uniform (all, the paper), weights, sample:n or rotate."})
    exit_weights: str | None = field(default=None, metadata={
        "help": "Per-exit loss weights for exit_schedule=weights, comma-separated in exit order."})
    loss_impl: str = field(default="auto", metadata={
        "help": "Linear + cross-entropy path: auto (cut-cross-entropy on a CUDA GPU, else chunked), chunked, cce, "
                "trl or dense (full logits of the labelled positions; reference)."})
    distill_alpha: float = field(default=0.0, metadata={
        "help": "Self-distillation: each intermediate exit's loss is (1 - a) * CE + a * T^2 * KL(last || exit) with "
                "the last layer detached as teacher (0 = the paper's SoFT). Makes exits better drafts."})
    distill_temperature: float = field(default=1.0, metadata={"help": "Temperature T of the distillation KL."})
    loss_chunk_size: int | None = field(default=None, metadata={
        "help": "Label positions per head tile of the chunked loss (default: ~32M logits per tile over all exits)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule (paper: cosine)."})
    bf16: bool | None = field(default=None, metadata={
        "help": "bf16 mixed precision; default: on when a bf16-capable GPU is present, off on CPU."})

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        if self.mode not in MODES:
            from ..errors import SortedError

            raise SortedError(f"unknown mode '{self.mode}': use one of {', '.join(MODES)}")
        from ..errors import SortedError
        from .chunked import resolve_impl  # a clear error now for an unknown or unavailable loss_impl

        if not 0 <= self.distill_alpha <= 1:
            raise SortedError(f"distill_alpha must be between 0 and 1 (got {self.distill_alpha})")
        if not self.distill_temperature > 0:
            raise SortedError(f"distill_temperature must be > 0 (got {self.distill_temperature})")
        if self.distill_alpha > 0 and self.mode != "soft":
            why = {"sft": "trains the last exit only: nothing to distill", "ict": "trains per-exit heads, which "
                   "are not distilled"}.get(self.mode, "distils into the draft layer by itself")
            raise SortedError(f"distill_alpha needs mode soft (mode {self.mode} {why}); set --distill_alpha 0")
        resolve_impl(self.loss_impl, torch.device("cuda" if torch.cuda.is_available() else "cpu"),
                     distill=self.distill_alpha > 0)
        super().__post_init__()


def trained_exits(mode: str, exits: list[int]) -> list[int]:
    """The exits whose loss is trained: SFT the last only, ICT the intermediate ones (their heads), SoFT all."""
    return exits[-1:] if mode == "sft" else exits[:-1] if mode == "ict" else exits


class SoFTTrainer(SFTTrainer):
    """SFTTrainer whose loss is the mean over exits of each exit's next-token cross-entropy.

    Each exit's loss is logged as `loss_exit_<k>` (and `eval_loss_exit_<k>`), its cross-entropy on the labels;
    with `distill_alpha` > 0 also `kl_exit_<k>`, the mean KL(last || exit) at the distillation temperature. The
    model goes through its own forward (so DDP/FSDP/peft wrappers work) with `output_hidden_states=True`; the shared
    norm and head are applied only at labelled positions.
    """

    def __init__(self, model=None, args: SoFTConfig | None = None, *pos, sorted_config: SortedConfig | None = None,
                 **kwargs):
        super().__init__(model, args, *pos, **kwargs)
        self.arch = Architecture(self.model)
        exits = resolve_exits(args.exits if sorted_config is None else sorted_config.exits, self.arch.num_layers)
        self.sorted_config = sorted_config or SortedConfig(exits=exits, num_hidden_layers=self.arch.num_layers)
        self.sorted_config.exits, self.sorted_config.mode = exits, args.mode
        self.sorted_config.exit_schedule = args.exit_schedule
        if args.distill_alpha > 0:
            self.sorted_config.extra["distill"] = {"alpha": args.distill_alpha,
                                                   "temperature": args.distill_temperature}
        self.schedule = make_schedule(args.exit_schedule, trained_exits(args.mode, exits), args.exit_weights,
                                      seed=args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                        output_hidden_states=True, logits_to_keep=1, use_cache=False)
        weights = self.schedule.weights(self.state.global_step) if mode == "train" else self.schedule.eval_weights()
        result = multi_exit_loss(outputs.hidden_states, inputs["labels"], weights, self.arch,
                                 exit_heads=getattr(self, "exit_heads", None), num_items_in_batch=num_items_in_batch,
                                 impl=self.args.loss_impl, chunk_size=self.args.loss_chunk_size,
                                 distill_alpha=self.args.distill_alpha,
                                 distill_temperature=self.args.distill_temperature)
        loss = result.loss
        # As transformers' Trainer: the token count spans all ranks and DDP averages gradients across them.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        # Per-token means over all ranks: each rank's mean weighted by its label tokens (a plain mean of the ranks'
        # means would not be the global batch's mean when ranks hold different numbers of tokens).
        n = torch.tensor(float(result.num_tokens), device=loss.device)
        total = self.accelerator.gather_for_metrics(n.reshape(1)).sum().clamp(min=1)
        for prefix, values in (("loss_exit", result.per_exit), ("kl_exit", result.kl)):
            for k, v in values.items():
                summed = self.accelerator.gather_for_metrics((v.to(n.device) * n).reshape(1)).sum()
                self._metrics[mode][f"{prefix}_{k}"].append((summed / total).item())
        return (loss, outputs) if return_outputs else loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            self.sorted_config.save(output_dir or self.args.output_dir)

    def _save_checkpoint(self, model, trial):
        """checkpoint-N written atomically with a verified manifest (see train/resume.py)."""
        from .resume import save_checkpoint

        save_checkpoint(self, super()._save_checkpoint, model, trial)
