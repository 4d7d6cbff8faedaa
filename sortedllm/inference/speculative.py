"""Self-speculative decoding: exit k drafts, the full model verifies, in one model and one KV cache.

Each round:
1. Draft: feed the last emitted token through layers 1..k (KV cached for those layers only), read exit k's head
   (restricted to the draft vocabulary) and propose the next token; repeat g times, then feed the last draft through
   layers 1..k too. The layer-k hidden states of the g + 1 fed tokens are kept.
2. Verify: run layers k+1..L once on those g + 1 hidden states (the draft's layers are not recomputed, and its KV
   entries for layers 1..k are the ones the full model writes: same weights, same inputs, same kernels) and read the
   full model's head there: the prediction after fed token i checks draft i + 1.
3. Accept the longest agreeing prefix of n drafts and emit it plus the full model's own token after it (its
   correction at the first disagreement, or a bonus token when all g drafts agree): n + 1 tokens per round. Take
   the g - n columns fed after them back from every cache slot.

Greedy output is token for token the same runtime's plain greedy output, in every dtype: the verify forward computes
each token's numbers exactly as a one-token step does (attention.py, runtime.py). Sampling uses speculative
rejection sampling (accept draft d with probability min(1, p(d)/q(d)), else draw from norm(max(p - q, 0))), so each
token is distributed as plain sampling from the full model's warped distribution. A batch keeps the minimum accepted
length over its rows (rows that accepted more emit their accepted draft there), so every row stays exact.

A trained draft layer (adapters/draft_layer.py) drafts in place of exit k: layers 1..s of the model, then its own
copies, norm and head rows; the verifier runs layers s+1..L on the layer-s states. Only acceptance changes.

Draft length: the one with the highest expected tokens per second, from the machine's cost table (costs.py) and the
acceptance rate seen so far (each draft token accepted with probability a, independently: a round of g drafts
yields (1 - a^(g+1)) / (1 - a) tokens for (g+1) shared-layer steps, g draft-head reads and one verify of g+1
tokens). When no length beats a plain step it decodes plainly, with a one-token probe after 4, 8, ... 64 plain
rounds to notice when drafting pays again.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..adapters.draft_layer import DraftLayer, load_draft_layer
from ..errors import SortedError
from .batch import Batch, prefill
from .costs import cost_table
from .runtime import SubsetHead
from .sampling import Sampling


@dataclass
class Speculative:
    """Options: `draft_exit` k (1 <= k < L); `draft_tokens` per round when not `adaptive` (adaptive rounds take
    the length the cost table and the running acceptance favour, up to `max_draft_tokens`);
    `draft_vocab` restricts the draft head to the model's N most frequent tokens (its saved draft
    vocabulary; None or 0 = full head); `draft_confidence` ends a draft early below that top probability (0 = off);
    `backoff` lets it decode plainly when drafting does not pay; `draft_layer` a trained draft layer (or its file or
    folder) that drafts in place of exit k (k must be its exit)."""

    draft_exit: int
    draft_tokens: int = 4
    adaptive: bool = True
    max_draft_tokens: int = 16
    draft_vocab: int | None = 8192
    draft_confidence: float = 0.0
    backoff: bool = True
    draft_layer: object = None
    name = "speculative"

    @property
    def spare(self) -> int:  # cache columns fed ahead of the reply
        return self.max_draft_tokens + 1

    def check(self, sm) -> "Speculative":
        L = sm.num_layers
        if self.draft_layer is not None:
            if not isinstance(self.draft_layer, DraftLayer):
                self.draft_layer = load_draft_layer(self.draft_layer, sm)
            if self.draft_exit != self.draft_layer.exit:
                raise SortedError(f"the draft layer drafts at exit {self.draft_layer.exit} ({self.draft_layer.shared} "
                                  f"shared + {len(self.draft_layer.layers)} own layers), not {self.draft_exit}")
        if not 1 <= self.draft_exit < L:
            raise SortedError(f"speculative draft exit {self.draft_exit} is out of range: use a layer in 1..{L - 1} "
                              f"(the full model, layer {L}, verifies)")
        if sm.config.mode != "untuned" and self.draft_exit not in sm.exits and self.draft_layer is None:
            sm.check_exits([self.draft_exit])  # raises the checkpoint's "not an exit" error
        if self.draft_tokens < 1 or self.max_draft_tokens < self.draft_tokens:
            raise SortedError(f"draft_tokens must be >= 1 and <= max_draft_tokens ({self.max_draft_tokens}), "
                              f"got {self.draft_tokens}")
        if self.draft_vocab is not None and self.draft_vocab < 0:
            raise SortedError(f"draft_vocab must be a positive number of tokens (or 0 = full head), got "
                              f"{self.draft_vocab}")
        return self

    @torch.inference_mode()
    def decode(self, rt, batch: Batch, sampling: Sampling) -> dict:
        drafter = Drafter.of(rt, self)
        planner = Planner(rt, drafter, self)
        h = prefill(rt, batch, rt.num_layers, draft=drafter.layer)[rt.num_layers]
        cur = sampling.pick(rt.logits(h, rt.num_layers))  # the first new token is the full model's
        (cur,) = batch.drop(batch.emit(cur.unsqueeze(1)), cur)
        totals = {"drafted": 0, "accepted": 0, "rounds": 0, "emitted": 0, "plain_rounds": 0}
        while batch.size:
            hs, drafts, qs = drafter.draft(batch, cur, planner.length(batch.room()), sampling, self.draft_confidence)
            logits = rt.logits(rt.run(torch.cat(hs, 1), drafter.shared, rt.num_layers, batch.columns(len(hs))),
                               rt.num_layers)  # [B, g+1, V]: the full model's next token after each fed token
            n, n_rows, emit = accept(logits, drafts, qs, drafter.head, sampling)
            g = len(drafts)
            batch.unfeed(g - n)  # fed g + 1 tokens, keep the n + 1 whose successors are now known
            planner.update(g, n)
            totals["drafted"] += g * batch.size
            totals["accepted"] += int(n_rows.sum())
            totals["emitted"] += n + 1
            totals["rounds"] += 1
            totals["plain_rounds"] += g == 0
            cur = emit[:, -1]
            (cur,) = batch.drop(batch.emit(emit), cur)
        return {"draft_exit": self.draft_exit, **totals,
                "acceptance": totals["accepted"] / totals["drafted"] if totals["drafted"] else None}


class Drafter:
    """What drafts: exit k (the model's first k layers, exit k's norm and a head over the draft vocabulary) or a
    trained draft layer's runtime copy; `shared` layers are common to the draft and the verifier."""

    def __init__(self, rt, spec: Speculative):
        self.rt, self.exit = rt, spec.draft_exit
        draft = spec.draft_layer
        self.layer = DraftRunner(rt, draft) if draft is not None else None
        self.shared = draft.shared if draft is not None else spec.draft_exit
        vocab = rt.sm.draft_vocab
        if self.layer is not None:
            self.head = self.layer.head
        elif spec.draft_vocab and vocab is not None and spec.draft_vocab < rt.arch.head.weight.shape[0]:
            self.head = rt.restricted_head(self.exit, vocab[:spec.draft_vocab])
        else:
            self.head = None

    @classmethod
    def of(cls, rt, spec: Speculative) -> "Drafter":
        """One per runtime and options (the draft layer's copy and the packed head are built once)."""
        memo = rt.__dict__.setdefault("_drafters", {})
        key = (spec.draft_exit, spec.draft_vocab, id(spec.draft_layer))
        if key not in memo:
            memo[key] = cls(rt, spec)
        return memo[key]

    def token_cost(self, costs) -> float:
        """Seconds to draft one token: the draft layer's own layers and a head read."""
        own = len(self.layer.layers) if self.layer is not None else 0
        return costs.forward(own, 1) + costs.read(1, subset=self.head is not None)

    def draft(self, batch: Batch, cur: torch.Tensor, budget: int, sampling: Sampling, confidence: float):
        """Feed `cur` and up to `budget` drafted tokens through the shared layers: (their layer-s states, the drafted
        token ids [B] each, the draft distributions when sampling)."""
        rt, hs, drafts, qs = self.rt, [], [], []
        x = cur
        while True:
            cols = batch.feed(1)
            h = rt.run(rt.embed(x.unsqueeze(1)), 0, self.shared, cols)
            hs.append(h)
            d = self.layer.hidden(rt, h, cols) if self.layer is not None else None  # fills its cache slots
            if len(drafts) >= budget:
                return hs, drafts, qs
            if d is not None:
                z = self.layer.logits(rt, d[:, -1])
            else:
                z = rt.logits(h[:, -1], self.exit, head=self.head)
            if sampling.greedy:
                col = z.argmax(-1)
            else:
                qs.append(sampling.probs(z))
                col = sampling.draw(qs[-1])
            x = self.head.ids[col] if self.head is not None else col
            drafts.append(x)
            if confidence and len(drafts) < budget:
                top = (qs[-1] if qs else z.float().softmax(-1)).max(-1).values
                if bool((top < confidence).any()):
                    budget = len(drafts)


