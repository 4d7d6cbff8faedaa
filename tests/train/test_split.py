"""The split-stream optimizer (train/split.py) and its use by the SoFT trainer."""

from __future__ import annotations

import copy

import pytest
import torch

from sortedllm.train.split import SplitAdamW


def two_streams(seed: int = 0):
    torch.manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(5, 3))
    grads = [(torch.randn(5, 3), torch.randn(5, 3) * 4) for _ in range(4)]
    return p, grads


def test_split_adamw_is_two_independent_adamw_updates():
    """Each step moves the weights by AdamW's update of the last stream plus AdamW's update of the rest (without
    weight decay the two are exactly additive)."""
    p, grads = two_streams()
    a, b = torch.nn.Parameter(p.detach().clone()), torch.nn.Parameter(torch.zeros(5, 3))
    split = SplitAdamW([p], lr=0.1, weight_decay=0.0)
    last_only = torch.optim.AdamW([a], lr=0.1, weight_decay=0.0)
    rest_only = torch.optim.AdamW([b], lr=0.1, weight_decay=0.0)
    for g_last, g_rest in grads:
        p.grad = g_last.clone()
        split.add_rest([g_rest.clone()])
        split.step()
        a.grad, b.grad = g_last.clone(), g_rest.clone()
        last_only.step()
        rest_only.step()
        torch.testing.assert_close(p.detach(), a.detach() + b.detach(), rtol=1e-6, atol=1e-6)


def test_split_adamw_without_rest_is_adamw():
    p, grads = two_streams(1)
    q = torch.nn.Parameter(p.detach().clone())
    split, plain = SplitAdamW([p], lr=0.05), torch.optim.AdamW([q], lr=0.05)
    for g, _ in grads:
        p.grad, q.grad = g.clone(), g.clone()
        split.step()
        plain.step()
    assert torch.equal(p, q)


def test_split_adamw_accumulates_and_clips_the_rest_stream():
    """Micro-batches add up before the step; the sum is clipped to rest_max_grad_norm on its own."""
    p, _ = two_streams(2)
    start = p.detach().clone()
    opt = SplitAdamW([p], lr=0.1, weight_decay=0.0, rest_max_grad_norm=1.0)
    p.grad = torch.zeros_like(p)
    opt.add_rest([torch.full((5, 3), 3.0)])
    opt.add_rest([torch.full((5, 3), 1.0)])
    opt.add_rest([None])
    opt.step()
    assert not opt.rest_grads  # consumed
    # first Adam step: the update is lr * sign(g) whatever the scale: both micro-batches pushed the same way
    torch.testing.assert_close(p.detach(), start - 0.1, rtol=0, atol=1e-6)
    state = opt.state[p]
    torch.testing.assert_close(state["rest_exp_avg"], torch.full((5, 3), 0.1 * 4 / (4 * 15 ** 0.5)))


def test_split_state_round_trips_through_state_dict():
    p, grads = two_streams(3)
    opt = SplitAdamW([p], lr=0.1)
    for g_last, g_rest in grads[:2]:
        p.grad = g_last
        opt.add_rest([g_rest])
        opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    restored = SplitAdamW([q], lr=0.1)
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))
    for g_last, g_rest in grads[2:]:
        p.grad, q.grad = g_last.clone(), g_last.clone()
        opt.add_rest([g_rest.clone()])
        restored.add_rest([g_rest.clone()])
        opt.step()
        restored.step()
    assert torch.equal(p, q)


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_soft_trainer_first_split_step_is_two_adam_steps(tiny, tmp_path, accumulate):
    """One SoFT step with exit_optimizer split moves each weight by lr * (g_last/|g_last| + g_rest/|g_rest|)
    (AdamW's first step), the two gradients taken on the whole batch as separate losses: gradient separation,
    normalisation and accumulation scaling are all what the optimizer sees. (No clipping: a clipped gradient's
    elements near AdamW's eps would move by less than lr.)"""
    from sortedllm.data import encode_dataset, load_examples
    from sortedllm.models import Architecture
    from sortedllm.train.loss import multi_exit_loss
    from sortedllm.train.trainer import SoFTConfig, SoFTTrainer

    model, tok = tiny
    ds = encode_dataset(tok, load_examples("gsm8k", limit=4), 96)
    reference = copy.deepcopy(model).train()
    args = SoFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4 // accumulate,
                      gradient_accumulation_steps=accumulate, learning_rate=1e-3, lr_scheduler_type="constant",
                      warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, save_strategy="no", max_length=96,
                      seed=0, disable_tqdm=True, exits="2,4,6", report_to=[], exit_optimizer="split")
    trainer = SoFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))  # (one step = the whole data set in either case)
    trainer.train()
    collate = trainer.data_collator
    full = collate([ds[i] for i in range(4)])
    out = reference(input_ids=full["input_ids"], attention_mask=full["attention_mask"], output_hidden_states=True,
                    logits_to_keep=1, use_cache=False)
    arch = Architecture(reference)
    g_last = _grads(reference, multi_exit_loss(out.hidden_states, full["labels"], {6: 1.0}, arch).loss)
    g_rest = _grads(reference, multi_exit_loss(out.hidden_states, full["labels"], {2: 0.5, 4: 0.5}, arch).loss)
    eps = 1e-8
    for (name, p0), p1, a, b in zip(reference.named_parameters(), model.parameters(), g_last, g_rest):
        expect = p0.detach().clone()
        if a is not None:
            expect -= 1e-3 * a / (a.abs() + eps)
        if b is not None:
            expect -= 1e-3 * b / (b.abs() + eps)
        # elements with a near-zero gradient carry eps-sized differences between the two computations
        torch.testing.assert_close(p1.detach(), expect, rtol=0, atol=2e-4, msg=name)
    assert batch["input_ids"].shape[0] == 4 // accumulate


def test_soft_trainer_split_logs_every_exit(tiny, tmp_path):
    from sortedllm.data import encode_dataset, load_examples
    from sortedllm.train.trainer import SoFTConfig, SoFTTrainer

    model, tok = tiny
    ds = encode_dataset(tok, load_examples("gsm8k", limit=16), 96)
    args = SoFTConfig(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
                      learning_rate=3e-3, logging_steps=1, save_strategy="no", max_length=96, seed=0,
                      disable_tqdm=True, exits="2,4,6", report_to=[], exit_optimizer="split")
    trainer = SoFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss_exit_6" in h]
    assert len(logs) == 4 and all(f"loss_exit_{k}" in logs[0] for k in (2, 4, 6))
    assert isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), SplitAdamW)
    assert trainer.sorted_config.extra["exit_optimizer"] == "split"
    assert all(logs[-1][f"loss_exit_{k}"] < logs[0][f"loss_exit_{k}"] for k in (2, 4, 6))


@pytest.mark.parametrize("arch_name", ["llama"], indirect=True)
@pytest.mark.parametrize("optim, expect", [("adamw_torch", "split"), ("sgd", "joint")])
def test_auto_exit_optimizer_splits_only_where_it_applies(tiny, tmp_path, optim, expect):
    from sortedllm.data import encode_dataset, load_examples
    from sortedllm.train.trainer import SoFTConfig, SoFTTrainer

    model, tok = tiny
    args = SoFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to=[], exits="2,4,6", optim=optim,
                      disable_tqdm=True, save_strategy="no", max_length=96, exit_optimizer="auto")
    ds = encode_dataset(tok, load_examples("gsm8k", limit=4), 96)
    trainer = SoFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    assert trainer.sorted_config.extra["exit_optimizer"] == expect and trainer.split == (expect == "split")
