"""A trained draft layer for self-speculative decoding (Kangaroo, arXiv 2404.18911, on a sorted model).

The draft is the model's first `shared` layers, then its own copies of the next layer(s), of the final norm and of
the head rows over the draft vocabulary, trained (`sortedllm.train.draft_layer`) to predict the last layer's token
while the model itself stays frozen. It costs what exit `shared + n` costs, but on the default model it agrees with
the last layer 0.64 of the time where exit 9 does 0.41 (docs/draft-quality.md): its layer need not also serve the
deeper layers. The full model, and so every exit and the last layer's output, is untouched.

The copies keep their KV entries in cache slots after the model's own (L, L+1, ...), so one transformers cache holds
both and every crop or row selection of speculative decoding applies to both. Written by hand: neither transformers
nor peft has a module that branches off a model's layer stack with its own KV cache.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..errors import SortedError
from .draft_head import RestrictedHead, restricted_head

DRAFT_FILE = "draft_layer.safetensors"


class DraftLayer(nn.Module):
    """`layers` (copies of layers shared+1..shared+n), `norm` and a `RestrictedHead`; `exit` = shared + n."""

    def __init__(self, layers: nn.ModuleList, norm: nn.Module, head: RestrictedHead, shared: int, num_layers: int):
        super().__init__()
        self.layers, self.norm, self.head = layers, norm, head
        self.shared, self.num_layers = shared, num_layers
        self.slots = list(range(num_layers, num_layers + len(layers)))  # their KV-cache slots
        for slot, layer in zip(self.slots, layers):
            layer.self_attn.layer_idx = slot

    @property
    def exit(self) -> int:
        return self.shared + len(self.layers)

    @classmethod
    def from_model(cls, sm, shared: int, layers: int = 1, vocab: int | None = 8192) -> "DraftLayer":
        """A draft initialised as exit `shared + layers` itself (copies of those layers, the norm, the head rows of
        the `vocab` most frequent tokens; None = every token)."""
        arch, L = sm.arch, sm.num_layers
        check_shape(arch, shared, layers)
        copies = copy.deepcopy(arch.layers[shared:shared + layers])
        V = arch.head.weight.shape[0]
        ids = restricted_head(sm, L, vocab).ids if vocab and vocab < V else torch.arange(V)
        head = RestrictedHead(arch.head, ids)
        draft = cls(copies, copy.deepcopy(arch.norm), head, shared, L)
        for p in draft.parameters():  # own storage (the head may be tied to the embeddings)
            p.data = p.data.clone()
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

    def state(self) -> dict[str, torch.Tensor]:
        out = {f"layers.{n}": t for n, t in self.layers.state_dict().items()}
        out |= {f"norm.{n}": t for n, t in self.norm.state_dict().items()}
        return out | {"head.weight": self.head.weight.detach(), "head.ids": self.head.ids}

    def save(self, path: str | Path, **meta) -> Path:
        """One safetensors file (written atomically): the copies, the head rows and their token ids."""
        from safetensors.torch import save

        from ..checkpoint import atomic_write_bytes

        path = Path(path)
        info = {"sortedllm": "draft_layer", "shared": str(self.shared), "layers": str(len(self.layers)),
                "num_hidden_layers": str(self.num_layers)} | {k: str(v) for k, v in meta.items()}
        atomic_write_bytes(path, save({k: v.detach().contiguous() for k, v in self.state().items()}, metadata=info))
        return path


def check_shape(arch, shared: int, layers: int) -> None:
    L = arch.num_layers
    if layers < 1 or not 1 <= shared < shared + layers < L:
        raise SortedError(f"a draft of {shared} shared + {layers} own layer(s) must end before the last layer "
                          f"(this model has {L}), so layers remain to verify")
    if any(t != "full_attention" for t in arch.layer_types[shared:shared + layers]):
        raise SortedError(f"draft layers must copy full-attention layers; layers {shared + 1}..{shared + layers} "
                          "of this model include sliding-window ones")


def load_draft_layer(path: str | Path, sm) -> DraftLayer:
    """Read a draft-layer file for `sm` (the model it was trained on: same layer count and shapes)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    fix = "train it with `sortedllm train --mode draft` (docs/draft-quality.md)"
    if not path.is_file():
        raise SortedError(f"draft layer file not found: {path}; {fix}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise SortedError(f"{path} is not a readable draft layer file ({e}); {fix}") from e
    if meta.get("sortedllm") != "draft_layer" or "head.ids" not in state:
        raise SortedError(f"{path} is not a draft layer file (no sortedllm draft_layer metadata); {fix}")
    arch = sm.arch
    shared, n, L = int(meta["shared"]), int(meta["layers"]), int(meta["num_hidden_layers"])
    if L != sm.num_layers:
        raise SortedError(f"{path} was trained on a {L}-layer model, this one has {sm.num_layers}")
    check_shape(arch, shared, n)
    ids = state.pop("head.ids")
    if int(ids.max()) >= arch.head.weight.shape[0]:
        raise SortedError(f"{path} drafts token ids beyond this model's vocabulary ({arch.head.weight.shape[0]})")
    draft = DraftLayer(copy.deepcopy(arch.layers[shared:shared + n]), copy.deepcopy(arch.norm),
                       RestrictedHead(arch.head, ids), shared, L)
    try:
        draft.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise SortedError(f"{path} does not fit this model (different hidden size or layers?): "
                          f"{str(e).splitlines()[-1].strip()[:160]}") from e
    w = arch.head.weight
    return draft.to(device=w.device, dtype=w.dtype).eval().requires_grad_(False)
