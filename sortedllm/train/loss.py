"""The SoFT loss: a weighted sum over exits of each exit's next-token cross-entropy, per label token.

    loss = sum_k w_k * CE_k / tokens          CE_k = sum over labelled positions of -log softmax(head(norm(h_k)))[y]

`multi_exit_loss` below is that formula, read top to bottom: pick each exit's hidden state at the labelled
positions, then run the exits that share a head through one tiled linear + cross-entropy call (chunked.py: no
exit's `[tokens x vocab]` logits are ever held). Two things compose around it without changing it:
- per-exit heads (ICT: `exit_heads`): an exit with its own norm and head forms its own group;
- self-distillation (`distill_alpha` a, temperature T): an intermediate exit's term becomes
  `(1 - a) * CE_k + a * T^2 * KL(p_L^T || p_k^T)` with the last layer's detached tempered distribution as the
  teacher, so shallow exits learn to predict what the last layer predicts (what a self-speculative draft needs).
  The last layer joins its group's tiles as the teacher even when its own weight is 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..exit_loss import IGNORE_INDEX, label_positions  # noqa: F401 (IGNORE_INDEX is re-exported for the trainer)
from ..exits import hidden_from_outputs
from .chunked import Head, linear_distill_loss


@dataclass
class ExitLoss:
    loss: torch.Tensor  # the weighted sum over exits, to backpropagate
    per_exit: dict[int, torch.Tensor]  # each exit's mean cross-entropy per label token (detached)
    num_tokens: int
    kl: dict[int, torch.Tensor] = field(default_factory=dict)  # distillation: mean KL(p_L^T || p_k^T) per token


@dataclass
class LossOptions:
    """How the loss is computed: the linear + cross-entropy path and tile size (chunked.py), and distillation."""

    impl: str = "auto"
    chunk_size: int | None = None
    distill_alpha: float = 0.0
    distill_temperature: float = 1.0


def multi_exit_loss(hidden_states, labels: torch.Tensor, weights: dict[int, float], arch, exit_heads=None,
                    num_items_in_batch=None, **options) -> ExitLoss:
    """The SoFT loss from a HF `output_hidden_states=True` forward. `weights`: exit -> loss weight (uniform SoFT
    1/n each, SFT {L: 1}); exits of weight 0 are skipped. Normalised by the label tokens of the whole (accumulated)
    batch when `num_items_in_batch` is given, as transformers' own loss is. `options`: `LossOptions` fields."""
    opts = LossOptions(**options)
    if not 0 <= opts.distill_alpha <= 1:
        raise ValueError(f"distill_alpha must be in [0, 1], got {opts.distill_alpha}")
    L = arch.num_layers
    mask, targets = label_positions(labels)
    n_tokens = int(mask.sum())
    denom = num_items_in_batch if num_items_in_batch is not None else max(n_tokens, 1)
    denom = denom.to(labels.device) if torch.is_tensor(denom) else denom
    terms = loss_terms(weights, L, opts.distill_alpha, exit_heads)  # exit -> (CE weight, KL weight)
    total, ce, kl = None, {}, {}
    for head, group in head_groups(terms, arch, exit_heads):
        xs = torch.stack([exit_state(hidden_states, k, L, mask, arch, exit_heads) for k in group])
        w_ce = torch.tensor([terms[k][0] for k in group], device=labels.device) / denom
        w_kl = torch.tensor([terms[k][1] for k in group], device=labels.device) / denom
        distill = group[-1] == L and any(terms[k][1] for k in group)
        loss, ce_sums, kl_sums = linear_distill_loss(
            xs, Head(head.weight, head.bias, arch.softcap), targets, w_ce,
            (w_kl, opts.distill_temperature) if distill else None, impl=opts.impl, chunk_size=opts.chunk_size)
        total = loss if total is None else total + loss
        ce.update({k: ce_sums[i] / max(n_tokens, 1) for i, k in enumerate(group)})
        if kl_sums is not None:
            kl.update({k: kl_sums[i] / max(n_tokens, 1) for i, k in enumerate(group) if terms[k][1]})
    if total is None:
        raise ValueError("multi_exit_loss needs at least one exit with a non-zero weight")
    return ExitLoss(total, {k: ce[k] for k in weights if k in ce}, n_tokens, {k: kl[k] for k in weights if k in kl})


def loss_terms(weights: dict[int, float], L: int, alpha: float, exit_heads=None) -> dict[int, tuple[float, float]]:
    """Each computed exit's (cross-entropy weight, distillation weight); with distillation the last layer is a
    term too (its CE at its own weight, possibly 0: it is there as the teacher)."""
    students = [k for k, w in weights.items() if w and k != L] if alpha > 0 else []
    if students and exit_heads and any(k in exit_heads for k in students):
        raise ValueError("self-distillation of exits with their own heads (ICT) is not supported")
    terms = {k: (float(w) * (1 - alpha if k in students else 1), float(w) * alpha if k in students else 0.0)
             for k, w in weights.items() if w}
    if students:
        terms.setdefault(L, (float(weights.get(L, 0.0)), 0.0))
    return terms


def head_groups(terms: dict, arch, exit_heads=None) -> list[tuple[torch.nn.Module, list[int]]]:
    """Exits grouped by the head they read through (shared head: one group, the last layer last in it)."""
    groups: dict[int, tuple] = {}
    for k in sorted(terms):
        own = exit_heads is not None and k in exit_heads
        head = exit_heads[k][1] if own else arch.head
        groups.setdefault(id(head), (head, []))[1].append(k)
    return list(groups.values())


def exit_state(hidden_states, k: int, L: int, mask: torch.Tensor, arch, exit_heads=None) -> torch.Tensor:
    """Exit k's normed hidden state at the labelled positions [n, hidden] (the last one comes normed from HF)."""
    h, normed = hidden_from_outputs(hidden_states, k, L)
    own = exit_heads is not None and k in exit_heads
    if normed and own:  # an ICT head replaces the final norm too
        raise ValueError("per-exit heads at the last layer are not supported")
    x = h[:, :-1][mask]
    return x if normed else (exit_heads[k][0] if own else arch.norm)(x)
