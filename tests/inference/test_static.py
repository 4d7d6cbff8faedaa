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


def test_default_model_full_depth_matches_hf_generate(default_model):
    sm = default_model
    ours = generate(sm, PROMPTS, max_new_tokens=20, batch_size=3)
    for p, g in zip(PROMPTS, ours):
        ref = hf_greedy(sm.model, sm.tokenizer, p, 20)
        assert g.token_ids == ref[:len(g.token_ids)] and len(g.token_ids) == len(ref)
