"""Self-distillation in the multi-exit loss: `(1 - a) * CE + a * T^2 * KL(p_last^T || p_exit^T)` per intermediate
exit, the last layer detached, against a naive full-logits implementation (values and gradients), on the tiled
path and the dense reference, on tiny models of every architecture; config errors; the trainer's logging."""

import pytest
import torch
import torch.nn.functional as F

from sortedllm.errors import SortedError
from sortedllm.train.chunked import Head, linear_distill_loss
from sortedllm.train.loss import multi_exit_loss

from test_chunked import LargestTensor, problem
from test_loss import batch, grads


def reference(h, W, b, t, w, a, T, softcap=None):
    """Full logits of every exit; CE weighted by w, KL to the detached last row weighted by a * T^2."""
    z = h @ W.T + (b if b is not None else 0)
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    ce = F.cross_entropy(z.reshape(-1, z.shape[-1]), t.repeat(h.shape[0]), reduction="none").view(h.shape[:2])
    teacher = torch.softmax(z[-1].detach() / T, -1)
    kl = torch.stack([(teacher * (teacher.log() - torch.log_softmax(z[e] / T, -1))).sum(-1)
                      for e in range(h.shape[0])])
    return (ce.sum(1) * w).sum() + T * T * (kl.sum(1) * a).sum(), ce.sum(1), kl.sum(1)


def distill_problem(E=3, **kw):
    h, W, b, t, w = problem(E=E, **kw)
    a = torch.linspace(0.2, 0.7, E, dtype=h.dtype)
    a[-1] = 0
    return h, W, b, t, w, a


@pytest.mark.parametrize("T, softcap, bias, chunk", [(1.0, None, False, 3), (2.0, 3.0, True, 2), (0.5, None, True, 100),
                                                     (2.0, None, False, 1)])
def test_tiled_distillation_matches_reference_and_passes_gradcheck(T, softcap, bias, chunk):
    h, W, b, t, w, a = distill_problem(bias=bias)
    loss, ce, kl = linear_distill_loss(h, Head(W, b, softcap), t, w, (a, T), impl="chunked", chunk_size=chunk)
    ref, ref_ce, ref_kl = reference(h, W, b, t, w, a, T, softcap)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kl[:-1], ref_kl[:-1], rtol=1e-10, atol=1e-12)
    dense = linear_distill_loss(h, Head(W, b, softcap), t, w, (a, T), impl="dense")
    torch.testing.assert_close(dense[0], ref, rtol=1e-12, atol=1e-12)
    inputs = (h, W) + ((b,) if bias else ())
    g_ours = torch.autograd.grad(loss, inputs)
    g_ref = torch.autograd.grad(ref, inputs)
    for x, y in zip(g_ours, g_ref):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)

    # Numerically, the teacher is only constant when neither its hidden state nor the head moves: gradcheck the
    # students' rows (the head's gradient, which skips the teacher's path, is checked against autograd above).
    teacher, W0, b0 = h[-1:].detach(), W.detach(), b.detach() if bias else None

    def f(students):
        return linear_distill_loss(torch.cat([students, teacher]), Head(W0, b0, softcap), t, w, (a, T),
                                   impl="chunked", chunk_size=chunk)[0]

    assert torch.autograd.gradcheck(f, (h[:-1].detach().requires_grad_(),))


