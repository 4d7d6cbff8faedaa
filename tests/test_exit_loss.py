"""Evaluation's per-exit cross-entropy (sortedllm/exit_loss.py) is the loss the trainer optimises."""

import torch

from sortedllm.exit_loss import TILE_LOGITS, exit_cross_entropy, label_positions
from sortedllm.train import loss as train_loss


def test_matches_the_training_loss(tiny_sorted, monkeypatch):
    sm = tiny_sorted
    ids = torch.randint(0, 1000, (2, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    mask, targets = label_positions(labels)
    want_mask, want_targets = train_loss.label_positions(labels)
    assert torch.equal(mask, want_mask) and torch.equal(targets, want_targets)
    monkeypatch.setattr("sortedllm.exit_loss.TILE_LOGITS", TILE_LOGITS // 10**6)  # several tiles
    with torch.no_grad():
        for k, h in sm.hidden_at_exits(ids).items():
            norm, head = sm.exit_norm_head(k)
            x = h[:, :-1][mask]
            got = exit_cross_entropy(x, targets, norm, head, sm.arch.softcap)
            want = train_loss.exit_cross_entropy(x, targets, norm, head, sm.arch.softcap)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
