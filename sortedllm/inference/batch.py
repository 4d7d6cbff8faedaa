"""The state every decode loop shares: a left-padded batch of prompts, its padding mask over every column fed so
far, the KV cache, each row's reply and when it ends.

All live rows advance by the same number of columns per step, so one mask (True = a real token) and one cache
length describe every row; position ids come from the mask, ignoring left padding, as HF `generate` computes them.
Finished rows leave the batch (cache rows included), so a long reply does not make the others pay for it.
"""

from __future__ import annotations

import torch

from ..adapters.vocab import stop_token_ids
from ..data import encode_prompt
from ..errors import SortedError
from .runtime import Columns


def context_length(sm) -> int | None:
    """The longest sequence (prompt + reply) the model has positions for, or None when its config does not say."""
    n = getattr(sm.arch.config, "max_position_embeddings", None)
    return int(n) if n else None


def _describe(prompt) -> str:
    text = " ".join(prompt.split()) if isinstance(prompt, str) else ""
    return f" ('{text[:40]}...')" if len(text) > 40 else (f" ('{text}')" if text else "")


def _prompt_ids(sm, i: int, p) -> list[int]:
    tok = sm.tokenizer
    vocab = sm.arch.base.embed_tokens.num_embeddings
    if isinstance(p, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        ids = list(p)  # token ids (an empty list included)
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise SortedError(f"prompt {i} has token id {bad}, outside the model's vocabulary 0..{vocab - 1}")
        return ids
    if isinstance(p, str) or (isinstance(p, (list, tuple)) and all(
            isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str) for m in p)):
        if tok is None:
            raise SortedError(f"prompt {i} is text but this model has no tokenizer; pass token ids")
        return encode_prompt(tok, list(p) if isinstance(p, tuple) else p)
    raise SortedError(f"prompt {i} is a {type(p).__name__}: give text, chat messages ({{role, content}} dicts) or a "
                      "list of token ids")


def encode_prompts(sm, prompts) -> list[list[int]]:
    """Prompts as token ids: strings/messages go through the chat template, lists of ints pass through.

    An empty prompt is still a prompt: "" gets the chat template (an empty user turn), and if that leaves no token
    at all (no template, or an empty list of ids) generation starts from the BOS token, as HF `generate` does with
    no input. A prompt longer than the model's context is an error naming it."""
    if isinstance(prompts, (str, bytes)):
        raise SortedError("prompts must be a list (of strings, chat messages or token ids), got one string; "
                          "wrap it in a list")
    limit = context_length(sm)
    out = []
    for i, p in enumerate(prompts):
        ids = _prompt_ids(sm, i, p)
        if not ids:
            tok = sm.tokenizer
            bos = getattr(tok, "bos_token_id", None) if tok is not None else None
            bos = getattr(sm.arch.config, "bos_token_id", None) if bos is None else bos
            if bos is None:
                raise SortedError(f"prompt {i} is empty and the model has no BOS token to start from; give at least "
                                  "one token")
            ids = [int(bos)]
        if limit and len(ids) > limit:
            raise SortedError(f"prompt {i}{_describe(p)} has {len(ids)} tokens, more than the model's context of "
                              f"{limit}; shorten it")
        out.append(ids)
    return out


def stop_ids(sm) -> set[int]:
    return stop_token_ids(sm.tokenizer, sm.model)


