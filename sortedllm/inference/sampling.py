"""Token choice shared by every decoding strategy: greedy, or sampling with temperature / top-k / top-p.

The warpers are transformers' own (`TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`), so "plain
sampling" here means exactly what HF `generate(do_sample=True, ...)` samples from; speculative sampling needs the
warped distributions themselves (not just a sample), which is why they are applied here rather than inside
`generate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SortedError


@dataclass
class Sampling:
    """temperature 0 = greedy (argmax); otherwise sample from the warped softmax with a seeded generator."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise SortedError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SortedError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SortedError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        self._warpers = None
        self.generator = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def start(self, device) -> "Sampling":
        """A fresh random stream for one `generate` call (same seed -> same samples)."""
        if not self.greedy:
            self.generator = torch.Generator(device=device)
            if self.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(self.seed)
        return self

    def warpers(self):
        if self._warpers is None:
            from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                                TopKLogitsWarper, TopPLogitsWarper)

            procs = [TemperatureLogitsWarper(self.temperature)]
            if self.top_k:
                procs.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1:
                procs.append(TopPLogitsWarper(self.top_p))
            self._warpers = LogitsProcessorList(procs)
        return self._warpers

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution tokens are drawn from, for logits of shape [..., V] (one-hot at the argmax if greedy)."""
        shape = logits.shape
        flat = logits.reshape(-1, shape[-1]).float()
        if self.greedy:
            out = torch.zeros_like(flat)
            out.scatter_(1, flat.argmax(-1, keepdim=True), 1.0)
        else:
            out = self.warpers()(None, flat).softmax(-1)
        return out.reshape(shape)

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One token per row of `probs` [N, V] (unnormalised is fine), by inverting the CDF: the same
        distribution as `torch.multinomial`, which is several times slower on CPU over a 50k vocabulary."""
        cdf = probs.float().cumsum(-1)
        u = torch.rand(cdf.shape[0], 1, generator=self.generator, device=cdf.device) * cdf[:, -1:]
        return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token per row of `logits` [N, V]."""
        if self.greedy:
            return logits.argmax(-1)
        return self.draw(self.probs(logits))

    def uniform(self, shape, device) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, device=device)


