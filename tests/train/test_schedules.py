"""Exit schedules: each is an unbiased estimate of the same objective, deterministic in (seed, step), and used by the
trainer once per optimizer step (the same weights for every micro-batch of a gradient-accumulation step)."""

import random

import pytest
import torch

from sortedllm.errors import SortedError
from sortedllm.train.schedules import make_schedule

EXITS = [9, 12, 15, 18, 21, 24, 27, 30]


def objective(weights, losses):
    return sum(w * losses[k] for k, w in weights.items())


def test_uniform_is_every_exit_every_step_with_equal_weight():
    s = make_schedule("uniform", EXITS)
    for step in (0, 1, 57):
        assert s.weights(step) == pytest.approx({k: 1 / 8 for k in EXITS})
    assert s.eval_weights() == pytest.approx({k: 1 / 8 for k in EXITS})


def test_weights_are_normalised_user_weights():
    s = make_schedule("weights", [4, 8, 12], exit_weights="1,1,2")
    assert s.weights(3) == pytest.approx({4: 0.25, 8: 0.25, 12: 0.5})
    assert make_schedule("weights", [4, 8, 12], exit_weights=[0, 1, 1]).weights(0) == pytest.approx(
        {4: 0, 8: 0.5, 12: 0.5})


def test_rotate_visits_each_intermediate_exit_in_turn_and_is_unbiased_over_a_cycle():
    s = make_schedule("rotate", EXITS)
    losses = {k: random.Random(k).uniform(1, 5) for k in EXITS}
    chosen = []
    for step in range(7):
        w = s.weights(step)
        assert len(w) == 2 and w[30] == pytest.approx(1 / 8)
        (mid, wk), = [(k, v) for k, v in w.items() if k != 30]
        assert wk == pytest.approx(7 / 8)  # 1/8 rescaled by 1 / P(chosen) = 7
        chosen.append(mid)
    assert chosen == EXITS[:-1]
    assert s.weights(7) == s.weights(0)
    mean = sum(objective(s.weights(step), losses) for step in range(7)) / 7
    assert mean == pytest.approx(objective(make_schedule("uniform", EXITS).weights(0), losses), rel=1e-12)


@pytest.mark.parametrize("n", [1, 3])
def test_sample_is_unbiased(n):
    s = make_schedule(f"sample:{n}", EXITS, seed=1)
    steps = 6000
    totals = dict.fromkeys(EXITS, 0.0)
    for step in range(steps):
        w = s.weights(step)
        assert len(w) == n + 1 and w[30] == pytest.approx(1 / 8)
        assert all(v == pytest.approx(1 / 8 * 7 / n) for k, v in w.items() if k != 30)
        for k, v in w.items():
            totals[k] += v
    # Each intermediate exit is drawn with probability n/7; its mean weight over steps approaches 1/8 (4 s.d.).
    for k in EXITS[:-1]:
        p = n / 7
        sd = (p * (1 - p) / steps) ** 0.5 / p
        assert totals[k] / steps == pytest.approx(1 / 8, rel=4 * sd)
    assert totals[30] / steps == pytest.approx(1 / 8)


@pytest.mark.parametrize("spec", ["sample:2", "rotate"])
def test_choice_derives_from_seed_and_step_only(spec):
    """Every rank, and a run resumed at any step, picks the same exits: no state carried between steps."""
    a = make_schedule(spec, EXITS, seed=3)
    b = make_schedule(spec, EXITS, seed=3)
    forward = [a.weights(step) for step in range(40)]
    backward = [b.weights(step) for step in reversed(range(40))][::-1]
    assert forward == backward
    if spec.startswith("sample"):
        other = make_schedule(spec, EXITS, seed=4)
        assert any(other.weights(step) != forward[step] for step in range(40))


@pytest.mark.parametrize("spec", ["sample:2", {"sample": 2}, "sample=2"])
def test_sample_spellings(spec):
    assert make_schedule(spec, EXITS).n == 2