def test_teacher_row_gets_only_its_cross_entropy_gradient():
    """The last row is a constant teacher: its gradient is the same with or without the distillation term."""
    h, W, b, t, w, a = distill_problem()
    with_kd = torch.autograd.grad(linear_distill_loss(h, Head(W), t, w, (a, 2.0), impl="chunked", chunk_size=3)[0], h)[0]
    plain = torch.autograd.grad(linear_distill_loss(h, Head(W), t, w, impl="chunked", chunk_size=3)[0], h)[0]
    torch.testing.assert_close(with_kd[-1], plain[-1], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(with_kd[0], plain[0])


def test_distillation_never_holds_the_full_logits():
    E, n, d, V = 4, 512, 16, 4096
    h, W, _, t, w, a = distill_problem(E, n=n, d=d, V=V, dtype=torch.float32)
    with LargestTensor() as mode:
        linear_distill_loss(h, Head(W), t, w, (a, 2.0), impl="chunked", chunk_size=64)[0].backward()
    assert mode.largest <= n * V // 2, mode.largest


def test_distillation_is_refused_by_kernels_that_cannot_compute_it():
    h, W, b, t, w, a = distill_problem()
    with pytest.raises(SortedError, match="loss_impl trl cannot compute the self-distillation term"):
        linear_distill_loss(h, Head(W), t, w, (a, 1.0), impl="trl")
    with pytest.raises(ValueError, match="0 for the last one"):
        linear_distill_loss(h, Head(W), t, w, (torch.ones(3, dtype=h.dtype), 1.0), impl="chunked")


# -- the multi-exit loss on tiny models ------------------------------------------------------------------------


def naive(sm, ids, labels, weights, alpha, T):
    """What the loss means, written plainly: full logits at every exit, F.cross_entropy and F.kl_div."""
    L = sm.num_layers
    hs = sm.hidden_at_exits(ids, exits=sorted(set(weights) | {L}))
    mask = labels[:, 1:] != -100
    targets = labels[:, 1:][mask]
    logits = {k: sm.exit_logits(h, k)[:, :-1][mask].float() for k, h in hs.items()}
    teacher = torch.log_softmax(logits[L].detach() / T, -1)
    total, kls = 0, {}
    for k, w in weights.items():
        ce = F.cross_entropy(logits[k], targets)
        if k == L or w == 0:
            total = total + w * ce
            continue
        kls[k] = F.kl_div(torch.log_softmax(logits[k] / T, -1), teacher, log_target=True, reduction="batchmean")
        total = total + w * ((1 - alpha) * ce + alpha * T * T * kls[k])
    return total, kls


CASES = [("llama", "chunked", 0.5, 1.0), ("llama", "dense", 0.9, 2.0), ("qwen2", "chunked", 0.9, 2.0),
         ("gemma3_text", "chunked", 0.5, 2.0)]


@pytest.mark.parametrize("arch_name, impl, alpha, T", CASES)
def test_multi_exit_distillation_matches_naive_values_and_gradients(tiny_sorted, impl, alpha, T):
    sm = tiny_sorted
    ids, labels = batch(seed=3)
    weights = {2: 0.5, 4: 0.2, 6: 0.3}
    out = sm.model(ids, output_hidden_states=True)
    res = multi_exit_loss(out.hidden_states, labels, weights, sm.arch, impl=impl, distill_alpha=alpha,
                          distill_temperature=T)
    res.loss.backward()
    ours = grads(sm.model)
    sm.model.zero_grad()
    expected, kls = naive(sm, ids, labels, weights, alpha, T)
    expected.backward()
    ref = grads(sm.model)
    torch.testing.assert_close(res.loss, expected, atol=1e-5, rtol=1e-5)
    assert set(res.kl) == {2, 4}
    for k in (2, 4):
        torch.testing.assert_close(res.kl[k], kls[k], atol=1e-5, rtol=1e-5)
    assert ours.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(ours[n], ref[n], atol=1e-5, rtol=1e-4)


def test_teacher_joins_even_when_its_own_weight_is_zero(tiny_sorted):
    """A schedule that leaves the last exit out (weights 0) still distils against it; its CE does not count."""
    sm = tiny_sorted
    ids, labels = batch(seed=4)
    weights = {2: 0.6, 4: 0.4, 6: 0.0}
    out = sm.model(ids, output_hidden_states=True)
    res = multi_exit_loss(out.hidden_states, labels, weights, sm.arch, distill_alpha=0.7, distill_temperature=1.5)
    torch.testing.assert_close(res.loss, naive(sm, ids, labels, weights, 0.7, 1.5)[0], atol=1e-5, rtol=1e-5)


def test_alpha_zero_is_the_paper_loss(tiny_sorted):
    sm = tiny_sorted
    ids, labels = batch(seed=5)
    weights = {k: 1 / 3 for k in sm.exits}
    out = sm.model(ids, output_hidden_states=True)
    plain = multi_exit_loss(out.hidden_states, labels, weights, sm.arch)
    zero = multi_exit_loss(out.hidden_states, labels, weights, sm.arch, distill_alpha=0.0, distill_temperature=3.0)
    torch.testing.assert_close(plain.loss, zero.loss, rtol=0, atol=0)
    assert zero.kl == {}


# -- configuration and trainer ---------------------------------------------------------------------------------


def test_config_rejects_distillation_it_cannot_do(tmp_path):
    from sortedllm.train.trainer import SoFTConfig

    out = str(tmp_path)
    with pytest.raises(SortedError, match="distill_alpha must be between 0 and 1"):
        SoFTConfig(output_dir=out, distill_alpha=1.5)
    with pytest.raises(SortedError, match="distill_temperature must be > 0"):
        SoFTConfig(output_dir=out, distill_alpha=0.5, distill_temperature=0)
    with pytest.raises(SortedError, match="needs mode soft.*nothing to distill"):
        SoFTConfig(output_dir=out, distill_alpha=0.5, mode="sft")
    with pytest.raises(SortedError, match="loss_impl trl cannot compute"):
        SoFTConfig(output_dir=out, distill_alpha=0.5, loss_impl="trl")
    assert SoFTConfig(output_dir=out, mode="sft").distill_alpha == 0  # the default is the paper's SoFT


@pytest.mark.parametrize("arch_name", ["llama"])
def test_trainer_distillation_logs_kl_and_records_its_settings(tiny, tmp_path):
    """The distilled run logs kl_exit_<k> for intermediate exits only and records its settings in
    sorted_config.json; the paper's SoFT (alpha 0) logs none. (That descending the term pulls an exit to the last
    layer is the next test; on the default model it is the draft-quality experiment.)"""
    from sortedllm.data import encode_dataset, load_examples
    from sortedllm.train.trainer import SoFTConfig, SoFTTrainer

    model, tok = tiny
    ds = encode_dataset(tok, load_examples("gsm8k", limit=16), 96)
    for alpha in (0.0, 0.9):
        args = SoFTConfig(output_dir=str(tmp_path / f"a{alpha}"), max_steps=3, per_device_train_batch_size=4,
                          logging_steps=1, save_strategy="no", max_length=96, seed=0, disable_tqdm=True,
                          exits="2,4,6", distill_alpha=alpha, distill_temperature=2.0, report_to="none")
        trainer = SoFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss_exit_6" in h]
        assert len(logs) == 3
        if alpha:
            assert all(h["kl_exit_2"] > 0 and "kl_exit_4" in h and "kl_exit_6" not in h for h in logs)
            assert trainer.sorted_config.extra["distill"] == {"alpha": 0.9, "temperature": 2.0}
        else:
            assert not any(k.startswith("kl_exit") for h in logs for k in h)
            assert "distill" not in trainer.sorted_config.extra


def test_distillation_steps_pull_a_shallow_exit_toward_the_last_layer(tiny_sorted):
    """Descending the distillation term moves exit 2's next-token distribution to the last layer's (the sign and
    the teacher's detachment are right end to end), on a model whose deeper layers first make the two disagree."""
    sm = tiny_sorted
    with torch.no_grad():
        for layer in sm.model.model.layers[2:]:
            layer.mlp.down_proj.weight.mul_(30)
    ids, labels = batch(seed=6)

    def gap():
        with torch.no_grad():
            z = sm.logits_at_exits(ids, exits=[2, 6])
        kl = F.kl_div(z[2].log_softmax(-1), z[6].log_softmax(-1), log_target=True, reduction="none").sum(-1)
        return kl.mean().item(), (z[2].argmax(-1) == z[6].argmax(-1)).float().mean().item()

    kl0, agree0 = gap()
    opt = torch.optim.Adam(sm.model.model.layers[:2].parameters(), lr=3e-3)
    for _ in range(30):
        out = sm.model(ids, output_hidden_states=True)
        multi_exit_loss(out.hidden_states, labels, {2: 1.0, 6: 0.0}, sm.arch, distill_alpha=1.0).loss.backward()
        opt.step()
        opt.zero_grad()
    kl1, agree1 = gap()
    print(kl0, agree0, kl1, agree1)
    assert kl1 < 0.5 * kl0 and agree1 > agree0, (kl0, agree0, kl1, agree1)
