"""The state every decode loop shares: a left-padded batch, its 2D attention mask over everything fed so far, the
KV cache, each row's output and when it is finished.

All live rows advance by the same number of columns per step, so one 2D mask (1 = real token) describes every row;
position ids come from it, ignoring left padding, as HF `generate` computes them. Finished rows are dropped from
the batch (cache rows included), so a long reply does not make the others pay for it.
"""

from __future__ import annotations

import torch

from ..data import encode_prompt
from ..errors import SortedError


def stop_ids(tokenizer, model=None) -> set[int]:
    """Token ids that end a reply: the tokenizer's EOS plus the model's generation-config EOS ids."""
    ids = set()
    for src in (getattr(tokenizer, "eos_token_id", None),
                getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(src)
    return ids


def context_length(sm) -> int | None:
    """The longest sequence (prompt + reply) the model has positions for, or None when its config does not say."""
    n = getattr(sm.arch.config, "max_position_embeddings", None)
    return int(n) if n else None


def _describe(prompt) -> str:
    text = prompt if isinstance(prompt, str) else ""
    text = " ".join(text.split())
    return f" ('{text[:40]}...')" if len(text) > 40 else (f" ('{text}')" if text else "")


def encode_prompts(sm, prompts) -> list[list[int]]:
    """Prompts as token ids: strings/messages go through the chat template, lists of ints pass through.

    An empty prompt is still a prompt: "" gets the chat template (an empty user turn), and if that leaves no token
    at all (no template, or an empty list of ids) generation starts from the BOS token, as HF `generate` does with
    no input. A prompt longer than the model's context is an error naming it; one that fits leaves its reply the
    room that is left (see `generate`)."""
    if isinstance(prompts, (str, bytes)):
        raise SortedError("prompts must be a list (of strings, chat messages or token ids), got one string; "
                          "wrap it in a list")
    tok = sm.tokenizer
    vocab = sm.arch.base.embed_tokens.num_embeddings
    limit = context_length(sm)
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            ids = list(p)  # token ids (an empty list included)
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise SortedError(f"prompt {i} has token id {bad}, outside the model's vocabulary 0..{vocab - 1}")
        elif isinstance(p, str) or (isinstance(p, (list, tuple)) and all(
                isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str) for m in p)):
            if tok is None:
                raise SortedError(f"prompt {i} is text but this model has no tokenizer; pass token ids")
            ids = encode_prompt(tok, list(p) if isinstance(p, tuple) else p)
        else:
            raise SortedError(f"prompt {i} is a {type(p).__name__}: give text, chat messages ({{role, content}} "
                              "dicts) or a list of token ids")
        if not ids:
            bos = getattr(tok, "bos_token_id", None) if tok is not None else None
            if bos is None:
                bos = getattr(sm.arch.config, "bos_token_id", None)
            if bos is None:
                raise SortedError(f"prompt {i} is empty and the model has no BOS token to start from; give at least "
                                  "one token")
            ids = [int(bos)]
        if limit and len(ids) > limit:
            raise SortedError(f"prompt {i}{_describe(p)} has {len(ids)} tokens, more than the model's context of "
                              f"{limit}; shorten it")
        out.append(ids)
    return out


def left_pad(batch: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(batch), width), dtype=torch.long, device=device)
    for i, x in enumerate(batch):
        if x:
            ids[i, width - len(x):] = torch.tensor(x, device=device)
            mask[i, width - len(x):] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding (as HF generate computes them)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def new_cache(sm, rollback: bool = False):
    """A HF DynamicCache for every layer. `rollback=True` keeps sliding-window layers' evicted entries until the
    next `crop`, so drafted tokens can be taken back on those layers too."""
    from transformers import DynamicCache

    cache = DynamicCache(config=sm.arch.config)
    if rollback:
        cache.activate_past_recording()
    return cache


def crop(cache, n: int, start: int = 0, end: int | None = None) -> None:
    """Drop the last `n` entries of layers start..end-1 (transformers 5 `crop` takes a negative count; `crop(0)`
    trims sliding-window layers back to their window)."""
    for layer in cache.layers[start:end]:
        layer.crop(-n if n else 0)


