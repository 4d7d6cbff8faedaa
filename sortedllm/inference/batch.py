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


def encode_prompts(sm, prompts) -> list[list[int]]:
    """Prompts as token ids: strings/messages go through the chat template, lists of ints pass through."""
    out = []
    limit = getattr(sm.arch.config, "max_position_embeddings", None)
    for i, p in enumerate(prompts):
        ids = list(p) if isinstance(p, (list, tuple)) and p and all(isinstance(t, int) for t in p) else \
            encode_prompt(sm.tokenizer, p)
        if not ids:
            raise SortedError(f"prompt {i} is empty")
        if limit and len(ids) >= limit:
            raise SortedError(f"prompt {i} has {len(ids)} tokens, at or over the model's context of {limit}")
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
    """Live rows of one left-padded batch: `mask` [B, T] over every fed column, `cache`, outputs, finished rows."""

    def __init__(self, sm, prompt_ids: list[list[int]], max_new_tokens: int, stop: set[int], rollback=False):
        self.device = next(sm.model.parameters()).device
        tok = sm.tokenizer
        self.pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
        self.ids, self.mask = left_pad(prompt_ids, self.pad, self.device)
        self.rows = list(range(len(prompt_ids)))  # original index of each live row
        self.out: list[list[int]] = [[] for _ in prompt_ids]
        self.limit = max_new_tokens
        self.stop = stop
        self.cache = new_cache(sm, rollback)
        self.next_pos = self.mask.sum(-1)  # position id of the next fed token, per live row

    @property
    def size(self) -> int:
        return len(self.rows)

    def prompt_positions(self) -> torch.Tensor:
        return positions(self.mask)

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
                if t in self.stop or len(out) >= self.limit:
                    finished = True
                    break
            done.append(finished or len(out) >= self.limit)
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
