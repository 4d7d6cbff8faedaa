"""Pick early-exit thresholds on a calibration set to meet a target agreement with the full model (or a target
speedup).

1. The full model greedily answers the calibration prompts.
2. One teacher-forced pass over prompt + answer reads every candidate exit at every answer position: its
   confidence, its screen confidence, and whether its argmax equals the full model's token. With the lazy KV
   policy these are exactly the decisions early exit would face on that trajectory.
3. Thresholds are searched on those numbers: token agreement = how often the chosen exit's token equals the full
   model's; cost per token = the machine's measured seconds (costs.py) for the layers climbed plus every head read
   on the way (screen heads, full heads where the screen passed); pending tokens ride along in forwards that run
   anyway, which a forward of a few tokens makes nearly free. For each trade-off weight lambda, coordinate descent
   over the exits (each threshold from its confidence quantiles, or off) minimises cost/full_cost + lambda *
   (1 - agreement); the cheapest solution meeting the target agreement (or the most agreeing one meeting the target
   speedup) wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import SortedError
from .batch import encode_prompts
from .costs import CostTable, cost_table
from .early_exit import OFF, EarlyExit, confidence
from .generate import GenerationOptions, generate
from .runtime import Columns, Runtime


@dataclass
class Calibration:
    """What to calibrate for: a target agreement (or speedup) on answers of `max_new_tokens`, with the early-exit
    options `exits`, `measure`, `screen`; `costs` replaces the measured cost table (tests, other machines)."""

    target_agreement: float | None = 0.95
    target_speedup: float | None = None
    exits: object = None
    measure: str = "max_prob"
    screen: int | None = 8192
    max_new_tokens: int = 64
    batch_size: int = 8
    dtype: str = "auto"
    costs: CostTable | None = None

    def check(self) -> "Calibration":
        if self.target_speedup is not None and self.target_speedup <= 0:
            raise SortedError(f"target_speedup must be > 0, got {self.target_speedup}")
        if self.target_speedup is None and not 0 < (self.target_agreement or 0) <= 1:
            raise SortedError(f"target_agreement must be in (0, 1], got {self.target_agreement}")
        return self


def _exit_states(rt, ids: list[int], exits: list[int]) -> dict[int, torch.Tensor]:
    """Hidden state after each exit at every position of one sequence (no padding), on the runtime."""
    x = torch.tensor([ids], device=rt.device)
    cols = Columns(None, torch.arange(len(ids), device=rt.device)[None], rt.new_cache(1, len(ids)))
    h, at, out = rt.embed(x), 0, {}
    for k in exits:
        h = rt.run(h, at, k, cols, exact=False)
        out[k], at = h[0], k
    return out


@torch.inference_mode()
def exit_statistics(sm, prompts, ee: EarlyExit, cal: Calibration) -> dict:
    """Per answer token and candidate exit: confidence, screen confidence and agreement with the full model."""
    rt = Runtime.of(sm, cal.dtype)
    L = sm.num_layers
    exits = [k for k in ee.exits if k < L]
    prompt_ids = encode_prompts(sm, prompts)
    answers = generate(sm, prompt_ids, None, GenerationOptions(max_new_tokens=cal.max_new_tokens,
                                                                batch_size=cal.batch_size, dtype=cal.dtype))
    screens = ee.screens(rt)
    conf, sub, agree = [], [], []
    for ids, ans in zip(prompt_ids, answers):
        if not ans.token_ids:
            continue
        seq = ids + ans.token_ids
        at = torch.arange(len(ids) - 1, len(seq) - 1)  # positions predicting each answer token
        target = torch.tensor(seq, device=rt.device)[at + 1]
        hidden = _exit_states(rt, seq, exits)
        previous = rt.embed(torch.tensor([seq], device=rt.device))[0, at]
        c, s, a = [], [], []
        for k in exits:
            h = hidden[k][at]
            logits = rt.logits(h, k)
            a.append(logits.argmax(-1) == target)
            if ee.measure == "saturation":
                c.append(confidence("saturation", hidden=h, previous=previous))
                previous = h
            else:
                c.append(confidence(ee.measure, logits=logits))
            if screens:
                s.append(rt.logits(h, k, head=screens[k]).float().softmax(-1).max(-1).values)
        conf.append(torch.stack(c, 1))
        agree.append(torch.stack(a, 1))
        if screens:
            sub.append(torch.stack(s, 1))
    if not conf:
        raise SortedError("calibration produced no answer tokens: give more prompts or a larger max_new_tokens")
    costs = cal.costs or cost_table(rt, sm.draft_vocab[:ee.screen] if screens else None)
    return {"exits": exits, "num_layers": L, "conf": torch.cat(conf).float().cpu().numpy(),
            "sub": torch.cat(sub).float().cpu().numpy() if screens else None,
            "agree": torch.cat(agree).cpu().numpy(), "layer_cost": costs.forward(1, 1), "head_cost": costs.read(1),
            "screen_cost": costs.read(1, subset=True) if screens else 0.0, "measure": ee.measure,
            "prompts": len(prompt_ids)}


def evaluate_thresholds(stats: dict, taus) -> tuple[float, float]:
    """(token agreement, estimated speedup) of thresholds `taus` (one per exit below L) on calibration data."""
    conf, agree, exits, L = stats["conf"], stats["agree"], stats["exits"], stats["num_layers"]
    taus = np.asarray(taus, dtype=float)
    n, E = conf.shape
    active = taus <= 1.0
    passes = (conf >= taus) & active
    first = np.where(passes.any(1), passes.argmax(1), E)  # E = the last layer
    depth = np.where(first < E, np.asarray(exits + [L])[np.minimum(first, E)], L)
    ok = np.ones(n, dtype=bool)
    inside = first < E
    ok[inside] = agree[np.arange(n)[inside], first[inside]]
    # Head reads: every checked exit before the chosen one, plus the chosen token's own head.
    before = (np.arange(E)[None, :] < first[:, None]) & active[None, :]
    if stats["measure"] == "saturation":
        checks = 0.0
    elif stats["sub"] is not None:
        needs_full = stats["sub"] >= taus
        checks = (before * (stats["screen_cost"] + stats["head_cost"] * needs_full)).sum(1)
        checks = checks + np.where(inside, stats["screen_cost"], 0.0)
    else:
        checks = before.sum(1) * stats["head_cost"]
    cost = depth * stats["layer_cost"] + stats["head_cost"] + checks
    full = L * stats["layer_cost"] + stats["head_cost"]
    return float(ok.mean()), float(full / cost.mean())


def _descend(stats: dict, candidates: list, lam: float) -> tuple[list[float], float, float]:
    """Coordinate descent on 1/speedup + lam * (1 - agreement), from every exit off."""
    E = len(candidates)
    taus, best = [OFF] * E, None
    for _ in range(3):
        changed = False
        for j in range(E):
            for c in candidates[j]:
                trial = taus[:j] + [c] + taus[j + 1:]
                agr, spd = evaluate_thresholds(stats, trial)
                score = 1 / spd + lam * (1 - agr)
                if best is None or score < best[0] - 1e-12:
                    best, taus, changed = (score, agr, spd), trial, True
        if not changed:
            break
    return taus, best[1], best[2]


def search(stats: dict, target_agreement: float | None = None, target_speedup: float | None = None,
           grid: int = 24) -> tuple[list[float], float, float]:
    """Thresholds meeting the target (see module doc): (taus, agreement, estimated speedup)."""
    conf = stats["conf"]
    candidates = [sorted(set(np.round(np.quantile(conf[:, j], np.linspace(0.0, 1.0, grid)), 4).tolist()) | {OFF})
                  for j in range(conf.shape[1])]
    solutions = [([OFF] * conf.shape[1], *evaluate_thresholds(stats, [OFF] * conf.shape[1]))]
    solutions += [_descend(stats, candidates, lam) for lam in np.geomspace(0.05, 200, 40)]
    if target_speedup is not None:
        fits = [s for s in solutions if s[2] >= target_speedup]
        if not fits:
            top = max(solutions, key=lambda s: s[2])
            raise SortedError(f"no thresholds reach a {target_speedup}x estimated speedup on this calibration set "
                              f"(best {top[2]:.2f}x at {top[1]:.1%} agreement)")
        return max(fits, key=lambda s: (s[1], s[2]))
    target = 0.95 if target_agreement is None else target_agreement
    fits = [s for s in solutions if s[1] >= target]
    return max(fits, key=lambda s: (s[2], s[1]))  # all-off (agreement 1) always fits


def calibrate(sm, prompts, options: Calibration | None = None, **overrides) -> EarlyExit:
    """Thresholds for `EarlyExit` that keep `target_agreement` token agreement with the full model on these prompts
    (or reach `target_speedup` with the best agreement); `overrides` set `Calibration` fields. The result's
    `.calibration` holds the numbers."""
    cal = Calibration(**{**(options or Calibration()).__dict__, **overrides}).check()
    if not prompts:
        raise SortedError("calibrate needs at least one prompt")
    ee = EarlyExit(exits=cal.exits, measure=cal.measure, screen=cal.screen).check(sm)
    stats = exit_statistics(sm, prompts, ee, cal)
    taus, agreement, speedup = search(stats, None if cal.target_speedup else cal.target_agreement,
                                      cal.target_speedup)
    ee.thresholds = {k: float(t) for k, t in zip(stats["exits"], taus)}
    ee.calibration = {"agreement": agreement, "estimated_speedup": speedup, "tokens": int(stats["conf"].shape[0]),
                      "prompts": stats["prompts"], "target_agreement": None if cal.target_speedup else
                      cal.target_agreement, "target_speedup": cal.target_speedup,
                      "max_new_tokens": cal.max_new_tokens,
                      "head_cost": stats["head_cost"] / stats["layer_cost"]}
    return ee
