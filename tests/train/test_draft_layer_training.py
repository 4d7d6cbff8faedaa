"""Training a draft layer on a frozen model: the loss is the KL to the last layer over the draft vocabulary (checked
against exit k's own logits at initialisation), it falls, the model stays bit-identical, and the CLI writes a file
that `generate --draft_layer` drafts with."""

import json

import pytest
import torch
import torch.nn.functional as F

from sortedllm.data import encode_example, load_examples
from sortedllm.inference import Speculative, generate, summary
from sortedllm import SortedModel
from sortedllm.adapters.draft_layer import DraftLayer, load_draft_layer
from sortedllm.errors import SortedError
from sortedllm.train.draft_layer import DraftOptions, cache_features, draft_kl, train_draft
from tests.inference.conftest import PROMPTS, draftable
from tests.test_cli import run_cli


def examples(tokenizer, n=12):
    rows = [encode_example(tokenizer, r, 192) for r in load_examples("gsm8k:train", limit=n)]
    assert all(rows)
    return rows


def test_loss_is_kl_to_the_last_layer_and_training_lowers_it(tokenizer):
    sm = draftable("llama", tokenizer)
    rows = examples(tokenizer)
    before = {n: p.clone() for n, p in sm.model.state_dict().items()}
    # At initialisation the draft is exit 3 itself: its loss is KL(last || exit 3) over the subset's logits.
    draft = DraftLayer.from_model(sm, shared=1, layers=2, vocab=sm.draft_vocab)
    (h, where, teacher), = cache_features(sm, rows[:1], draft)
    ids = torch.tensor([rows[0]["input_ids"]])
    with torch.no_grad():
        z = sm.logits_at_exits(ids, exits=[3, 6])
        sub = draft.head.ids
        naive = F.kl_div(F.log_softmax(z[3][0, where][:, sub], -1), F.log_softmax(z[6][0, where][:, sub], -1),
                         log_target=True, reduction="sum")
        assert torch.allclose(draft_kl(sm, draft, h, where, teacher), naive, rtol=2e-2, atol=1e-3)  # fp16 teacher

    trained, losses = train_draft(sm, rows, DraftOptions(shared=1, layers=2, vocab=8192, steps=30, batch=4, lr=3e-3))
    assert trained.head.ids.tolist() == sorted(sm.draft_vocab[:8192].tolist())  # the model's draft vocabulary
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    for n, p in sm.model.state_dict().items():
        assert torch.equal(p, before[n]), n  # the model itself is frozen
    ref = [g.token_ids for g in generate(sm, PROMPTS, max_new_tokens=16, batch_size=1)]
    plain = generate(sm, PROMPTS, strategy=Speculative(3, draft_vocab=8192), max_new_tokens=16, batch_size=4)
    ours = generate(sm, PROMPTS, strategy=Speculative(3, draft_layer=trained), max_new_tokens=16, batch_size=4)
    assert [g.token_ids for g in ours] == ref
    assert summary(ours)["acceptance"] > summary(plain)["acceptance"], (summary(ours), summary(plain))


def test_a_model_without_draft_vocabulary_drafts_the_training_tokens(tokenizer):
    sm = draftable("llama", tokenizer)
    sm.draft_vocab = None  # saved before draft vocabularies: the head's rows are the training rows' tokens
    rows = examples(tokenizer, 4)
    trained, _ = train_draft(sm, rows, DraftOptions(shared=1, layers=2, vocab=8192, steps=1, batch=2))
    counted = {t for e in rows for t in e["input_ids"]} | set(tokenizer.all_special_ids)
    assert set(trained.head.ids.tolist()) == counted
    trained, _ = train_draft(sm, rows, DraftOptions(shared=1, layers=2, vocab=None, steps=1, batch=2))
    assert len(trained.head.ids) == sm.arch.head.weight.shape[0]  # vocab None: every token


@pytest.mark.slow  # three CLI subprocesses (train, then generate twice)
@pytest.mark.timeout(600)
def test_cli_trains_a_draft_layer_and_generate_uses_it(tiny_checkpoint, tmp_path):
    out = tmp_path / "draft"
    r = run_cli("train", "--mode", "draft", "--base", tiny_checkpoint, "--data", "gsm8k", "--data_limit", 8,
                "--max_steps", 3, "--per_device_train_batch_size", 2, "--max_length", 192, "--draft_shared", 2, "--draft_layers", 1,
                "--output_dir", out, "--disable_tqdm", "true")
    assert r.returncode == 0, r.stderr[-3000:]
    path = out / "draft_layer.safetensors"
    assert sorted(p.name for p in out.iterdir()) == ["draft_layer.safetensors", "draft_vocab.json", "manifest.json",
                                                     "sorted_adapter.json"]
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert (meta["shared"], meta["layers"], meta["rows"], meta["steps"]) == ("2", "1", "8", "3")
    config = json.loads((out / "sorted_adapter.json").read_text())
    assert (config["type"], config["base_model"], config["shared"]) == ("draft_layer", str(tiny_checkpoint), 2)
    sm = SortedModel.from_pretrained(str(out))  # the base it names, with the draft layer attached
    assert sm.draft_layer.exit == 3 and sm.draft_vocab_info["rows"] == 8
    for draft_layer in (path, out):  # the file, as before adapter folders, or the folder
        r = run_cli("generate", "--model", tiny_checkpoint, "--prompt", "What is 2+3?", "--speculative", 3,
                    "--draft_layer", draft_layer, "--max_new_tokens", 8, "--jsonl")
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.loads(r.stdout.splitlines()[0])["new_tokens"] >= 1
    r = run_cli("train", "--mode", "draft", "--base", tiny_checkpoint, "--data_limit", 4, "--max_steps", 1,
                "--output_dir", tmp_path)  # it holds other things: the draft folder would replace them
    assert r.returncode == 2 and "is not an empty folder or a draft layer's" in r.stderr
    r = run_cli("generate", "--model", tiny_checkpoint, "--prompt", "hi", "--speculative", 4, "--draft_layer", path)
    assert r.returncode == 2 and "drafts at exit 3" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("extra,message", [  # one CLI subprocess each: the first in the fast run, the rest slow
    ((), "--mode draft needs --base"),
    pytest.param(("--base", "BASE", "--max_steps", "-1"), "--mode draft needs --max_steps", marks=pytest.mark.slow),
    pytest.param(("--base", "BASE", "--draft_shared", "6"), "must end before the last layer", marks=pytest.mark.slow),
])
def test_cli_errors(tiny_checkpoint, tmp_path, extra, message):
    extra = [str(tiny_checkpoint) if x == "BASE" else x for x in extra]
    r = run_cli("train", "--mode", "draft", "--data_limit", 4, "--max_steps", 2, "--output_dir", tmp_path / "o",
                *extra)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "o" / "draft_layer.safetensors").exists()


def test_load_rejects_a_draft_of_another_model(tokenizer, tmp_path):
    sm = draftable("llama", tokenizer)
    folder = DraftLayer.from_model(sm, shared=2).save_pretrained(tmp_path / "d")
    other = draftable("qwen2", tokenizer)
    with pytest.raises(SortedError, match=r"trained on another base model .*structure differs"):
        load_draft_layer(folder, other)
    lone = tmp_path / "lone.safetensors"  # as files were written before adapter folders: only shapes to check
    lone.write_bytes((folder / "draft_layer.safetensors").read_bytes())
    with pytest.raises(SortedError, match="does not fit this model"):
        load_draft_layer(lone, other)
