"""The draft vocabulary: counted on training data when a model is trained or exported, saved beside it, loaded with
it, and never computed at inference time."""

import json

import pytest
import torch

from sortedllm import SortedError, SortedModel
from sortedllm.adapters import vocab
from sortedllm.adapters.vocab import VOCAB_FILE, count_vocab, rank_tokens, restricted_head, vocab_from_data
from sortedllm.checkpoint import verify_manifest
from sortedllm.cli import main as cli
from sortedllm.inference import EarlyExit, Speculative, generate


def test_ranking_keeps_special_and_stop_tokens_first(tokenizer, tiny):
    assert rank_tokens([[5, 6, 6, 7], [7, 7, 9]], 10).tolist() == [7, 6, 5, 9]  # by count, ties by id
    assert rank_tokens([[5, 6, 6, 7], [7, 7, 9]], 3, always=[9, 1]).tolist() == [1, 9, 7]
    model, _ = tiny
    model.generation_config.eos_token_id = [2, 77]
    ids, info = count_vocab(tokenizer, model, [[100, 100, 101]], 64, "mine")
    specials = sorted(set(tokenizer.all_special_ids) | {77})
    assert ids.tolist() == specials + [100, 101]
    assert info == {"data": "mine", "rows": 1, "tokens": 3, "size": len(specials) + 2}
    with pytest.raises(SortedError, match=">= 1"):
        count_vocab(tokenizer, model, [[1]], 0, None)


def test_saved_and_loaded_with_the_model(tiny_sorted, tmp_path):
    sm = tiny_sorted
    assert sm.draft_vocab is None
    sm.draft_vocab, sm.draft_vocab_info = vocab_from_data(sm.tokenizer, sm.model, "gsm8k:test", 500)
    assert len(sm.draft_vocab) == 500 and sm.draft_vocab_info["rows"] == 250
    sm.save_pretrained(tmp_path / "m")
    loaded = SortedModel.from_pretrained(str(tmp_path / "m"))
    assert torch.equal(loaded.draft_vocab, sm.draft_vocab) and loaded.draft_vocab_info == sm.draft_vocab_info
    assert restricted_head(loaded, 2, 100).ids.tolist() == sorted(sm.draft_vocab[:100].tolist())
    data = json.loads((tmp_path / "m" / VOCAB_FILE).read_text())
    data["ids"] = ["x"]
    (tmp_path / "m" / VOCAB_FILE).write_text(json.dumps(data))
    (tmp_path / "m" / "manifest.json").unlink()  # edited on purpose
    with pytest.raises(SortedError, match="draft_vocab.json is malformed"):
        SortedModel.from_pretrained(str(tmp_path / "m"))


def test_inference_tokenises_nothing(tiny_sorted, monkeypatch):
    """Restricted draft heads and early-exit screens come from sm.draft_vocab; no data is read to build them."""
    sm = tiny_sorted
    sm.draft_vocab = count_vocab(sm.tokenizer, sm.model, [list(range(3000))], 2000, None)[0]

    def no_data(*args, **kwargs):
        raise AssertionError("data read at inference time")

    monkeypatch.setattr(vocab, "load_examples", no_data)
    monkeypatch.setattr("sortedllm.data.load_examples", no_data)
    stats = generate(sm, ["What is 2+3?"], strategy=Speculative(2, draft_vocab=1000), max_new_tokens=6)[0].stats
    assert stats["drafted"] > 0
    generate(sm, ["What is 2+3?"], strategy=EarlyExit(thresholds={2: 0.0}, screen=1000), max_new_tokens=4)
    assert restricted_head(sm, 2, 1000) is not None


def test_export_writes_copies_and_adds_it(tiny_sorted, tmp_path, capsys):
    sm = tiny_sorted
    sm.config.mode, sm.config.data = "soft", "gsm8k:test"
    folder = sm.save_pretrained(tmp_path / "m")
    assert not (folder / VOCAB_FILE).exists()
    # in place: counted on the data the model was trained on; the folder's manifest still verifies
    assert cli(["export", "--model", str(folder), "--draft_vocab", "300"]) == 0
    assert "draft vocabulary of 300 tokens (gsm8k:test)" in capsys.readouterr().out
    verify_manifest(folder)
    loaded = SortedModel.from_pretrained(str(folder))
    assert len(loaded.draft_vocab) == 300 and loaded.draft_vocab_info["data"] == "gsm8k:test"
    # exported sub-models carry the model's own; --draft_vocab 0 writes none
    assert cli(["export", "--model", str(folder), "--layers", "2,4", "--out", str(tmp_path / "x")]) == 0
    for k in (2, 4):
        again = SortedModel.from_pretrained(str(tmp_path / "x" / f"exit-{k}"))
        assert torch.equal(again.draft_vocab, loaded.draft_vocab)
    assert cli(["export", "--model", str(folder), "--layers", "2", "--out", str(tmp_path / "y"),
                "--draft_vocab", "0"]) == 0
    assert not (tmp_path / "y" / VOCAB_FILE).exists()
    # a copy of the whole model with a vocabulary counted on other data
    assert cli(["export", "--model", str(folder), "--draft_vocab", "50", "--draft_data", "alpaca:test",
                "--out", str(tmp_path / "copy")]) == 0
    copy = SortedModel.from_pretrained(str(tmp_path / "copy"))
    assert len(copy.draft_vocab) == 50 and copy.draft_vocab_info["data"] == "alpaca:test" and copy.exits == sm.exits
    capsys.readouterr()
    untuned = SortedModel(sm.model, sm.tokenizer).save_pretrained(tmp_path / "untuned")
    assert cli(["export", "--model", str(untuned), "--draft_vocab", "50"]) == 2
    assert "records no training data" in capsys.readouterr().err
    assert cli(["export", "--model", str(untuned)]) == 2
    assert "--layers is required" in capsys.readouterr().err
