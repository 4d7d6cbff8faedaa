"""ICT: per-exit heads on a frozen base (the paper's SFT+ICT baseline, and ICT after SoFT)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from sortedllm import SortedModel
from sortedllm.exits import SortedConfig
from sortedllm.data import encode_dataset, load_examples
from sortedllm.errors import SortedError
from sortedllm.evaluate import evaluate
from sortedllm.export import submodel
from sortedllm.inference import Static, generate
from sortedllm.inference.batch import encode_prompts
from sortedllm.models import load_model
from sortedllm.train import recipe
from sortedllm.adapters import ADAPTER_CONFIG, ICTHeads
from sortedllm.adapters.ict import HEADS_FILE
from sortedllm.adapters.vocab import VOCAB_FILE
from sortedllm.train.ict import ICTTrainer, extra_parameters, paper_extra_parameters
from sortedllm.train.trainer import SoFTConfig


def ict_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                logging_steps=1, save_strategy="no", max_length=128, gradient_checkpointing=False, seed=0,
                disable_tqdm=True, exits="2,4,6", mode="ict", report_to="none")
    base.update(kw)
    return SoFTConfig(**base)


def gsm8k(tok, n=16):
    return encode_dataset(tok, load_examples("gsm8k", limit=n), 128)


def test_ict_trains_only_the_heads(tiny, tmp_path):
    """The body (embeddings tied to the head included) stays bit-identical; each intermediate exit's own head moves
    and its loss falls; the last exit keeps the model's own norm and head."""
    model, tok = tiny
    before = {n: t.clone() for n, t in model.state_dict().items()}
    trainer = ICTTrainer(model=model, args=ict_args(tmp_path), train_dataset=gsm8k(tok), processing_class=tok)
    arch = trainer.arch
    assert sorted(trainer.exit_heads) == [2, 4]
    trainer.train()
    after = model.state_dict()
    assert set(after) == set(before)  # the heads were inside the model only while training
    assert all(torch.equal(before[n], after[n]) for n in before)
    for k, (norm, head) in trainer.exit_heads.items():
        assert norm is not arch.norm and head is not arch.head
        assert head.weight.data_ptr() != arch.head.weight.data_ptr()
        assert not torch.equal(head.weight, arch.head.weight) and not torch.equal(norm.weight, arch.norm.weight)
    logs = [h for h in trainer.state.log_history if "loss_exit_2" in h]
    assert logs[-1]["loss_exit_2"] < logs[0]["loss_exit_2"] and logs[-1]["loss_exit_4"] < logs[0]["loss_exit_4"]
    assert "loss_exit_6" not in logs[0]  # nothing to train at the last exit
    assert trainer.sorted_config.mode == "ict"


def test_norm_only_keeps_the_shared_head(tokenizer, tiny_checkpoint, tmp_path):
    model, tok = load_model(str(tiny_checkpoint))
    trainer = ICTTrainer(model=model, args=ict_args(tmp_path, ict_train="norm", max_steps=2), processing_class=tok,
                         train_dataset=gsm8k(tok, 8))
    trainer.sorted_config.base_model = str(tiny_checkpoint)
    trainer.train()
    assert all(head is trainer.arch.head for _, head in trainer.exit_heads.values())
    sm = SortedModel(model, tok, config=trainer.sorted_config)
    sm.exit_heads = trainer.exit_heads
    sm.save_pretrained(tmp_path / "ict")
    from safetensors.torch import load_file

    assert sorted(load_file(tmp_path / "ict" / HEADS_FILE)) == ["exit_2.norm.weight", "exit_4.norm.weight"]
    loaded = SortedModel.from_pretrained(str(tmp_path / "ict"))
    assert loaded.exit_heads[2][1] is loaded.arch.head
    assert loaded.config.extra["ict"]["extra_parameters"] == 2 * 64


def test_save_load_round_trip_is_exact_and_compact(tiny_checkpoint, tmp_path):
    """ICT after SoFT: heads on a SoFT checkpoint, saved alone, loaded back bit-exactly with the base."""
    soft = SortedModel(*load_model(str(tiny_checkpoint)), exits=[2, 4, 6]).save_pretrained(tmp_path / "soft",
                                                                                          mode="soft")
    model, tok = load_model(str(soft))
    config = SortedConfig(exits=[2, 4, 6], num_hidden_layers=6, base_model=str(soft))
    trainer = ICTTrainer(model=model, args=ict_args(tmp_path, max_steps=2), train_dataset=gsm8k(tok, 8),
                         processing_class=tok, sorted_config=config)
    assert trainer.sorted_config.extra["ict"]["base_mode"] == "soft"
    trainer.train()
    sm = SortedModel(model.eval(), tok, config=trainer.sorted_config)
    sm.exit_heads = trainer.exit_heads
    ids = torch.tensor([encode_prompts(sm, ["What is 2 + 3?"])[0]])
    want = sm.logits_at_exits(ids)
    folder = sm.save_pretrained(tmp_path / "ict")
    names = {p.name for p in folder.iterdir()}
    assert names == {HEADS_FILE, ADAPTER_CONFIG, "sorted_config.json", "manifest.json"}
    extra = extra_parameters(sm.arch.config, sm.exits)  # exits 2, 4: two (norm + vocab x 64 head) copies
    assert 4 * extra < (folder / HEADS_FILE).stat().st_size < 4 * extra + 4096  # the heads and nothing else
    cfg = json.loads((folder / "sorted_config.json").read_text())
    assert cfg["mode"] == "ict" and cfg["base_model"] == str(soft.resolve())
    adapter = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert (adapter["type"], adapter["base_model"], adapter["exits"]) == ("ict_heads", str(soft.resolve()), [2, 4])

    loaded = SortedModel.from_pretrained(str(folder))
    assert loaded.exits == [2, 4, 6] and sorted(loaded.exit_heads) == [2, 4]
    got = loaded.logits_at_exits(ids)
    assert all(torch.equal(want[k], got[k]) for k in want)
    plain = SortedModel.from_pretrained(str(soft)).logits_at_exits(ids)
    assert torch.equal(plain[6], got[6]) and not torch.allclose(plain[2], got[2])


