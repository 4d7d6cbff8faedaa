"""Intervals for the numbers sortedllm reports: a percentile bootstrap over rows (prompts, held-out examples).

Means per token are ratio estimators (total loss over total tokens), so rows are resampled whole and the ratio is
recomputed; comparisons between two models on the same rows resample the rows jointly (paired). numpy's seeded
generator keeps every report reproducible. Written here because scipy's `bootstrap` is not a dependency and these
two statistics are all the reports need.
"""

from __future__ import annotations

import numpy as np

RESAMPLES = 4000
LEVEL = 0.95


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def ratio_interval(numerator, denominator, resamples: int = RESAMPLES, seed: int = 0,
                   level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of sum(numerator) / sum(denominator) over rows resampled with replacement."""
    num, den = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    if len(num) == 0:
        return float("nan"), float("nan")
    idx = _indices(len(num), resamples, seed)
    stats = num[idx].sum(1) / np.maximum(den[idx].sum(1), 1e-300)
    tail = (1 - level) / 2
    return float(np.quantile(stats, tail)), float(np.quantile(stats, 1 - tail))


def at_least(lo: float, hi: float, target: float) -> str:
    """Where a 95% interval puts a value against a lower bound: "yes" when the whole interval is at or above it, "no"
    when it lies below, "no difference" when it contains it."""
    return "yes" if lo >= target else "no" if hi < target else "no difference"


def paired_ratio(a, b, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> dict:
    """sum(a) / sum(b) for two measurements of the same rows (e.g. two models' loss sums per held-out example),
    with a paired percentile interval; `verdict` says whether the interval lies above 1, below 1, or crosses it."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ratio = float(a.sum() / b.sum()) if b.sum() else float("nan")
    lo, hi = ratio_interval(a, b, resamples, seed, level)
    verdict = "higher" if lo > 1 else "lower" if hi < 1 else "no difference"
    return {"ratio": ratio, "ci95": [lo, hi], "n": int(len(a)), "verdict": verdict}


def paired_difference(a, b, denominator, resamples: int = RESAMPLES, seed: int = 0,
                      level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of sum(a)/sum(den) - sum(b)/sum(den): two models' per-token means over the same rows
    (e.g. per-row loss sums and token counts), the rows resampled jointly. The difference of two ratios over one
    denominator is the ratio of the row differences, so `ratio_interval` computes it."""
    return ratio_interval(np.asarray(a, dtype=float) - np.asarray(b, dtype=float), denominator, resamples, seed, level)
