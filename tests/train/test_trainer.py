import json
import math

import pytest
import torch

from sortedllm import SortedModel
from sortedllm.data import encode_dataset, load_examples
from sortedllm.train.trainer import SoFTConfig, SoFTTrainer


def tiny_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=4, learning_rate=3e-3,
                logging_steps=1, save_strategy="no", max_length=128, gradient_checkpointing=False, seed=0,
                disable_tqdm=True, exits="2,4,6")
    base.update(kw)
    return SoFTConfig(**base)


@pytest.mark.parametrize("mode", ["soft", "sft"])
def test_trainer_logs_each_exit_and_learns(tiny, tmp_path, mode):
    model, tok = tiny
    ds = encode_dataset(tok, load_examples("gsm8k", limit=24), 128)
    trainer = SoFTTrainer(model=model, args=tiny_args(tmp_path, mode=mode), train_dataset=ds, processing_class=tok)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss_exit_6" in h]
    assert logs, trainer.state.log_history
    if mode == "soft":
        assert all(f"loss_exit_{k}" in logs[0] for k in (2, 4, 6))
        first, last = logs[0], logs[-1]
        assert all(last[f"loss_exit_{k}"] < first[f"loss_exit_{k}"] for k in (2, 4, 6))
    else:  # SFT trains and logs the last exit only
        assert "loss_exit_2" not in logs[0]
        assert logs[-1]["loss_exit_6"] < logs[0]["loss_exit_6"]


def test_trainer_checkpoint_carries_sorted_config(tiny, tmp_path):
    model, tok = tiny
    ds = encode_dataset(tok, load_examples("gsm8k", limit=8), 128)
    args = tiny_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    SoFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok).train()
    ckpt = tmp_path / "out" / "checkpoint-2"
    cfg = json.loads((ckpt / "sorted_config.json").read_text())
    assert cfg["exits"] == [2, 4, 6] and cfg["mode"] == "soft"
    assert SortedModel.from_pretrained(str(ckpt)).exits == [2, 4, 6]


def test_trainer_accepts_raw_prompt_completion_data(tiny, tmp_path):
    """A TRL user's dataset (not pre-tokenised) goes through TRL's own preparation: the same tokens and the same
    completion-only labels as our own encoding of those rows, then a training step with a finite loss."""
    import datasets

    model, tok = tiny
    rows = load_examples("gsm8k", limit=8)
    ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                      "completion": [{"role": "assistant", "content": r["completion"]}]}
                                     for r in rows])
    trainer = SoFTTrainer(model=model, args=tiny_args(tmp_path, max_steps=1), train_dataset=ds, processing_class=tok)
    ours = encode_dataset(tok, rows, 128)  # drops the rows whose prompt fills max_length, as TRL does
    prepared = trainer.train_dataset
    assert prepared["input_ids"] == ours["input_ids"]
    assert prepared["labels"] == [[t if m else -100 for t, m in zip(ids, mask)]
                                  for ids, mask in zip(ours["input_ids"], ours["completion_mask"])]
    trainer.train()
    assert trainer.state.global_step == 1
    logged = [h for h in trainer.state.log_history if "loss" in h]
    keys = ("loss", "loss_exit_2", "loss_exit_4", "loss_exit_6")
    assert logged and all(math.isfinite(logged[0][k]) for k in keys), trainer.state.log_history