class DraftRunner:
    """A trained draft layer in the runtime's dtype and weight layout (its own KV slots after the model's)."""

    def __init__(self, rt, draft: DraftLayer):
        self.shared, self.exit, self.slots = draft.shared, draft.exit, draft.slots
        self.layers = rt.prepare(draft.layers)
        self.norm = copy.deepcopy(draft.norm).to(rt.dtype).eval()
        bias = getattr(draft.head, "bias", None)
        self.head = SubsetHead(draft.head.weight.detach(), bias, draft.head.ids, rt.arch.head.weight.shape[0], rt.dtype,
                                         rt.device)

    def hidden(self, rt, h: torch.Tensor, cols, exact: bool = True) -> torch.Tensor:
        """The draft's normed state from the hidden state after layer `shared`."""
        return self.norm(rt.run(h, self.shared, self.exit, cols, layers=self.layers, exact=exact))

    def logits(self, rt, normed: torch.Tensor) -> torch.Tensor:
        return rt.arch.logits(normed, head=self.head, normed=True)


class Planner:
    """The draft length of each round (module doc): cost table x acceptance so far, with plain-step backoff."""

    def __init__(self, rt, drafter: Drafter, spec: Speculative):
        self.spec, self.gamma = spec, spec.draft_tokens
        self.hits, self.trials = 1.0, 2.0  # a weak prior: acceptance 0.5
        self.plain, self.wait = 0, 4
        if spec.adaptive:
            costs = cost_table(rt, drafter.head.ids if drafter.head is not None else None)
            L, s = rt.num_layers, drafter.shared
            own = len(drafter.layer.layers) if drafter.layer is not None else 0
            shared_step = costs.forward(s + own, 1)
            draft_token = costs.read(1, subset=drafter.head is not None)
            # seconds of a round with g drafts (g = 0: a plain step)
            self.cost = [(g + 1) * shared_step + g * draft_token + costs.forward(L - s, g + 1) + costs.read(g + 1)
                         for g in range(spec.max_draft_tokens + 1)]

    def length(self, room: int) -> int:
        if room <= 1:
            return 0
        if not self.spec.adaptive:
            return min(self.gamma, room - 1)
        a = min(self.hits / self.trials, 0.999)
        rate = [(1 - a ** (g + 1)) / (1 - a) / c for g, c in enumerate(self.cost)]
        best = max(range(min(len(rate), room)), key=lambda g: rate[g])
        if best > 0 or not self.spec.backoff:
            self.plain = 0
            return max(best, 1)
        self.plain += 1
        if self.plain < self.wait:
            return 0
        self.plain, self.wait = 0, min(self.wait * 2, 64)
        return 1  # a probe: is drafting paying again?

    def update(self, drafted: int, accepted: int) -> None:
        """Decayed counts of draft-token trials: accepted ones, plus the first rejected one."""
        if not drafted:
            return
        self.hits = 0.9 * self.hits + accepted
        self.trials = 0.9 * self.trials + accepted + (accepted < drafted)
        if accepted == drafted:
            self.wait = 4


