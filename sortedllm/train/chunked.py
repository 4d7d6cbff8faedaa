"""Linear + cross-entropy over many exits without ever holding any exit's full `[tokens x vocab]` logits.

All exits that share one head go through one call: the normed hidden states are stacked `[exits, n, hidden]` and
the head runs over tiles of positions, each tile holding every exit's logits for the same positions. Per tile the
loss and its gradients are computed at once; afterwards only `[exits, n]` losses, the `[exits, n, hidden]`
gradient and one `[vocab, hidden]` head gradient (shared by all exits) remain. Because a tile has every exit of the
same positions, a later term that compares an exit with the last exit (self-distillation) can be added per tile.

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


def resolve_impl(impl: str, device: torch.device, has_bias: bool = False) -> str:
    """The concrete path for `impl` on `device` (`auto`: cut-cross-entropy on CUDA, else our chunked function)."""
    if impl not in IMPLS:
        raise SortedError(f"unknown loss_impl '{impl}': use one of {', '.join(IMPLS)}")
    if impl == "auto":
        return "cce" if device.type == "cuda" and cce_available() and not has_bias else "chunked"
    if impl == "cce" and not (device.type == "cuda" and cce_available()):
        raise SortedError("loss_impl cce needs a CUDA GPU with Triton and the cut-cross-entropy package "
                          "(pip install cut-cross-entropy); use loss_impl chunked (or auto) on CPU")
    if impl == "cce" and has_bias:
        raise SortedError("loss_impl cce does not support an LM head with a bias; use loss_impl chunked")
    return impl


def default_chunk(vocab: int, exits: int) -> int:
    """Positions per tile so that a tile holds about TILE_ELEMENTS logits over all exits."""
    return max(1, TILE_ELEMENTS // (vocab * exits))


def tile_loss(z: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, grad: bool):
    """Cross-entropy `[exits, c]` of one tile of logits `z` `[exits, c, vocab]` and, if `grad`, d(weighted sum)/dz
    (computed in z's memory). A per-exit term against the last exit's logits `z[-1]` (e.g. self-distillation's KL,
    with the last exit detached) would add its value and gradient here: every exit of a position is in the tile."""
    E, c, _ = z.shape
    at_target = (torch.arange(E, device=z.device).view(E, 1), torch.arange(c, device=z.device), targets.view(1, c))
    lse = torch.logsumexp(z, dim=-1)
    ce = lse - z[at_target]
    if not grad:
        return ce, None
    g = z.sub_(lse.unsqueeze(-1)).exp_()  # softmax(z) - onehot(target), times each exit's weight
    g[at_target] -= 1
    return ce, g.mul_(scale)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """`sum_e w_e * sum_i CE(softcap(hidden[e, i] @ weight.T + bias), targets[i])` over tiles of positions.

    Returns that weighted sum (differentiable) and the per-row cross-entropies `[exits, n]` (not differentiable).
    Gradients are computed during the forward, tile by tile, and scaled by the incoming gradient in backward; the
    head gradient is only computed when the head is trained (not under LoRA), and none at all under no_grad.
    Matmuls run in the autocast dtype when autocast is on; softmax and accumulators are float32 (float64 inputs
    stay float64).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, exit_weights, softcap, chunk):
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
                ce[:, s:s + c], g = tile_loss(z, targets[s:s + c], scale, need_h or need_w or need_b)
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
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(ce)
        return loss, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce):
        grads = ctx.saved_tensors
        out = [None if g is None else (g * grad_loss.to(g.dtype)).to(dt) for g, dt in zip(grads, ctx.dtypes)]
        return (*out, None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         exit_weights: torch.Tensor, *, bias: torch.Tensor | None = None, softcap: float | None = None,
                         impl: str = "auto", chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum over exits of each exit's summed cross-entropy, and the per-exit sums (detached).

    `hidden` is `[exits, n, hidden]` (already normed, only labelled positions), `targets` `[n]`, `exit_weights`
    `[exits]` (loss weight per exit, already divided by the token count). `chunk_size`: positions per tile for
    `chunked`, vocabulary columns per tile for `trl`.
    """
    E, n, _ = hidden.shape
    impl = resolve_impl(impl, hidden.device, bias is not None)
    exit_weights = torch.as_tensor(exit_weights, device=hidden.device)
    if impl == "chunked":
        chunk = chunk_size or default_chunk(weight.shape[0], E)
        loss, ce = ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, exit_weights, softcap, chunk)
        return loss, ce.sum(1).detach()
    x = hidden.reshape(E * n, -1)
    tgt = targets.repeat(E)
    if impl == "dense":
        z = F.linear(x, weight, bias)
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        if softcap:
            z = torch.tanh(z / softcap) * softcap
        ce = F.cross_entropy(z, tgt, reduction="none")
    elif impl == "trl":
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        vocab_chunk = chunk_size or 8192
        logp = ChunkedLogProbFunction.apply(x, weight, bias, tgt, 1.0, vocab_chunk, softcap, 1.0, ())[0]
        ce = -logp
    else:  # cce
        from cut_cross_entropy import linear_cross_entropy as cce

        ce = cce(x, weight, tgt, softcap=softcap, reduction="none", impl="cce")
    sums = ce.to(torch.promote_types(ce.dtype, torch.float32)).view(E, n).sum(1)
    return (sums * exit_weights.to(sums.dtype)).sum(), sums.detach()
