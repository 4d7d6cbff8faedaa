"""Linear + cross-entropy over many exits without ever holding any exit's full `[tokens x vocab]` logits.

All exits that share one head go through one call: the normed hidden states are stacked `[exits, n, hidden]` and
the head runs over tiles of positions, each tile holding every exit's logits for the same positions. Per tile the
loss and its gradients are computed at once; afterwards only `[exits, n]` losses, the `[exits, n, hidden]`
gradient and one `[vocab, hidden]` head gradient (shared by all exits) remain. Because a tile has every exit of the
same positions, self-distillation (each exit's KL to the last exit, whose logits are the last row of the tile and
are treated as a constant teacher) is added per tile too.

Paths (`impl`):
- `cce`: Apple's cut-cross-entropy Triton kernel (CUDA only), chosen by `auto` on a GPU.
- `chunked`: our own autograd function below, chosen by `auto` elsewhere (CPU).
- `trl`: TRL's `ChunkedLogProbFunction` (vocabulary tiles with an online log-sum-exp; torch ops on CPU).
- `dense`: plain `F.cross_entropy` on `[exits x n x vocab]` logits: the reference.

Why our own function on CPU: cut-cross-entropy needs a CUDA driver, its `torch_compile` path materialises the
logits, and TRL's function recomputes the logits in backward (4 head GEMMs instead of 3) and folds vocabulary tiles
with an online log-sum-exp: forward + backward of SmolLM2's head for 8 exits x 600 positions took ~3x ours on this
2-core CPU. Ours computes the gradients in the forward (as Liger's fused linear cross-entropy does), so each tile's
logits are built once.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import SortedError

IMPLS = ("auto", "chunked", "cce", "trl", "dense")
TILE_ELEMENTS = 1 << 25  # logits per tile (128 MB in fp32): big enough for efficient GEMMs, small next to a batch


@functools.cache
def cce_available() -> bool:
    """cut-cross-entropy's kernel: needs the package, Triton and a CUDA device."""
    if not torch.cuda.is_available():
        return False
    try:
        from cut_cross_entropy import linear_cross_entropy  # noqa: F401
        from transformers.utils import is_triton_available
    except ImportError:
        return False
    return is_triton_available()


def resolve_impl(impl: str, device: torch.device, has_bias: bool = False, distill: bool = False) -> str:
    """The concrete path for `impl` on `device` (`auto`: cut-cross-entropy on CUDA, else our chunked function;
    with self-distillation always ours, since the cce and trl kernels only produce the targets' log-probabilities)."""
    if impl not in IMPLS:
        raise SortedError(f"unknown loss_impl '{impl}': use one of {', '.join(IMPLS)}")
    if impl == "auto":
        return "cce" if device.type == "cuda" and cce_available() and not has_bias and not distill else "chunked"
    if distill and impl in ("cce", "trl"):
        raise SortedError(f"loss_impl {impl} cannot compute the self-distillation term (its kernel only yields the "
                          f"targets' log-probabilities); use loss_impl chunked (or auto), or distill_alpha 0")
    if impl == "cce" and not (device.type == "cuda" and cce_available()):
        raise SortedError("loss_impl cce needs a CUDA GPU with Triton and the cut-cross-entropy package "
                          "(pip install cut-cross-entropy); use loss_impl chunked (or auto) on CPU")
    if impl == "cce" and has_bias:
        raise SortedError("loss_impl cce does not support an LM head with a bias; use loss_impl chunked")
    return impl


