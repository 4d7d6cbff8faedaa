"""Determinism on CPU: the same seed and config give a bit-identical loss curve and bit-identical weights; another
seed gives another run (so the comparison can fail). The model has attention dropout and the exit schedule samples
exits, so every source of randomness in a step is exercised. See docs/reliability.md for what breaks it on GPU."""

import torch
from tests.conftest import make_tiny

from sortedllm.data import encode_dataset, load_examples
from sortedllm.train.trainer import SoFTConfig, SoFTTrainer


def run(tmp_path, tokenizer, dataset, seed: int):
    model = make_tiny("llama", tokenizer, layers=4, seed=0)  # same initial weights every time
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    args = SoFTConfig(output_dir=str(tmp_path / f"run-{seed}"), max_steps=4, per_device_train_batch_size=2,
                      learning_rate=3e-3, logging_steps=1, save_strategy="no", max_length=128, seed=seed,
                      gradient_checkpointing=False, disable_tqdm=True, report_to="none", exits="1,2,3",
                      exit_schedule="sample:1")
    trainer = SoFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    curve = [dict(h) for h in trainer.state.log_history if "loss" in h]
    return curve, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_same_seed_same_run_other_seed_other_run(tmp_path, tokenizer):
    dataset = encode_dataset(tokenizer, load_examples("gsm8k", limit=6), 128)
    curve_a, weights_a = run(tmp_path, tokenizer, dataset, seed=1)
    curve_b, weights_b = run(tmp_path, tokenizer, dataset, seed=1)
    assert len(curve_a) == 4 and all("loss_exit_4" in h for h in curve_a)
    assert curve_a == curve_b  # every logged float, bit for bit
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)

    curve_c, weights_c = run(tmp_path, tokenizer, dataset, seed=2)
    assert [h["loss"] for h in curve_c] != [h["loss"] for h in curve_a]
    assert not all(torch.equal(weights_a[k], weights_c[k]) for k in weights_a)
