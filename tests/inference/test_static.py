import pytest
import torch

from sortedllm.data import encode_prompt
from sortedllm.export import submodel
from sortedllm.inference import generate

PROMPTS = ["What is 2+3?", "Name a color.", "Write one word about the sea, please, in a short reply."]


def hf_greedy(model, tokenizer, prompt, n):
    ids = torch.tensor([encode_prompt(tokenizer, prompt)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_static_exit_equals_exported_submodel_generate(tiny_sorted):
    """Batched (left-padded) decoding at exit k == HF generate of the exported k-layer model, one prompt at a time."""
    sm = tiny_sorted
    for k in (2, sm.num_layers):
        ours = generate(sm, PROMPTS, exit_layer=k, max_new_tokens=12, batch_size=3)
        small = submodel(sm, k)
        for p, g in zip(PROMPTS, ours):
            assert g.token_ids == hf_greedy(small, sm.tokenizer, p, 12)[:len(g.token_ids)]


@pytest.mark.slow  # the real SmolLM2 model
@pytest.mark.timeout(600)  # may load it first (converted from GGUF on a new machine)
def test_default_model_full_depth_matches_hf_generate(default_model):
    sm = default_model
    ours = generate(sm, PROMPTS, max_new_tokens=20, batch_size=3)
    for p, g in zip(PROMPTS, ours):
        ref = hf_greedy(sm.model, sm.tokenizer, p, 20)
        assert g.token_ids == ref[:len(g.token_ids)] and len(g.token_ids) == len(ref)


def test_rows_leave_the_batch_at_their_stop_token(tokenizer):
    """A row that stops early is dropped from the batch (cache rows included); the others continue unchanged."""
    from tests.inference.conftest import draftable

    sm = draftable("qwen2", tokenizer)  # varied output (random tiny LLaMA repeats one token)
    first = generate(sm, PROMPTS, exit_layer=4, max_new_tokens=10, batch_size=1)
    stop = first[1].token_ids[3]
    sm.model.generation_config.eos_token_id = [sm.tokenizer.eos_token_id, stop]
    single = generate(sm, PROMPTS, exit_layer=4, max_new_tokens=10, batch_size=1)
    batched = generate(sm, PROMPTS, exit_layer=4, max_new_tokens=10, batch_size=3)
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert len(single[1].token_ids) == 4 and single[1].token_ids[-1] == stop
    assert single[1].text == sm.tokenizer.decode(single[1].token_ids[:-1], skip_special_tokens=True)


def test_sampling_is_seeded(tiny_sorted):
    sm = tiny_sorted
    kw = dict(exit_layer=4, max_new_tokens=8, temperature=1.0, top_k=50)
    a = generate(sm, PROMPTS, seed=1, **kw)
    b = generate(sm, PROMPTS, seed=1, **kw)
    c = generate(sm, PROMPTS, seed=2, **kw)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
