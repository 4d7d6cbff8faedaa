"""Exit schedules: which exits enter the loss at a given optimizer step, and with what weight.

Every schedule is an unbiased estimate of the same objective, the weighted mean over exits (uniform unless
`weights` is given), so switching schedule changes the cost per step, not what is optimised:
- `uniform`: every exit every step (the paper).
- `weights`: every exit every step with user weights (normalised to sum to 1).
- `last:w`: every exit every step, the last exit weighted w and the others (1 - w) / (E - 1) each; `last:0.75`
  is SoFT's default (`auto`), which keeps the full model within a few percent of SFT (docs/results.md 7).
- `sample:n`: the last exit plus n intermediate exits drawn at random each step, rescaled by (E-1)/n.
- `rotate`: the last exit plus one intermediate exit per step in turn (LayerSkip's rotational curriculum).
"""

from __future__ import annotations

import random

from ..errors import SortedError

KINDS = ("uniform", "weights", "last", "sample", "rotate")


class ExitSchedule:
    def __init__(self, kind: str, exits: list[int], base: dict[int, float], n: int = 0, seed: int = 0):
        self.kind, self.exits, self.base, self.n, self.seed = kind, list(exits), base, n, seed

    def eval_weights(self) -> dict[int, float]:
        return dict(self.base)

    def weights(self, step: int) -> dict[int, float]:
        """Loss weight per exit for this optimizer step (the same for every micro-batch and rank)."""
        if self.kind in ("uniform", "weights", "last") or len(self.exits) == 1:
            return dict(self.base)
        last, middle = self.exits[-1], self.exits[:-1]
        if self.kind == "rotate":
            chosen = [middle[step % len(middle)]]
        else:
            chosen = sorted(random.Random(self.seed * 1_000_003 + step).sample(middle, self.n))
        # Inverse-probability rescaling: each middle exit is chosen with probability len(chosen)/len(middle).
        scale = len(middle) / len(chosen)
        return {**{k: self.base[k] * scale for k in chosen}, last: self.base[last]}


def make_schedule(spec: str | dict, exits: list[int], exit_weights: str | list | None = None,
                  seed: int = 0) -> ExitSchedule:
    """Parse `uniform`, `weights`, `last:w`, `sample:n` / {sample: n} or `rotate` for the trained exits."""
    if isinstance(spec, dict):
        if len(spec) != 1:
            raise SortedError(f"exit_schedule {spec} not understood: use uniform, weights, last:w, sample:n or "
                              "rotate")
        (kind, arg), = spec.items()
    else:
        kind, _, arg = str(spec).replace("=", ":").partition(":")
    kind = kind.strip()
    if kind not in KINDS:
        raise SortedError(f"unknown exit_schedule '{spec}': use uniform, weights, last:w, sample:n or rotate")
    base = {k: 1 / len(exits) for k in exits}
    n = 0
    if kind == "weights":
        if exit_weights is None:
            raise SortedError("exit_schedule weights needs --exit_weights w1,w2,... (one per exit)")
        ws = exit_weights if isinstance(exit_weights, (list, tuple)) else str(exit_weights).split(",")
        try:
            ws = [float(w) for w in ws]
        except ValueError:
            raise SortedError(f"exit_weights '{exit_weights}' must be numbers separated by commas")
        if len(ws) != len(exits) or any(w < 0 for w in ws) or sum(ws) <= 0:
            raise SortedError(f"exit_weights needs {len(exits)} non-negative numbers (one per exit "
                              f"{','.join(map(str, exits))}), got {exit_weights}")
        base = {k: w / sum(ws) for k, w in zip(exits, ws)}
    elif kind == "last":
        base = last_weighted(exits, arg, spec)
    elif kind == "sample":
        try:
            n = int(arg)
        except ValueError:
            raise SortedError(f"exit_schedule '{spec}': sample needs a count, e.g. sample:2")
        if not 1 <= n <= max(len(exits) - 1, 1):
            raise SortedError(f"exit_schedule sample:{n}: choose 1..{len(exits) - 1} intermediate exits")
    elif arg:
        raise SortedError(f"exit_schedule '{spec}': {kind} takes no argument")
    return ExitSchedule(kind, exits, base, n, seed)


def last_weighted(exits: list[int], arg, spec) -> dict[int, float]:
    """`last:w`: the last exit weighted w, the others sharing 1 - w equally."""
    try:
        w = float(arg)
    except (TypeError, ValueError):
        raise SortedError(f"exit_schedule '{spec}': last needs the last exit's weight, e.g. last:0.75")
    if not 0 < w <= 1:
        raise SortedError(f"exit_schedule '{spec}': the last exit's weight must be in (0, 1]")
    if len(exits) == 1:
        return {exits[0]: 1.0}
    return {**{k: (1 - w) / (len(exits) - 1) for k in exits[:-1]}, exits[-1]: w}
