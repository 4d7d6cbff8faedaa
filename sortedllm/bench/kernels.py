"""Cost of one forward of n new tokens over a ~200-token KV cache, relative to one new token: HF float32, HF
bfloat16, our decode runtime (inference/runtime.py) and the LM head alone.

    sortedllm bench kernels [--model M] [--reps 7] [--context 200] [--threads 1] [--dtype auto]
                            [--out benchmarks/results/kernels.json]

Why it matters: speculative decoding verifies n drafted tokens in one forward, and early exit carries its pending
tokens along in one forward, so both pay off only where a forward of a few tokens costs about what one costs. Each
method runs a forward of n tokens over the same cache (cropped back after each call); every rep times n = 1 and n
back to back, so both compare times taken under the same load: `relative` = median n-token time / median one-token
time (robust to a disturbed rep), `relative_mean` = mean / mean with its paired bootstrap 95% interval over reps
(`relative_ci95`, sortedllm.stats.paired_ratio). Our runtime is timed over all layers plus the
head; the cost table the strategies decide with (inference/costs.py, measured once per machine and cached) is shown
beside it.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from ..exits import SortedModel
from ..inference.costs import CostTable, cost_table
from ..inference.runtime import Columns, Runtime
from ..models import DEFAULT_MODEL
from ..stats import paired_ratio
from .common import Clock, check_args, default_out, machine, parser, shown_path, write_json

SIZES = (1, 2, 3, 4, 6, 8)
CONTEXT = 200


def build_parser():
    p = parser("kernels", __doc__)
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint folder, hub id, .gguf or alias")
    p.add_argument("--reps", type=int, default=7, help="timed reps per size (after one warm-up)")
    p.add_argument("--context", type=int, default=CONTEXT, help="cached tokens the new ones attend over")
    p.add_argument("--out", default=default_out("kernels.json"))
    return p


@torch.inference_mode()
def hf_forward(model, context: torch.Tensor, new: torch.Tensor):
    """f(n): transformers' own forward of n new tokens (logits included) over a cache of `context`."""
    cache = model(input_ids=context, use_cache=True).cache

    def run(n: int) -> None:
        model(input_ids=new[:, :n], cache=cache, use_cache=True)
        cache.crop(-n)  # transformers 5: a negative count removes that many columns
    return run


@torch.inference_mode()
def runtime_forward(rt, context: torch.Tensor, new: torch.Tensor, head_only: bool = False):
    """f(n): our runtime over every layer plus exit L's head on n new tokens (or the head alone)."""
    L, width = rt.num_layers, context.shape[1]
    cache = rt.new_cache(1, width + new.shape[1])
    rt.run(rt.embed(context), 0, L, Columns(None, torch.arange(width)[None], cache), exact=False)
    x = rt.embed(new)

    def run(n: int) -> None:
        if head_only:
            rt.logits(x[:, :n], L)
            return
        h = rt.run(x[:, :n], 0, L, Columns(None, torch.arange(width, width + n)[None], cache))
        rt.logits(h, L)
        cache.crop(n)
    return run


@torch.inference_mode()
def raw_head(rt, new: torch.Tensor):
    """f(n): oneDNN's product of n rows with the runtime's packed LM head, not padded (runtime.MIN_ROWS's evidence:
    which row counts run fastest)."""
    x = rt.embed(new)[0]
    head = rt.heads[rt.num_layers][1]
    return lambda n: torch.ops.mkldnn._linear_pointwise(x[:n], head.weight_packed, head.bias, "none", [], "")


@torch.inference_mode()
def hf_head(sm, new: torch.Tensor):
    """f(n): the HF model's final norm and LM head alone on n hidden states (float32)."""
    h = sm.arch.embed(new)
    return lambda n: sm.arch.logits(h[:, :n])


@torch.inference_mode()  # the forwards write caches made in inference mode
def time_sizes(run, sizes, reps: int) -> dict:
    """Median milliseconds per size and the cost relative to one token, with a paired interval over reps."""
    for n in sizes:  # warm-up: first-call allocations and kernel selection
        run(n)
    out = {"ms": {}, "relative": {}, "relative_mean": {}, "relative_ci95": {}, "relative_n": reps}
    for n in sizes:
        ones, many = [], []
        for _ in range(reps):
            for size, into in ((1, ones), (n, many)):
                with Clock() as c:
                    run(size)
                into.append(c.wall)
        r = paired_ratio(many, ones)
        out["ms"][str(n)] = 1000 * statistics.median(many)
        out["relative"][str(n)] = statistics.median(many) / statistics.median(ones)
        out["relative_mean"][str(n)] = r["ratio"]
        out["relative_ci95"][str(n)] = r["ci95"]
    return out


