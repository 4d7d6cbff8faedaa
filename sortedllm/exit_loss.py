"""Per-exit next-token cross-entropy for evaluation: which positions carry a label, and one exit's summed loss
over them, in tiles of positions so no `[tokens x vocab]` logits are held at once.

Training computes the same quantity through its own tiled autograd function (train/chunked.py), which also
produces gradients and several exits per tile; evaluation needs neither, so this is plain torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
TILE_LOGITS = 1 << 24  # logits per tile (64 MB in float32)


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean mask over `[batch, seq-1]` positions that predict a label, and those target ids."""
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    return mask, shifted[mask]


def exit_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, norm, head, softcap: float | None = None,
                       normed: bool = False) -> torch.Tensor:
    """Summed cross-entropy (float32) of one exit over the selected positions (`hidden` is `[n, hidden]`): the
    exit's norm (unless `normed`), its head and the model's logit soft-capping, a tile of positions at a time."""
    return position_cross_entropy(hidden, targets, norm, head, softcap, normed).sum()


def position_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, norm, head, softcap: float | None = None,
                           normed: bool = False) -> torch.Tensor:
    """`exit_cross_entropy` per position: [n] float32."""
    h = hidden if normed else norm(hidden)
    rows = max(1, TILE_LOGITS // head.weight.shape[0])
    parts = []
    for i in range(0, h.shape[0], rows):
        z = F.linear(h[i:i + rows], head.weight, head.bias).float()
        if softcap:
            z = torch.tanh(z / softcap) * softcap
        parts.append(F.cross_entropy(z, targets[i:i + rows], reduction="none"))
    return torch.cat(parts) if parts else torch.zeros(0, device=h.device)
