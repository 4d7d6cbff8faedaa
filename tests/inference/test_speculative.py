"""Self-speculative decoding: greedy output identical to the full model's, sampling distributed exactly as plain
sampling (chi-square against the exact distribution, with a power check), restricted draft head, errors."""

import pytest
import torch

from sortedllm.errors import SortedError
from sortedllm.inference import Speculative, Static, generate, summary
from sortedllm.adapters.vocab import RestrictedHead, restricted_head
from sortedllm.inference.sampling import Sampling
from tests.inference.conftest import PROMPTS, draftable

CONFIGS = [  # (draft exit, batch size, Speculative options)
    (2, 1, dict(draft_vocab=None)),
    (4, 4, dict(draft_vocab=1024)),
    (5, 10, dict(draft_tokens=1, adaptive=False)),
    (1, 3, dict(draft_tokens=7, draft_confidence=0.2)),
    (3, 10, dict(draft_tokens=3, max_draft_tokens=5, draft_vocab=4096)),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_is_identical_to_the_full_model(draft_model, dtype):
    """Property: for many prompts, draft exits, batch sizes, draft lengths and draft heads, the text is token for
    token the same runtime's plain greedy text, in both dtypes (sliding-window rollback included: the Gemma3 model's
    window is 8)."""
    sm = draft_model
    ref = [g.token_ids for g in generate(sm, PROMPTS, max_new_tokens=24, batch_size=1, dtype=dtype)]
    acceptance = []
    for k, bs, opts in CONFIGS:
        out = generate(sm, PROMPTS, strategy=Speculative(k, **opts), max_new_tokens=24, batch_size=bs, dtype=dtype)
        assert [g.token_ids for g in out] == ref, (k, bs, opts)
        acceptance.append(summary(out)["acceptance"])
    assert any(0.05 < a < 0.95 for a in acceptance), acceptance  # both accept and reject paths ran


def test_backoff_to_plain_steps_when_drafts_fail(tokenizer):
    """A draft exit that rarely agrees drives the draft length to 0 (plain full-model steps with probes); the text
    stays identical. Without backoff every round drafts (except a reply's last token, which needs no draft)."""
    sm = draftable("gemma3_text", tokenizer)
    ref = [g.token_ids for g in generate(sm, PROMPTS[:3], max_new_tokens=32, batch_size=1)]
    out = generate(sm, PROMPTS[:3], strategy=Speculative(1, draft_vocab=None), max_new_tokens=32, batch_size=1)
    s = summary(out)
    assert [g.token_ids for g in out] == ref
    assert s["acceptance"] < 0.3 and s["plain_rounds"] > s["rounds"] / 2, s
    eager = generate(sm, PROMPTS[:3], strategy=Speculative(1, draft_vocab=None, backoff=False), max_new_tokens=32)
    assert [g.token_ids for g in eager] == ref and summary(eager)["plain_rounds"] <= 3


def test_stop_tokens_end_rows_early_in_a_batch(tokenizer):
    sm = draftable("qwen2", tokenizer)
    first = generate(sm, PROMPTS[:4], max_new_tokens=16, batch_size=1)
    stop = first[0].token_ids[5]  # make a token the model does produce end replies
    sm.model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    ref = generate(sm, PROMPTS[:4], max_new_tokens=16, batch_size=1)
    assert len(ref[0].token_ids) == 6 and ref[0].token_ids[-1] == stop
    for bs in (1, 4):
        out = generate(sm, PROMPTS[:4], strategy=Speculative(3, draft_vocab=None), max_new_tokens=16,
                       batch_size=bs)
        assert [g.token_ids for g in out] == [g.token_ids for g in ref]
        assert out[0].text == ref[0].text


@pytest.mark.slow  # the real SmolLM2 model
@pytest.mark.timeout(600)  # may load it first (converted from GGUF on a new machine)
def test_default_model_greedy_identical(default_model):
    sm = default_model
    prompts = PROMPTS[:4]
    ref = [g.token_ids for g in generate(sm, prompts, max_new_tokens=24, batch_size=1)]
    for k, bs, opts in [(9, 1, {}), (15, 4, dict(draft_vocab=None, draft_tokens=6))]:
        out = generate(sm, prompts, strategy=Speculative(k, **opts), max_new_tokens=24, batch_size=bs)
        assert [g.token_ids for g in out] == ref, k


# ----------------------------------------------------------------------------------------------------------------
# Sampling


def chi_square_p(counts: dict, probs: dict, n: int) -> float:
    """p-value of observed `counts` against exact `probs` (cells with expected < 5 pooled)."""
    obs, exp, pool_o, pool_e = [], [], 0.0, 0.0
    for cell, p in probs.items():
        if p * n >= 5:
            obs.append(counts.get(cell, 0))
            exp.append(p * n)
        else:
            pool_o += counts.get(cell, 0)
            pool_e += p * n
    pool_o += sum(c for cell, c in counts.items() if cell not in probs)  # impossible outcomes
    if pool_e > 0 or pool_o > 0:
        obs.append(pool_o)
        exp.append(max(pool_e, 1e-9))
    obs, exp = torch.tensor(obs, dtype=torch.float64), torch.tensor(exp, dtype=torch.float64)
    stat = ((obs - exp) ** 2 / exp).sum()
    return float(torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2, dtype=torch.float64), stat / 2))


