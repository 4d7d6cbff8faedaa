import torch
import torch.nn.functional as F

from sortedllm.train.loss import multi_exit_loss


def batch(vocab=1000, b=3, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # prompt
    labels[1, 12:] = -100  # padding
    return ids, labels


def naive(sm, ids, labels, exits):
    """Full logits at every exit and F.cross_entropy: what the SoFT loss means."""
    hs = sm.hidden_at_exits(ids, exits=exits)
    losses = {k: F.cross_entropy(sm.exit_logits(hs[k], k)[:, :-1].reshape(-1, sm.model.config.vocab_size).float(),
                                 labels[:, 1:].reshape(-1), ignore_index=-100) for k in exits}
    return sum(losses.values()) / len(exits), losses


def test_soft_loss_equals_naive_loop_over_exits(tiny_sorted):
    sm = tiny_sorted
    ids, labels = batch()
    out = sm.model(ids, output_hidden_states=True)
    res = multi_exit_loss(out.hidden_states, labels, {k: 1 / 3 for k in sm.exits}, sm.arch)
    expected, per_exit = naive(sm, ids, labels, sm.exits)
    torch.testing.assert_close(res.loss, expected, atol=1e-5, rtol=1e-5)
    for k in sm.exits:
        torch.testing.assert_close(res.per_exit[k], per_exit[k], atol=1e-5, rtol=1e-5)


def test_sft_mode_equals_models_own_labels_loss(tiny_sorted):
    sm = tiny_sorted
    ids, labels = batch(seed=1)
    out = sm.model(ids, labels=labels, output_hidden_states=True)
    res = multi_exit_loss(out.hidden_states, labels, {sm.num_layers: 1.0}, sm.arch)
    torch.testing.assert_close(res.loss, out.loss, atol=1e-5, rtol=1e-5)


def test_gradients_match_naive(tiny_sorted):
    sm = tiny_sorted
    ids, labels = batch(seed=2)
    out = sm.model(ids, output_hidden_states=True)
    multi_exit_loss(out.hidden_states, labels, {k: 1 / 3 for k in sm.exits}, sm.arch).loss.backward()
    ours = {n: p.grad.clone() for n, p in sm.model.named_parameters() if p.grad is not None}
    sm.model.zero_grad()
    naive(sm, ids, labels, sm.exits)[0].backward()
    for n, p in sm.model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ours[n], p.grad, atol=1e-5, rtol=1e-4)
