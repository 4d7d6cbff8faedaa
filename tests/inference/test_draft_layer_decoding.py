"""A trained draft layer in self-speculative decoding: exact output, its KV slots mirror the model's own, file
round trip and errors."""

import pytest
import torch

from sortedllm.errors import SortedError
from sortedllm.inference import Speculative, generate, summary
from sortedllm import SortedModel
from sortedllm.adapters.draft_layer import DraftLayer, load_draft_layer
from tests.inference.conftest import PROMPTS, draftable


def perturbed(draft: DraftLayer, scale: float = 0.5, seed: int = 0) -> DraftLayer:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in draft.layers.named_parameters():
            if name.endswith("o_proj.weight"):
                p.add_(torch.randn(p.shape, generator=g) * p.std() * scale)
    return draft


@pytest.mark.parametrize("arch,restricted", [("llama", True), ("qwen2", False)])
def test_greedy_is_identical_to_the_full_model(arch, restricted, tokenizer):
    """A draft layer that differs from the model's own layer 3: both accept and reject paths run (prompts of mixed
    lengths, so the prefill merges per-length caches into the draft's slots too) and the text is the full model's."""
    sm = draftable(arch, tokenizer)
    draft = perturbed(DraftLayer.from_model(sm, shared=2, layers=1, vocab=sm.draft_vocab if restricted else None))
    ref = [g.token_ids for g in generate(sm, PROMPTS, max_new_tokens=24, batch_size=1)]
    for bs, opts in ((1, {}), (4, dict(draft_tokens=6)), (10, dict(draft_tokens=2, adaptive=False))):
        out = generate(sm, PROMPTS, strategy=Speculative(3, draft_layer=draft, **opts), max_new_tokens=24,
                       batch_size=bs)
        assert [g.token_ids for g in out] == ref, (bs, opts)
        acceptance = summary(out)["acceptance"]
        assert 0.05 < acceptance < 0.95, acceptance


def test_an_untrained_draft_layer_drafts_exactly_as_its_exit(tokenizer):
    """A copy of layer 3 (its own norm and head rows unchanged) must draft exactly what exit 3 drafts: same
    acceptance, rounds and drafts, batched. It only can if its KV slots hold what layer 3's hold after every crop and
    row drop."""
    sm = draftable("llama", tokenizer)
    draft = DraftLayer.from_model(sm, shared=2, layers=1, vocab=sm.draft_vocab)
    # A fixed draft length: the adaptive one follows the measured cost table, whose timings differ run to run.
    plain = summary(generate(sm, PROMPTS, strategy=Speculative(3, draft_vocab=8192, adaptive=False),
                             max_new_tokens=24, batch_size=4))
    ours = summary(generate(sm, PROMPTS, strategy=Speculative(3, draft_layer=draft, adaptive=False),
                            max_new_tokens=24, batch_size=4))
    for key in ("drafted", "accepted", "rounds", "emitted"):
        assert ours[key] == plain[key], (key, ours, plain)
    assert 0.05 < ours["acceptance"] < 0.95


def test_two_draft_layers_and_sampling(tokenizer):
    sm = draftable("qwen2", tokenizer)
    draft = perturbed(DraftLayer.from_model(sm, shared=1, layers=2, vocab=None), seed=1)
    ref = [g.token_ids for g in generate(sm, PROMPTS[:4], max_new_tokens=16, batch_size=1)]
    out = generate(sm, PROMPTS[:4], strategy=Speculative(3, draft_layer=draft), max_new_tokens=16, batch_size=2)
    assert [g.token_ids for g in out] == ref
    a = generate(sm, PROMPTS[:4], strategy=Speculative(3, draft_layer=draft), max_new_tokens=8, temperature=1.0,
                 seed=3)
    b = generate(sm, PROMPTS[:4], strategy=Speculative(3, draft_layer=draft), max_new_tokens=8, temperature=1.0,
                 seed=3)
    assert [g.token_ids for g in a] == [g.token_ids for g in b] and all(g.token_ids for g in a)


def test_file_round_trip_and_errors(tokenizer, tmp_path):
    sm = draftable("llama", tokenizer)
    draft = perturbed(DraftLayer.from_model(sm, shared=2, layers=1, vocab=sm.draft_vocab))
    draft.info = {"rows": 10}
    folder = draft.save_pretrained(tmp_path / "draft")
    path = folder / "draft_layer.safetensors"
    for source in (folder, path):  # the folder, or its weights file alone
        loaded = load_draft_layer(source, sm)
        assert (loaded.shared, loaded.exit, loaded.head.ids.tolist()) == (2, 3, draft.head.ids.tolist())
        assert loaded.info == {"rows": "10"}
        for a, b in zip(draft.state_dict().values(), loaded.state_dict().values()):
            assert torch.equal(a, b)
    by_path = generate(sm, PROMPTS[:3], strategy=Speculative(3, draft_layer=str(folder)), max_new_tokens=12)
    by_module = generate(sm, PROMPTS[:3], strategy=Speculative(3, draft_layer=draft), max_new_tokens=12)
    assert summary(by_path)["accepted"] == summary(by_module)["accepted"]
    assert not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob(".*"))

    with pytest.raises(SortedError, match="drafts at exit 3 .* not 4"):
        generate(sm, ["hi"], strategy=Speculative(4, draft_layer=draft))
    with pytest.raises(SortedError, match="draft layer file not found"):
        load_draft_layer(tmp_path / "nope.safetensors", sm)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SortedError, match="not a readable draft layer file"):
        load_draft_layer(tmp_path / "junk.safetensors", sm)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(SortedError, match="not a draft layer file"):
        load_draft_layer(tmp_path / "other.safetensors", sm)
    from tests.conftest import make_tiny

    shallow = SortedModel(make_tiny("llama", tokenizer, layers=4), tokenizer)
    lone = tmp_path / "lone.safetensors"  # a file alone records no base: only its shape is checked
    lone.write_bytes(path.read_bytes())
    with pytest.raises(SortedError, match="trained on a 6-layer model, this one has 4"):
        load_draft_layer(lone, shallow)
    with pytest.raises(SortedError, match="trained on another base model"):
        load_draft_layer(folder, shallow)
    with pytest.raises(SortedError, match="must end before the last layer"):
        DraftLayer.from_model(sm, shared=5, layers=1)
    with pytest.raises(SortedError, match="sliding-window"):
        DraftLayer.from_model(draftable("gemma3_text", tokenizer), shared=2, layers=1)
