"""Static depth: decode with the first k layers only (norm + shared head at k), KV cache for those k layers only,
batched with left padding (each prompt's prefill unpadded: `batch.prefill`).

HF `generate` always runs every layer, so the decode loop is written here on top of `Architecture.run_layers`;
its greedy output equals the exported k-layer model's greedy `generate` (tested).
"""

from __future__ import annotations

import torch

from .batch import Batch, encode_prompts, left_pad, new_cache, positions, prefill, stop_ids  # noqa: F401 (re-exported)
from .generation import Generation  # noqa: F401 (re-exported)
from .sampling import Sampling


@torch.inference_mode()
def decode_static(sm, batch: Batch, k: int, sampling: Sampling, stats: dict) -> None:
    """Decode every row of `batch` to the end at exit k."""
    arch = sm.arch
    h = prefill(sm, batch, k)[k][:, -1]
    steps = 0
    while True:
        nxt = sampling.pick(sm.exit_logits(h, k))
        finished = batch.emit(nxt.unsqueeze(1))
        (nxt,) = batch.drop(finished, nxt)
        if not batch.size:
            break
        pos = batch.feed(1)
        h = arch.run_layers(arch.embed(nxt.unsqueeze(1)), 0, k, attention_mask=batch.mask, position_ids=pos,
                            cache=batch.cache)[:, -1]
        steps += 1
    stats["forward_steps"] = stats.get("forward_steps", 0) + steps + 1


def generate(sm, prompts, *, exit_layer: int | None = None, max_new_tokens: int = 128, batch_size: int = 16,
             progress: bool = False, desc: str = "generate", **kwargs) -> list[Generation]:
    """Generation at one exit (default: the full model) for many prompts; see `generation.generate`."""
    from .generation import generate as _generate

    return _generate(sm, prompts, exit_layer=exit_layer, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     progress=progress, desc=desc, **kwargs)
