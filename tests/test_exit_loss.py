"""Evaluation's per-exit cross-entropy (sortedllm/exit_loss.py) is the loss the trainer optimises."""

import torch

from sortedllm.exit_loss import TILE_LOGITS, exit_cross_entropy, label_positions
from sortedllm.train.loss import multi_exit_loss


def test_matches_the_training_loss(tiny_sorted, monkeypatch):
    sm = tiny_sorted
    ids = torch.randint(0, 1000, (2, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    mask, targets = label_positions(labels)
    assert mask.sum() == 2 * 7 and torch.equal(targets, ids[:, 5:].reshape(-1))  # positions 4..10 predict 5..11
    monkeypatch.setattr("sortedllm.exit_loss.TILE_LOGITS", TILE_LOGITS // 10**6)  # several tiles
    with torch.no_grad():
        out = sm.model(input_ids=ids, output_hidden_states=True)
        for k, h in sm.hidden_at_exits(ids).items():
            norm, head = sm.exit_norm_head(k)
            got = exit_cross_entropy(h[:, :-1][mask], targets, norm, head, sm.arch.softcap)
            want = multi_exit_loss(out.hidden_states, labels, {k: 1.0}, sm.arch).per_exit[k] * len(targets)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
