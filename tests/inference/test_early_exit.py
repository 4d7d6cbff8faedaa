"""Confidence early exit: the lazy KV policy against a no-cache recomputation, batches, measures, screening,
paper thresholds and calibration."""

import pytest
import torch

from sortedllm.errors import SortedError
from sortedllm.inference import EarlyExit, Static, calibrate, generate
from sortedllm.inference.batch import encode_prompts, stop_ids
from sortedllm.inference.calibrate import Calibration, evaluate_thresholds, exit_statistics
from sortedllm.inference.costs import CostTable
from sortedllm.inference.runtime import Columns, Runtime
from sortedllm.inference.early_exit import confidence, paper_threshold
from tests.inference.conftest import PROMPTS, draftable


@torch.inference_mode()
def reference(sm, prompt_ids, ee, n, dtype):
    """Early exit without skipping: every token runs through every layer (one token at a time, the decode path of
    the same runtime), and the token is the first passing exit's. Its KV cache is the full model's by construction,
    which is what the lazy policy claims to reproduce."""
    rt = Runtime.of(sm, dtype)
    L = sm.num_layers
    plan = ee.active(L)
    stops = sorted({k for k, _ in plan} | {L})
    stop = stop_ids(sm)
    cache = rt.new_cache(1, len(prompt_ids) + n + 1)
    x, toks, exits, exact = torch.tensor([prompt_ids]), [], [], False
    for _ in range(n):
        past = cache.get_seq_length(0)
        cols = Columns(None, torch.arange(past, past + x.shape[1])[None], cache)
        h, at, hidden = rt.embed(x), 0, {0: None}
        previous = h[0, -1:]
        for k in stops:
            h = rt.run(h, at, k, cols, exact=exact)
            hidden[k], at = h[0, -1:], k
        for k, tau in plan:
            logits = rt.logits(hidden[k], k)
            if ee.measure == "saturation":
                conf = confidence("saturation", hidden=hidden[k], previous=previous)
                previous = hidden[k]
            else:
                conf = confidence(ee.measure, logits=logits)
            if k == L or conf[0] >= tau:
                break
        t = int(logits.argmax(-1))
        toks.append(t)
        exits.append(k)
        if t in stop:
            break
        x, exact = torch.tensor([[t]]), True
    return toks, exits


def mixing_thresholds(sm, prompts, measure):
    """Per-exit thresholds between two observed confidences near the median, so exits really mix."""
    ee = EarlyExit(measure=measure, screen=None).check(sm)
    stats = exit_statistics(sm, prompts, ee, Calibration(max_new_tokens=12, batch_size=4))
    out = {}
    for j, k in enumerate(stats["exits"]):
        vals = sorted(set(stats["conf"][:, j].tolist()))
        mid = len(vals) // 2
        out[k] = (vals[mid - 1] + vals[mid]) / 2 if len(vals) > 1 else 2.0
    out[stats["exits"][0]] = out[stats["exits"][0]]
    return out


@pytest.mark.parametrize("measure,dtype", [("max_prob", "float32"), ("saturation", "float32"),
                                           ("max_prob", "bfloat16")])
def test_lazy_kv_equals_recomputation(draft_model, measure, dtype):
    """Tokens and exit layers equal decoding that runs every layer for every token (so the skipped layers' KV,
    filled in later by the pending tokens, is exact), at batch size 1 and in a batch, in both dtypes."""
    sm = draft_model
    prompts = PROMPTS[:4]
    sm.config.exits = [2, 4, 6]
    ee = EarlyExit(exits=[2, 4], measure=measure, screen=None,
                   thresholds={k: v for k, v in mixing_thresholds(sm, prompts, measure).items() if k in (2, 4)})
    single = generate(sm, prompts, strategy=ee, max_new_tokens=16, batch_size=1, dtype=dtype)
    batched = generate(sm, prompts, strategy=ee, max_new_tokens=16, batch_size=4, dtype=dtype)
    seen = set()
    for p, a, b in zip(encode_prompts(sm, prompts), single, batched):
        toks, exits = reference(sm, p, ee.check(sm), 16, dtype)
        assert a.token_ids == toks and a.stats["exit_layers"] == exits
        assert b.token_ids == toks and b.stats["exit_layers"] == exits
        seen.update(exits)
    assert len(seen) >= 2, seen  # tokens really left at different depths


def test_thresholds_off_is_the_full_model_and_zero_is_the_first_exit(draft_model):
    sm = draft_model
    full = generate(sm, PROMPTS[:5], max_new_tokens=16, batch_size=5)
    off = generate(sm, PROMPTS[:5], strategy=EarlyExit(thresholds={2: 2.0, 4: 2.0}), max_new_tokens=16,
                   batch_size=3)
    assert [g.token_ids for g in off] == [g.token_ids for g in full]
    assert all(set(g.stats["exit_layers"]) == {6} for g in off)
    static = generate(sm, PROMPTS[:5], strategy=Static(2), max_new_tokens=16, batch_size=5)
    first = generate(sm, PROMPTS[:5], strategy=EarlyExit(thresholds={2: 0.0, 4: 2.0}), max_new_tokens=16,
                     batch_size=2)
    assert [g.token_ids for g in first] == [g.token_ids for g in static]
    assert all(set(g.stats["exit_layers"]) == {2} for g in first)