def accept(logits: torch.Tensor, drafts: list, qs: list, head, sampling: Sampling):
    """(n kept drafts for the batch, leading accepted drafts per row, tokens to emit [B, n + 1])."""
    B, g = logits.shape[0], len(drafts)
    D = torch.stack(drafts, 1) if g else logits.new_zeros(B, 0, dtype=torch.long)
    if sampling.greedy:
        out = logits.argmax(-1)
        ok = out[:, :g] == D
    else:
        P = sampling.probs(logits)
        if g:
            Q = torch.stack(qs, 1)
            if head is not None:
                Q = head.to_vocab(Q)
            p_d = P[:, :g].gather(-1, D.unsqueeze(-1)).squeeze(-1)
            q_d = Q.gather(-1, D.unsqueeze(-1)).squeeze(-1)
            ok = sampling.uniform(D.shape, D.device) * q_d <= p_d  # accept with probability min(1, p/q)
        else:
            ok = torch.zeros(B, 0, dtype=torch.bool, device=D.device)
        out = torch.cat([D, D.new_zeros(B, 1)], 1)
    n_rows = ok.int().cumprod(1).sum(1)  # leading accepted drafts per row
    n = int(n_rows.min()) if g else 0
    if not sampling.greedy:
        if n < g:  # rows that rejected draft n draw from the residual max(p - q, 0)
            rejected = ~ok[:, n]
            residual = (P[rejected, n] - Q[rejected, n]).clamp(min=0)
            mass = residual.sum(-1, keepdim=True)
            residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), P[rejected, n])
            out[rejected, n] = sampling.draw(residual)
        else:  # every draft accepted: the bonus token comes from the full model
            out[:, n] = sampling.draw(P[:, n])
    return n, n_rows, out[:, :n + 1]
