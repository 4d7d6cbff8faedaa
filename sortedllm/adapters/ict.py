"""ICT heads: one trained (norm, LM head) copy per intermediate exit on a frozen base model (the paper's SFT+ICT
baseline, or ICT after SoFT). Training is `sortedllm.train.ict`; this is the adapter that holds, saves and loads
the copies.

Folder: `sorted_adapter.json` (type `ict_heads`, the base, `ict_train`, the exits with a head) +
`exit_heads.safetensors` (`exit_<k>.norm.*`, `exit_<k>.head.*`; no head tensors when only norms were trained) +
`sorted_config.json` (mode `ict`, the exits). Folders saved before sorted_adapter.json (the base named by
sorted_config.json's `base_model`) load too. Attached, `sm.exit_heads` maps exit k to its (norm, head), and
`exit_norm_head` / `exit_logits` (so evaluate, generate and export) use them.
"""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from ..errors import SortedError
from .base import Adapter, check_fingerprint, locate_base, read_adapter_config, read_safetensors

HEADS_FILE = "exit_heads.safetensors"
TRAIN_CHOICES = ("head", "norm")  # head: norm + LM head copies (the paper); norm: norm copies, LM head shared
LEGACY_CONFIG = "sorted_config.json"  # exits.CONFIG_NAME: a pre-adapter ICT folder is one whose mode is "ict"


class ICTHeads(Adapter, nn.Module):
    """`heads[str(k)]` = ModuleDict(norm=..., head=...) for each intermediate exit k ("head" absent when only the
    norm is trained: the exit then shares the model's head)."""

    adapter_type = "ict_heads"
    weights_file = HEADS_FILE

    def __init__(self, heads: nn.ModuleDict, ict_train: str = "head"):
        nn.Module.__init__(self)
        if ict_train not in TRAIN_CHOICES:
            raise SortedError(f"unknown ict_train '{ict_train}': use head (norm + LM head) or norm")
        self.heads, self.ict_train = heads, ict_train

    @classmethod
    def new(cls, arch, exits, ict_train: str = "head") -> "ICTHeads":
        """Fresh copies of the shared norm (and head) for every exit below the last layer, own storage each."""
        if ict_train not in TRAIN_CHOICES:
            raise SortedError(f"unknown ict_train '{ict_train}': use head (norm + LM head) or norm")
        heads = nn.ModuleDict()
        for k in exits:
            if k < arch.num_layers:
                parts = {"norm": copy.deepcopy(arch.norm)}
                if ict_train == "head":
                    parts["head"] = copy.deepcopy(arch.head)
                heads[str(k)] = nn.ModuleDict(parts)
        for p in heads.parameters():  # never a view of the (possibly tied) original
            p.data = p.data.clone()
            p.requires_grad_(True)
        return cls(heads, ict_train)

    @classmethod
    def from_pairs(cls, pairs: dict, arch) -> "ICTHeads":
        """The adapter holding given {exit: (norm, head)} modules (the model's own head where it is shared)."""
        heads = nn.ModuleDict({str(k): nn.ModuleDict({"norm": norm} | ({} if head is arch.head else {"head": head}))
                               for k, (norm, head) in sorted(pairs.items())})
        return cls(heads, "head" if any("head" in m for m in heads.values()) else "norm")

    def pairs(self, arch) -> dict[int, tuple[nn.Module, nn.Module]]:
        """{exit: (norm, head)}, the model's shared head where only the norm was copied."""
        return {int(k): (m["norm"], m["head"] if "head" in m else arch.head) for k, m in self.heads.items()}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"exit_{k}.{part}.{name}": t for k, parts in sorted(self.heads.items(), key=lambda kv: int(kv[0]))
                for part, module in parts.items() for name, t in module.state_dict().items()}

    def fields(self) -> dict:
        return {"ict_train": self.ict_train, "exits": sorted(int(k) for k in self.heads)}

    def metadata(self) -> dict[str, str]:
        return {"format": "pt", "sortedllm": "exit_heads", "ict_train": self.ict_train}

    @classmethod
    def is_legacy(cls, path: Path) -> bool:
        config = Path(path) / LEGACY_CONFIG
        if not Path(path).is_dir() or not config.is_file():
            return False
        try:
            return json.loads(config.read_text()).get("mode") == "ict"
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return False  # SortedConfig.load reports a malformed file

    @classmethod
    def base_spec(cls, folder: Path) -> str:
        if read_adapter_config(folder) is not None:
            return super().base_spec(folder)
        config = json.loads((Path(folder) / LEGACY_CONFIG).read_text())
        return locate_base(Path(folder), config.get("base_model"),
                           (config.get("extra") or {}).get("ict", {}).get("base_relative"),
                           f"set base_model in {Path(folder) / LEGACY_CONFIG} to where it is now")

    @classmethod
    def load(cls, path: Path, sm) -> "ICTHeads":
        """The folder's heads as copies of `sm`'s norm / head modules (so the module types match)."""
        folder = Path(path)
        config = read_adapter_config(folder) or {}
        fix = "re-run `sortedllm train --mode ict`"
        check_fingerprint(config, sm, folder)
        state, meta = read_safetensors(folder / HEADS_FILE, "exit-heads", fix)
        heads = cls(nn.ModuleDict(), config.get("ict_train") or meta.get("ict_train") or "head")
        heads.base_model, heads.base_fingerprint = config.get("base_model"), config.get("base_fingerprint")
        arch = sm.arch
        grouped: dict[int, dict[str, dict]] = defaultdict(lambda: defaultdict(dict))
        for key, t in state.items():
            exit_name, part, name = key.split(".", 2) if key.count(".") >= 2 else (key, "", "")
            k = exit_name.removeprefix("exit_")
            if not (exit_name.startswith("exit_") and k.isdigit() and part in ("norm", "head")):
                raise SortedError(f"{folder / HEADS_FILE} has an unexpected tensor '{key}': not an exit-heads file")
            grouped[int(k)][part][name] = t
        w = arch.head.weight
        for k, parts in sorted(grouped.items()):
            if "norm" not in parts or not 1 <= k <= arch.num_layers:
                raise SortedError(f"{folder / HEADS_FILE}: exit {k} is incomplete or out of range for a "
                                  f"{arch.num_layers}-layer base")
            heads.heads[str(k)] = nn.ModuleDict({part: _module_like(arch.norm if part == "norm" else arch.head,
                                                                    tensors, f"{folder / HEADS_FILE}: the {part} "
                                                                    f"of exit {k}") for part, tensors in parts.items()})
        return heads.to(device=w.device, dtype=w.dtype).eval().requires_grad_(False)


def _module_like(template: nn.Module, tensors: dict, where: str) -> nn.Module:
    module = copy.deepcopy(template)
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise SortedError(f"{where} does not fit the base model (different hidden size or vocabulary?): "
                          f"{str(e).splitlines()[-1].strip()[:160]}") from e
    return module
