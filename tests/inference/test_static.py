import pytest
import torch

from sortedllm.data import encode_prompt
from sortedllm.export import submodel
from sortedllm.inference import Static, generate

PROMPTS = ["What is 2+3?", "Name a color.", "Write one word about the sea, please, in a short reply."]


def hf_greedy(model, tokenizer, prompt, n):
    ids = torch.tensor([encode_prompt(tokenizer, prompt)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def greedy_up_to_ties(model, tokenizer, prompt, tokens, tol=1e-3):
    """Whether `tokens` is `model`'s greedy continuation of `prompt`, a token counting as greedy when its logit is
    within `tol` of the maximum: the runtime's kernels sum in another order than HF's, and a random tiny model's
    near-uniform logits are full of near-ties."""
    ids = torch.tensor([encode_prompt(tokenizer, prompt) + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0, -len(tokens) - 1:-1]
    chosen = logits.gather(-1, torch.tensor(tokens)[:, None])[:, 0]
    return bool((chosen >= logits.max(-1).values - tol).all())


def test_static_exit_equals_exported_submodel_generate(tiny_sorted):
    """Batched (left-padded) decoding at exit k, float32 runtime == greedy decoding of the exported k-layer model."""
    sm = tiny_sorted
    for k in (2, sm.num_layers):
        ours = generate(sm, PROMPTS, strategy=Static(k), max_new_tokens=12, batch_size=3, dtype="float32")
        small = submodel(sm, k)
        for p, g in zip(PROMPTS, ours):
            assert greedy_up_to_ties(small, sm.tokenizer, p, g.token_ids)


@pytest.mark.slow  # the real SmolLM2 model
@pytest.mark.timeout(600)  # may load it first (converted from GGUF on a new machine)
def test_default_model_full_depth_matches_hf_generate(default_model):
    sm = default_model
    ours = generate(sm, PROMPTS, max_new_tokens=20, batch_size=3, dtype="float32")
    for p, g in zip(PROMPTS, ours):
        ref = hf_greedy(sm.model, sm.tokenizer, p, 20)
        assert g.token_ids == ref[:len(g.token_ids)] and len(g.token_ids) == len(ref)


def test_rows_leave_the_batch_at_their_stop_token(tokenizer):
    """A row that stops early is dropped from the batch (cache rows included); the others continue unchanged."""
    from tests.inference.conftest import draftable

    sm = draftable("qwen2", tokenizer)  # varied output (random tiny LLaMA repeats one token)
    first = generate(sm, PROMPTS, strategy=Static(4), max_new_tokens=10, batch_size=1)
    stop = first[1].token_ids[3]
    sm.model.generation_config.eos_token_id = [sm.tokenizer.eos_token_id, stop]
    single = generate(sm, PROMPTS, strategy=Static(4), max_new_tokens=10, batch_size=1)
    batched = generate(sm, PROMPTS, strategy=Static(4), max_new_tokens=10, batch_size=3)
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert len(single[1].token_ids) == 4 and single[1].token_ids[-1] == stop
    assert single[1].text == sm.tokenizer.decode(single[1].token_ids[:-1], skip_special_tokens=True)


def test_sampling_is_seeded(tiny_sorted):
    sm = tiny_sorted
    kw = dict(strategy=Static(4), max_new_tokens=8, temperature=1.0, top_k=50)
    a = generate(sm, PROMPTS, seed=1, **kw)
    b = generate(sm, PROMPTS, seed=1, **kw)
    c = generate(sm, PROMPTS, seed=2, **kw)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
