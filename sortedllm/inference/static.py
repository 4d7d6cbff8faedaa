"""Static-depth generation: decode with the first k layers only (norm + shared head at k), KV cache for
those k layers only, batched with left padding.

HF `generate` always runs every layer, so the decode loop is written here on top of `Architecture.run_layers`;
its output equals the exported k-layer model's greedy `generate` (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..data import encode_prompt
from ..errors import SortedError


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    stats: dict = field(default_factory=dict)


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
        ids = list(p) if isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p) and p else \
            encode_prompt(sm.tokenizer, p)
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


def new_cache(sm):
    from transformers import DynamicCache

    return DynamicCache(config=sm.arch.config)


@torch.no_grad()
def generate_static(sm, prompt_ids: list[list[int]], exit_layer: int, max_new_tokens: int,
                    stop: set[int]) -> list[list[int]]:
    """Greedy decoding of one batch at exit `exit_layer`; returns the new tokens of each prompt (stop token kept)."""
    device = next(sm.model.parameters()).device
    pad = sm.tokenizer.pad_token_id if sm.tokenizer.pad_token_id is not None else 0
    ids, mask = left_pad(prompt_ids, pad, device)
    cache = new_cache(sm)
    arch = sm.arch
    out = [[] for _ in prompt_ids]
    done = torch.zeros(len(prompt_ids), dtype=torch.bool, device=device)
    stop_t = torch.tensor(sorted(stop), dtype=torch.long, device=device)
    h = arch.run_layers(arch.embed(ids), 0, exit_layer, attention_mask=mask, position_ids=positions(mask), cache=cache)
    for _ in range(max_new_tokens):
        nxt = sm.exit_logits(h[:, -1], exit_layer).argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        for i in range(len(out)):
            if not done[i]:
                out[i].append(int(nxt[i]))
        done |= torch.isin(nxt, stop_t)
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = positions(mask)[:, -1:]
        h = arch.run_layers(arch.embed(nxt.unsqueeze(1)), 0, exit_layer, attention_mask=mask, position_ids=pos,
                            cache=cache)
    return out


def generate(sm, prompts, *, exit_layer: int | None = None, max_new_tokens: int = 128, batch_size: int = 16,
             progress: bool = False, desc: str = "generate") -> list[Generation]:
    """Greedy generation at one exit for many prompts, in left-padded batches sorted by length."""
    k = exit_layer or sm.num_layers
    if not 1 <= k <= sm.num_layers:
        raise SortedError(f"exit layer {k} is out of range: this model has layers 1..{sm.num_layers}")
    if max_new_tokens < 0:
        raise SortedError("max_new_tokens must be >= 0")
    encoded = encode_prompts(sm, prompts)
    stop = stop_ids(sm.tokenizer, sm.model)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    results: list[Generation | None] = [None] * len(encoded)
    bar = tqdm(total=len(encoded), desc=desc, disable=not progress)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        new = generate_static(sm, [encoded[i] for i in idx], k, max_new_tokens, stop) if max_new_tokens else \
            [[] for _ in idx]
        for i, toks in zip(idx, new):
            text_toks = [t for t in toks if t not in stop]
            results[i] = Generation(sm.tokenizer.decode(text_toks, skip_special_tokens=True), toks, len(encoded[i]))
        bar.update(len(idx))
    bar.close()
    return results
