"""ICT: a frozen base model plus one trained (norm, LM head) copy per intermediate exit.

SFT+ICT is the paper's early-exit baseline (the SFT model frozen, a head per exit trained for one epoch); the same
code on a SoFT checkpoint is "ICT after SoFT". Every parameter of the base stays bit-identical; the exits' copies
start from the shared norm and head (real copies: the head may be tied to the input embeddings).

    sortedllm train --config configs/ict.yaml --base runs/sft/final [--ict_train norm]

An ICT checkpoint is compact: `exit_heads.safetensors` (only the copies) + `sorted_config.json` (mode "ict",
`base_model` = the base checkpoint). `SortedModel.from_pretrained(folder)` loads the base and attaches the heads,
so `exit_norm_head(k)` / `exit_logits` (and so evaluate, generate and export) use exit k's own head.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from ..errors import SortedError
from ..exits import CONFIG_NAME, SortedConfig, resolve_exits
from ..models import Architecture, unwrap
from .trainer import SoFTTrainer

log = logging.getLogger("sortedllm")

HEADS_FILE = "exit_heads.safetensors"
TRAIN_CHOICES = ("head", "norm")  # head: norm + LM head copies (the paper); norm: norm copies, LM head shared
ATTR = "sortedllm_exit_heads"  # where the copies sit inside the model while the Trainer trains them

# The paper's setting, for the extra-parameter figure: LLaMA-2 13B with exits 12, 16, ..., 40.
PAPER_MODEL, PAPER_EXITS = "meta-llama/Llama-2-13b-hf", [12, 16, 20, 24, 28, 32, 36, 40]


# -- the heads ---------------------------------------------------------------------------------------------------


def new_heads(arch, exits, train: str = "head") -> nn.ModuleDict:
    """One copy of the shared norm (and head) per intermediate exit; the last exit keeps the model's own."""
    if train not in TRAIN_CHOICES:
        raise SortedError(f"unknown ict_train '{train}': use head (norm + LM head) or norm")
    heads = nn.ModuleDict()
    for k in exits:
        if k < arch.num_layers:
            parts = {"norm": copy.deepcopy(arch.norm)}
            if train == "head":
                parts["head"] = copy.deepcopy(arch.head)
            heads[str(k)] = nn.ModuleDict(parts)
    for p in heads.parameters():  # own storage, never a view of the (possibly tied) original
        p.data = p.data.clone()
        p.requires_grad_(True)
    return heads


def exit_pairs(heads: nn.ModuleDict, arch) -> dict[int, tuple[nn.Module, nn.Module]]:
    """`SortedModel.exit_heads` form: {exit: (norm, head)}, the shared head where only the norm was copied."""
    return {int(k): (m["norm"], m["head"] if "head" in m else arch.head) for k, m in heads.items()}


def heads_state(exit_heads: dict, arch) -> dict[str, torch.Tensor]:
    state = {}
    for k, (norm, head) in sorted(exit_heads.items()):
        for part, module in (("norm", norm), ("head", head)):
            if module is (arch.norm if part == "norm" else arch.head):
                continue  # shared, stays in the base
            for name, t in module.state_dict().items():
                state[f"exit_{k}.{part}.{name}"] = t.detach().contiguous()
    return state


