"""Confidence early exit (the paper's instance-aware dynamic inference): each token stops at the first exit whose
confidence passes that exit's threshold; the last layer always accepts.

KV policy for the layers a token skips (lazy, exact; EE-LLM's "KV recomputation", SkipDecode's deferred
computation): a token that exits at layer e has KV entries in layers 1..e only. Its layer-e hidden state is kept as
*pending*. The next token that goes deeper than e carries the pending tokens with it: layers e+1.. run on
[pending..., current] in one forward, which writes the missing KV entries exactly as the full model would (same
weights, same inputs, same earlier cache, and the runtime computes each token's numbers as a one-token step does).
So every KV entry any token ever reads equals the full model's entry for that token sequence; skipping changes which
token is chosen, never the state it is chosen from. In bfloat16 on this kind of CPU a forward of a few tokens costs
about one, so pending tokens ride along nearly free. Pending tokens form groups by depth; a later group is never
deeper than an earlier one, so the groups are a stack merged from the top as the current token climbs. Anything
still pending when a reply ends is never computed.

Confidence measures (higher = more confident): `max_prob` (softmax top probability, the paper's), `margin` (top-1
minus top-2 probability), `entropy` (1 - H(p)/log V) and `saturation` (cosine similarity between the hidden states
at this exit and the previous one, CALM's hidden-state saturation; needs no head until it passes). With `max_prob`,
checks are screened with the head restricted to the model's draft vocabulary: the top probability over the subset
is an upper bound on the full one whenever the full argmax is in the subset, so the full head runs only where the
threshold can be met (a missed exit only sends the token deeper, never changes its choice).

Batches: every row picks its token at its own first passing exit; the batch keeps climbing until its slowest row has
exited (rows that exited ride along, which gives their skipped layers exact KV without waiting).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import atomic_write_text
from ..errors import SortedError
from .batch import Batch, prefill
from .sampling import Sampling

MEASURES = ("max_prob", "margin", "entropy", "saturation")
# The paper's max-probability thresholds by relative depth (LLaMA-2 13B, 40 layers): layers 12 and 16 -> 0.95,
# 20 and 24 -> 0.9, 28 and 32 -> 0.8, 36 -> 0.7, the last layer always accepts.
PAPER_THRESHOLDS = ((16 / 40, 0.95), (24 / 40, 0.9), (32 / 40, 0.8), (39 / 40, 0.7))
OFF = 2.0  # a threshold above 1 switches an exit off (no check there)


def paper_threshold(k: int, num_layers: int) -> float:
    """The paper's threshold for exit k, mapped by relative depth k / L."""
    if k >= num_layers:
        return 0.0
    f = k / num_layers
    for upto, t in PAPER_THRESHOLDS:
        if f <= upto + 1e-9:
            return t
    return PAPER_THRESHOLDS[-1][1]


def confidence(measure: str, logits: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
               previous: torch.Tensor | None = None) -> torch.Tensor:
    """Confidence per row (higher = more confident) from logits [N, V] or, for saturation, hidden states [N, H]."""
    if measure == "saturation":
        return torch.nn.functional.cosine_similarity(hidden.float(), previous.float(), dim=-1)
    p = logits.float().softmax(-1)
    if measure == "max_prob":
        return p.max(-1).values
    if measure == "margin":
        top = p.topk(2, dim=-1).values
        return top[:, 0] - top[:, 1]
    if measure == "entropy":
        ent = -(p * p.clamp(min=1e-30).log()).sum(-1)
        return 1 - ent / torch.log(torch.tensor(float(p.shape[-1])))
    raise SortedError(f"unknown confidence measure '{measure}'")