class Batch:
    """Live rows of one left-padded batch: `mask` [B, T] over every fed column, `cache`, outputs, finished rows.
    `limits` caps each row's reply (default `max_new_tokens` for all; `generate` lowers it where the context is
    nearly full)."""

    def __init__(self, sm, prompt_ids: list[list[int]], max_new_tokens: int, stop: set[int], rollback=False,
                 limits: list[int] | None = None):
        self.device = next(sm.model.parameters()).device
        tok = sm.tokenizer
        self.pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
        self.prompts = prompt_ids
        self.ids, self.mask = left_pad(prompt_ids, self.pad, self.device)
        self.rows = list(range(len(prompt_ids)))  # original index of each live row
        self.out: list[list[int]] = [[] for _ in prompt_ids]
        self.limits = list(limits) if limits is not None else [max_new_tokens] * len(prompt_ids)
        self.stop = stop
        self.rollback = rollback
        self.cache = new_cache(sm, rollback)
        self.next_pos = self.mask.sum(-1)  # position id of the next fed token, per live row

    def room(self) -> int:
        """Tokens every live row may still emit (live rows have emitted equally many)."""
        return min(self.limits[r] for r in self.rows) - len(self.out[self.rows[0]])

    @property
    def size(self) -> int:
        return len(self.rows)

    def feed(self, n: int) -> torch.Tensor:
        """Add n columns (new tokens for every live row); returns their position ids [B, n]."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.size, n)], dim=1)
        pos = self.next_pos.unsqueeze(1) + torch.arange(n, device=self.device)
        self.next_pos = self.next_pos + n
        return pos

    def unfeed(self, n: int, cache_layers: tuple[int, int | None] = (0, None)) -> None:
        """Take back the last n columns (rejected drafts) from the mask and the cache."""
        if n:
            self.mask = self.mask[:, :-n]
            self.next_pos = self.next_pos - n
        crop(self.cache, n, *cache_layers)

    def emit(self, tokens) -> torch.Tensor:
        """Append tokens [B, m] (a tensor or lists) to each live row's reply, cut at a stop token or the length
        limit. Returns a bool tensor: which live rows are now finished."""
        rows = tokens.tolist() if torch.is_tensor(tokens) else tokens
        done = []
        for r, new in zip(self.rows, rows):
            out = self.out[r]
            finished = False
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
            self.mask = self.mask[keep]
            self.next_pos = self.next_pos[keep]
            self.cache.batch_select_indices(keep)
        return tuple(t[keep] if t is not None else None for t in tensors)


@torch.inference_mode()
def prefill(sm, batch: Batch, end: int, keep=(), draft=None) -> dict[int, torch.Tensor]:
    """Run the prompts through layers 0..end-1, filling `batch.cache` for those layers (and a `DraftLayer`'s cache
    slots, when given). Returns the last prompt position's hidden state [B, 1, H] after layer `end` and after each
    layer in `keep` (0 = the embedding).

    Prompts of equal length run together, others one length at a time, never as one left-padded batch: padding
    every prompt to the longest multiplied the prefill work (16 PandaLM prompts: 1,152 real tokens became 2,928),
    and on a CPU prefill costs by the token (one prompt at a time is as fast per token as a batch). Each group's
    cache is then left-padded into the batch cache, which ends up holding what a padded prefill would have written
    for the real tokens (pad columns are zeros, masked out by `batch.mask`), so decoding continues unchanged. A
    prompt is computed exactly as when it is generated alone. Written here because HF's `generate` has no
    unpadded batched prefill for a DynamicCache."""
    arch = sm.arch
    width = batch.ids.shape[1]
    stops = sorted({k for k in (*keep, draft.shared if draft else 0) if 0 < k < end} | {end})
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(batch.prompts):
        groups.setdefault(len(p), []).append(i)
    out: dict[int, torch.Tensor] = {}
    parts = []
    for n, rows in groups.items():
        idx = torch.tensor(rows, device=batch.device)
        ids = batch.ids[idx, width - n:]
        cache = new_cache(sm, batch.rollback) if len(groups) > 1 else batch.cache
        h = arch.embed(ids)
        states = {0: h[:, -1:]}
        at = 0
        pos = torch.arange(n, device=batch.device).expand(len(rows), n)
        for k in stops:
            h = arch.run_layers(h, at, k, attention_mask=torch.ones_like(ids), cache=cache, position_ids=pos)
            states[k] = h[:, -1:]
            at = k
            if draft is not None and k == draft.shared:  # the prompt's KV entries in the draft's own slots
                draft.hidden(arch, h, attention_mask=torch.ones_like(ids), cache=cache, position_ids=pos)
        for k in set(keep) | {end}:
            if k not in out:
                out[k] = states[k].new_zeros(len(batch.prompts), *states[k].shape[1:])
            out[k][idx] = states[k]
        parts.append((idx, n, cache))
    if len(parts) > 1:
        if draft is not None:
            draft.ensure_slots(batch.cache)
        # left-pad each group's entries to the batch width, then store them as one update
        for i in [*range(end), *(draft.slots if draft is not None else ())]:
            keys = values = None
            for idx, n, cache in parts:
                layer = cache.layers[i]
                if keys is None:
                    shape = (len(batch.prompts), *layer.keys.shape[1:2], width, layer.keys.shape[-1])
                    keys = layer.keys.new_zeros(shape)
                    values = layer.values.new_zeros(*shape[:3], layer.values.shape[-1])
                m = layer.keys.shape[-2]  # n, or fewer on a sliding-window layer
                keys[idx, :, width - m:] = layer.keys
                values[idx, :, width - m:] = layer.values
            batch.cache.layers[i].update(keys, values)
    return out
