"""A trained draft layer for self-speculative decoding (Kangaroo, arXiv 2404.18911, on a sorted model).

The draft is the model's first `shared` layers, then its own copies of the next layer(s), of the final norm and of
the head rows over the draft vocabulary, trained (`sortedllm.train.draft_layer`) to predict the last layer's token
while the model itself stays frozen. It costs what exit `shared + n` costs, but on the default model 7 shared + 2
own layers agree with the last layer 0.670 of the time where exit 9 does 0.408 (docs/draft-quality.md): its layers
need not also serve the deeper layers. The full model, and so every exit and the last layer's output, is untouched.

The copies keep their KV entries in cache slots after the model's own (L, L+1, ...), so one transformers cache holds
both and every crop or row selection of speculative decoding applies to both. Written by hand: neither transformers
nor peft has a module that branches off a model's layer stack with its own KV cache.

Folder: `sorted_adapter.json` (type `draft_layer`, the base, `shared`, `layers`) + `draft_layer.safetensors`. The
weights file describes itself (its metadata holds shared / layers / num_hidden_layers), so the file alone, as
written before adapter folders, loads too (without the base check).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import SortedError
from .base import Adapter, check_fingerprint, read_adapter_config, read_safetensors
from .vocab import RestrictedHead

DRAFT_FILE = "draft_layer.safetensors"
FIX = "train it with `sortedllm train --mode draft` (docs/draft-quality.md)"


class DraftLayer(Adapter, nn.Module):
    """`layers` (copies of layers shared+1..shared+n), `norm` and a `RestrictedHead`; `exit` = shared + n.
    `info` is the training record kept in the file (data, rows, steps, final KL)."""

    adapter_type = "draft_layer"
    weights_file = DRAFT_FILE
    replaceable = True

    def __init__(self, layers: nn.ModuleList, norm: nn.Module, head: RestrictedHead, shared: int, num_layers: int):
        nn.Module.__init__(self)
        self.layers, self.norm, self.head = layers, norm, head
        self.shared, self.num_layers = shared, num_layers
        self.info: dict = {}
        self.slots = list(range(num_layers, num_layers + len(layers)))  # their KV-cache slots
        for slot, layer in zip(self.slots, layers):
            layer.self_attn.layer_idx = slot

    @property
    def exit(self) -> int:
        return self.shared + len(self.layers)

    @classmethod
    def from_model(cls, sm, shared: int, layers: int = 1, vocab: torch.Tensor | None = None) -> "DraftLayer":
        """A draft initialised as exit `shared + layers` itself: copies of those layers, of the norm and of the head
        rows of the token ids `vocab` (None = every token). Records `sm` as its base."""
        arch, L = sm.arch, sm.num_layers
        check_shape(arch, shared, layers)
        copies = copy.deepcopy(arch.layers[shared:shared + layers])
        V = arch.head.weight.shape[0]
        ids = torch.arange(V) if vocab is None else vocab[vocab < V].sort().values
        draft = cls(copies, copy.deepcopy(arch.norm), RestrictedHead(arch.head, ids), shared, L)
        for p in draft.parameters():  # own storage (the head may be tied to the embeddings)
            p.data = p.data.clone()
        draft.set_base(sm.model, sm.source)
        return draft

    def ensure_slots(self, cache) -> None:
        from transformers.cache_utils import DynamicLayer

        while len(cache.layers) <= self.slots[-1]:
            cache.layers.append(DynamicLayer())

    def hidden(self, arch, h: torch.Tensor, **kwargs) -> torch.Tensor:
        """The draft's normed state from the hidden state after layer `shared` (kwargs: mask, positions, cache)."""
        if kwargs.get("cache") is not None:
            self.ensure_slots(kwargs["cache"])
        return self.norm(arch.run_layers(h, self.shared, self.exit, layers=self.layers, **kwargs))

    def logits(self, arch, normed: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary (column i is token `head.ids[i]`)."""
        return arch.logits(normed, head=self.head, normed=True)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"layers.{n}": t for n, t in self.layers.state_dict().items()}
        out |= {f"norm.{n}": t for n, t in self.norm.state_dict().items()}
        return out | {"head.weight": self.head.weight.detach(), "head.ids": self.head.ids}

    def fields(self) -> dict:
        return {"shared": self.shared, "layers": len(self.layers), "num_hidden_layers": self.num_layers,
                "vocab": len(self.head.ids), **self.info}

    def metadata(self) -> dict[str, str]:
        return {"sortedllm": "draft_layer", "shared": str(self.shared), "layers": str(len(self.layers)),
                "num_hidden_layers": str(self.num_layers)} | {k: str(v) for k, v in self.info.items()}

    @classmethod
    def is_legacy(cls, path: Path) -> bool:
        """A lone draft-layer file, or a folder holding only one."""
        path = Path(path)
        if path.is_dir():
            path = path / DRAFT_FILE
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), "pt") as f:
                return (f.metadata() or {}).get("sortedllm") == "draft_layer"
        except (SafetensorError, OSError):
            return False

    @classmethod
    def base_spec(cls, folder: Path) -> str:
        if read_adapter_config(folder) is None:
            raise SortedError(f"{folder} holds a draft layer without a record of its base model; load the model it "
                              f"was trained on and pass the file with --draft_layer")
        return super().base_spec(folder)

    @classmethod
    def load(cls, path: Path, sm) -> "DraftLayer":
        return load_draft_layer(path, sm)


def check_shape(arch, shared: int, layers: int) -> None:
    L = arch.num_layers
    if layers < 1 or not 1 <= shared < shared + layers < L:
        raise SortedError(f"a draft of {shared} shared + {layers} own layer(s) must end before the last layer "
                          f"(this model has {L}), so layers remain to verify")
    if any(t != "full_attention" for t in arch.layer_types[shared:shared + layers]):
        raise SortedError(f"draft layers must copy full-attention layers; layers {shared + 1}..{shared + layers} "
                          "of this model include sliding-window ones")


def load_draft_layer(path: str | Path, sm) -> DraftLayer:
    """A draft layer for `sm` (the model it was trained on: same layer count and shapes) from its folder or its
    `draft_layer.safetensors` file; the base fingerprint is checked when the folder records one."""
    path = Path(path)
    folder, file = (path, path / DRAFT_FILE) if path.is_dir() else (path.parent, path)
    config = read_adapter_config(folder) if file.name == DRAFT_FILE and folder.is_dir() else None
    if config is not None and config["type"] != DraftLayer.adapter_type:
        if path.is_dir():
            raise SortedError(f"{folder} holds a '{config['type']}' adapter, not a draft layer; {FIX}")
        config = None  # a draft-layer file that was copied into another adapter's folder
    if config is not None:
        check_fingerprint(config, sm, folder)
    state, meta = read_safetensors(file, "draft layer", FIX)
    if meta.get("sortedllm") != "draft_layer" or "head.ids" not in state:
        raise SortedError(f"{file} is not a draft layer file (no sortedllm draft_layer metadata); {FIX}")
    arch = sm.arch
    shared, n, L = int(meta["shared"]), int(meta["layers"]), int(meta["num_hidden_layers"])
    if L != sm.num_layers:
        raise SortedError(f"{file} was trained on a {L}-layer model, this one has {sm.num_layers}")
    check_shape(arch, shared, n)
    ids = state.pop("head.ids")
    if int(ids.max()) >= arch.head.weight.shape[0]:
        raise SortedError(f"{file} drafts token ids beyond this model's vocabulary ({arch.head.weight.shape[0]})")
    draft = DraftLayer(copy.deepcopy(arch.layers[shared:shared + n]), copy.deepcopy(arch.norm),
                       RestrictedHead(arch.head, ids), shared, L)
    if config is not None:
        draft.base_model, draft.base_fingerprint = config.get("base_model"), config.get("base_fingerprint")
    draft.info = {k: v for k, v in meta.items() if k not in ("sortedllm", "shared", "layers", "num_hidden_layers")}
    try:
        draft.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise SortedError(f"{file} does not fit this model (different hidden size or layers?): "
                          f"{str(e).splitlines()[-1].strip()[:160]}") from e
    w = arch.head.weight
    return draft.to(device=w.device, dtype=w.dtype).eval().requires_grad_(False)