@dataclass
class EarlyExit:
    """Options: candidate `exits` (default: the checkpoint's), per-exit `thresholds` (default: the paper's by
    relative depth; > 1 = off), the confidence `measure`, and the `screen` vocabulary size for max_prob checks
    (None = always the full head)."""

    exits: list[int] | None = None
    thresholds: dict[int, float] = field(default_factory=dict)
    measure: str = "max_prob"
    screen: int | None = 8192
    calibration: dict | None = None  # filled by `calibrate`: agreement, estimated speedup, data
    name = "early_exit"
    spare = 0

    def check(self, sm) -> "EarlyExit":
        if self.measure not in MEASURES:
            raise SortedError(f"unknown confidence measure '{self.measure}': choose from {', '.join(MEASURES)}")
        L = sm.num_layers
        exits = sm.check_exits(self.exits) if self.exits else list(sm.exits)
        self.exits = sorted(set(exits) | {L})
        self.thresholds = {int(k): float(v) for k, v in (self.thresholds or {}).items()}
        bad = [k for k in self.thresholds if k not in self.exits]
        if bad:
            raise SortedError(f"threshold given for layer {bad[0]}, which is not one of the early-exit candidates "
                              f"{','.join(map(str, self.exits))}")
        if any(not 0 <= v for v in self.thresholds.values()):
            raise SortedError("early-exit thresholds must be >= 0 (and > 1 to switch an exit off)")
        if self.screen is not None and self.screen < 1:
            raise SortedError(f"screen must be a positive vocabulary size or None, got {self.screen}")
        return self

    def threshold(self, k: int, num_layers: int) -> float:
        if k >= num_layers:
            return 0.0
        if k in self.thresholds:
            return self.thresholds[k]
        if self.measure != "max_prob":
            raise SortedError(f"no threshold for exit {k}: the paper's defaults are for max_prob; give thresholds "
                              f"for '{self.measure}' or run calibrate")
        return paper_threshold(k, num_layers)

    def active(self, num_layers: int) -> list[tuple[int, float]]:
        """(exit, threshold) for every exit that is checked, the last layer included."""
        return [(k, t) for k in self.exits if (t := self.threshold(k, num_layers)) <= 1.0 or k == num_layers]

    def save(self, path: str | Path) -> None:
        data = {"measure": self.measure, "exits": self.exits, "screen": self.screen,
                "thresholds": {str(k): v for k, v in self.thresholds.items()}, "calibration": self.calibration}
        atomic_write_text(path, json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "EarlyExit":
        try:
            data = json.loads(Path(path).read_text())
            return cls(exits=data.get("exits"), thresholds={int(k): v for k, v in data["thresholds"].items()},
                       measure=data.get("measure", "max_prob"), screen=data.get("screen", 8192),
                       calibration=data.get("calibration"))
        except FileNotFoundError:
            raise SortedError(f"thresholds file not found: {path}")
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError, ValueError) as e:
            raise SortedError(f"thresholds file {path} is malformed ({e}); write it with `calibrate` or give "
                              "{\"thresholds\": {\"9\": 0.95, ...}}")

    def screens(self, rt) -> dict:
        """Exit -> head over the draft vocabulary for screening max_prob checks (none without a saved vocabulary)."""
        vocab = rt.sm.draft_vocab
        if self.measure != "max_prob" or not self.screen or vocab is None or \
                self.screen >= rt.arch.head.weight.shape[0]:
            return {}
        return {k: rt.restricted_head(k, vocab[:self.screen]) for k, _ in self.active(rt.num_layers)
                if k < rt.num_layers}

    @torch.inference_mode()
    def decode(self, rt, batch: Batch, sampling: Sampling) -> dict:
        L, plan = rt.num_layers, self.active(rt.num_layers)
        climb = Climb(rt, batch, self, sampling)
        # The prompt runs through every layer up front (unpadded, see `prefill`): the first token's exit is decided
        # on those states, exactly as if the prompt had climbed lazily, and nothing of the prompt is left pending.
        first = prefill(rt, batch, L, keep=[0] + [k for k, _ in plan])
        tokens, where, depth = climb.step(plan, first)
        while True:
            climb.record(tokens, where, depth)
            finished = batch.emit(tokens.unsqueeze(1))
            tokens, *groups = batch.drop(finished, tokens, *[g for _, g in climb.pending])
            for entry, g in zip(climb.pending, groups):
                entry[1] = g
            if not batch.size:
                break
            batch.feed(1)
            climb.h = rt.embed(tokens.unsqueeze(1))
            tokens, where, depth = climb.step(plan)
        return climb.stats()


