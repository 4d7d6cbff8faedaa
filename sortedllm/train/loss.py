"""The SoFT loss: a weighted mean over exits of each exit's next-token cross-entropy.

Exit k's logits are `head(norm(h_k))` with the model's shared norm and head (or per-exit heads for ICT). The head
is applied only at positions whose next-token label is not masked, so prompt and padding positions cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class ExitLoss:
    loss: torch.Tensor  # the weighted sum over exits, to backpropagate
    per_exit: dict[int, torch.Tensor]  # each exit's mean cross-entropy per label token (detached)
    num_tokens: int


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean mask over `[batch, seq-1]` positions that predict a label, and those target ids."""
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    return mask, shifted[mask]


def exit_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, norm, head, softcap=None,
                       normed: bool = False) -> torch.Tensor:
    """Summed cross-entropy of one exit over the selected positions (`hidden` is `[n, hidden]`)."""
    h = hidden if normed else norm(hidden)
    logits = head(h).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def multi_exit_loss(hidden_states, labels: torch.Tensor, weights: dict[int, float], arch, exit_heads=None,
                    num_items_in_batch=None) -> ExitLoss:
    """SoFT loss from a HF `output_hidden_states=True` forward.

    `weights` maps exit layer -> loss weight (uniform SoFT: 1/n each; SFT: {L: 1}). Normalised by the label token
    count of the whole (accumulated) batch when `num_items_in_batch` is given, as transformers' own loss does.
    """
    from ..exits import hidden_from_outputs

    mask, targets = label_positions(labels)
    n_tokens = int(mask.sum())
    denom = num_items_in_batch if num_items_in_batch is not None else max(n_tokens, 1)
    if torch.is_tensor(denom):
        denom = denom.to(labels.device)
    total, per_exit = None, {}
    for k, w in weights.items():
        h, normed = hidden_from_outputs(hidden_states, k, arch.num_layers)
        norm, head = (exit_heads[k] if exit_heads and k in exit_heads else (arch.norm, arch.head))
        if normed and exit_heads and k in exit_heads:  # an ICT head replaces the final norm too
            raise ValueError("per-exit heads at the last layer are not supported")
        ce = exit_cross_entropy(h[:, :-1][mask], targets, norm, head, arch.softcap, normed)
        per_exit[k] = ce.detach() / max(n_tokens, 1)
        total = ce * (w / denom) if total is None else total + ce * (w / denom)
    return ExitLoss(total, per_exit, n_tokens)