def left_pad(batch: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, width] and the bool mask of real tokens, prompts aligned to the right."""
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(batch), width), dtype=torch.bool, device=device)
    for i, x in enumerate(batch):
        if x:
            ids[i, width - len(x):] = torch.tensor(x, device=device)
            mask[i, width - len(x):] = True
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding (as HF generate computes them)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class Batch:
    """Live rows of one left-padded batch: the mask over every fed column, the cache, outputs, finished rows.
    `limits` caps each row's reply; `spare` is room in the cache for columns fed ahead of the reply (drafts)."""

    def __init__(self, rt, prompt_ids: list[list[int]], limits: list[int], stop: set[int], spare: int = 0):
        self.rt, self.device = rt, rt.device
        tok = rt.sm.tokenizer
        pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
        self.prompts = prompt_ids
        self.ids, mask = left_pad(prompt_ids, pad, self.device)
        self.rows = list(range(len(prompt_ids)))  # original index of each live row
        self.out: list[list[int]] = [[] for _ in prompt_ids]
        self.limits, self.stop = list(limits), stop
        width = self.ids.shape[1]
        capacity = width + max(limits) + spare + 1
        self.cache = rt.new_cache(len(prompt_ids), capacity)
        self.padded = not bool(mask.all())
        self._mask = torch.ones(len(prompt_ids), capacity, dtype=torch.bool, device=self.device)
        self._mask[:, :width] = mask
        self.width = width  # columns fed so far
        self.next_pos = mask.sum(-1)  # position id of the next fed token, per live row

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def mask(self) -> torch.Tensor:
        return self._mask[:, :self.width]

    def room(self) -> int:
        """Tokens every live row may still emit (live rows have emitted equally many)."""
        return min(self.limits[r] for r in self.rows) - len(self.out[self.rows[0]])

    def feed(self, n: int) -> Columns:
        """Add n columns (new tokens for every live row): what a forward over them needs."""
        pos = self.next_pos.unsqueeze(1) + torch.arange(n, device=self.device)
        self.next_pos = self.next_pos + n
        self.width += n
        return Columns(self.mask if self.padded else None, pos, self.cache)

    def columns(self, n: int) -> Columns:
        """The last n fed columns again (a verify forward over tokens fed one at a time)."""
        pos = self.next_pos.unsqueeze(1) - n + torch.arange(n, device=self.device)
        return Columns(self.mask if self.padded else None, pos, self.cache)

    def unfeed(self, n: int) -> None:
        """Take back the last n columns (rejected drafts) from the mask and from every cache slot."""
        self.width -= n
        self.next_pos = self.next_pos - n
        self.cache.crop(n)

    def emit(self, tokens) -> torch.Tensor:
        """Append tokens [B, m] to each live row's reply, cut at a stop token or the length limit. Returns which live
        rows are now finished (bool [B])."""
        rows = tokens.tolist() if torch.is_tensor(tokens) else tokens
        done = []
        for r, new in zip(self.rows, rows):
            out, finished = self.out[r], False
            for t in new:
                out.append(t)
                if t in self.stop or len(out) >= self.limits[r]:
                    finished = True
                    break
            done.append(finished or len(out) >= self.limits[r])
        return torch.tensor(done, dtype=torch.bool, device=self.device)

    def drop(self, finished: torch.Tensor, *tensors):
        """Remove finished rows from the batch (mask, positions, cache and the given per-row tensors)."""
        if not bool(finished.any()):
            return tensors
        keep = (~finished).nonzero().squeeze(1)
        self.rows = [self.rows[i] for i in keep.tolist()]
        if self.rows:
            self._mask = self._mask[keep]
            self.next_pos = self.next_pos[keep]
            self.cache.select_rows(keep)
            self.padded = not bool(self.mask.all())
        return tuple(t[keep] if t is not None else None for t in tensors)


@torch.inference_mode()
def prefill(rt, batch: Batch, end: int, keep=(), draft=None) -> dict[int, torch.Tensor]:
    """Run the prompts through layers 0..end-1 (and a draft layer's own, given its runtime copy `draft`), filling
    the cache. Returns the last prompt position's hidden state [B, H] after layer `end` and after each layer in
    `keep` (0 = the embedding).

    Prompts of equal length run together, others one length at a time, never as one left-padded batch: padding
    every prompt to the longest multiplied the prefill work (16 PandaLM prompts: 1,152 real tokens became 2,928),
    and on a CPU prefill costs by the token. Each group writes its keys and values straight into its rows of the
    batch cache, right-aligned, so the cache holds what a padded prefill would have written for the real tokens (pad
    columns stay zero, masked out); a prompt is computed exactly as when it is generated alone."""
    width = batch.ids.shape[1]
    stops = sorted({k for k in (*keep, draft.shared if draft else 0) if 0 < k < end} | {end})
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(batch.prompts):
        groups.setdefault(len(p), []).append(i)
    out: dict[int, torch.Tensor] = {}
    for n, rows in groups.items():
        idx = torch.tensor(rows, device=batch.device)
        batch.cache.writer = (idx, width - n)
        h = rt.embed(batch.ids[idx, width - n:])
        states = {0: h[:, -1]}
        cols = Columns(None, torch.arange(n, device=batch.device).expand(len(rows), n), batch.cache)
        at = 0
        for k in stops:
            h = rt.run(h, at, k, cols, exact=False)
            states[k], at = h[:, -1], k
            if draft is not None and k == draft.shared:  # the prompt's entries in the draft's own cache slots
                draft.hidden(rt, h, cols, exact=False)
        for k in set(keep) | {end}:
            if k not in out:
                out[k] = states[k].new_zeros(len(batch.prompts), states[k].shape[-1])
            out[k][idx] = states[k]
    batch.cache.writer = None
    batch.cache.set_length(width, 0, end)
    if draft is not None:
        batch.cache.set_length(width, draft.slots[0], draft.slots[-1] + 1)
    return out
