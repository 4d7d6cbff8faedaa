"""LoRA SoFT/SFT: the --lora option, a tiny adapter folder that loads back with peft's one call, and merging."""

import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel

from sortedllm import SortedModel
from sortedllm.data import encode_dataset, load_examples
from sortedllm.errors import SortedError
from sortedllm.evaluate import evaluate
from sortedllm.inference.batch import encode_prompts
from sortedllm.adapters import ADAPTER_CONFIG, lora
from sortedllm.adapters.vocab import VOCAB_FILE
from sortedllm.models import load_model
from sortedllm.train import recipe
from sortedllm.train.lora import main as merge_main
from sortedllm.train.trainer import SoFTConfig, SoFTTrainer


def test_parse_lora():
    assert lora.parse_lora("r=16,alpha=32,targets=q_proj,v_proj") == {
        "r": 16, "alpha": 32.0, "dropout": 0.05, "targets": ["q_proj", "v_proj"]}
    assert lora.parse_lora({"r": 8, "targets": ["q_proj", "o_proj"], "dropout": 0})["targets"] == ["q_proj", "o_proj"]
    assert lora.parse_lora("targets=q_proj,k_proj,alpha=8")["alpha"] == 8.0  # keys may follow the target list
    assert lora.parse_lora(True)["targets"] == "all-linear"
    assert lora.parse_lora(None) is None and lora.parse_lora("none") is None
    for bad, msg in [("rank=4", "unknown key 'rank'"), ("r=0", "r >= 1"), ("r=four", "r must be an integer"),
                     ("q_proj", "not understood"), ("targets=", "targets is empty")]:
        with pytest.raises(SortedError, match=msg):
            lora.parse_lora(bad)


def test_bad_target_lists_valid_names(tiny):
    model, _ = tiny
    with pytest.raises(SortedError, match=r"target 'qproj' is not a linear layer.*valid names: .*q_proj.*v_proj"):
        lora.lora_config("r=4,targets=qproj,v_proj", model)
    with pytest.raises(SortedError, match="lm_head"):  # shared by every exit: not a LoRA target
        lora.lora_config("targets=lm_head", model)


def test_sft_with_lora_trains_only_the_adapter(tiny, tmp_path):
    model, tok = tiny
    base = {n: t.clone() for n, t in model.state_dict().items()}
    args = SoFTConfig(output_dir=str(tmp_path / "o"), mode="sft", exits="2,4,6", max_steps=2, learning_rate=1e-2,
                      per_device_train_batch_size=4, max_length=128, save_strategy="no", report_to="none",
                      disable_tqdm=True, logging_steps=1)
    ds = encode_dataset(tok, load_examples("gsm8k", limit=8), 128)
    trainer = SoFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                          peft_config=lora.lora_config("r=4,alpha=8", model))
    trainer.train()
    assert isinstance(trainer.model, PeftModel)
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    body = {n.replace(".base_layer", ""): t for n, t in trainer.model.get_base_model().state_dict().items()
            if "lora_" not in n}
    assert body.keys() == base.keys() and all(torch.equal(base[n], body[n]) for n in base)
    assert any(h.get("loss_exit_6") for h in trainer.state.log_history)


def test_lora_soft_round_trip_save_load_merge(tiny_checkpoint, tmp_path):
    """Train SoFT+LoRA through the CLI recipe; the adapter folder is tiny, loads back with peft's one call, and
    adapter, merged and re-loaded merged models give the same per-exit logits and held-out losses."""
    out = tmp_path / "run"
    assert recipe.main([
        "--model", str(tiny_checkpoint), "--lora", "r=4,alpha=8,targets=q_proj,v_proj,up_proj", "--data", "gsm8k",
        "--data_limit", "8", "--exits", "2,4,6", "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--max_length", "128", "--learning_rate", "1e-2", "--save_strategy", "no", "--output_dir", str(out),
        "--disable_tqdm", "true", "--report_to", "none"]) == 0
    final = out / "final"
    names = {p.name for p in final.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "sorted_config.json", ADAPTER_CONFIG, VOCAB_FILE} <= names
    assert "config.json" not in names and "model.safetensors" not in names
    adapter_bytes = (final / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < 0.05 * (tiny_checkpoint / "model.safetensors").stat().st_size
    cfg = json.loads((final / "sorted_config.json").read_text())
    assert cfg["exits"] == [2, 4, 6] and cfg["extra"]["lora"]["r"] == 4
    assert cfg["extra"]["lora"]["targets"] == ["q_proj", "up_proj", "v_proj"]

    sm = SortedModel.from_pretrained(str(final))
    assert isinstance(sm.model, PeftModel) and sm.exits == [2, 4, 6] and sm.config.mode == "soft"
    ids = torch.tensor([encode_prompts(sm, ["Tom has 3 apples and buys 2 more. How many?"])[0]])
    adapter = sm.logits_at_exits(ids)
    plain = SortedModel.from_pretrained(str(tiny_checkpoint), exits=[2, 4, 6]).logits_at_exits(ids)
    assert not torch.allclose(adapter[6], plain[6], atol=1e-3)  # the adapter learned something

    # peft's own one call loads the same model
    direct = SortedModel(AutoPeftModelForCausalLM.from_pretrained(str(final)).eval(), sm.tokenizer, exits=[2, 4, 6])
    assert all(torch.equal(adapter[k], direct.logits_at_exits(ids)[k]) for k in adapter)

    loss_adapter = evaluate({"A": sm}, ["loss"], limit=4)["tasks"]["loss"]["A"]
    assert merge_main(["--model", str(final), "--out", str(tmp_path / "merged")]) == 0
    merged = SortedModel.from_pretrained(str(tmp_path / "merged"))
    assert not isinstance(merged.model, PeftModel) and (tmp_path / "merged" / "config.json").is_file()
    assert merged.config.extra["lora"]["merged"] is True and merged.exits == [2, 4, 6]
    assert torch.equal(merged.draft_vocab, sm.draft_vocab)  # the draft vocabulary travels with the model
    got = merged.logits_at_exits(ids)
    for k in adapter:  # merging folds B @ A into W: equal up to float32 rounding
        torch.testing.assert_close(got[k], adapter[k], atol=1e-5, rtol=1e-5)
    loss_merged = evaluate({"A": merged}, ["loss"], limit=4)["tasks"]["loss"]["A"]
    for k in loss_adapter:
        assert loss_merged[k]["loss"] == pytest.approx(loss_adapter[k]["loss"], abs=1e-5)

    with pytest.raises(SortedError, match="not a LoRA adapter"):
        lora.merge(merged)


def test_adapter_with_missing_base_is_a_clear_error(tiny_checkpoint, tmp_path):
    model, tok = load_model(str(tiny_checkpoint))
    from peft import get_peft_model

    folder = tmp_path / "adapter"
    SortedModel(get_peft_model(model, lora.lora_config("r=2", model)), tok, exits=[2, 4, 6]).save_pretrained(folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "moved")
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    (folder / "manifest.json").unlink(missing_ok=True)  # edited on purpose
    with pytest.raises(SortedError, match="needs its base model"):
        SortedModel.from_pretrained(str(folder))
