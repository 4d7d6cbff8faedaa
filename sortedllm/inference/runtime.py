"""The decode runtime: a private copy of the model in the dtype and weight layout this machine decodes fastest,
its KV cache, and the two operations every decoding strategy is built from: run layers a..b on some tokens, and
read exit k's logits.

Dtype: `auto` picks bfloat16 where the CPU has bfloat16 dot-product instructions (avx512_bf16 or AMX) or on a
bf16-capable GPU, else float32. On such a CPU a bfloat16 product of 1-16 rows costs about what one row costs, so a
verify step of several drafted tokens costs about one decode step; in float32 the small-M products take MKL's slow
paths (2 rows cost ~2x one). Weight layout: on a CPU every linear layer's weight is reordered once into oneDNN's
blocked layout (`mkldnn._reorder_linear_weight`, the layout torch.compile's CPU backend uses after freezing): its
one-row product runs at about twice the memory bandwidth of the plain layout here, and row i of an M-row product
equals the same row alone (checked by `sortedllm bench kernels`).

The copy leaves the caller's model untouched (training, evaluation and HF `generate` keep using it). Attention is
`inference/attention.py`'s, which is what keeps speculative and plain decoding token-identical.
"""

from __future__ import annotations

import copy
import inspect
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import SortedError
from ..models import Architecture, unwrap
from . import attention
from .kv import KVCache

DTYPES = ("auto", "bfloat16", "float32")
_RUNTIMES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def cpu_has_bf16() -> bool:
    """bfloat16 dot-product instructions on this CPU (Linux: /proc/cpuinfo flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in DTYPES:
        raise SortedError(f"unknown dtype '{name}': use auto, bfloat16 or float32")
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    return getattr(torch, name)


class PackedLinear(nn.Module):
    """`nn.Linear` with its weight reordered once for oneDNN (CPU); the same products, computed faster."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        w = linear.weight.detach().to(dtype).contiguous()
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.weight_packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1]:
            # oneDNN sums a one-row product in another order than its 2..256-row products (row i of those equals
            # row i computed in any other block), which now and then rounds one output differently; a second row
            # puts every step on the M >= 2 path, at no cost in bfloat16
            two = x.reshape(1, -1).expand(2, -1).contiguous()
            y = torch.ops.mkldnn._linear_pointwise(two, self.weight_packed, self.bias, "none", [], "")
            return y[:1].reshape(*x.shape[:-1], -1)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight_packed, self.bias, "none", [], "")


