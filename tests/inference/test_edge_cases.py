"""Generation edge cases for every strategy (static exit, self-speculative, early exit) on tiny models of each
architecture: empty prompts, prompts at / one short of / over the context, `max_new_tokens=0`, EOS as the first
token, a batch of one, and a batch of mixed lengths that must equal one-prompt-at-a-time greedy output."""

import pytest
import torch

from sortedllm import SortedModel
from sortedllm.data import encode_prompt
from sortedllm.errors import SortedError
from sortedllm.inference import EarlyExit, Speculative, Static, generate
from tests.inference.conftest import PROMPTS, draftable
from tests.inference.test_early_exit import mixing_thresholds

STRATEGIES = ("static", "speculative", "early_exit")


def options(sm, strategy: str) -> dict:
    """generate() keyword arguments; early-exit thresholds are picked so tokens really leave at several depths."""
    if strategy == "static":
        return {"strategy": Static(4)}
    if strategy == "speculative":
        return {"strategy": Speculative(2, draft_vocab=None)}
    return {"strategy": EarlyExit(thresholds=mixing_thresholds(sm, PROMPTS[:4], "max_prob"), screen=None)}


def token_prompt(n: int, seed: int, avoid=()) -> list[int]:
    """n random ordinary token ids (no special tokens, none of `avoid`)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 20000, (n,), generator=g).tolist()
    return [t if t not in avoid else t + 1 for t in ids]


def same(a, b):
    assert [(g.token_ids, g.text, g.prompt_tokens, g.finish_reason) for g in a] == \
        [(g.token_ids, g.text, g.prompt_tokens, g.finish_reason) for g in b]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mixed_batch_equals_one_at_a_time(draft_model, strategy):
    """A batch holding every edge case at once (empty text, empty ids, one token, long and short prompts) gives
    each prompt exactly its one-prompt output (a batch of one), whatever the batch size."""
    sm = draft_model
    kw = options(sm, strategy)
    prompts = [*PROMPTS[:5], "", [], [sm.tokenizer.bos_token_id], token_prompt(40, 1)]
    single = [generate(sm, [p], max_new_tokens=10, **kw)[0] for p in prompts]
    assert all(g.stats["batch_size"] == 1 for g in single)
    for bs in (len(prompts), 3):
        batched = generate(sm, prompts, max_new_tokens=10, batch_size=bs, **kw)
        same(batched, single)
        if strategy == "early_exit":
            assert [g.stats["exit_layers"] for g in batched] == [g.stats["exit_layers"] for g in single]
    assert {g.finish_reason for g in single} <= {"length", "stop"} and all(g.token_ids for g in single)
    if strategy == "early_exit":
        assert len({e for g in single for e in g.stats["exit_layers"]}) >= 2  # exits really mixed
    if strategy == "speculative":  # exact: the full model's greedy text
        same(single, [generate(sm, [p], max_new_tokens=10)[0] for p in prompts])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_empty_prompt(draft_model, strategy):
    """"" is an empty user turn in the chat template; [] starts from BOS, as HF generate does with no input."""
    sm = draft_model
    kw = options(sm, strategy)
    empty_text, empty_ids = generate(sm, ["", []], max_new_tokens=6, **kw)
    template = encode_prompt(sm.tokenizer, "")
    same([empty_text], generate(sm, [template], max_new_tokens=6, **kw))
    same([empty_ids], generate(sm, [[sm.tokenizer.bos_token_id]], max_new_tokens=6, **kw))
    assert empty_text.prompt_tokens == len(template) > 1 and empty_ids.prompt_tokens == 1
    assert empty_text.token_ids and empty_ids.token_ids


def test_empty_prompt_without_tokenizer(tokenizer):
    model = draftable("llama", tokenizer).model
    sm = SortedModel(model, None, exits=[2, 4, 6])
    [g] = generate(sm, [[]], strategy=Static(4), max_new_tokens=3)
    assert g.prompt_tokens == 1 and len(g.token_ids) == 3 and g.text == ""  # BOS from the model config
    with pytest.raises(SortedError, match="prompt 0 is text but this model has no tokenizer; pass token ids"):
        generate(sm, ["hi"], strategy=Static(4))
    model.config.bos_token_id = None
    with pytest.raises(SortedError, match="prompt 0 is empty and the model has no BOS token"):
        generate(sm, [[]], strategy=Static(4))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_context_limit(draft_model, strategy):
    """prompt + reply never exceed max_position_embeddings: a prompt that fills the context gets an empty reply, one
    a token short gets one token, both with finish_reason "context"; the tokens are the unconstrained reply's first
    ones. A prompt over the context is an error naming it and the limit."""
    sm = draft_model
    kw = options(sm, strategy)
    context = 24
    prompts = [token_prompt(n, seed=n) for n in (context, context - 1, context - 3, 5)]
    free = generate(sm, prompts, max_new_tokens=8, **kw)
    assert all(len(g.token_ids) == 8 for g in free), [g.token_ids for g in free]  # no stop token: limits decide
    assert sm.arch.config is sm.model.config
    sm.model.config.max_position_embeddings = context
    full, one, three, short = generate(sm, prompts, max_new_tokens=8, batch_size=4, **kw)
    assert (full.token_ids, full.text, full.finish_reason, full.prompt_tokens) == ([], "", "context", context)
    assert one.token_ids == free[1].token_ids[:1] and one.finish_reason == "context"
    assert three.token_ids == free[2].token_ids[:3] and three.finish_reason == "context"
    assert short.token_ids == free[3].token_ids and short.finish_reason == "length"
    same([one, three], [generate(sm, [p], max_new_tokens=8, **kw)[0] for p in prompts[1:3]])
    over = token_prompt(context + 1, seed=0)
    with pytest.raises(SortedError, match=f"prompt 1 has {context + 1} tokens, more than the model's context of "
                                          f"{context}; shorten it"):
        generate(sm, [prompts[3], over], max_new_tokens=8, **kw)
    with pytest.raises(SortedError, match=r"prompt 0 \('w w w w .*\.\.\.'\) has \d+ tokens, more than the model's "
                                          f"context of {context}"):
        generate(sm, ["w " * 40], max_new_tokens=8, **kw)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_max_new_tokens_zero_runs_no_model(draft_model, strategy, monkeypatch):
    sm = draft_model
    kw = options(sm, strategy)

    def forbidden(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(sm.arch, "run_layers", forbidden)
    monkeypatch.setattr(sm.arch, "embed", forbidden)
    gens = generate(sm, [*PROMPTS[:3], "", []], max_new_tokens=0, **kw)
    assert [(g.token_ids, g.text, g.finish_reason) for g in gens] == [([], "", "length")] * 5
    assert [g.prompt_tokens for g in gens] == [len(encode_prompt(sm.tokenizer, p)) for p in PROMPTS[:3]] + \
        [len(encode_prompt(sm.tokenizer, "")), 1]
    with pytest.raises(SortedError, match="max_new_tokens must be >= 0, got -1"):
        generate(sm, PROMPTS[:1], max_new_tokens=-1, **kw)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_eos_as_the_first_token(draft_model, strategy):
    """Swap the head rows of EOS and of the token the model picks first for one prompt: that prompt's reply is then
    [eos] ("stop", empty text), and the other rows of its batch go on exactly as when generated alone."""
    sm = draft_model
    kw = options(sm, strategy)
    eos = sm.tokenizer.eos_token_id
    prompt = token_prompt(12, seed=3, avoid={eos})
    [first] = generate(sm, [prompt], max_new_tokens=1, **kw)
    t = first.token_ids[0]
    assert t != eos and t not in prompt
    with torch.no_grad():  # a permutation of the logits: same confidences, same hidden states for this prompt
        w = sm.arch.head.weight
        w[[t, eos]] = w[[eos, t]]
    batch = [PROMPTS[0], prompt, token_prompt(30, seed=4), PROMPTS[2]]
    gens = generate(sm, batch, max_new_tokens=8, batch_size=4, **kw)
    assert (gens[1].token_ids, gens[1].text, gens[1].finish_reason) == ([eos], "", "stop")
    same(gens, [generate(sm, [p], max_new_tokens=8, **kw)[0] for p in batch])
    assert any(len(g.token_ids) > 1 for g in gens)


def test_bad_prompts_and_strategies(tiny_sorted):
    sm = tiny_sorted
    vocab = sm.arch.base.embed_tokens.num_embeddings
    for kw in ({"strategy": Static(4)}, {"strategy": Speculative(2)}, {"strategy": EarlyExit()}):
        with pytest.raises(SortedError, match=f"prompt 1 has token id {vocab}, outside the model's vocabulary "
                                              f"0..{vocab - 1}"):
            generate(sm, [[5, 6], [7, vocab]], **kw)
        with pytest.raises(SortedError, match="prompt 0 has token id -1, outside"):
            generate(sm, [[-1]], **kw)
    with pytest.raises(SortedError, match="got one string; wrap it in a list"):
        generate(sm, "hi")
    with pytest.raises(SortedError, match="prompt 1 is a list: give text, chat messages"):
        generate(sm, ["hi", [1, "a"]])
    with pytest.raises(SortedError, match="prompt 0 is a NoneType"):
        generate(sm, [None])
    with pytest.raises(SortedError, match="exit layer 0 is out of range: this model has layers 1..6"):
        generate(sm, ["hi"], strategy=Static(0))
    with pytest.raises(SortedError, match="speculative draft exit 0 is out of range: use a layer in 1..5"):
        generate(sm, ["hi"], strategy=Speculative(0))
    with pytest.raises(SortedError, match=r"generate\(\) takes the strategy as an object now: Static\(k\)"):
        generate(sm, ["hi"], exit_layer=2)
    with pytest.raises(SortedError, match="batch_size must be >= 1"):
        generate(sm, ["hi"], batch_size=0)
    generate(sm, ["hi"], strategy=Static(3), max_new_tokens=1)  # an untuned model: every layer is an exit
    sm.config.mode = "soft"
    with pytest.raises(SortedError, match=r"exit 3 is not an exit of this checkpoint \(its exits: 2,4,6\)"):
        generate(sm, ["hi"], strategy=Static(3))
