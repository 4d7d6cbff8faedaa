"""Pick early-exit thresholds on a calibration set to meet a target agreement with the full model (or a target
speedup).

1. The full model greedily answers the calibration prompts.
2. One teacher-forced pass over prompt + answer reads every candidate exit at every answer position: its
   confidence, its screen confidence, and whether its argmax equals the full model's token. With the lazy KV
   policy these are exactly the decisions early exit would face on that trajectory.
3. Thresholds are searched on those numbers: token agreement = how often the chosen exit's token equals the full
   model's; cost per token = layers climbed + head work (a full head costs head_params / layer_params layers,
   a screen head size / V of that), since on a memory-bound machine time follows weights read and pending
   tokens ride along for free. For each trade-off weight lambda, coordinate descent over the exits (each
   threshold from its confidence quantiles, or off) minimises cost/full_cost + lambda * (1 - agreement); the
   cheapest solution meeting the target agreement (or the most agreeing one meeting the target speedup) wins.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import SortedError
from .early_exit import OFF, EarlyExit, confidence


@torch.inference_mode()
def exit_statistics(sm, prompts, ee: EarlyExit, max_new_tokens: int = 64, batch_size: int = 8,
                    head_cost: float | None = None) -> dict:
    """Per answer token and candidate exit: confidence, screen confidence and agreement with the full model."""
    from .batch import encode_prompts
    from ..adapters.vocab import restricted_head
    from .generation import generate

    L = sm.num_layers
    exits = [k for k in ee.exits if k < L]
    prompt_ids = encode_prompts(sm, prompts)
    answers = generate(sm, prompt_ids, max_new_tokens=max_new_tokens, batch_size=batch_size)
    vocab = sm.arch.head.weight.shape[0]
    screen = ee.measure == "max_prob" and ee.screen and ee.screen < vocab
    conf, sub, agree = [], [], []
    for ids, ans in zip(prompt_ids, answers):
        if not ans.token_ids:
            continue
        seq = torch.tensor([ids + ans.token_ids], device=next(sm.model.parameters()).device)
        at = torch.arange(len(ids) - 1, seq.shape[1] - 1)  # positions predicting each answer token
        target = seq[0, at + 1]
        hidden = sm.hidden_at_exits(seq, None, exits)
        previous = sm.arch.embed(seq)[0, at]
        c, s, a = [], [], []
        for k in exits:
            h = hidden[k][0, at]
            logits = sm.exit_logits(h, k)
            a.append(logits.argmax(-1) == target)
            if ee.measure == "saturation":
                c.append(confidence("saturation", hidden=h, previous=previous))
                previous = h
            else:
                c.append(confidence(ee.measure, logits=logits))
            if screen:
                norm, _ = sm.exit_norm_head(k)
                s.append(sm.arch.logits(h, norm=norm, head=restricted_head(sm, k, ee.screen)).float().softmax(-1)
                         .max(-1).values)
        conf.append(torch.stack(c, 1))
        agree.append(torch.stack(a, 1))
        if screen:
            sub.append(torch.stack(s, 1))
    if not conf:
        raise SortedError("calibration produced no answer tokens: give more prompts or a larger max_new_tokens")
    from ..models import parameter_counts

    if head_cost is None:
        counts = parameter_counts(sm.model)
        head_cost = counts["head"] / counts["per_layer"]
    return {"exits": exits, "num_layers": L, "conf": torch.cat(conf).cpu().numpy(),
            "sub": torch.cat(sub).cpu().numpy() if screen else None, "agree": torch.cat(agree).cpu().numpy(),
            "head_cost": head_cost, "screen_cost": head_cost * ee.screen / vocab if screen else 0.0,
            "measure": ee.measure, "prompts": len(prompt_ids)}


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
    # Head work: every checked exit before the chosen one, plus the chosen token's own head.
    before = (np.arange(E)[None, :] < first[:, None]) & active[None, :]
    if stats["measure"] == "saturation":
        checks = 0.0
    elif stats["sub"] is not None:
        needs_full = stats["sub"] >= taus
        checks = (before * (stats["screen_cost"] + stats["head_cost"] * needs_full)).sum(1)
        checks = checks + np.where(inside, stats["screen_cost"], 0.0)
    else:
        checks = before.sum(1) * stats["head_cost"]
    cost = depth + stats["head_cost"] + checks
    full = L + stats["head_cost"]
    return float(ok.mean()), float(full / cost.mean())


def search(stats: dict, target_agreement: float | None = None, target_speedup: float | None = None,
           grid: int = 24) -> tuple[list[float], float, float]:
    """Thresholds meeting the target (see module doc): (taus, agreement, estimated speedup)."""
    conf = stats["conf"]
    E = conf.shape[1]
    candidates = []
    for j in range(E):
        qs = np.quantile(conf[:, j], np.linspace(0.0, 1.0, grid))
        candidates.append(sorted(set(np.round(qs, 4).tolist()) | {OFF}))
    solutions = [([OFF] * E, *evaluate_thresholds(stats, [OFF] * E))]
    for lam in np.geomspace(0.05, 200, 40):
        taus = [OFF] * E
        best = None
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
        solutions.append((taus, best[1], best[2]))
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


def calibrate(sm, prompts, *, target_agreement: float | None = 0.95, target_speedup: float | None = None,
              exits=None, measure: str = "max_prob", screen: int | None = 8192, max_new_tokens: int = 64,
              batch_size: int = 8, head_cost: float | None = None) -> EarlyExit:
    """Thresholds for `early_exit=` that keep `target_agreement` token agreement with the full model on these
    prompts (or reach `target_speedup` with the best agreement). The result's `.calibration` holds the numbers.
    `head_cost` is one full LM head's cost in decoder layers (default: their parameter ratio, as time follows
    weights read when decoding); pass a measured ratio for hardware where that is off."""
    if target_speedup is not None and target_speedup <= 0:
        raise SortedError(f"target_speedup must be > 0, got {target_speedup}")
    if target_speedup is None and not 0 < (target_agreement or 0) <= 1:
        raise SortedError(f"target_agreement must be in (0, 1], got {target_agreement}")
    if not prompts:
        raise SortedError("calibrate needs at least one prompt")
    ee = EarlyExit(exits=exits, measure=measure, screen=screen).check(sm)
    stats = exit_statistics(sm, prompts, ee, max_new_tokens, batch_size, head_cost)
    taus, agreement, speedup = search(stats, None if target_speedup else target_agreement, target_speedup)
    ee.thresholds = {k: float(t) for k, t in zip(stats["exits"], taus)}
    ee.calibration = {"agreement": agreement, "estimated_speedup": speedup, "tokens": int(stats["conf"].shape[0]),
                      "prompts": stats["prompts"], "target_agreement": None if target_speedup else target_agreement,
                      "target_speedup": target_speedup, "max_new_tokens": max_new_tokens,
                      "head_cost": stats["head_cost"]}
    return ee