def exact_distribution(sm, prompt_ids, sampling, depth=3, exit_layer=None):
    """Exact probability of every possible first `depth` tokens under `sampling`'s warped distribution."""
    k = exit_layer or sm.num_layers
    out = {(): 1.0}
    for _ in range(depth):
        nxt = {}
        for prefix, p in out.items():
            ids = torch.tensor([prompt_ids + list(prefix)])
            probs = sampling.probs(sm.logits_at_exits(ids, exits=[k])[k][0, -1])
            for t in probs.nonzero().squeeze(1).tolist():
                nxt[prefix + (t,)] = p * float(probs[t])
        out = nxt
    return out


def sample_counts(sm, prompt_ids, n, **kwargs):
    gens = generate(sm, [prompt_ids] * n, max_new_tokens=3, batch_size=400, temperature=1.0, top_k=4, seed=1234,
                    dtype="float32", **kwargs)
    counts = {}
    for g in gens:
        counts[tuple(g.token_ids)] = counts.get(tuple(g.token_ids), 0) + 1
    return counts, gens


def test_speculative_sampling_matches_plain_sampling(tokenizer):
    """First three tokens over 1200 draws: speculative sampling (draft exit 2 of 6: rejections, residual draws and
    bonus tokens all happen) and plain sampling both fit the exact distribution; sampling from the draft alone
    does not (the test has the power to see a wrong sampler)."""
    sm = draftable("qwen2", tokenizer)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name a color."}],
                                           add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    sampling = Sampling(temperature=1.0, top_k=4)
    exact = exact_distribution(sm, prompt, sampling)
    n = 1200
    spec, gens = sample_counts(sm, prompt, n, strategy=Speculative(2, draft_tokens=2, adaptive=False,
                                                                    draft_vocab=None))
    acceptance = summary(gens)["acceptance"]
    assert 0.1 < acceptance < 0.9, acceptance
    plain, _ = sample_counts(sm, prompt, n)
    assert chi_square_p(spec, exact, n) > 1e-3
    assert chi_square_p(plain, exact, n) > 1e-3
    draft_only, _ = sample_counts(sm, prompt, n, strategy=Static(2))
    assert chi_square_p(draft_only, exact, n) < 1e-6
    # Same seed, same samples: sampling is reproducible.
    again, _ = sample_counts(sm, prompt, n, strategy=Speculative(2, draft_tokens=2, adaptive=False,
                                                                  draft_vocab=None))
    assert again == spec


def test_sampling_with_restricted_draft_head_and_top_p(tokenizer):
    """A draft distribution that is zero outside the draft vocabulary is still corrected exactly."""
    sm = draftable("qwen2", tokenizer)
    prompt = list(tokenizer("Count to five:")["input_ids"])
    sampling = Sampling(temperature=0.8, top_p=0.9)
    exact = exact_distribution(sm, prompt, sampling, depth=2)
    n = 1000
    gens = generate(sm, [prompt] * n, max_new_tokens=2, batch_size=500, temperature=0.8, top_p=0.9, seed=7,
                    dtype="float32", strategy=Speculative(2, draft_tokens=1, adaptive=False, draft_vocab=2048))
    counts = {}
    for g in gens:
        counts[tuple(g.token_ids)] = counts.get(tuple(g.token_ids), 0) + 1
    assert chi_square_p(counts, exact, n) > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# Restricted draft head and errors


def test_restricted_head(tokenizer, tiny_sorted):
    sm = tiny_sorted
    assert restricted_head(sm, 2, 1000) is None  # no draft vocabulary: the full head drafts
    sm.draft_vocab = torch.tensor([7, 3, 900, 5, 11])  # ranked
    assert restricted_head(sm, 2, 3).ids.tolist() == [3, 7, 900]  # the first 3, sorted
    assert restricted_head(sm, 2, 100).ids.tolist() == [3, 5, 7, 11, 900]  # all there is
    sm.draft_vocab = torch.arange(1500).flip(0)
    small = restricted_head(sm, 2, 1000)
    assert restricted_head(sm, 2, 1000) is small  # built once per head
    assert small.ids.tolist() == list(range(500, 1500))
    assert restricted_head(sm, 2, 0) is None
    h = torch.randn(3, sm.arch.head.weight.shape[1])
    assert torch.allclose(small(h), sm.arch.head(h)[:, small.ids], atol=1e-5)
    q = torch.softmax(torch.randn(3, len(small.ids)), -1)
    full = small.to_vocab(q)
    assert full.shape[-1] == sm.arch.head.weight.shape[0] and torch.allclose(full[:, small.ids], q)
    assert torch.allclose(full.sum(-1), torch.ones(3))
    assert isinstance(small, RestrictedHead)


def test_bad_options(tiny_sorted):
    sm = tiny_sorted
    with pytest.raises(SortedError, match="draft exit 6 is out of range"):
        generate(sm, ["hi"], strategy=Speculative(6))
    with pytest.raises(SortedError, match="takes the strategy as an object now"):
        generate(sm, ["hi"], speculative=2)
    with pytest.raises(SortedError, match="draft_tokens must be >= 1"):
        generate(sm, ["hi"], strategy=Speculative(2, draft_tokens=0))
    with pytest.raises(SortedError, match="top_p must be in"):
        generate(sm, ["hi"], strategy=Speculative(2), temperature=1.0, top_p=0)
    sm.config.mode = "soft"  # a trained checkpoint drafts only from its own exits
    with pytest.raises(SortedError, match="exit 3 is not an exit of this checkpoint"):
        generate(sm, ["hi"], strategy=Speculative(3))
