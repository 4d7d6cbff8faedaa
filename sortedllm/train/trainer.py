"""`SoFTTrainer`: TRL's `SFTTrainer` with the multi-exit loss. Switching from SFT to SoFT is one class name:

    trainer = SoFTTrainer(model=model, args=SoFTConfig(output_dir="out", exits="count:8"), train_dataset=ds)
    trainer.train()

Everything else (datasets, collator, checkpoints, accelerate launch, peft) is TRL's and transformers'.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import SFTConfig, SFTTrainer

from ..errors import SortedError
from ..exits import SortedConfig, resolve_exits
from ..models import Architecture
from .chunked import resolve_impl
from .loss import multi_exit_loss
from .resume import save_checkpoint
from .schedules import make_schedule
from .split import SplitAdamW

MODES = ("soft", "sft", "ict", "draft")
EXIT_OPTIMIZERS = ("auto", "split", "joint")
# SoFT's default loss weights. On the quickstart budget (configs/quickstart.yaml, whose learning rate is 1.41x for it)
# the last exit's held-out loss is 1.08x SFT's where the paper's uniform weights give 1.31x, and every intermediate
# exit stays within 1.09x of uniform's (docs/results.md 7).
SOFT_SCHEDULE = "last:0.75"


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
    exit_schedule: str = field(default="auto", metadata={
        "help": "Which exits contribute each step, and with what weight: uniform (all alike, the paper's SoFT), "
                "last:w (the last exit w, the others sharing 1 - w), weights, sample:n or rotate; auto (default): "
                f"{SOFT_SCHEDULE} for mode soft (the full model stays near SFT: docs/results.md 7), else uniform."})
    exit_weights: str | None = field(default=None, metadata={
        "help": "Per-exit loss weights for exit_schedule=weights, comma-separated in exit order."})
    exit_optimizer: str = field(default="joint", metadata={
        "help": "split: the last exit's gradient and the other exits' gradient each get their own AdamW moments, so "
                "the shallow exits' larger gradients do not starve the full model's update (train/split.py; two "
                "more moment buffers); joint (default): one AdamW on the weighted sum, as the paper; auto: split "
                "where it applies (SoFT, AdamW, no FSDP/DeepSpeed), else joint."})
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
            raise SortedError(f"unknown mode '{self.mode}': use one of {', '.join(MODES)}")
        if not 0 <= self.distill_alpha <= 1:
            raise SortedError(f"distill_alpha must be between 0 and 1 (got {self.distill_alpha})")
        if not self.distill_temperature > 0:
            raise SortedError(f"distill_temperature must be > 0 (got {self.distill_temperature})")
        if self.distill_alpha > 0 and self.mode != "soft":
            why = {"sft": "trains the last exit only: nothing to distill", "ict": "trains per-exit heads, which "
                   "are not distilled"}.get(self.mode, "distils into the draft layer by itself")
            raise SortedError(f"distill_alpha needs mode soft (mode {self.mode} {why}); set --distill_alpha 0")
        if self.exit_schedule == "auto":
            self.exit_schedule = SOFT_SCHEDULE if self.mode == "soft" else "uniform"
        if self.exit_optimizer not in EXIT_OPTIMIZERS:
            raise SortedError(f"unknown exit_optimizer '{self.exit_optimizer}': use auto, split or joint")
        # a clear error now for an unknown or unavailable loss_impl
        resolve_impl(self.loss_impl, torch.device("cuda" if torch.cuda.is_available() else "cpu"),
                     distill=self.distill_alpha > 0)
        super().__post_init__()


def split_streams(args) -> bool:
    """Whether SoFT trains with the split-stream optimizer (train/split.py)."""
    return args.mode == "soft" and getattr(args, "exit_optimizer", "joint") == "split"


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
        if args.exit_optimizer == "auto":  # resolved here, where the optimizer class and the sharding are known
            adamw = SFTTrainer.get_optimizer_cls_and_kwargs(args, self.model)[0] is torch.optim.AdamW
            sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
            args.exit_optimizer = "split" if adamw and not sharded else "joint"
        self.split = split_streams(args) and len(trained_exits(args.mode, exits)) > 1
        if args.mode == "soft":
            self.sorted_config.extra["exit_optimizer"] = args.exit_optimizer
        if self.split and (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            raise SortedError("exit_optimizer split keeps a second gradient stream that FSDP and DeepSpeed do not "
                              "shard; train with --exit_optimizer joint under them")

    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None):
        """AdamW as configured, or its split-stream form (train/split.py) for SoFT with exit_optimizer split."""
        cls, kwargs = SFTTrainer.get_optimizer_cls_and_kwargs(args, model)
        if not split_streams(args):
            return cls, kwargs
        if cls is not torch.optim.AdamW:
            raise SortedError(f"exit_optimizer split needs AdamW (optim adamw_torch or adamw_torch_fused), got "
                              f"optim {args.optim}; choose one of those or --exit_optimizer joint")
        return SplitAdamW, {**kwargs, "rest_max_grad_norm": args.max_grad_norm}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                        output_hidden_states=True, logits_to_keep=1, use_cache=False)
        weights = self.schedule.weights(self.state.global_step) if mode == "train" else self.schedule.eval_weights()
        # As transformers' Trainer: the token count spans all ranks and DDP averages gradients across them.
        spread = self.accelerator.num_processes if (self.args.average_tokens_across_devices
                                                    and num_items_in_batch is not None) else 1
        L = self.arch.num_layers
        rest = {k: w for k, w in weights.items() if k != L and w}
        if mode == "train" and self.split and rest and weights.get(L):
            # Two streams from one forward: the intermediate exits' gradient goes to the optimizer's second stream
            # now; the last exit's loss is what the Trainer backpropagates into .grad, as SFT's would be.
            total = sum(rest.values())
            others = self.exit_loss(outputs, inputs["labels"], {k: w / total for k, w in rest.items()},
                                    num_items_in_batch)
            last = self.exit_loss(outputs, inputs["labels"], {L: 1.0}, num_items_in_batch, distill=False)
            self.add_rest_gradient(others.loss * spread, num_items_in_batch)
            loss, results = last.loss + others.loss.detach(), (others, last)
        else:
            result = self.exit_loss(outputs, inputs["labels"], weights, num_items_in_batch)
            loss, results = result.loss, (result,)
        self.log_exits(mode, results)
        loss = loss * spread
        return (loss, outputs) if return_outputs else loss

    def exit_loss(self, outputs, labels, weights: dict[int, float], num_items_in_batch, distill: bool = True):
        return multi_exit_loss(outputs.hidden_states, labels, weights, self.arch,
                               exit_heads=getattr(self, "exit_heads", None), num_items_in_batch=num_items_in_batch,
                               impl=self.args.loss_impl, chunk_size=self.args.loss_chunk_size,
                               distill_alpha=self.args.distill_alpha if distill else 0.0,
                               distill_temperature=self.args.distill_temperature)

    def add_rest_gradient(self, loss: torch.Tensor, num_items_in_batch) -> None:
        """Backpropagate the intermediate exits' loss into the split optimizer's second stream, scaled for gradient
        accumulation exactly as `Trainer.training_step` scales the loss it backpropagates."""
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
                self.compute_loss_func is not None
        if not scaled:
            loss = loss / self.current_gradient_accumulation_steps
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        params = optimizer.parameters()
        optimizer.add_rest(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))

    def log_exits(self, mode: str, results) -> None:
        """Per-token means over all ranks: each rank's mean weighted by its label tokens (a plain mean of the ranks'
        means would not be the global batch's mean when ranks hold different numbers of tokens)."""
        n = torch.tensor(float(results[0].num_tokens), device=results[0].loss.device)
        total = self.accelerator.gather_for_metrics(n.reshape(1)).sum().clamp(min=1)
        for result in results:
            for prefix, values in (("loss_exit", result.per_exit), ("kl_exit", result.kl)):
                for k, v in values.items():
                    summed = self.accelerator.gather_for_metrics((v.to(n.device) * n).reshape(1)).sum()
                    self._metrics[mode][f"{prefix}_{k}"].append((summed / total).item())

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            self.sorted_config.save(output_dir or self.args.output_dir)

    def _save_checkpoint(self, model, trial):
        """checkpoint-N written atomically with a verified manifest (see train/resume.py)."""
        save_checkpoint(self, super()._save_checkpoint, model, trial)
