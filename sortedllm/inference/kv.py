"""A preallocated KV cache for the decode loops: one [rows, kv heads, capacity, head dim] buffer per layer slot.

Every live row of a left-padded batch holds the same number of columns, so one length per slot describes the cache;
taking drafted tokens back is a length change (`crop`), with no copy. Slots after the model's own layers belong to a
draft layer's copies (adapters/draft_layer.py) and behave the same. Written by hand because transformers'
`StaticCache` writes by position id (left padding gives the rows different positions for one column) and has no crop.
The decoder layers call `update` exactly as they call a transformers cache.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, rows: int, heads: int, head_dim: int, capacity: int, dtype, device, slots: int):
        self.shape = (rows, heads, capacity, head_dim)
        self.dtype, self.device = dtype, device
        self.keys: list[torch.Tensor | None] = [None] * slots
        self.values: list[torch.Tensor | None] = [None] * slots
        self.length = [0] * slots
        self.writer: tuple[torch.Tensor, int] | None = None  # (rows, first column) while a prefill group writes

    @property
    def capacity(self) -> int:
        return self.shape[2]

    def _buffers(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        while slot >= len(self.keys):
            self.keys.append(None)
            self.values.append(None)
            self.length.append(0)
        if self.keys[slot] is None:
            self.keys[slot] = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
            self.values[slot] = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        return self.keys[slot], self.values[slot]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store the new columns of `layer_idx` and return every column so far (views, no copy)."""
        k, v = self._buffers(layer_idx)
        key, value = key.to(self.dtype), value.to(self.dtype)  # the cache's dtype may differ (Runtime.new_cache)
        n = key.shape[2]
        if self.writer is not None:  # an unpadded prefill group: its own rows, right-aligned in the batch
            rows, start = self.writer
            k[rows, :, start:start + n] = key
            v[rows, :, start:start + n] = value
            return key, value
        at = self.length[layer_idx]
        if at + n > self.capacity:
            raise RuntimeError(f"KV cache capacity {self.capacity} exceeded ({at} + {n} columns)")
        k[:, :, at:at + n] = key
        v[:, :, at:at + n] = value
        self.length[layer_idx] = at + n
        return k[:, :, :at + n], v[:, :, :at + n]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length[layer_idx] if layer_idx < len(self.length) else 0

    def set_length(self, n: int, start: int = 0, end: int | None = None) -> None:
        for i in range(start, len(self.length) if end is None else end):
            self._buffers(i)
            self.length[i] = n

    def crop(self, n: int, start: int = 0, end: int | None = None) -> None:
        """Drop the last `n` columns of slots start..end-1."""
        for i in range(start, len(self.length) if end is None else end):
            self.length[i] -= n

    def select_rows(self, keep: torch.Tensor) -> None:
        """Keep only the rows `keep` (finished rows leave the batch)."""
        self.shape = (len(keep), *self.shape[1:])
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i], self.values[i] = k[keep], v[keep]
