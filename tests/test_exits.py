import json

import pytest
import torch

from sortedllm import SortedError, SortedModel, resolve_exits
from sortedllm.exits import CONFIG_NAME, hidden_from_outputs


@pytest.mark.parametrize("spec, layers, expected", [
    ("count:8", 30, [9, 12, 15, 18, 21, 24, 27, 30]),
    ({"count": 8}, 40, [12, 16, 20, 24, 28, 32, 36, 40]),  # the paper's exits on LLaMA-2 13B
    ({"every": 3}, 12, [3, 6, 9, 12]),
    ("every:5", 12, [5, 10, 12]),
    ([9, 12, 30], 30, [9, 12, 30]),
    ("9,18", 30, [9, 18, 30]),  # the last layer is always an exit
    ("[4, 8]", 8, [4, 8]),
    ({"count": 3, "start": 2}, 8, [2, 5, 8]),
    ("all", 3, [1, 2, 3]),
    (None, 30, [9, 12, 15, 18, 21, 24, 27, 30]),
])
def test_resolve_exits(spec, layers, expected):
    assert resolve_exits(spec, layers) == expected


@pytest.mark.parametrize("spec, message", [
    ([0, 30], "exit layer 0 is out of range"),
    ("9,31", "exit layer 31 is out of range"),
    ([9, 9, 30], "listed twice"),
    ([12, 9, 30], "increasing order"),
    ("count:40", "out of range"),
    ("every:0", "out of range"),
    ("banana", "not understood"),
    ({"step": 2}, "not understood"),
])
def test_bad_exits_are_clear_errors(spec, message):
    with pytest.raises(SortedError, match=message):
        resolve_exits(spec, 30)


def test_save_load_roundtrip_is_a_plain_hf_model(tiny_sorted, tmp_path):
    from transformers import AutoModelForCausalLM

    sm = tiny_sorted
    sm.config.mode = "soft"
    sm.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    assert saved["exits"] == [2, 4, 6] and saved["num_hidden_layers"] == 6
    assert list((tmp_path / "ckpt").glob("*.safetensors"))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")  # no sortedllm code needed
    ids = torch.randint(0, 1000, (1, 7))
    torch.testing.assert_close(plain(ids).logits, sm.model(ids).logits)
    again = SortedModel.from_pretrained(str(tmp_path / "ckpt"))
    assert again.exits == [2, 4, 6] and again.config.mode == "soft"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_check_exits_on_a_checkpoint(tiny_sorted):
    sm = tiny_sorted
    sm.config.mode = "soft"
    assert sm.check_exits("2,6") == [2, 6]
    assert sm.check_exits(None) == [2, 4, 6]
    with pytest.raises(SortedError, match="exit 3 is not an exit of this checkpoint"):
        sm.check_exits("3")


def test_forward_early_and_remainder_are_the_full_forward(tiny_sorted):
    """forward_early(ids, k) is HF's hidden state after layer k; forward_remainder from there is the last layer's;
    with a padding mask and with a KV cache (prefill, then one more token) too."""
    from transformers import DynamicCache

    sm, L = tiny_sorted, tiny_sorted.num_layers
    ids = torch.randint(0, 1000, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    with torch.no_grad():
        full = sm.model(ids, attention_mask=mask, output_hidden_states=True)
        for k in range(L + 1):
            h = sm.forward_early(ids, k, attention_mask=mask)
            real = mask.bool()
            want, normed = hidden_from_outputs(full.hidden_states, k, L)  # HF's last slot is after the final norm
            torch.testing.assert_close((sm.arch.norm(h) if normed else h)[real], want[real], rtol=1e-4, atol=1e-4)
            last = sm.forward_remainder(h, k, attention_mask=mask)
            torch.testing.assert_close(sm.exit_logits(last, L)[real], full.logits[real], rtol=1e-4, atol=1e-4)
        assert torch.equal(sm.forward_early(sm.arch.embed(ids), 3), sm.forward_early(ids, 3))  # embeddings in
        assert torch.equal(sm.forward_remainder(sm.forward_early(ids, 2), 2, 4), sm.forward_early(ids, 4))
        cache = DynamicCache(config=sm.arch.config)
        sm.forward_remainder(sm.forward_early(ids[:1, :-1], 3, cache=cache), 3, cache=cache)
        step = sm.forward_remainder(sm.forward_early(ids[:1, -1:], 3, cache=cache), 3, cache=cache)
        torch.testing.assert_close(sm.exit_logits(step, L)[0, -1], sm.model(ids[:1]).logits[0, -1], rtol=1e-4,
                                   atol=1e-4)
    with pytest.raises(SortedError, match="out of range"):
        sm.forward_early(ids, L + 1)
    with pytest.raises(SortedError, match="out of range"):
        sm.forward_remainder(torch.zeros(1, 1, 64), 4, 2)