def test_cli_train_evaluate_generate_export(tiny_checkpoint, tmp_path):
    """`sortedllm train --mode ict --base ...`, then the checkpoint works everywhere exits are read."""
    out = tmp_path / "run"
    assert recipe.main([
        "--mode", "ict", "--base", str(tiny_checkpoint), "--data", "gsm8k", "--data_limit", "8", "--exits", "2,4,6",
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--max_length", "128", "--learning_rate", "1e-2",
        "--save_strategy", "no", "--output_dir", str(out), "--disable_tqdm", "true", "--report_to", "none"]) == 0
    sm = SortedModel.from_pretrained(str(out / "final"))
    base = SortedModel.from_pretrained(str(tiny_checkpoint), exits=[2, 4, 6])
    assert sm.config.extra["ict"]["base_mode"] == "untuned"
    assert (out / "final" / VOCAB_FILE).is_file() and sm.draft_vocab_info["data"] == "gsm8k"
    assert sm.draft_vocab_info["rows"] == 7 and base.draft_vocab is None  # the training rows (1 of 8 is too long)

    res = evaluate({"ict": sm, "base": base}, ["loss"], exits="2,6", limit=4)
    assert res["models"]["ict"]["mode"] == "ict"
    loss = res["tasks"]["loss"]
    assert loss["ict"]["6"]["loss"] == pytest.approx(loss["base"]["6"]["loss"], abs=1e-6)
    assert loss["ict"]["2"]["loss"] != pytest.approx(loss["base"]["2"]["loss"], abs=1e-4)

    # generate reads exit 2's own head; the exported 2-layer model (untied head) agrees with it under HF generate
    prompt = "Tom has 3 apples and buys 2 more. How many?"
    [g] = generate(sm, [prompt], strategy=Static(2), max_new_tokens=6)
    small = submodel(sm, 2)
    assert small.config.tie_word_embeddings is False
    ids = torch.tensor([encode_prompts(sm, [prompt])[0]])
    hf = small.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                        pad_token_id=sm.tokenizer.pad_token_id)
    assert hf[0, ids.shape[1]:].tolist()[:len(g.token_ids)] == g.token_ids
    exported = tmp_path / "exit2"
    small.save_pretrained(exported)
    reread = AutoModelForCausalLM.from_pretrained(exported)
    assert torch.equal(reread.lm_head.weight, sm.exit_heads[2][1].weight)


def test_bad_input(tiny_checkpoint, tmp_path):
    def run(*argv):
        return recipe.main(["--data", "gsm8k", "--data_limit", "4", "--max_steps", "1", "--max_length", "128",
                            "--output_dir", str(tmp_path / "o"), "--report_to", "none", *argv])

    with pytest.raises(SortedError, match="needs --base"):
        run("--mode", "ict")
    with pytest.raises(SortedError, match="--base is for --mode ict"):
        run("--mode", "soft", "--base", str(tiny_checkpoint))
    with pytest.raises(SortedError, match="only exit is the last layer"):
        run("--mode", "ict", "--base", str(tiny_checkpoint), "--exits", "6")
    with pytest.raises(SortedError, match="ict_train"):
        run("--mode", "ict", "--base", str(tiny_checkpoint), "--ict_train", "everything")
    with pytest.raises(SortedError, match="drop --lora"):
        run("--mode", "ict", "--base", str(tiny_checkpoint), "--lora", "r=4")
    # an ICT folder is not a base, and an ICT folder whose base is gone says which base it needs
    ict = tmp_path / "ict"
    ict.mkdir()
    (ict / "sorted_config.json").write_text(json.dumps(
        {"exits": [2, 4, 6], "num_hidden_layers": 6, "mode": "ict", "base_model": str(tmp_path / "gone")}))
    with pytest.raises(SortedError, match="itself an ICT checkpoint"):
        run("--mode", "ict", "--base", str(ict))
    with pytest.raises(SortedError, match="needs its base model"):
        SortedModel.from_pretrained(str(ict))


def test_extra_parameters_from_config(tiny):
    """The count from a config matches the modules ICT builds; the paper's 13B setting gives its ~1.15B."""
    model, tok = tiny
    sm = SortedModel(model, tok, exits=[2, 4, 6])
    for train in ("head", "norm"):
        heads = ICTHeads.new(sm.arch, sm.exits, train)
        built = sum(p.numel() for p in heads.parameters())
        assert extra_parameters(sm.arch.config, sm.exits, train) == built
        assert len(heads.pairs(sm.arch)) == 2
    assert round(paper_extra_parameters() / 1e9, 2) == 1.15  # "≈1.15B extra parameters for LLaMA-2 13B"
