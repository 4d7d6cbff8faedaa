"""The multi-exit loss on tiny real-architecture models against the naive loss (full logits at every exit), for
every loss path, and with gradient checkpointing, gradient accumulation, bf16 autocast, LoRA and per-exit heads."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sortedllm.train.chunked import cce_available
from sortedllm.train.loss import multi_exit_loss

# Our chunked path on every architecture; TRL's on the soft-capped one; the dense reference on one.
ARCH_IMPLS = [("llama", "chunked"), ("qwen2", "chunked"), ("gemma3_text", "chunked"), ("gemma3_text", "trl"),
              ("llama", "dense")]


def batch(vocab=1000, b=3, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # prompt
    labels[1, 12:] = -100  # padding
    return ids, labels


def naive(sm, ids, labels, exits, weights=None):
    """Full logits at every exit and F.cross_entropy: what the SoFT loss means."""
    hs = sm.hidden_at_exits(ids, exits=exits)
    losses = {k: F.cross_entropy(sm.exit_logits(hs[k], k)[:, :-1].reshape(-1, sm.model.config.vocab_size).float(),
                                 labels[:, 1:].reshape(-1), ignore_index=-100) for k in exits}
    weights = weights or {k: 1 / len(exits) for k in exits}
    return sum(weights[k] * losses[k] for k in exits), losses


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch_name, impl", ARCH_IMPLS)
def test_soft_loss_equals_naive_loop_over_exits(tiny_sorted, impl):
    sm = tiny_sorted
    ids, labels = batch()
    out = sm.model(ids, output_hidden_states=True)
    res = multi_exit_loss(out.hidden_states, labels, {k: 1 / 3 for k in sm.exits}, sm.arch, impl=impl)
    expected, per_exit = naive(sm, ids, labels, sm.exits)
    torch.testing.assert_close(res.loss, expected, atol=1e-5, rtol=1e-5)
    for k in sm.exits:
        torch.testing.assert_close(res.per_exit[k], per_exit[k], atol=1e-5, rtol=1e-5)
    assert res.num_tokens == int((labels[:, 1:] != -100).sum())


def test_sft_mode_equals_models_own_labels_loss(tiny_sorted):
    sm = tiny_sorted
    ids, labels = batch(seed=1)
    out = sm.model(ids, labels=labels, output_hidden_states=True)
    res = multi_exit_loss(out.hidden_states, labels, {sm.num_layers: 1.0}, sm.arch)
    torch.testing.assert_close(res.loss, out.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch_name, impl", ARCH_IMPLS)
def test_gradients_match_naive(tiny_sorted, impl):
    sm = tiny_sorted
    ids, labels = batch(seed=2)
    weights = {2: 0.5, 4: 0.2, 6: 0.3}  # non-uniform, as the weights / sample / rotate schedules give
    out = sm.model(ids, output_hidden_states=True)
    multi_exit_loss(out.hidden_states, labels, weights, sm.arch, impl=impl).loss.backward()
    ours = grads(sm.model)
    sm.model.zero_grad()
    naive(sm, ids, labels, sm.exits, weights)[0].backward()
    expected = grads(sm.model)
    assert ours.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(ours[n], expected[n], atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not cce_available(), reason="cut-cross-entropy's Triton kernel needs a CUDA GPU (none here)")
def test_cce_gradients_match_naive_on_gpu(tiny_sorted):
    sm = tiny_sorted
    sm.model.cuda()
    ids, labels = (x.cuda() for x in batch(seed=2))
    out = sm.model(ids, output_hidden_states=True)
    multi_exit_loss(out.hidden_states, labels, {k: 1 / 3 for k in sm.exits}, sm.arch, impl="cce").loss.backward()
    ours = grads(sm.model)
    sm.model.zero_grad()
    naive(sm, ids, labels, sm.exits)[0].backward()
    for n, g in grads(sm.model).items():
        torch.testing.assert_close(ours[n], g, atol=1e-4, rtol=1e-3)


def test_float64_gradcheck_through_norm_and_shared_head():
    """gradcheck of the whole loss in float64 w.r.t. two exits' hidden states, the final norm (which the
    intermediate exit applies and HF applied to the last) and the shared head, with soft-capped logits. (HF's RMSNorms
    compute in float32 whatever the input dtype, so torch's own RMSNorm stands in for them here.)"""
    d, vocab = 8, 13
    g = torch.Generator().manual_seed(0)
    norm = torch.nn.RMSNorm(d, dtype=torch.float64)
    h0, h1, h2 = (torch.randn(2, 5, d, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    w_norm = (torch.randn(d, dtype=torch.float64, generator=g) * 0.1).requires_grad_()
    w_head = torch.randn(vocab, d, dtype=torch.float64, generator=g).requires_grad_()
    labels = torch.randint(0, vocab, (2, 5), generator=g)
    labels[0, :2] = -100

    def f(h1, h2, w_norm, w_head):
        def normed(x):
            return torch.func.functional_call(norm, {"weight": w_norm}, (x,))

        arch = SimpleNamespace(num_layers=2, norm=normed, head=SimpleNamespace(weight=w_head, bias=None), softcap=3.0)
        return multi_exit_loss((h0, h1, normed(h2)), labels, {1: 0.3, 2: 0.7}, arch, impl="chunked",
                               chunk_size=3).loss

    assert torch.autograd.gradcheck(f, (h1, h2, w_norm, w_head))


@pytest.mark.parametrize("arch_name", ["llama"])
def test_gradient_accumulation_two_micro_batches_equal_one_batch(tiny_sorted):
    """2 micro-batches of 2, each normalised by the whole batch's label count (num_items_in_batch), give the
    gradient of 1 batch of 4."""
    sm = tiny_sorted
    ids, labels = batch(b=4, seed=3)
    labels[3, 8:] = -100  # micro-batches with different label counts
    weights = {k: 1 / 3 for k in sm.exits}
    out = sm.model(ids, output_hidden_states=True)
    multi_exit_loss(out.hidden_states, labels, weights, sm.arch).loss.backward()
    whole = grads(sm.model)
    sm.model.zero_grad()
    total = int((labels[:, 1:] != -100).sum())
    for part in (slice(0, 2), slice(2, 4)):
        out = sm.model(ids[part], output_hidden_states=True)
        multi_exit_loss(out.hidden_states, labels[part], weights, sm.arch,
                        num_items_in_batch=torch.tensor(total)).loss.backward()
    for n, g in grads(sm.model).items():
        torch.testing.assert_close(g, whole[n], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("arch_name", ["llama", "gemma3_text"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_sorted):
    sm = tiny_sorted
    ids, labels = batch(seed=4)
    weights = {k: 1 / 3 for k in sm.exits}
    sm.model.train()
    out = sm.model(ids, output_hidden_states=True, use_cache=False)
    multi_exit_loss(out.hidden_states, labels, weights, sm.arch).loss.backward()
    plain = grads(sm.model)
    sm.model.zero_grad()
    sm.model.gradient_checkpointing_enable()
    out = sm.model(ids, output_hidden_states=True, use_cache=False)
    multi_exit_loss(out.hidden_states, labels, weights, sm.arch).loss.backward()
    checkpointed = grads(sm.model)
    assert checkpointed.keys() == plain.keys()
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch_name", ["llama", "qwen2"])
def test_bf16_autocast_matches_naive_under_autocast(tiny_sorted):
    sm = tiny_sorted
    ids, labels = batch(seed=5)
    weights = {k: 1 / 3 for k in sm.exits}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sm.model(ids, output_hidden_states=True)
        res = multi_exit_loss(out.hidden_states, labels, weights, sm.arch)
    res.loss.backward()
    ours = grads(sm.model)
    sm.model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = naive(sm, ids, labels, sm.exits)[0]
    expected.backward()
    torch.testing.assert_close(res.loss, expected, atol=2e-2, rtol=2e-3)
    for n, g in grads(sm.model).items():
        assert ours[n].dtype == torch.float32
        assert F.cosine_similarity(ours[n].flatten(), g.flatten(), dim=0) > 0.99, n


@pytest.mark.parametrize("arch_name", ["llama"])
def test_lora_trains_adapters_through_the_chunked_loss(tiny_sorted):
    """peft LoRA: the frozen shared head gets no gradient (and none is computed); adapters match the naive loss."""
    from peft import LoraConfig, get_peft_model

    from sortedllm.exits import SortedModel

    sm = tiny_sorted
    peft_model = get_peft_model(sm.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    psm = SortedModel(peft_model, sm.tokenizer, exits=sm.exits)
    ids, labels = batch(seed=6)
    out = peft_model(input_ids=ids, output_hidden_states=True)
    multi_exit_loss(out.hidden_states, labels, {k: 1 / 3 for k in sm.exits}, psm.arch).loss.backward()
    ours = grads(peft_model)
    assert ours and all("lora_" in n for n in ours)
    assert psm.arch.head.weight.grad is None
    peft_model.zero_grad()
    naive(psm, ids, labels, sm.exits)[0].backward()
    for n, g in grads(peft_model).items():
        torch.testing.assert_close(ours[n], g, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch_name", ["qwen2"])
def test_per_exit_heads_and_zero_weights(tiny_sorted):
    """Exits with their own (norm, head) (ICT) go through their own call; exits of weight 0 cost nothing."""
    sm = tiny_sorted
    own = {2: (copy.deepcopy(sm.arch.norm), copy.deepcopy(sm.arch.head))}
    with torch.no_grad():
        own[2][1].weight.mul_(1.5)
    ids, labels = batch(seed=7)
    out = sm.model(ids, output_hidden_states=True)
    res = multi_exit_loss(out.hidden_states, labels, {2: 0.5, 4: 0.0, 6: 0.5}, sm.arch, exit_heads=own)
    assert set(res.per_exit) == {2, 6}
    mask = labels[:, 1:] != -100
    z2 = own[2][1](own[2][0](out.hidden_states[2][:, :-1][mask]))
    expected2 = F.cross_entropy(z2, labels[:, 1:][mask])
    torch.testing.assert_close(res.per_exit[2], expected2, atol=1e-5, rtol=1e-5)
    expected = 0.5 * expected2 + 0.5 * naive(sm, ids, labels, [6])[1][6]
    torch.testing.assert_close(res.loss, expected, atol=1e-5, rtol=1e-5)