def write_heads(exit_heads: dict, arch, folder: Path, train: str | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(folder) / HEADS_FILE
    save_file(heads_state(exit_heads, arch), str(path), metadata={"format": "pt", "sortedllm": "exit_heads",
                                                                   "ict_train": train or ""})
    return path


def load_heads(folder: str | Path, arch) -> dict[int, tuple[nn.Module, nn.Module]]:
    """Read `exit_heads.safetensors` into copies of the base's norm/head modules (so the module types match)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder) / HEADS_FILE
    if not path.is_file():
        raise SortedError(f"{folder} is an ICT checkpoint (mode ict in {CONFIG_NAME}) but has no {HEADS_FILE}; "
                          "re-run `sortedllm train --mode ict`")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise SortedError(f"{path} is unreadable ({e}); re-run `sortedllm train --mode ict`") from e
    grouped: dict[int, dict[str, dict]] = defaultdict(lambda: defaultdict(dict))
    for key, t in state.items():
        exit_name, part, name = key.split(".", 2) if key.count(".") >= 2 else (key, "", "")
        k = exit_name.removeprefix("exit_")
        if not (exit_name.startswith("exit_") and k.isdigit() and part in ("norm", "head")):
            raise SortedError(f"{path} has an unexpected tensor '{key}': not an exit-heads file")
        grouped[int(k)][part][name] = t
    heads = nn.ModuleDict()
    device, dtype = arch.head.weight.device, arch.head.weight.dtype
    for k, parts in sorted(grouped.items()):
        if "norm" not in parts or not 1 <= k <= arch.num_layers:
            raise SortedError(f"{path}: exit {k} is incomplete or out of range for a {arch.num_layers}-layer base")
        modules = {}
        for part, tensors in parts.items():
            module = copy.deepcopy(arch.norm if part == "norm" else arch.head)
            try:
                module.load_state_dict(tensors, strict=True)
            except RuntimeError as e:
                raise SortedError(f"{path}: the {part} of exit {k} does not fit the base model (different hidden size "
                                  f"or vocabulary?): {str(e).splitlines()[-1].strip()[:160]}") from e
            modules[part] = module.to(device=device, dtype=dtype).requires_grad_(False)
        heads[str(k)] = nn.ModuleDict(modules)
    return exit_pairs(heads.eval(), arch)


# -- extra parameters --------------------------------------------------------------------------------------------


def extra_parameters(config, exits, train: str = "head") -> int:
    """Parameters ICT adds, from a model config: per intermediate exit an RMSNorm (hidden) and, unless only the norm
    is trained, an LM head (hidden x vocab)."""
    num_layers = config.num_hidden_layers
    heads = sum(1 for k in resolve_exits(exits, num_layers) if k < num_layers)
    per_exit = config.hidden_size + (config.hidden_size * config.vocab_size if train == "head" else 0)
    return heads * per_exit


def paper_extra_parameters(train: str = "head") -> int:
    """The same count for the paper's LLaMA-2 13B with exits 12, 16, ..., 40 (~1.15B with norm + head)."""
    from .dry_run import model_config  # its built-in copy of the published config.json: nothing downloaded

    config, _ = model_config(PAPER_MODEL)
    return extra_parameters(config, PAPER_EXITS, train)


# -- base reference ----------------------------------------------------------------------------------------------


def base_reference(spec: str) -> str:
    """What `base_model` records: an absolute path for a local folder, the spec itself for a hub id or alias."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def locate_base(folder: str | Path, config: SortedConfig) -> str:
    """The base checkpoint of an ICT folder: `base_model`, else the same relative path from the folder."""
    base = config.base_model
    relative = config.extra.get("ict", {}).get("base_relative")
    candidates = [base] + ([str(Path(folder) / relative)] if relative else [])
    for c in candidates:
        if c and Path(c).expanduser().exists():
            return c
    if base and not base.startswith(("/", ".", "~")) and base.count("/") <= 1:
        return base  # a hub id or a built-in alias
    raise SortedError(f"ICT checkpoint {folder} needs its base model '{base}', which is not found; restore it or "
                      f"set base_model in {Path(folder) / CONFIG_NAME} to where it is now")


def model_source(script, args) -> str:
    """The model `sortedllm train` loads: `--model`, or for `--mode ict` the `--base` checkpoint (checked)."""
    if args.mode != "ict":
        if script.base:
            raise SortedError(f"--base is for --mode ict (per-exit heads on a frozen model); to fine-tune "
                              f"{script.base} with --mode {args.mode}, pass it as --model")
        return script.model
    if script.lora:
        raise SortedError("--lora trains adapters in the body, which ICT keeps frozen: drop --lora or use --mode soft/sft")
    if getattr(script, "resume", None):
        raise SortedError("--resume is not supported with --mode ict (it trains only the heads, one short epoch): "
                          "re-run it without --resume")
    return check_base(script.base)


def check_base(spec: str | None) -> str:
    """`--base` must be given, and must be a full model (not an ICT folder)."""
    if not spec:
        raise SortedError("--mode ict needs --base <checkpoint>: the SFT (or SoFT) model whose per-exit heads to train")
    base_config = SortedConfig.load(spec) if Path(spec).is_dir() else None
    if base_config is not None and base_config.mode == "ict":
        raise SortedError(f"--base {spec} is itself an ICT checkpoint (heads only); pass the model it was trained on: "
                          f"{base_config.base_model}")
    return spec


# -- save / load -------------------------------------------------------------------------------------------------


def save_ict(sm, folder: str | Path) -> Path:
    """Only the heads + sorted_config.json (mode ict, the base reference), written atomically."""
    from ..checkpoint import atomic_dir

    if not sm.config.base_model:
        raise SortedError("cannot save per-exit heads without a reference to their base model: set config.base_model")
    folder = Path(folder)
    config = copy.deepcopy(sm.config)
    config.mode = "ict"
    ict = dict(config.extra.get("ict", {}))
    base = Path(config.base_model).expanduser()
    if base.exists():
        ict["base_relative"] = os.path.relpath(base.resolve(), folder.resolve())
    config.extra = {**config.extra, "ict": ict}
    with atomic_dir(folder) as tmp:
        write_heads(sm.exit_heads, sm.arch, tmp, ict.get("train"))
        config.save(tmp)
    return folder


def load_ict(folder: str | Path, config: SortedConfig, exits=None, **load_kwargs):
    """The base model (loaded as usual) with the folder's per-exit heads attached."""
    from ..exits import SortedModel

    base = SortedModel.from_pretrained(locate_base(folder, config), **load_kwargs)
    if base.exit_heads:
        raise SortedError(f"the base of {folder} is itself an ICT checkpoint; ICT heads go on a full model")
    sm = SortedModel(base.model, base.tokenizer, exits=exits, config=config)
    sm.exit_heads = load_heads(folder, sm.arch)
    sm.source = str(folder)
    return sm


# -- training ----------------------------------------------------------------------------------------------------


class ICTTrainer(SoFTTrainer):
    """SoFTTrainer on a frozen model: only the per-exit copies train, on the mean of the intermediate exits' losses.

    The copies sit inside the model (`ATTR`) while `train()` runs, so the Trainer's optimizer, gradient clipping and
    DDP see them with no extra code; the body's forward records no graph since nothing in it needs a gradient.
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
        self.heads = new_heads(self.arch, exits, args.ict_train)
        self.exit_heads = exit_pairs(self.heads, self.arch)
        base_params = sum(p.numel() for p in {id(p): p for p in self.arch.model.parameters()}.values())
        extra = extra_parameters(self.arch.config, exits, args.ict_train)
        cfg = self.sorted_config
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
        model.add_module(ATTR, self.heads.to(self.arch.head.weight.device))
        try:
            return super().train(*args, **kwargs)
        finally:
            delattr(model, ATTR)  # the model is the plain base again

    def _save(self, output_dir: str | None = None, state_dict=None):
        """checkpoint-N holds the heads only (sorted_config.json is written by `save_model`)."""
        folder = Path(output_dir or self.args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        write_heads(self.exit_heads, self.arch, folder, self.args.ict_train)