def packed(module: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Every `nn.Linear` inside `module` (or `module` itself) replaced by a `PackedLinear` on a CPU."""
    if device.type != "cpu":
        return module
    if isinstance(module, nn.Linear):
        return PackedLinear(module, dtype)
    for name, child in list(module.named_children()):
        setattr(module, name, packed(child, dtype, device))
    return module


def weights_version(sm) -> tuple:
    """Changes whenever a parameter of `sm` (or its per-exit heads) is replaced or modified in place."""
    params = list(sm.model.parameters())
    for norm, head in (sm.exit_heads or {}).values():
        params += list(norm.parameters()) + list(head.parameters())
    return tuple((p.data_ptr(), p._version) for p in params)


@dataclass
class Columns:
    """What one forward over new tokens needs besides the hidden states: the batch's padding mask over every column
    (new ones included; None = no padding), the new tokens' position ids [B, n], and the cache."""

    mask: torch.Tensor | None
    positions: torch.Tensor
    cache: KVCache


class Runtime:
    """Decode-time copy of a `SortedModel`: `embed`, `run(h, a, b, cols)`, `logits(h, k)`."""

    def __init__(self, sm, dtype: str = "auto"):
        source = unwrap(sm.model)
        device = next(source.parameters()).device
        self.sm, self.device = sm, device
        self.dtype = resolve_dtype(dtype, device)
        model = copy.deepcopy(source)
        if hasattr(model, "merge_and_unload"):  # a peft LoRA adapter decodes merged
            model = model.merge_and_unload()
        model = model.to(self.dtype).eval().requires_grad_(False)
        model.config._attn_implementation = attention.NAME
        self.arch = Architecture(model)
        for layer in self.arch.layers:
            packed(layer, self.dtype, device)
        self.heads: dict[int, tuple[nn.Module, nn.Module]] = {}
        shared = (self.arch.norm, packed(copy.copy(self.arch.head), self.dtype, device))
        for k in range(1, self.arch.num_layers + 1):
            self.heads[k] = shared
        for k, (norm, head) in (sm.exit_heads or {}).items():  # ICT: exit k's own norm (and head)
            own_head = shared[1] if head is sm.arch.head else packed(copy.deepcopy(head).to(self.dtype), self.dtype,
                                                                     device)
            self.heads[k] = (copy.deepcopy(norm).to(self.dtype), own_head)
        self.model = model
        self.config = model.config
        self.rope_by_type = "layer_type" in inspect.signature(self.arch.base.rotary_emb.forward).parameters
        self.num_layers = self.arch.num_layers
        self.heads_shape = (self.config.num_key_value_heads,
                            getattr(self.config, "head_dim", None)
                            or self.config.hidden_size // self.config.num_attention_heads)

    @classmethod
    def of(cls, sm, dtype: str = "auto") -> "Runtime":
        """The runtime of `sm` for `dtype`, built once and kept while `sm` lives and its weights stay as they were
        (training or editing them in place makes a new copy)."""
        per_model = _RUNTIMES.setdefault(sm, {})
        version = weights_version(sm)
        if dtype not in per_model or per_model[dtype].version != version:
            per_model[dtype] = cls(sm, dtype)
            per_model[dtype].version = version
        return per_model[dtype]

    # -- the two operations ------------------------------------------------------------------------------------

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.arch.embed(ids)

    def run(self, h: torch.Tensor, start: int, end: int, cols: Columns, layers=None, exact: bool = True):
        """Layers start..end-1 (0-based) on the new tokens' hidden states h [B, n, H]; `layers` runs other modules
        in their place (a draft layer's copies). `exact=False` only for prefill (see attention.py)."""
        if start >= end:
            return h
        modules = self.arch.layers[start:end] if layers is None else layers
        rope = {}
        for i in range(start, end):
            kind = self.arch.layer_types[i]
            if kind not in rope:
                rope[kind] = self.rope(h, cols.positions, kind)
        for i, layer in zip(range(start, end), modules):
            h = layer(h, attention_mask=cols.mask, position_embeddings=rope[self.arch.layer_types[i]],
                      position_ids=cols.positions, cache=cols.cache, use_cache=True, exact=exact)
        return h

    def rope(self, h: torch.Tensor, positions: torch.Tensor, kind: str):
        """Rotary (cos, sin) for these positions; per attention type where the model has one per type (Gemma 3)."""
        rotary = self.arch.base.rotary_emb
        return rotary(h, positions, kind) if self.rope_by_type else rotary(h, positions)

    def logits(self, h: torch.Tensor, k: int, head: nn.Module | None = None) -> torch.Tensor:
        """Exit k's logits: its norm, then its head (or `head`, e.g. a restricted draft head), soft-capped as the
        model's own logits are."""
        norm, own = self.heads[k]
        return self.arch.logits(h, norm=norm, head=head if head is not None else own)

    # -- what the strategies need around them ------------------------------------------------------------------

    def new_cache(self, rows: int, capacity: int) -> KVCache:
        heads, dim = self.heads_shape
        return KVCache(rows, heads, dim, capacity, self.dtype, self.device, self.num_layers)

    def restricted_head(self, k: int, ids: torch.Tensor) -> "SubsetHead":
        """Exit k's head over the token ids `ids` only (a draft or screening head), packed like the others."""
        key = (k, ids.data_ptr(), len(ids))
        cache = self.__dict__.setdefault("_restricted", {})
        if key not in cache:
            _, head = self.sm.exit_norm_head(k)
            cache[key] = SubsetHead.of(head, ids, self.dtype, self.device)
        return cache[key]

    def prepare(self, module: nn.Module) -> nn.Module:
        """A copy of `module` (e.g. a draft layer's decoder layers) in this runtime's dtype, weight layout and
        attention."""
        module = copy.deepcopy(module).to(self.dtype).eval().requires_grad_(False)
        for m in module.modules():
            if hasattr(m, "config"):  # the copy's attention modules read their implementation from it
                m.config = self.config
        return packed(module, self.dtype, self.device)


class SubsetHead(nn.Module):
    """A head over a subset of the vocabulary, packed like the runtime's other linears: logits [..., len(ids)];
    `ids` maps a column back to a token id."""

    def __init__(self, rows: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor, vocab_size: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.ids = ids.to(device)
        linear = nn.Linear(rows.shape[1], rows.shape[0], bias=bias is not None, device=device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(rows)
            if bias is not None:
                linear.bias.copy_(bias)
        self.rows = packed(linear, dtype, device)
        self.vocab_size = vocab_size

    @classmethod
    def of(cls, head: nn.Linear, ids: torch.Tensor, dtype: torch.dtype, device: torch.device) -> "SubsetHead":
        """`head`'s rows for the token ids `ids`."""
        ids = ids.to(head.weight.device)
        bias = None if head.bias is None else head.bias.detach()[ids]
        return cls(head.weight.detach()[ids], bias, ids, head.weight.shape[0], dtype, device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.rows(hidden)

    def to_vocab(self, probs: torch.Tensor) -> torch.Tensor:
        """Scatter a distribution over the subset [..., n] into the full vocabulary [..., V]."""
        out = probs.new_zeros(*probs.shape[:-1], self.vocab_size)
        return out.index_copy_(-1, self.ids, probs)
