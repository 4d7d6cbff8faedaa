"""Activation (gradient) checkpointing and bf16 with the SoFT trainer on CPU, on tiny models of the real
architectures: checkpointing recomputes, it must not change the numbers; bf16 autocast must really compute in
bf16 while the weights and the exit losses stay fp32."""

import math

import pytest
import torch

from sortedllm.data import encode_dataset, load_examples
from sortedllm.train.trainer import SoFTConfig, SoFTTrainer


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                logging_steps=1, save_strategy="no", max_length=128, seed=0, disable_tqdm=True, report_to="none",
                exits="2,4,6", use_cpu=True)
    base.update(kw)
    return SoFTConfig(**base)


def train(model, tok, tmp_path, **kw):
    ds = encode_dataset(tok, load_examples("gsm8k", limit=8), 128)
    trainer = SoFTTrainer(model=model, args=args(tmp_path, **kw), train_dataset=ds, processing_class=tok)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return trainer, logs


@pytest.mark.parametrize("arch_name", ["llama", "gemma3_text"])  # dense, and sliding + full attention
def test_activation_checkpointing_changes_nothing(arch_name, tokenizer, tmp_path):
    from tests.conftest import make_tiny

    plain, plain_logs = train(make_tiny(arch_name, tokenizer), tokenizer, tmp_path / "a")
    model = make_tiny(arch_name, tokenizer)
    ckpt, ckpt_logs = train(model, tokenizer, tmp_path / "b", activation_checkpointing=True)
    assert model.is_gradient_checkpointing
    assert [h["loss"] for h in ckpt_logs] == pytest.approx([h["loss"] for h in plain_logs], rel=1e-5)
    for k in (2, 4, 6):
        assert ckpt_logs[-1][f"loss_exit_{k}"] == pytest.approx(plain_logs[-1][f"loss_exit_{k}"], rel=1e-5)
    for (name, a), b in zip(plain.model.named_parameters(), ckpt.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=3e-5, msg=name)


def test_bf16_autocast_on_cpu(tokenizer, tmp_path):
    from tests.conftest import make_tiny

    _, fp32_logs = train(make_tiny("llama", tokenizer), tokenizer, tmp_path / "fp32")
    model = make_tiny("llama", tokenizer)
    seen = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer, logs = train(model, tokenizer, tmp_path / "bf16", bf16=True, activation_checkpointing=True)
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}  # the matmuls ran in bf16 ...
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # ... on fp32 master weights
    losses = [h["loss"] for h in logs]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert losses[0] == pytest.approx(fp32_logs[0]["loss"], rel=1e-2)  # bf16 rounding, not a different model
    assert all(f"loss_exit_{k}" in logs[-1] for k in (2, 4, 6))


def test_bf16_weights_train(tokenizer, tmp_path):
    """A model loaded in bfloat16 (--dtype bfloat16) trains in bf16 end to end; the exit losses are still fp32."""
    from tests.conftest import make_tiny

    model = make_tiny("llama", tokenizer, dtype=torch.bfloat16)
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    trainer, logs = train(model, tokenizer, tmp_path, learning_rate=3e-2)
    assert all(p.dtype == torch.bfloat16 for p in trainer.model.parameters())
    assert not torch.equal(before, trainer.model.model.layers[0].self_attn.q_proj.weight)
    losses = [h["loss"] for h in logs]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