def default_chunk(vocab: int, exits: int, distill: bool = False) -> int:
    """Positions per tile so that a tile holds about TILE_ELEMENTS logits over all exits (distillation keeps three
    more `[c, vocab]` buffers: the teacher's log-probabilities and probabilities, one student's)."""
    return max(1, TILE_ELEMENTS // (vocab * (exits + 3 * distill)))


def tile_loss(z: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, grad: bool,
              distill: tuple[torch.Tensor, float] | None = None):
    """Cross-entropy `[exits, c]` of one tile of logits `z` `[exits, c, vocab]`, the distillation KL `[exits, c]`
    (or None) and, if `grad`, d(weighted sum)/dz (computed in z's memory).

    `distill` = (`dscale` `[exits]`, T): exit e adds `dscale[e] * T^2 * KL(softmax(z[-1] / T) || softmax(z[e] / T))`,
    the last row being the teacher (a constant: no gradient flows into it from this term, `dscale[-1]` must be 0).
    d/dz[e] of `T^2 * KL` is `T * (softmax(z[e] / T) - softmax(z[-1] / T))`.
    """
    E, c, _ = z.shape
    at_target = (torch.arange(E, device=z.device).view(E, 1), torch.arange(c, device=z.device), targets.view(1, c))
    lse = torch.logsumexp(z, dim=-1)
    ce = lse - z[at_target]
    kl = None
    if distill is not None:
        dscale, T = distill
        logp = torch.log_softmax(z[-1] / T, dim=-1)  # the teacher, read before z's memory becomes the gradient
        p = logp.exp()
        kl = torch.zeros_like(ce)
        students = [e for e in range(E - 1) if dscale[e] != 0]
    if not grad:
        if kl is not None:
            for e in students:
                kl[e] = (p * (logp - torch.log_softmax(z[e] / T, dim=-1))).sum(-1)
        return ce, kl, None
    if kl is None:
        g = z.sub_(lse.unsqueeze(-1)).exp_()  # softmax(z) - onehot(target), times each exit's weight
        g[at_target] -= 1
        return ce, None, g.mul_(scale)
    # Exit by exit, so a student's tempered distribution needs one `[c, vocab]` buffer, not one per exit.
    rows = torch.arange(c, device=z.device)
    for e in range(E):
        d = None
        if e in students:
            logq = torch.log_softmax(z[e] / T, dim=-1)
            kl[e] = (p * (logp - logq)).sum(-1)
            d = logq.exp_().sub_(p).mul_(float(dscale[e]) * T)
        g = z[e].sub_(lse[e].unsqueeze(-1)).exp_()
        g[rows, targets] -= 1
        g.mul_(scale[e])
        if d is not None:
            g.add_(d)
    return ce, kl, z


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """`sum_e w_e * sum_i CE(softcap(hidden[e, i] @ weight.T + bias), targets[i])` over tiles of positions, plus
    with `distill_weights` (`[exits]`, last 0) `sum_e a_e * T^2 * sum_i KL(p_last,i^T || p_e,i^T)` (see tile_loss).

    Returns that weighted sum (differentiable), the per-row cross-entropies `[exits, n]` and KLs `[exits, n]` (empty
    without distillation; neither differentiable).
    Gradients are computed during the forward, tile by tile, and scaled by the incoming gradient in backward; the
    head gradient is only computed when the head is trained (not under LoRA), and none at all under no_grad.
    Matmuls run in the autocast dtype when autocast is on; softmax and accumulators are float32 (float64 inputs
    stay float64).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, exit_weights, softcap, chunk, distill_weights=None,
                temperature=1.0):
        E, n, d = hidden.shape
        device = hidden.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
        acc = torch.promote_types(dtype, torch.float32)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        with torch.autocast(device.type, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            scale = exit_weights.to(device=device, dtype=acc).view(E, 1, 1)
            ce = torch.empty(E, n, dtype=acc, device=device)
            distill = None
            kl = ce.new_empty(0)
            if distill_weights is not None:
                distill = ([float(a) for a in distill_weights], float(temperature))
                kl = torch.empty(E, n, dtype=acc, device=device)
            grad_h = torch.empty(E, n, d, dtype=acc, device=device) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=acc, device=device) if need_w else None
            grad_b = torch.zeros(bias.shape, dtype=acc, device=device) if need_b else None
            for s in range(0, n, chunk):
                c = min(chunk, n - s)
                x = hidden[:, s:s + c].reshape(E * c, d).to(dtype)
                z = x @ w.t() if b is None else torch.addmm(b, x, w.t())
                z = z.to(acc).view(E, c, -1)
                if softcap:
                    t = torch.tanh(z / softcap)
                    z = t * softcap
                ce[:, s:s + c], kl_tile, g = tile_loss(z, targets[s:s + c], scale, need_h or need_w or need_b,
                                                       distill)
                if distill is not None:
                    kl[:, s:s + c] = kl_tile
                if g is None:
                    continue
                if softcap:
                    g.mul_(1 - t * t)
                g = g.view(E * c, -1).to(dtype)
                if need_h:
                    grad_h[:, s:s + c] = (g @ w).view(E, c, d)
                if need_w:
                    if dtype == acc:
                        grad_w.addmm_(g.t(), x)
                    else:
                        grad_w += (g.t() @ x).to(acc)
                if need_b:
                    grad_b += g.sum(0, dtype=acc)
            loss = (ce.sum(1) * scale.view(E)).sum()
            if distill is not None:
                dscale = torch.tensor(distill[0], dtype=acc, device=device)
                loss = loss + distill[1] ** 2 * (kl.sum(1) * dscale).sum()
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        grads = ctx.saved_tensors
        out = [None if g is None else (g * grad_loss.to(g.dtype)).to(dt) for g, dt in zip(grads, ctx.dtypes)]
        return (*out, None, None, None, None, None, None)


class Head(NamedTuple):
    """The linear head the exits read through: its weight, optional bias and the model's logit soft-capping."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float | None = None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         exit_weights: torch.Tensor, *, bias: torch.Tensor | None = None, softcap: float | None = None,
                         impl: str = "auto", chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum over exits of each exit's summed cross-entropy, and the per-exit sums (detached).

    `hidden` is `[exits, n, hidden]` (already normed, only labelled positions), `targets` `[n]`, `exit_weights`
    `[exits]` (loss weight per exit, already divided by the token count). `chunk_size`: positions per tile for
    `chunked`, vocabulary columns per tile for `trl`.
    """
    loss, ce, _ = linear_distill_loss(hidden, Head(weight, bias, softcap), targets, exit_weights, impl=impl,
                                      chunk_size=chunk_size)
    return loss, ce


def linear_distill_loss(hidden: torch.Tensor, head: Head, targets: torch.Tensor, exit_weights: torch.Tensor,
                        distill: tuple[torch.Tensor, float] | None = None, *, impl: str = "auto",
                        chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`linear_cross_entropy` plus self-distillation: with `distill` = (distill_weights, T) the loss adds, per exit
    e, `distill_weights[e] * T^2 * sum_i KL(softmax(z_last,i / T) || softmax(z_e,i / T))`, where the last row of
    `hidden` is the teacher (detached; `distill_weights[-1]` must be 0). Returns (loss, per-exit CE sums, per-exit KL
    sums or None without `distill`), sums detached.
    """
    E, n, _ = hidden.shape
    weight, bias, softcap = head
    distill_weights, temperature = distill if distill is not None else (None, 1.0)
    distill = distill_weights is not None
    if distill:
        distill_weights = torch.as_tensor(distill_weights, device=hidden.device)
        if distill_weights.shape != (E,) or float(distill_weights[-1]) != 0:
            raise ValueError("distill_weights needs one weight per exit and 0 for the last one (the teacher)")
        if not temperature > 0:
            raise ValueError(f"the distillation temperature must be > 0, got {temperature}")
    impl = resolve_impl(impl, hidden.device, bias is not None, distill)
    exit_weights = torch.as_tensor(exit_weights, device=hidden.device)
    if impl == "chunked":
        chunk = chunk_size or default_chunk(weight.shape[0], E, distill)
        loss, ce, kl = ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, exit_weights, softcap, chunk,
                                                       distill_weights, temperature)
        return loss, ce.sum(1).detach(), kl.sum(1).detach() if distill else None
    x = hidden.reshape(E * n, -1)
    tgt = targets.repeat(E)
    kl = None
    if impl == "dense":
        z = F.linear(x, weight, bias)
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        if softcap:
            z = torch.tanh(z / softcap) * softcap
        ce = F.cross_entropy(z, tgt, reduction="none")
        if distill:
            z = z.view(E, n, -1)
            teacher = torch.log_softmax(z[-1].detach() / temperature, -1)
            kl = F.kl_div(torch.log_softmax(z / temperature, -1), teacher.expand_as(z), log_target=True,
                          reduction="none").sum(-1)
    elif impl == "trl":
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        vocab_chunk = chunk_size or 8192
        logp = ChunkedLogProbFunction.apply(x, weight, bias, tgt, 1.0, vocab_chunk, softcap, 1.0, ())[0]
        ce = -logp
    else:  # cce
        from cut_cross_entropy import linear_cross_entropy as cce

        ce = cce(x, weight, tgt, softcap=softcap, reduction="none", impl="cce")
    sums = ce.to(torch.promote_types(ce.dtype, torch.float32)).view(E, n).sum(1)
    loss = (sums * exit_weights.to(sums.dtype)).sum()
    if kl is None:
        return loss, sums.detach(), None
    kl_sums = kl.sum(1)
    loss = loss + temperature ** 2 * (kl_sums * distill_weights.to(kl_sums.dtype)).sum()
    return loss, sums.detach(), kl_sums.detach()