class Climb:
    """One token per row per step up the exits, with the pending tokens' stack (module doc)."""

    def __init__(self, rt, batch: Batch, ee: EarlyExit, sampling: Sampling):
        self.rt, self.batch, self.ee, self.sampling = rt, batch, ee, sampling
        self.screens = ee.screens(rt)
        self.pending: list[list] = []  # [depth, hidden [B, n, H]], oldest first; depths never increase
        self.h: torch.Tensor | None = None
        self.exit_layers = {r: [] for r in batch.rows}
        self.depth_sum = self.steps = self.full_heads = self.screened = 0

    def run(self, x: torch.Tensor, a: int, b: int) -> torch.Tensor:
        return self.rt.run(x, a, b, self.batch.columns(x.shape[1]))

    def step(self, plan, first: dict | None = None):
        """Climb until every row has exited: (token per row, exit per row, depth reached)."""
        rt, batch, L = self.rt, self.batch, self.rt.num_layers
        B = batch.size
        tokens = torch.zeros(B, dtype=torch.long, device=batch.device)
        where = torch.full((B,), L, dtype=torch.long, device=batch.device)
        undecided = torch.ones(B, dtype=torch.bool, device=batch.device)
        h = first[0].unsqueeze(1) if first is not None else self.h
        previous, at = h[:, -1], 0
        for k, tau in plan:
            if first is not None:
                h = first[k].unsqueeze(1)
            else:
                while self.pending and self.pending[-1][0] < k:  # pending tokens join at their depth
                    d, group = self.pending.pop()
                    h = torch.cat([group, self.run(h, at, d)], 1)
                    at = d
                h = self.run(h, at, k)
            at = k
            rows = undecided.nonzero().squeeze(1)
            passed, logits = self.decide(k, tau, h[rows, -1], previous[rows])
            previous = h[:, -1]
            if logits is not None and len(logits):
                chosen = rows[passed]
                tokens[chosen] = self.sampling.pick(logits)
                where[chosen] = k
                undecided[chosen] = False
            if not bool(undecided.any()):
                break
        if first is None and at < L:  # the current tokens (and any that joined them) stay pending at depth `at`
            if self.pending and self.pending[-1][0] == at:
                self.pending[-1][1] = torch.cat([self.pending[-1][1], h], 1)
            else:
                self.pending.append([at, h])
        return tokens, where, at

    def decide(self, k: int, tau: float, last: torch.Tensor, previous: torch.Tensor):
        """(which of these rows exit at k, the logits of those that do)."""
        rt, L, measure = self.rt, self.rt.num_layers, self.ee.measure
        if k == L:
            self.full_heads += len(last)
            return torch.ones(len(last), dtype=torch.bool, device=last.device), rt.logits(last, k)
        if measure == "saturation":
            passed = confidence("saturation", hidden=last, previous=previous) >= tau
            return passed, rt.logits(last[passed], k) if bool(passed.any()) else None
        candidate = torch.ones(len(last), dtype=torch.bool, device=last.device)
        if k in self.screens:
            sub = rt.logits(last, k, head=self.screens[k])
            candidate = sub.float().softmax(-1).max(-1).values >= tau
            self.screened += len(last)
        passed = torch.zeros_like(candidate)
        if not bool(candidate.any()):
            return passed, None
        full = rt.logits(last[candidate], k)
        self.full_heads += int(candidate.sum())
        ok = confidence(measure, logits=full) >= tau
        passed[candidate] = ok
        return passed, full[ok]

    def record(self, tokens, where, depth) -> None:
        self.depth_sum += depth
        self.steps += 1
        for r, e in zip(self.batch.rows, where.tolist()):
            self.exit_layers[r].append(e)

    def stats(self) -> dict:
        order = sorted(self.exit_layers)
        return {"steps": self.steps, "mean_depth": self.depth_sum / max(self.steps, 1), "full_heads": self.full_heads,
                "screened": self.screened, "per_row": {"exit_layers": [self.exit_layers[r] for r in order]}}
