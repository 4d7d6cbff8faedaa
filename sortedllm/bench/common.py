"""What the benchmarks share: argument helpers, machine facts, timing, paired speed-ups with intervals, JSON output.

Results are committed to the repository, so the JSON names files relative to the repository (or as the user gave
them), never by one machine's absolute path.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from ..checkpoint import atomic_write_text
from ..config import ArgumentParser
from ..errors import SortedError
from ..inference.runtime import DTYPES, cpu_has_bf16
from ..stats import paired_ratio

ROOT = Path(__file__).resolve().parents[2]  # the checkout holding benchmarks/ (when run from one)
RESULTS = Path("benchmarks") / "results"


def default_out(name: str) -> str:
    """benchmarks/results/<name> of the checkout this package runs from, else of the working directory."""
    base = ROOT if (ROOT / "benchmarks").is_dir() else Path.cwd()
    return str(base / RESULTS / name)


RUNTIME_DTYPE = ("our runtime's weights: auto (bfloat16 where the CPU has bfloat16 instructions), bfloat16 or "
                 "float32")


def parser(name: str, doc: str, dtype_help: str | None = RUNTIME_DTYPE, threads: int | None = 1) -> ArgumentParser:
    """`sortedllm bench <name>`'s parser with the options every benchmark takes: --threads, --dtype (unless
    `dtype_help` is None), --out. Bad options raise SortedError (one line, exit 2)."""
    p = ArgumentParser(prog=f"sortedllm bench {name}", description=doc.strip().splitlines()[0])
    p.add_argument("--threads", type=int, default=threads, help="torch CPU threads (one is fastest on a busy "
                   "2-core machine)" + ("" if threads else "; default: torch's choice"))
    if dtype_help:
        p.add_argument("--dtype", default="auto", help=dtype_help)
    return p


def check_args(a, positive: tuple[str, ...] = (), at_least_zero: tuple[str, ...] = ()) -> None:
    """Checks that need no model, so bad input fails before anything loads."""
    if getattr(a, "dtype", "auto") not in DTYPES:
        raise SortedError(f"unknown dtype '{a.dtype}': use auto, bfloat16 or float32")
    if a.threads is not None and a.threads < 1:
        raise SortedError(f"--threads must be at least 1 (got {a.threads})")
    for name in positive:
        if getattr(a, name) < 1:
            raise SortedError(f"--{name} must be at least 1 (got {getattr(a, name)})")
    for name in at_least_zero:
        if getattr(a, name) < 0:
            raise SortedError(f"--{name} must be at least 0 (got {getattr(a, name)})")
    if a.threads:
        torch.set_num_threads(a.threads)


def exits_list(text: str, flag: str) -> list[int]:
    """'9,12,15' -> [9, 12, 15]."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SortedError(f"{flag} takes comma-separated layer numbers, e.g. 9,12 (got '{text}')") from None


def shown_path(path: str | Path | None) -> str | None:
    """A path as results store it: relative to the repository when inside it, else as given."""
    if path is None:
        return None
    p = Path(path)
    if p.is_absolute():
        try:
            return str(p.resolve().relative_to(ROOT))
        except ValueError:
            return str(path)
    return str(path)


def machine() -> dict:
    """The facts a timing depends on."""
    return {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "cpu_bf16": cpu_has_bf16(), "load_average": list(os.getloadavg())}


def write_json(path: str | Path, data) -> Path:
    """Write results whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    print(f"wrote {shown_path(path)}", flush=True)
    return path


class Clock:
    """Wall and process-CPU seconds of a block: `with Clock() as c: ...; c.wall, c.cpu`. CPU time of a
    single-threaded process barely moves with other processes' load; wall time does (tens of percent here)."""

    def __enter__(self) -> "Clock":
        self._t, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._t
        self.cpu = time.process_time() - self._c


def speedup(base_per_token, method_per_token) -> dict:
    """Speed-up of a method over the baseline from per-prompt seconds per token measured on the same prompts:
    sum(base) / sum(method) with its paired bootstrap 95% interval over prompts, n and verdict."""
    return paired_ratio(base_per_token, method_per_token)


def interval_fields(prefix: str, r: dict) -> dict:
    """A `paired_ratio` result as flat keys beside the point estimate: <prefix>_ci95, _n, _verdict."""
    return {f"{prefix}_ci95": r["ci95"], f"{prefix}_n": r["n"], f"{prefix}_verdict": r["verdict"]}
