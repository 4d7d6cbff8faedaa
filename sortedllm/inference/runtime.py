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


# oneDNN's bfloat16 products of 3-6 rows run faster here than those of 1 or 2 (SmolLM2's 30 layers' products: 17 ms
# at 2 rows, 13 ms at 4, 15 ms at 1; `sortedllm bench kernels` shows the LM head's "unpadded oneDNN" row), and row i
# of a product is the same number for every row count >= 2, while a one-row product now and then sums in another
# order. So every product of fewer rows runs padded to MIN_ROWS: faster, and a one-token step computes bitwise what
# a verify step of several tokens does.
MIN_ROWS = 4


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] times a weight packed by `mkldnn._reorder_linear_weight`, fewer than MIN_ROWS rows padded."""
    rows = x.numel() // x.shape[-1]
    if rows >= MIN_ROWS:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    pad = x.new_zeros(MIN_ROWS, x.shape[-1])
    pad[:rows] = x.reshape(rows, -1)
    y = torch.ops.mkldnn._linear_pointwise(pad, weight, bias, "none", [], "")
    return y[:rows].reshape(*x.shape[:-1], -1)


class PackedLinear(nn.Module):
    """`nn.Linear` with its weight reordered once for oneDNN (CPU); the same products, computed faster."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        w = linear.weight.detach().to(dtype).contiguous()
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.weight_packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight_packed, self.bias)


class FusedLinears(nn.Module):
    """Sibling linears that read the same input (q/k/v, gate/up) as one packed product: one call instead of three
    (or two) and a wider product, ~10% less time in the layers' products here. The model's own code still calls
    each sibling; the first call computes every sibling's output and the others read their columns of it."""

    def __init__(self, linears: list[nn.Linear], dtype: torch.dtype):
        super().__init__()
        self.whole = PackedLinear(_concatenated(linears), dtype)
        bounds = [0]
        for lin in linears:
            bounds.append(bounds[-1] + lin.out_features)
        self.bounds = bounds
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, output) of the latest product

    def part(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.last is None or self.last[0] is not x:
            self.last = (x, self.whole(x))
        y = self.last[1][..., self.bounds[i]:self.bounds[i + 1]]
        if i == len(self.bounds) - 2:
            self.last = None  # the last sibling read its part: let go of the tensors
        return y


class FusedPart(nn.Module):
    """Sibling i of a `FusedLinears` group, in the place of the `nn.Linear` it replaces."""

    def __init__(self, group: FusedLinears, i: int):
        super().__init__()
        self.i = i
        self.group = [group]  # a list, so the group is not registered once per sibling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group[0].part(self.i, x)


def _concatenated(linears: list[nn.Linear]) -> nn.Linear:
    out = nn.Linear(linears[0].in_features, sum(lin.out_features for lin in linears),
                    bias=linears[0].bias is not None, dtype=linears[0].weight.dtype)
    with torch.no_grad():
        out.weight.copy_(torch.cat([lin.weight for lin in linears]))
        if out.bias is not None:
            out.bias.copy_(torch.cat([lin.bias for lin in linears]))
    return out


SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # Llama, Gemma, Qwen, Mistral naming


def _fuse_siblings(module: nn.Module, dtype: torch.dtype) -> None:
    """Replace each group of SIBLINGS among `module`'s own children by the parts of one `FusedLinears`."""
    for names in SIBLINGS:
        linears = [getattr(module, n, None) for n in names]
        if not all(isinstance(lin, nn.Linear) for lin in linears):
            continue
        if len({lin.in_features for lin in linears}) > 1 or len({lin.bias is None for lin in linears}) > 1:
            continue
        group = FusedLinears(linears, dtype)
        module.add_module("fused_" + "_".join(n.split("_")[0] for n in names), group)
        for i, n in enumerate(names):
            setattr(module, n, FusedPart(group, i))


def packed(module: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Every `nn.Linear` inside `module` (or `module` itself) replaced by a `PackedLinear` on a CPU, sibling
    projections fused."""
    if device.type != "cpu":
        return module
    if isinstance(module, nn.Linear):
        return PackedLinear(module, dtype)
    _fuse_siblings(module, dtype)
    for name, child in list(module.named_children()):
        if not isinstance(child, (FusedLinears, FusedPart)):
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
        """Float32 keys and values on a CPU: attention's one-query products run faster in float32 there
        (attention.py)."""
        heads, dim = self.heads_shape
        dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        return KVCache(rows, heads, dim, capacity, dtype, self.device, self.num_layers)

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