@pytest.mark.parametrize("spec, kwargs, message", [
    ("bogus", {}, "unknown exit_schedule 'bogus'"),
    ("sample:0", {}, "choose 1..7 intermediate exits"),
    ("sample:8", {}, "choose 1..7 intermediate exits"),
    ("sample:x", {}, "sample needs a count"),
    ("rotate:3", {}, "rotate takes no argument"),
    ("weights", {}, "needs --exit_weights"),
    ("weights", {"exit_weights": "1,2"}, "needs 8 non-negative numbers"),
    ("weights", {"exit_weights": "1,2,3,4,5,6,7,-1"}, "needs 8 non-negative numbers"),
    ("weights", {"exit_weights": "a,b"}, "must be numbers"),
    ({"sample": 1, "rotate": None}, {}, "not understood"),
])
def test_bad_schedules_are_one_line_errors(spec, kwargs, message):
    with pytest.raises(SortedError, match=message):
        make_schedule(spec, EXITS, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# The trainer: weights chosen per optimizer step, and gradient accumulation equal to one big batch.


def train_once(tiny_model, tok, tmp_path, name, **kw):
    from sortedllm.data import encode_dataset, load_examples
    from sortedllm.train.trainer import SoFTConfig, SoFTTrainer

    ds = encode_dataset(tok, load_examples("gsm8k", limit=kw.pop("rows", 4)), 96)
    kw = {"max_steps": 1, "logging_steps": 1, **kw}
    # SGD makes the update a linear function of the gradient (the joint loss's: one optimizer stream)
    args = SoFTConfig(output_dir=str(tmp_path / name), learning_rate=0.5, optim="sgd", max_grad_norm=0.0,
                      exit_optimizer="joint", lr_scheduler_type="constant", save_strategy="no", max_length=96, seed=0, disable_tqdm=True,
                      report_to=[], exits="2,4,6", **kw)
    trainer = SoFTTrainer(model=tiny_model, args=args, train_dataset=ds, processing_class=tok)
    calls = []
    weights = trainer.schedule.weights
    trainer.schedule.weights = lambda step: calls.append(step) or weights(step)
    trainer.train()
    return trainer, calls


@pytest.mark.parametrize("arch_name", ["llama"])
def test_trainer_accumulation_matches_one_batch_and_keeps_the_step_weights(tiny, tmp_path):
    """2 micro-batches of 2 with the rotate schedule make the same SGD update as 1 batch of 4 (the loss is
    normalised by the whole step's label tokens, and both micro-batches use step 0's exits)."""
    import copy

    model, tok = tiny
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    one = copy.deepcopy(model)
    _, calls_acc = train_once(model, tok, tmp_path, "acc", per_device_train_batch_size=2,
                              gradient_accumulation_steps=2, exit_schedule="rotate")
    _, calls_one = train_once(one, tok, tmp_path, "one", per_device_train_batch_size=4, exit_schedule="rotate")
    assert calls_acc == [0, 0] and calls_one == [0]
    moved = 0
    for (n, p), q in zip(model.named_parameters(), one.parameters()):
        torch.testing.assert_close(p - before[n], q - before[n], atol=1e-6, rtol=1e-4)
        moved += bool((p != before[n]).any())
    assert moved > 5


@pytest.mark.parametrize("arch_name", ["qwen2"])
def test_trainer_draws_exits_per_optimizer_step(tiny, tmp_path):
    model, tok = tiny
    trainer, calls = train_once(model, tok, tmp_path, "s", rows=8, max_steps=2, per_device_train_batch_size=2,
                                gradient_accumulation_steps=2, exit_schedule="sample:1", logging_steps=1)
    assert calls == [0, 0, 1, 1]
    logged = [h for h in trainer.state.log_history if "loss_exit_6" in h]
    assert len(logged) == 2  # the last exit every step; intermediate exits only on the steps that drew them


def test_last_weighted_schedule_and_the_soft_default():
    from sortedllm.train.trainer import SOFT_SCHEDULE, SoFTConfig

    s = make_schedule("last:0.75", [9, 18, 30])
    assert s.weights(0) == {9: 0.125, 18: 0.125, 30: 0.75} == s.eval_weights()
    assert make_schedule("last:0.75", [30]).weights(3) == {30: 1.0}
    for bad in ("last", "last:0", "last:1.5", "last:x"):
        with pytest.raises(SortedError, match="last"):
            make_schedule(bad, [9, 30])
    assert SoFTConfig(output_dir="o", report_to=[]).exit_schedule == SOFT_SCHEDULE == "last:0.75"
    assert SoFTConfig(output_dir="o", report_to=[], mode="sft").exit_schedule == "uniform"
    assert SoFTConfig(output_dir="o", report_to=[], mode="ict").exit_schedule == "uniform"
    assert SoFTConfig(output_dir="o", report_to=[], exit_schedule="uniform").exit_schedule == "uniform"
