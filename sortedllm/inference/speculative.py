"""Self-speculative decoding: exit k drafts, the full model verifies, in one model and one KV cache.

Each round:
1. Draft: feed the last emitted token through layers 1..k (KV cached for those layers only), read exit k's head
   and propose the next token; repeat g times, then feed the last draft through layers 1..k too. The layer-k
   hidden states of the g + 1 fed tokens are kept.
2. Verify: run layers k+1..L once on those g + 1 hidden states (the draft's layers are not recomputed, and its
   KV entries for layers 1..k are exactly the ones the full model would have written: same weights, same inputs)
   and read the full model's head there: the prediction after fed token i checks draft i + 1.
3. Accept the longest agreeing prefix of n drafts and emit it plus the full model's own token after it (its
   correction at the first disagreement, or a bonus token when all g drafts agree): n + 1 tokens per round. Crop
   the g - n entries fed after them from every layer's cache (sliding-window layers record their evicted entries
   until that crop, so they roll back too).

Greedy output is token-for-token the full model's greedy output. Sampling uses standard speculative rejection
sampling (accept draft d with probability min(1, p(d)/q(d)), else draw from norm(max(p - q, 0))), so each token
is distributed exactly as plain sampling from the full model's warped distribution. A batch accepts the minimum
accepted length over its rows (rows that accepted more emit their accepted draft at that position), which keeps
every row's cache the same length and each row exact.

With a trained `DraftLayer` (inference/draft_layer.py) the draft is layers 1..s of the model plus the draft's own
layer(s), norm and head, where s = `draft_layer.shared`: the fed tokens go through layers 1..s, then through the
draft's copies (their KV entries in the cache's extra slots, cropped with the rest), and the verifier runs layers
s+1..L on the layer-s states. Output is exactly as above; only acceptance changes.

Draft length adapts as in HF assisted generation: +2 after a fully accepted draft; after a rejection -1, and at
most one more than the drafts just accepted (a draft rejected at its first token drops straight to 1). Below 1
it backs off to plain decoding: a rejected single-token draft makes the next rounds draft nothing (a round with no
draft is exactly one full-model step), then a one-token probe; the rest doubles after each failed probe (4, 8, ...
64 rounds) and resets after a full accept. Verifying several tokens costs more than one on a CPU, so drafting only
pays at high acceptance; with a poor draft exit this keeps decoding close to plain speed instead of well below it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SortedError
from .batch import Batch, prefill
from .sampling import Sampling


@dataclass
class Speculative:
    """Options: `draft_exit` k (1 <= k < L); `draft_tokens` to start with; `adaptive` draft length up to
    `max_draft_tokens`; `draft_vocab` restricts the draft head to the N most frequent tokens (None = full head);
    `draft_confidence` stops a draft early when the draft head's top probability falls below it (0 = off);
    `backoff` lets the draft length fall to 0 (plain steps, with probes) when single drafts keep failing;
    `draft_layer` a trained `DraftLayer` (or its file) that drafts in place of exit k (k must be its exit)."""

    draft_exit: int
    draft_tokens: int = 4
    adaptive: bool = True
    max_draft_tokens: int = 16
    draft_vocab: int | None = 8192
    draft_confidence: float = 0.0
    backoff: bool = True
    draft_layer: object = None

    def check(self, sm) -> None:
        L = sm.num_layers
        if self.draft_layer is not None:
            from ..adapters.draft_layer import DraftLayer, load_draft_layer

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
        if self.draft_vocab is not None and self.draft_vocab < 1:
            raise SortedError(f"draft_vocab must be a positive number of tokens, got {self.draft_vocab}")


@torch.inference_mode()
def decode_speculative(sm, batch: Batch, spec: Speculative, sampling: Sampling, stats: dict) -> None:
    from ..adapters.vocab import restricted_head

    arch, L, k, draft = sm.arch, sm.num_layers, spec.draft_exit, spec.draft_layer
    s = draft.shared if draft is not None else k  # layers shared by the draft and the verifier
    norm_k, head_k = sm.exit_norm_head(k)
    if draft is not None:
        small = draft.head
    else:
        small = restricted_head(sm, k, spec.draft_vocab) if spec.draft_vocab and spec.draft_vocab < \
            head_k.weight.shape[0] else None
    device = batch.device

    # Prefill: the prompt through every layer (and the draft layer's own); the first new token is the full model's.
    h = prefill(sm, batch, L, draft=draft)[L][:, -1]
    cur = sampling.pick(sm.exit_logits(h, L))
    (cur,) = batch.drop(batch.emit(cur.unsqueeze(1)), cur)
    gamma, rest, wait = spec.draft_tokens, 0, 4
    drafted = accepted = rounds = emitted_total = plain_rounds = 0
    while batch.size:
        room = batch.room()
        budget = 0 if rest else min(gamma, room - 1)  # a round emits up to g + 1 tokens
        rest = max(rest - 1, 0)
        hs, drafts, qs = [], [], []
        x = cur
        while True:  # feed x through layers 1..k; unless the draft is complete, draft the next token from it
            pos = batch.feed(1)
            h = arch.run_layers(arch.embed(x.unsqueeze(1)), 0, s, attention_mask=batch.mask, position_ids=pos,
                                cache=batch.cache)
            hs.append(h)
            if draft is not None:  # always, so the draft's slots hold every fed token as the model's layers do
                d = draft.hidden(arch, h, attention_mask=batch.mask, position_ids=pos, cache=batch.cache)
            if len(drafts) >= budget:
                break
            if draft is not None:
                z = draft.logits(arch, d[:, -1])
            else:
                z = arch.logits(h[:, -1], norm=norm_k, head=small if small is not None else head_k)
            if sampling.greedy:
                col = z.argmax(-1)
            else:
                q = sampling.probs(z)
                col = sampling.draw(q)
                qs.append(q)
            x = small.ids[col] if small is not None else col
            drafts.append(x)
            if spec.draft_confidence and len(drafts) < budget:
                top = (qs[-1] if qs else z.float().softmax(-1)).max(-1).values
                if bool((top < spec.draft_confidence).any()):
                    budget = len(drafts)
        g = len(drafts)  # g drafts; g + 1 fed tokens (the last accepted token and the drafts)
        hv = arch.run_layers(torch.cat(hs, 1), s, L, attention_mask=batch.mask,
                             position_ids=positions_of_last(batch, g + 1), cache=batch.cache)
        logits = sm.exit_logits(hv, L)  # [B, g+1, V]: the full model's next token after each fed token
        D = torch.stack(drafts, 1) if g else cur.new_zeros(batch.size, 0)
        if sampling.greedy:
            out = logits.argmax(-1)
            ok = out[:, :g] == D
        else:
            P = sampling.probs(logits)
            if g:
                Q = torch.stack(qs, 1)
                if small is not None:
                    Q = small.to_vocab(Q)
                p_d = P[:, :g].gather(-1, D.unsqueeze(-1)).squeeze(-1)
                q_d = Q.gather(-1, D.unsqueeze(-1)).squeeze(-1)
                ok = sampling.uniform(D.shape, device) * q_d <= p_d  # accept with probability min(1, p/q)
            else:
                ok = torch.zeros(batch.size, 0, dtype=torch.bool, device=device)
            out = torch.cat([D, D.new_zeros(batch.size, 1)], 1)
        n_row = ok.int().cumprod(1).sum(1)  # leading accepted drafts per row
        n = int(n_row.min()) if g else 0  # the batch keeps n drafts + one token of the full model's
        if not sampling.greedy:
            if n < g:  # rows that rejected draft n draw from the residual max(p - q, 0)
                rejected = ~ok[:, n]
                residual = (P[rejected, n] - Q[rejected, n]).clamp(min=0)
                mass = residual.sum(-1, keepdim=True)
                residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), P[rejected, n])
                out[rejected, n] = sampling.draw(residual)
            else:  # every draft accepted: the bonus token comes from the full model
                out[:, n] = sampling.draw(P[:, n])
        emit = out[:, :n + 1]
        batch.unfeed(g - n)  # fed g + 1 tokens, keep the n + 1 whose successors are now known
        drafted += g * batch.size
        accepted += int(n_row.sum())
        emitted_total += n + 1
        rounds += 1
        plain_rounds += g == 0
        if spec.adaptive and g:
            if n == g:
                gamma, wait = min(gamma + 2, spec.max_draft_tokens), 4
            else:
                if gamma == 1 and spec.backoff:
                    rest, wait = wait, min(wait * 2, 64)
                gamma = max(1, min(gamma - 1, n + 1))
        cur = emit[:, -1]
        (cur,) = batch.drop(batch.emit(emit), cur)
    stats.update(draft_exit=k, drafted=stats.get("drafted", 0) + drafted,
                 accepted=stats.get("accepted", 0) + accepted, rounds=stats.get("rounds", 0) + rounds,
                 emitted=stats.get("emitted", 0) + emitted_total,
                 plain_rounds=stats.get("plain_rounds", 0) + plain_rounds,
                 acceptance=accepted / drafted if drafted else None)


def positions_of_last(batch: Batch, n: int) -> torch.Tensor:
    """Position ids of the last n fed columns [B, n]."""
    return batch.next_pos.unsqueeze(1) - n + torch.arange(n, device=batch.device)
