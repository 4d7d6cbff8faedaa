"""Integration: the quickstart recipe, shortened, on the real default model (SmolLM2-135M, 30 layers)."""

import pytest

from sortedllm import SortedModel
from sortedllm.config import ScriptArguments
from sortedllm.data import load_examples
from sortedllm.evaluate.loss import exit_losses
from sortedllm.train.recipe import train
from sortedllm.train.trainer import SoFTConfig


@pytest.mark.slow
@pytest.mark.timeout(1200)  # four SoFT steps and two evaluations of the 30-layer model
def test_short_soft_run_improves_every_intermediate_exit(tmp_path, default_model):
    script = ScriptArguments(model="smollm2-135m", data="gsm8k", data_limit=24)
    args = SoFTConfig(output_dir=str(tmp_path / "run"), exits="9,18,30", max_steps=4, per_device_train_batch_size=4,
                      learning_rate=2e-4, warmup_steps=0, max_length=192, gradient_checkpointing=False,
                      save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0)
    final = train(script, args)
    tuned = SortedModel.from_pretrained(str(final))
    assert tuned.exits == [9, 18, 30] and tuned.config.mode == "soft"
    rows = load_examples("gsm8k:test", limit=16)
    before = exit_losses(default_model, rows, [9, 18, 30], max_length=192, progress=False)
    after = exit_losses(tuned, rows, [9, 18, 30], max_length=192, progress=False)
    for k in (9, 18):  # untuned intermediate exits are far off (loss > 10); four SoFT steps fix a lot of that
        assert after[k]["loss"] < 0.8 * before[k]["loss"], (k, before[k], after[k])
    assert after[30]["loss"] < before[30]["loss"] * 1.1
