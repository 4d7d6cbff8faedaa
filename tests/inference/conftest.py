"""Tiny models whose exits disagree often enough to exercise both sides of every decision.

Random-weight tiny models are degenerate for dynamic inference: a draft exit either always or never agrees with
the last layer, and their max probabilities over 49k tokens are ~1e-4. Scaling the layers' output projections
and fixing the final norm's scale gives each architecture draft acceptance strictly between 0 and 1 and spread-out
confidences; tests assert that spread, so they cannot pass vacuously.
"""

import pytest
import torch

from tests.conftest import ARCHS, make_tiny

# arch -> (scale of o_proj / down_proj, final norm scale)
TUNING = {"llama": (3.0, None), "qwen2": (0.3, 30.0), "gemma3_text": (0.1, 100.0)}
VOCAB_DATA = "gsm8k:train+alpaca:train+triviaqa:train"  # what a trained model's draft vocabulary is counted on
_VOCAB = {}
PROMPTS = ["What is 2+3?", "Name a color.", "Write one word about the sea, please, in a short reply.", "hi",
           "Tell me a long story about dragons, knights and a castle on a hill far away.", "List three fruits.",
           "Why is the sky blue?", "Translate 'cat' to French.", "Count to five.", "2*7=?"]


def builtin_vocab(tokenizer, model):
    """The draft vocabulary a model trained on the built-in training splits saves (computed once per session)."""
    from sortedllm.adapters.vocab import vocab_from_data

    if id(tokenizer) not in _VOCAB:
        _VOCAB[id(tokenizer)] = vocab_from_data(tokenizer, model, VOCAB_DATA, 8192)
    return _VOCAB[id(tokenizer)]


def draftable(arch: str, tokenizer, exits=(2, 4, 6)):
    """A tiny model whose exits disagree often, with the draft vocabulary of a trained model."""
    from sortedllm import SortedModel

    model = make_tiny(arch, tokenizer)
    scale, norm = TUNING[arch]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(scale)
        if norm is not None:  # Gemma's RMSNorm multiplies by (1 + weight)
            model.model.norm.weight.fill_(norm - 1 if arch == "gemma3_text" else norm)
    sm = SortedModel(model, tokenizer, exits=list(exits))
    sm.draft_vocab, sm.draft_vocab_info = builtin_vocab(tokenizer, model)
    return sm


@pytest.fixture(params=ARCHS)
def draft_model(request, tokenizer):
    return draftable(request.param, tokenizer)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models decode faster on one thread, and on a shared machine two OpenMP threads spin against the other
    processes; restored afterwards so other tests keep their setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
