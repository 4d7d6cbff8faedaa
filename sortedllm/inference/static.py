"""Static depth: decode with the first k layers only (exit k's norm and head), a KV cache for those k layers only.

Its greedy output equals the exported k-layer model's (tested); `Static()` is the full model, plain decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SortedError
from .batch import Batch, prefill
from .sampling import Sampling


@dataclass
class Static:
    """Decode at exit `exit` (default: the last layer, i.e. the full model)."""

    exit: int | None = None
    name = "static"
    spare = 0  # cache columns fed ahead of the reply

    def check(self, sm) -> "Static":
        if self.exit is None:
            return self
        k = int(self.exit)
        if not 1 <= k <= sm.num_layers:
            raise SortedError(f"exit layer {k} is out of range: this model has layers 1..{sm.num_layers}")
        sm.check_exits([k])  # a trained checkpoint decodes at its own exits only (ICT: no head elsewhere)
        return self

    @torch.inference_mode()
    def decode(self, rt, batch: Batch, sampling: Sampling) -> dict:
        k = self.exit or rt.num_layers
        h = prefill(rt, batch, k)[k]
        steps = 1
        while True:
            nxt = sampling.pick(rt.logits(h, k))
            (nxt,) = batch.drop(batch.emit(nxt.unsqueeze(1)), nxt)
            if not batch.size:
                return {"forward_steps": steps, "exit": k}
            cols = batch.feed(1)
            h = rt.run(rt.embed(nxt.unsqueeze(1)), 0, k, cols)[:, -1]
            steps += 1
