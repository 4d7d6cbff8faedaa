"""Adapters (ICT heads, a draft layer, LoRA): each saves as a folder that names its base and loads back onto it
exactly, refuses a different base, and the formats from before adapter folders still load."""

import json
import shutil

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import save_file

from sortedllm import SortedError, SortedModel
from sortedllm.adapters import ADAPTER_CONFIG, DraftLayer, ICTHeads, adapter_kind, fingerprint, lora
from sortedllm.adapters.base import fingerprint_problem
from sortedllm.models import load_model
from tests.conftest import make_tiny


def saved_base(arch, tokenizer, folder, seed=0):
    """A tiny model saved as a SoFT checkpoint, loaded back as sortedllm loads any model."""
    sm = SortedModel(make_tiny(arch, tokenizer, seed=seed), tokenizer, exits=[2, 4, 6])
    sm.save_pretrained(folder, mode="soft")
    return SortedModel.from_pretrained(str(folder))


def ids_of(tokenizer):
    return torch.tensor([tokenizer("Tom has 3 apples and buys 2 more. How many?")["input_ids"]])


def perturb(module, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


def same_logits(a, b, ids):
    want, got = a.logits_at_exits(ids), b.logits_at_exits(ids)
    return want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def make_ict(sm):
    heads = perturb(ICTHeads.new(sm.arch, sm.exits))
    heads.set_base(sm.model, sm.source)
    return heads


def make_draft(sm):
    draft = perturb(DraftLayer.from_model(sm, shared=1, layers=1, vocab=torch.arange(300)), scale=0.01)
    draft.info = {"steps": 3}
    return draft


def test_ict_heads_round_trip(arch_name, tokenizer, tmp_path):
    sm = saved_base(arch_name, tokenizer, tmp_path / "base")
    ids = ids_of(tokenizer)
    sm.attach(make_ict(sm))
    folder = sm.adapters["ict_heads"].save_pretrained(tmp_path / "ict")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert (config["type"], config["base_model"], config["exits"]) == ("ict_heads", str(tmp_path / "base"), [2, 4])
    assert adapter_kind(folder) is ICTHeads
    loaded = SortedModel.from_pretrained(str(folder))  # the base it names, heads attached
    assert sorted(loaded.exit_heads) == [2, 4] and same_logits(sm, loaded, ids)
    onto = SortedModel.from_pretrained(str(tmp_path / "base"))
    onto.load_adapter(folder)
    assert same_logits(sm, onto, ids)
    plain = SortedModel.from_pretrained(str(tmp_path / "base")).logits_at_exits(ids)
    assert not torch.allclose(plain[2], loaded.logits_at_exits(ids)[2])  # the heads do change exit 2


def test_draft_layer_round_trip(arch_name, tokenizer, tmp_path):
    sm = saved_base(arch_name, tokenizer, tmp_path / "base")
    draft = make_draft(sm)
    folder = draft.save_pretrained(tmp_path / "draft")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert (config["type"], config["shared"], config["layers"], config["vocab"]) == ("draft_layer", 1, 1, 300)
    loaded = SortedModel.from_pretrained(str(folder))
    assert loaded.exit_heads is None and loaded.draft_layer.exit == 2 and loaded.draft_layer.info == {"steps": "3"}
    assert torch.equal(loaded.draft_layer.head.ids, draft.head.ids)
    for (name, a), (_, b) in zip(draft.state_dict().items(), loaded.draft_layer.state_dict().items()):
        assert torch.equal(a, b), name
    h = sm.forward_early(ids_of(tokenizer), 1)
    assert torch.equal(draft.logits(sm.arch, draft.hidden(sm.arch, h)),
                       loaded.draft_layer.logits(loaded.arch, loaded.draft_layer.hidden(loaded.arch, h)))


def test_lora_round_trip(arch_name, tokenizer, tmp_path):
    sm = saved_base(arch_name, tokenizer, tmp_path / "base")
    ids = ids_of(tokenizer)
    peft_model = get_peft_model(sm.model, lora.lora_config("r=2,alpha=4,targets=q_proj,v_proj", sm.model))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    adapted = SortedModel(peft_model.eval(), tokenizer, config=sm.config)
    assert list(adapted.adapters) == ["lora"]
    folder = adapted.save_pretrained(tmp_path / "lora")
    assert json.loads((folder / ADAPTER_CONFIG).read_text())["type"] == "lora"
    assert "base_model" not in json.loads((folder / ADAPTER_CONFIG).read_text())  # peft's record is the reference
    loaded = SortedModel.from_pretrained(str(folder))
    assert isinstance(loaded.model, PeftModel) and loaded.exits == [2, 4, 6] and same_logits(adapted, loaded, ids)
    with pytest.raises(SortedError, match="already has a LoRA adapter"):
        loaded.load_adapter(folder)


def test_a_different_base_is_refused(tokenizer, tmp_path):
    """Each kind saved on base A: refused on B (same architecture, other weights), on A fine-tuned, and on another
    architecture; accepted on A loaded in another dtype."""
    a = saved_base("llama", tokenizer, tmp_path / "a")
    b = saved_base("llama", tokenizer, tmp_path / "b", seed=1)
    ict = make_ict(a).save_pretrained(tmp_path / "ict")
    draft = make_draft(a).save_pretrained(tmp_path / "draft")
    peft_model = get_peft_model(SortedModel.from_pretrained(str(tmp_path / "a")).model,
                                lora.lora_config("r=2", a.model))
    lora_folder = SortedModel(peft_model, tokenizer).save_pretrained(tmp_path / "lora")
    tuned = SortedModel.from_pretrained(str(tmp_path / "a"))
    with torch.no_grad():  # what fine-tuning does: every weight moves by a few percent
        for p in tuned.model.parameters():
            p.mul_(1 + 0.05 * torch.randn_like(p))
    qwen = saved_base("qwen2", tokenizer, tmp_path / "q")
    for folder in (ict, draft, lora_folder):
        for other, why in ((b, "sampled weights differ"), (tuned, "sampled weights differ"),
                           (qwen, "structure differs")):
            with pytest.raises(SortedError, match=f"trained on another base model .*{why}"):
                other.load_adapter(folder)
    half = SortedModel.from_pretrained(str(tmp_path / "a"), dtype="bfloat16")
    for folder in (ict, draft):
        half.load_adapter(folder)  # bf16 rounding moves no weight by 1%
    assert fingerprint_problem(fingerprint(a.model), half.model) is None

    # a folder pointed at another base (base_model edited) is refused when loaded from its own folder too
    config = json.loads((ict / ADAPTER_CONFIG).read_text())
    config["base_model"] = str(tmp_path / "b")
    (ict / ADAPTER_CONFIG).write_text(json.dumps(config))
    (ict / "manifest.json").unlink()  # edited on purpose
    with pytest.raises(SortedError, match="trained on another base model"):
        SortedModel.from_pretrained(str(ict))


def test_formats_from_before_adapter_folders_load(tokenizer, tmp_path):
    """As older versions wrote them: an ICT folder named by sorted_config.json, a lone draft-layer file, and a peft
    folder with nothing of sortedllm's."""
    sm = saved_base("llama", tokenizer, tmp_path / "base")
    ids = ids_of(tokenizer)
    heads = make_ict(sm)
    ict = tmp_path / "ict-old"
    ict.mkdir()
    save_file({k: t.contiguous() for k, t in heads.tensors().items()}, str(ict / "exit_heads.safetensors"),
              metadata={"format": "pt", "sortedllm": "exit_heads", "ict_train": "head"})
    (ict / "sorted_config.json").write_text(json.dumps({
        "exits": [2, 4, 6], "num_hidden_layers": 6, "mode": "ict", "base_model": str(tmp_path / "gone"),
        "extra": {"ict": {"train": "head", "base_relative": "../base"}}}))
    old = SortedModel.from_pretrained(str(ict))  # found through base_relative: the base "moved"
    sm.attach(heads)
    assert old.config.mode == "ict" and same_logits(sm, old, ids)

    draft = make_draft(sm)
    lone = tmp_path / "draft-old" / "draft_layer.safetensors"
    lone.parent.mkdir()
    meta = {"sortedllm": "draft_layer", "shared": "1", "layers": "1", "num_hidden_layers": "6", "base": "x",
            "rows": "10"}
    save_file({k: t.contiguous() for k, t in draft.tensors().items()}, str(lone), metadata=meta)
    for path in (lone, lone.parent):  # the file, or the folder `--mode draft` wrote it into
        loaded = SortedModel.from_pretrained(str(tmp_path / "base")).load_adapter(path)
        assert loaded.exit == 2 and torch.equal(loaded.head.ids, draft.head.ids)
    with pytest.raises(SortedError, match="without a record of its base model"):
        SortedModel.from_pretrained(str(lone.parent))

    model, tok = load_model(str(tmp_path / "base"))
    peft_model = get_peft_model(model, lora.lora_config("r=2", model))
    peft_model.save_pretrained(tmp_path / "peft")  # peft alone: adapter_config.json + adapter_model.safetensors
    loaded = SortedModel.from_pretrained(str(tmp_path / "peft"))
    assert isinstance(loaded.model, PeftModel) and loaded.exits == [2, 4, 6]  # no sorted_config.json: the base's
    assert same_logits(SortedModel(peft_model.eval(), tok, exits=[2, 4, 6]), loaded, ids)


def test_adapters_stack_and_plain_loading_names_them(tokenizer, tmp_path):
    sm = saved_base("llama", tokenizer, tmp_path / "base")
    ict = make_ict(sm).save_pretrained(tmp_path / "ict")
    on_ict = SortedModel.from_pretrained(str(ict))
    draft = make_draft(on_ict).save_pretrained(tmp_path / "draft")  # trained on the ICT folder: it names that
    loaded = SortedModel.from_pretrained(str(draft))
    assert sorted(loaded.adapters) == ["draft_layer", "ict_heads"] and loaded.exits == [2, 4, 6]
    loaded.load_adapter(draft)  # a draft layer replaces the attached one
    with pytest.raises(SortedError, match="already has a ict_heads adapter"):
        loaded.load_adapter(ict)
    with pytest.raises(SortedError, match="is an adapter folder .* SortedModel.from_pretrained"):
        load_model(str(ict))
    with pytest.raises(SortedError, match="is not an adapter"):
        loaded.load_adapter(tmp_path / "base")
    shutil.copytree(ict, tmp_path / "loop")
    config = json.loads((tmp_path / "loop" / ADAPTER_CONFIG).read_text())
    config["base_model"] = str(tmp_path / "loop")
    (tmp_path / "loop" / ADAPTER_CONFIG).write_text(json.dumps(config))
    (tmp_path / "loop" / "manifest.json").unlink()
    with pytest.raises(SortedError, match="names itself as its base"):
        SortedModel.from_pretrained(str(tmp_path / "loop"))