def test_measures_screen_and_sampling(tokenizer):
    sm = draftable("qwen2", tokenizer)
    prompts = PROMPTS[:3]
    for measure in ("margin", "entropy"):
        ths = mixing_thresholds(sm, prompts, measure)
        gens = generate(sm, prompts, strategy=EarlyExit(measure=measure, thresholds=ths, screen=None),
                        max_new_tokens=12, batch_size=3)
        assert len({e for g in gens for e in g.stats["exit_layers"]}) >= 2
    # Screening with a restricted head never makes a token exit earlier than the full-head check would.
    ths = mixing_thresholds(sm, prompts, "max_prob")
    plain = generate(sm, prompts, strategy=EarlyExit(thresholds=ths, screen=None), max_new_tokens=12)
    screened = generate(sm, prompts, strategy=EarlyExit(thresholds=ths, screen=512), max_new_tokens=12)
    for a, b in zip(plain, screened):
        for ta, tb, ea, eb in zip(a.token_ids, b.token_ids, a.stats["exit_layers"], b.stats["exit_layers"]):
            assert eb >= ea
            if ta != tb:
                break
    # Sampling at the chosen exit: reproducible with a seed.
    runs = [generate(sm, prompts, strategy=EarlyExit(thresholds=ths), temperature=1.0, top_k=5, seed=3,
                     max_new_tokens=8) for _ in range(2)]
    assert [g.token_ids for g in runs[0]] == [g.token_ids for g in runs[1]]


def test_paper_thresholds():
    assert [paper_threshold(k, 40) for k in (12, 16, 20, 24, 28, 32, 36, 40)] == \
        [0.95, 0.95, 0.9, 0.9, 0.8, 0.8, 0.7, 0.0]
    assert [paper_threshold(k, 30) for k in (9, 12, 15, 18, 21, 24, 27, 30)] == \
        [0.95, 0.95, 0.9, 0.9, 0.8, 0.8, 0.7, 0.0]


LARGE = CostTable(layer={1: 1.0, 16: 1.0}, head={1: 0.5, 16: 0.5})  # a head half a layer's cost, as in big models


def test_calibrate(tokenizer, tmp_path):
    """With the machine's measured costs the tiny model calibrates to its target; a cost table pricing its head
    like a large model's (half a layer) makes early exits worth taking."""
    sm = draftable("qwen2", tokenizer)
    prompts = PROMPTS[:6]
    measured = calibrate(sm, prompts, target_agreement=0.6, max_new_tokens=8).calibration
    assert measured["agreement"] >= 0.6 and measured["head_cost"] > 0
    exact = calibrate(sm, prompts, target_agreement=1.0, max_new_tokens=16, screen=None, costs=LARGE)
    assert exact.calibration["agreement"] == 1.0
    assert any(t <= 1 for t in exact.thresholds.values()), exact.thresholds  # some exit is worth using
    # At 100% calibration agreement, early exit reproduces the full model on those prompts, exiting early.
    full = generate(sm, prompts, max_new_tokens=16)
    fast = generate(sm, prompts, strategy=exact, max_new_tokens=16)
    assert [g.token_ids for g in fast] == [g.token_ids for g in full]
    assert min(e for g in fast for e in g.stats["exit_layers"]) < sm.num_layers
    loose = calibrate(sm, prompts, target_agreement=0.6, max_new_tokens=16, costs=LARGE)
    c = loose.calibration
    assert c["agreement"] >= 0.6 and c["estimated_speedup"] > exact.calibration["estimated_speedup"]
    stats = exit_statistics(sm, prompts, loose, Calibration(max_new_tokens=16, costs=LARGE))
    taus = [loose.thresholds[k] for k in stats["exits"]]
    assert evaluate_thresholds(stats, taus) == pytest.approx((c["agreement"], c["estimated_speedup"]))
    fastest = calibrate(sm, prompts, target_speedup=1.3, max_new_tokens=16, costs=LARGE)
    assert fastest.calibration["estimated_speedup"] >= 1.3
    with pytest.raises(SortedError, match="no thresholds reach a 50"):
        calibrate(sm, prompts, target_speedup=50, max_new_tokens=16, costs=LARGE)
    loose.save(tmp_path / "th.json")
    back = EarlyExit.load(tmp_path / "th.json")
    assert back.thresholds == loose.thresholds and back.calibration == loose.calibration


def test_bad_options(tiny_sorted, tmp_path):
    sm = tiny_sorted
    with pytest.raises(SortedError, match="unknown confidence measure"):
        generate(sm, ["hi"], strategy=EarlyExit(measure="vibes"))
    with pytest.raises(SortedError, match="not one of the early-exit candidates"):
        generate(sm, ["hi"], strategy=EarlyExit(thresholds={3: 0.5}))
    with pytest.raises(SortedError, match="give thresholds for 'margin'"):
        generate(sm, ["hi"], strategy=EarlyExit(measure="margin"))
    with pytest.raises(SortedError, match="target_agreement must be in"):
        calibrate(sm, ["hi"], target_agreement=1.5)
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(SortedError, match="is malformed"):
        EarlyExit.load(bad)
