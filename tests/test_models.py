import pytest
import torch

from sortedllm import SortedError, SortedModel, load_model
from sortedllm.exits import hidden_from_outputs
from sortedllm.models import Architecture, resolve_source


def test_alias_resolves_to_packaged_gguf():
    src = resolve_source("smollm2-135m")
    assert src.kind == "gguf" and src.gguf_file.endswith(".gguf")


@pytest.mark.parametrize("spec, message", [
    ("./no/such/folder", "model path not found"),
    ("/tmp/definitely-missing.gguf", "GGUF file not found"),
    ("not-an-org/not-a-model-xyz", "unknown model 'not-an-org/not-a-model-xyz'"),
])
def test_bad_model_specs_give_one_clear_line(spec, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SortedError, match=message) as e:
        load_model(spec)
    assert "\n" not in str(e.value)


def test_not_a_gguf_file_is_refused(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(SortedError, match="not a valid GGUF file"):
        load_model(str(bad))


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(SortedError, match="no config.json"):
        load_model(str(tmp_path))


def test_adapter_logits_match_hf_forward_at_last_exit(tiny_sorted):
    sm = tiny_sorted
    ids = torch.randint(0, 1000, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    ref = sm.model(ids, attention_mask=mask).logits
    ours = sm.logits_at_exits(ids, mask, exits=[sm.num_layers])[sm.num_layers]
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-5)


def test_training_hidden_states_match_layer_runner(tiny_sorted):
    """The trainer reads exits from HF's output_hidden_states; inference runs layers itself: same numbers."""
    sm = tiny_sorted
    ids = torch.randint(0, 1000, (2, 9))
    hs = sm.model(ids, output_hidden_states=True).hidden_states
    ours = sm.hidden_at_exits(ids, exits=sm.exits)
    for k in sm.exits:
        h, normed = hidden_from_outputs(hs, k, sm.num_layers)
        expected = sm.arch.norm(ours[k]) if normed else ours[k]
        torch.testing.assert_close(h, expected, atol=1e-5, rtol=1e-5)


def test_cached_decoding_matches_full_forward(tiny_sorted):
    from transformers import DynamicCache

    sm, arch = tiny_sorted, tiny_sorted.arch
    ids = torch.randint(0, 1000, (1, 10))
    full = sm.logits_at_exits(ids, exits=[4])[4]
    cache = DynamicCache(config=arch.config)
    with torch.no_grad():
        h = arch.run_layers(arch.embed(ids[:, :6]), 0, 4, cache=cache)
        steps = [sm.exit_logits(h, 4)]
        for t in range(6, 10):
            steps.append(sm.exit_logits(arch.run_layers(arch.embed(ids[:, t:t + 1]), 0, 4, cache=cache), 4))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(SortedError, match="unsupported architecture 'gpt2'"):
        Architecture(model)


@pytest.mark.slow  # the real SmolLM2 model
@pytest.mark.timeout(600)  # may load it first (converted from GGUF on a new machine)
def test_parameter_layout_of_default_model(default_model):
    sm = default_model
    assert sm.num_layers == 30
    assert sm.arch.model_type == "llama"
    head_share = sm.arch.head.weight.numel() / sum(p.numel() for p in sm.model.parameters())
    assert 0.15 < head_share < 0.3  # the ~21% the issues quote
