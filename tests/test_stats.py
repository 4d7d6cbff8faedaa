"""The bootstrap intervals behind every comparison in the reports, and per-row held-out loss."""

import numpy as np
import pytest

from sortedllm.data import load_examples
from sortedllm.evaluate.loss import exit_losses
from sortedllm.stats import paired_ratio, ratio_interval


def test_ratio_interval_brackets_the_ratio_and_narrows_with_more_rows():
    rng = np.random.default_rng(1)
    tokens = rng.integers(5, 50, size=400)
    loss = tokens * rng.normal(2.0, 0.5, size=400)
    lo, hi = ratio_interval(loss, tokens)
    assert lo < loss.sum() / tokens.sum() < hi
    lo40, hi40 = ratio_interval(loss[:40], tokens[:40])
    assert hi40 - lo40 > hi - lo


def test_paired_ratio_separates_a_real_difference_from_noise():
    rng = np.random.default_rng(2)
    base = rng.gamma(2.0, 1.0, size=200)
    assert paired_ratio(base * 1.2, base)["verdict"] == "higher"
    assert paired_ratio(base * 0.8, base)["verdict"] == "lower"
    noisy = base * rng.normal(1.0, 0.3, size=200)
    assert paired_ratio(noisy, base)["verdict"] == "no difference"  # seeded: noise of 30% per row, mean 1
    same = paired_ratio(base, base)
    assert same["ratio"] == 1.0 and same["n"] == 200 and same["verdict"] == "no difference"


@pytest.mark.parametrize("arch_name", ["llama"], indirect=True)
def test_exit_losses_reports_rows_their_sum_and_an_interval(tiny_sorted):
    rows = load_examples("gsm8k:test", limit=12)
    out = exit_losses(tiny_sorted, rows, tiny_sorted.exits, max_length=512, batch_size=5, progress=False)
    for k, r in out.items():
        assert r["rows"] == len(r["row_loss"]) == len(r["row_tokens"]) == 12
        assert sum(r["row_tokens"]) == r["tokens"]
        assert sum(r["row_loss"]) / r["tokens"] == pytest.approx(r["loss"], rel=1e-4)
        assert r["ci95"][0] <= r["loss"] <= r["ci95"][1]
    # Rows keep their order whatever the batching: one row alone gives its own entry.
    alone = exit_losses(tiny_sorted, rows[3:4], tiny_sorted.exits, max_length=512, progress=False)
    k = tiny_sorted.exits[0]
    assert alone[k]["row_loss"][0] == pytest.approx(out[k]["row_loss"][3], rel=1e-3)
