"""The machine's decode cost table: seconds to run one decoder layer, the LM head and a draft-vocabulary head on n
new tokens (n = 1..16), measured on this runtime (dtype, weight layout, threads) over a realistic KV cache.

The strategies decide with it instead of rules of thumb: speculative decoding picks the draft length whose expected
tokens per second is highest (a verify of n tokens costs `forward(L - s, n)`, not n one-token steps), and early exit
prices a token by the layers it climbs plus the pending tokens that ride along. Measured once per (model shape,
dtype, threads) and kept on disk under the sortedllm cache folder; `sortedllm bench kernels` prints it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field

import torch

from ..checkpoint import atomic_write_text
from ..models import cache_dir
from .runtime import Columns

SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16)
METHOD = 3  # part of the cache key: tables measured another way are measured again
CONTEXT = 192  # cached columns the measurement attends over (a typical prompt + part of a reply)


@dataclass
class CostTable:
    """Seconds per call, keyed by the number of new tokens n."""

    layer: dict[int, float]  # one decoder layer (the mean over the model's layers)
    head: dict[int, float]  # the full LM head (with its norm)
    subset_head: dict[int, float] = field(default_factory=dict)  # a head over the draft vocabulary
    subset_rows: int = 0
    threads: int = 1
    dtype: str = "float32"

    @staticmethod
    def _at(table: dict[int, float], n: int) -> float:
        if n in table:
            return table[n]
        sizes = sorted(table)
        if n > sizes[-1]:  # beyond the measured range: cost grows at the last measured rate
            a, b = sizes[-2], sizes[-1]
            return table[b] + (table[b] - table[a]) / (b - a) * (n - b)
        lo = max(s for s in sizes if s < n)
        hi = min(s for s in sizes if s > n)
        return table[lo] + (table[hi] - table[lo]) * (n - lo) / (hi - lo)

    def forward(self, layers: int, n: int = 1) -> float:
        """Seconds for `layers` decoder layers on n new tokens."""
        return layers * self._at(self.layer, n)

    def read(self, n: int = 1, subset: bool = False) -> float:
        """Seconds to read logits for n rows through the full head (or the draft-vocabulary head)."""
        return self._at(self.subset_head if subset and self.subset_head else self.head, n)

    def step(self, num_layers: int, n: int = 1) -> float:
        """A plain decoding step of the full model on n tokens."""
        return self.forward(num_layers, n) + self.read(n)

    def relative(self, num_layers: int) -> dict[int, float]:
        """Full-model forward of n tokens relative to one token (the kernel table's headline)."""
        one = self.step(num_layers, 1)
        return {n: self.step(num_layers, n) / one for n in SIZES}


def _key(rt, subset_rows: int) -> str:
    c = rt.config
    shape = (c.model_type, c.hidden_size, getattr(c, "intermediate_size", 0), rt.num_layers, c.num_attention_heads,
             c.num_key_value_heads, rt.arch.head.weight.shape[0] if hasattr(rt.arch.head, "weight") else 0)
    text = json.dumps([shape, str(rt.dtype), torch.get_num_threads(), subset_rows, torch.__version__, SIZES, METHOD])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _monotone(times: dict[int, list[float]]) -> dict[int, float]:
    """The fastest of each size's timings (other processes only ever add time), then a running maximum over n: a
    forward of more tokens never costs less, so a lower figure is the noise of a loaded machine."""
    out, floor = {}, 0.0
    for n in sorted(times):
        floor = max(floor, min(times[n]))
        out[n] = floor
    return out


@torch.inference_mode()
def measure(rt, subset_ids: torch.Tensor | None = None, reps: int = 5) -> CostTable:
    """Time every kernel the strategies combine, on this runtime (see module doc). The sizes alternate within each
    round, so a burst of load on this shared machine hits them alike."""
    L, H = rt.num_layers, rt.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    context = torch.randn(1, CONTEXT, H, generator=gen).to(rt.dtype)
    subset = rt.restricted_head(L, subset_ids) if subset_ids is not None else None
    kernels = {}  # (kind, n) -> a call of it
    for n in SIZES:
        cache = rt.new_cache(1, CONTEXT + n)
        rt.run(context, 0, L, Columns(None, torch.arange(CONTEXT)[None], cache), exact=False)
        x = torch.randn(1, n, H, generator=gen).to(rt.dtype)
        cols = Columns(None, torch.arange(CONTEXT, CONTEXT + n)[None], cache)
        kernels["layer", n] = lambda x=x, cols=cols, cache=cache, n=n: (rt.run(x, 0, L, cols), cache.crop(n))
        kernels["head", n] = lambda x=x: rt.logits(x, L)
        if subset is not None:
            kernels["subset_head", n] = lambda x=x: rt.logits(x, L, head=subset)
    times = {key: [] for key in kernels}
    for fn in kernels.values():  # warm-up
        fn()
    for _ in range(reps):
        for key, fn in kernels.items():
            times[key].append(_time(fn) / (L if key[0] == "layer" else 1))
    by_kind = {kind: _monotone({n: t for (k, n), t in times.items() if k == kind})
               for kind in ("layer", "head", "subset_head")}
    return CostTable(layer=by_kind["layer"], head=by_kind["head"], subset_head=by_kind["subset_head"],
                     subset_rows=len(subset_ids) if subset_ids is not None else 0, threads=torch.get_num_threads(),
                     dtype=str(rt.dtype).replace("torch.", ""))


def cost_table(rt, subset_ids: torch.Tensor | None = None) -> CostTable:
    """This machine's table for `rt`, measured on first use and then read from the cache folder."""
    memo = rt.__dict__.setdefault("_costs", {})
    rows = len(subset_ids) if subset_ids is not None else 0
    if rows in memo:
        return memo[rows]
    path = cache_dir() / "costs" / f"{_key(rt, rows)}.json"
    table = None
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            table = CostTable(**{**data, **{k: {int(n): v for n, v in data[k].items()}
                                            for k in ("layer", "head", "subset_head")}})
        except (json.JSONDecodeError, TypeError, KeyError, ValueError):
            table = None  # a damaged entry is measured again
    if table is None:
        table = measure(rt, subset_ids)
        try:
            atomic_write_text(path, json.dumps(asdict(table)))
        except OSError:
            pass  # a read-only cache folder only costs a new measurement next time
    memo[rows] = table
    return table
