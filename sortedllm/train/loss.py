"""The SoFT loss: a weighted mean over exits of each exit's next-token cross-entropy, optionally with
self-distillation: each intermediate exit's term becomes `(1 - alpha) * CE + alpha * T^2 * KL(p_L^T || p_k^T)`, the
last layer's (detached) tempered distribution as the teacher, so shallow exits learn to predict what the last layer
predicts (what a self-speculative draft needs), not only the data. The last exit keeps plain CE.

Exit k's logits are `head(norm(h_k))` with the model's shared norm and head (or per-exit heads for ICT). The norm
and head are applied only at positions whose next-token label is not masked, so prompt and padding positions cost
nothing, and the head and cross-entropy run in tiles (chunked.py), so no exit's full logits are ever held.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .chunked import linear_cross_entropy, linear_distill_loss

IGNORE_INDEX = -100


@dataclass
class ExitLoss:
    loss: torch.Tensor  # the weighted sum over exits, to backpropagate
    per_exit: dict[int, torch.Tensor]  # each exit's mean cross-entropy per label token (detached)
    num_tokens: int
    kl: dict[int, torch.Tensor] = field(default_factory=dict)  # distillation: mean KL(p_L^T || p_k^T) per token


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean mask over `[batch, seq-1]` positions that predict a label, and those target ids."""
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    return mask, shifted[mask]


def exit_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, norm, head, softcap=None,
                       normed: bool = False, impl: str = "auto", chunk_size: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of one exit over the selected positions (`hidden` is `[n, hidden]`), in tiles."""
    h = hidden if normed else norm(hidden)
    one = torch.ones(1, device=h.device)
    return linear_cross_entropy(h.unsqueeze(0), head.weight, targets, one, bias=head.bias, softcap=softcap,
                                impl=impl, chunk_size=chunk_size)[0]


def multi_exit_loss(hidden_states, labels: torch.Tensor, weights: dict[int, float], arch, exit_heads=None,
                    num_items_in_batch=None, impl: str = "auto", chunk_size: int | None = None,
                    distill_alpha: float = 0.0, distill_temperature: float = 1.0) -> ExitLoss:
    """SoFT loss from a HF `output_hidden_states=True` forward.

    `weights` maps exit layer -> loss weight (uniform SoFT: 1/n each; SFT: {L: 1}); exits of weight 0 are skipped.
    Normalised by the label token count of the whole (accumulated) batch when `num_items_in_batch` is given, as
    transformers' own loss does. The exits that share a head go through one `linear_cross_entropy` call (`impl`,
    `chunk_size`: see chunked.py), which never holds an exit's full `[tokens x vocab]` logits.

    `distill_alpha` > 0 mixes in self-distillation (module doc) for every intermediate exit with a weight; the last
    layer joins the tile as the teacher even when its own weight is 0 (its CE then does not count). Exits with their
    own heads (ICT) cannot be distilled here: their tiles do not hold the last layer's logits.
    """
    from ..exits import hidden_from_outputs

    L = arch.num_layers
    if not 0 <= distill_alpha <= 1:
        raise ValueError(f"distill_alpha must be in [0, 1], got {distill_alpha}")
    students = [k for k, w in weights.items() if w != 0 and k != L] if distill_alpha > 0 else []
    if students and exit_heads and any(k in exit_heads for k in students):
        raise ValueError("self-distillation of exits with their own heads (ICT) is not supported")
    mask, targets = label_positions(labels)
    n_tokens = int(mask.sum())
    denom = num_items_in_batch if num_items_in_batch is not None else max(n_tokens, 1)
    if torch.is_tensor(denom):
        denom = denom.to(labels.device)
    groups: dict[int, tuple] = {}  # id(head) -> (norm-less head, [exits], [normed hidden at labelled positions])
    chosen = sorted(k for k, w in weights.items() if w != 0 or (k == L and students))
    if students and L not in chosen:
        chosen.append(L)  # the teacher, last in its tile
    for k in chosen:
        h, normed = hidden_from_outputs(hidden_states, k, L)
        own = exit_heads is not None and k in exit_heads
        if normed and own:  # an ICT head replaces the final norm too
            raise ValueError("per-exit heads at the last layer are not supported")
        norm, head = exit_heads[k] if own else (arch.norm, arch.head)
        x = h[:, :-1][mask]
        groups.setdefault(id(head), (head, [], []))
        groups[id(head)][1].append(k)
        groups[id(head)][2].append(x if normed else norm(x))
    total, per_exit, kl = None, {}, {}
    for head, exits, xs in groups.values():
        distill = bool(students) and exits[-1] == L and any(k in students for k in exits)
        ce_w = [float(weights.get(k, 0.0)) * (1 - distill_alpha if distill and k != L else 1) for k in exits]
        exit_weights = torch.tensor(ce_w, device=labels.device) / denom
        distill_weights = None
        if distill:
            distill_weights = torch.tensor([float(weights.get(k, 0.0)) * distill_alpha if k != L else 0.0
                                            for k in exits], device=labels.device) / denom
        loss, sums, kl_sums = linear_distill_loss(torch.stack(xs), head.weight, targets, exit_weights,
                                                  distill_weights, distill_temperature, bias=head.bias,
                                                  softcap=arch.softcap, impl=impl, chunk_size=chunk_size)
        total = loss if total is None else total + loss
        per_exit.update({k: sums[i] / max(n_tokens, 1) for i, k in enumerate(exits)})
        if kl_sums is not None:
            kl.update({k: kl_sums[i] / max(n_tokens, 1) for i, k in enumerate(exits) if k != L})
    if total is None:
        raise ValueError("multi_exit_loss needs at least one exit with a non-zero weight")
    return ExitLoss(total, {k: per_exit[k] for k in weights if k in per_exit}, n_tokens,
                    {k: kl[k] for k in weights if k in kl})