def cost_summary(table: CostTable, num_layers: int, sizes=SIZES) -> dict:
    """The cost table as results store it: milliseconds per kernel and the full step relative to one token."""
    def ms(d: dict) -> dict:
        return {str(n): 1000 * CostTable._at(d, n) for n in sizes} if d else {}

    return {"dtype": table.dtype, "threads": table.threads, "layer_ms": ms(table.layer), "head_ms": ms(table.head),
            "subset_head_ms": ms(table.subset_head), "subset_rows": table.subset_rows,
            "step_ms": {str(n): 1000 * table.step(num_layers, n) for n in sizes},
            "relative": {str(n): table.step(num_layers, n) / table.step(num_layers, 1) for n in sizes}}


def print_costs(summary: dict, title: str) -> None:
    sizes = list(summary["relative"])
    print(f"\n{title} ({summary['dtype']}, {summary['threads']} thread(s)); ms per call by new tokens n")
    print("| kernel | " + " | ".join(f"n={n}" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for name, key in (("one layer", "layer_ms"), ("LM head", "head_ms"), ("draft-vocab head", "subset_head_ms"),
                      ("full step", "step_ms")):
        if summary[key]:
            print(f"| {name} | " + " | ".join(f"{summary[key][n]:.2f}" for n in sizes) + " |")
    print("| full step / n=1 | " + " | ".join(f"{summary['relative'][n]:.2f}x" for n in sizes) + " |\n", flush=True)


def print_table(methods: dict, sizes) -> None:
    print("\ncost of one forward of n new tokens relative to n=1: median ratio (mean ratio [its paired 95% interval])")
    print("| method | ms (n=1) | " + " | ".join(f"n={n}" for n in sizes) + " |")
    print("|---|---|" + "---|" * len(sizes))
    for name, m in methods.items():
        cells = []
        for n in map(str, sizes):
            lo, hi = m["relative_ci95"][n]
            cells.append(f"{m['relative'][n]:.2f}x ({m['relative_mean'][n]:.2f}x [{lo:.2f}, {hi:.2f}])")
        print(f"| {name} | {m['ms']['1']:.2f} | " + " | ".join(cells) + " |")
    print(flush=True)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    check_args(a, positive=("reps", "context"))
    started = time.perf_counter()
    sm = SortedModel.from_pretrained(a.model)
    gen = torch.Generator().manual_seed(0)
    vocab = sm.arch.config.vocab_size
    context = torch.randint(0, vocab, (1, a.context), generator=gen)
    new = torch.randint(0, vocab, (1, max(SIZES)), generator=gen)
    rt = Runtime.of(sm, a.dtype)
    ours = str(rt.dtype).replace("torch.", "")
    runs = {"HF float32": hf_forward(sm.model.float(), context, new)}
    bf16 = copy.deepcopy(sm.model).to(torch.bfloat16)
    runs["HF bfloat16"] = hf_forward(bf16, context, new)
    runs[f"ours {ours}"] = runtime_forward(rt, context, new)
    runs[f"LM head {ours} (ours)"] = runtime_forward(rt, context, new, head_only=True)
    if rt.device.type == "cpu":
        runs[f"LM head {ours}, unpadded oneDNN"] = raw_head(rt, new)
    runs["LM head float32 (HF)"] = hf_head(sm, new)
    methods = {}
    for name, run in runs.items():
        methods[name] = time_sizes(run, SIZES, a.reps)
        print(f"  {name}: {methods[name]['ms']['1']:.2f} ms at n=1, {methods[name]['relative'][str(max(SIZES))]:.2f}x "
              f"at n={max(SIZES)}", flush=True)
    table = cost_summary(cost_table(rt), sm.num_layers)
    print_table(methods, SIZES)
    print_costs(table, "our runtime's cost table (inference/costs.py, cached per machine)")
    write_json(a.out, {"model": shown_path(a.model), "num_layers": sm.num_layers, "context": a.context,
                       "sizes": list(SIZES), "reps": a.reps, "dtype": ours, "methods": methods, "cost_table": table,
                       "machine": machine(), "seconds": time.perf_counter() - started})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
