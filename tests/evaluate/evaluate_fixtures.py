"""Models whose greedy output is known in advance, so the evaluation pipeline's numbers can be checked exactly."""

from __future__ import annotations

import pytest
import torch


def constant_model(tokenizer, token: str, layers: int = 4, seed: int = 0):
    """A tiny LLaMA (real architecture, tied head) that emits `token` at every step and at every exit: each
    layer's MLP bias adds a large multiple of the token's embedding to the residual stream, so every exit's
    normed state points at that embedding row and the tied head ranks it first."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    [tid] = tokenizer(token, add_special_tokens=False)["input_ids"]
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=2,
                      eos_token_id=2, bos_token_id=1, tie_word_embeddings=True, mlp_bias=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[tid] *= 4.0
        for layer in model.model.layers:
            layer.mlp.down_proj.bias.copy_(emb[tid] * 50.0)
    return model.eval()


@pytest.fixture(scope="session")
def constant_checkpoints(tmp_path_factory, tokenizer):
    """Saved sorted checkpoints (exits 2 and 4): "sevens" answers 77777777..., "blank" answers newlines only."""
    from sortedllm import SortedModel

    root = tmp_path_factory.mktemp("constant")
    out = {}
    for name, token, mode in (("sevens", "7", "soft"), ("blank", "\n", "sft")):
        sm = SortedModel(constant_model(tokenizer, token), tokenizer, exits=[2, 4])
        sm.config.mode = mode
        sm.save_pretrained(root / name)
        out[name] = root / name
    return out
