"""Generation throughput of the evaluation path: one left-padded batch of 16 prompts vs the same prompts one at a
time, with `sortedllm.inference.generate` (greedy, static depth) on the default model.

    sortedllm bench batch [--model M] [--n 16] [--batch-size 16] [--max-new-tokens 128] [--rounds 3] [--exit 30]
                          [--threads N] [--dtype auto] [--out benchmarks/results/batched_generation.json]

`--n` PandaLM prompts are generated in left-padded batches of `--batch-size` (sorted by length, as the evaluation
does) and one at a time. The default, one batch of 16, is the worst case for padding. Both modes generate for the
same prompts; they alternate within each round (the order flips every round) so machine load hits both alike, and
each round's ratio compares the two runs of that round; `ratio_ci95` is the paired bootstrap interval over rounds of
seconds per token one at a time / batched. Throughput counts only real new tokens and includes the prompts' prefill.
`decode` numbers subtract a prefill-only run (1 new token) of the same mode and round, to show where time goes.
Target: >= 4x end to end.
"""

from __future__ import annotations

import statistics
import time

from ..data import load_examples
from ..exits import SortedModel
from ..inference import GenerationOptions, Static, generate
from ..models import DEFAULT_MODEL
from .common import Clock, check_args, default_out, interval_fields, machine, parser, shown_path, speedup, write_json

TARGET = 4.0


def build_parser():
    p = parser("batch", __doc__, threads=None)
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint folder, hub id, .gguf or alias")
    p.add_argument("--n", type=int, default=16, help="prompts")
    p.add_argument("--batch-size", type=int, default=16, help="batch size of the batched mode")
    p.add_argument("--max-new-tokens", type=int, default=128, help="the tournament's default reply length")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--exit", type=int, help="exit layer (default: the last layer)")
    p.add_argument("--out", default=default_out("batched_generation.json"))
    return p


def timed(sm, prompts, strategy, options: GenerationOptions) -> tuple[float, int, list[list[int]]]:
    """(wall seconds, new tokens, token ids per prompt) of one `generate` call."""
    with Clock() as c:
        gens = generate(sm, prompts, strategy, options)
    return c.wall, sum(len(g.token_ids) for g in gens), [g.token_ids for g in gens]


def one_round(sm, prompts, strategy, a, r: int) -> dict:
    """Both modes once (order flipped on odd rounds), each with its prefill-only run."""
    runs, prefill = {}, {}
    for mode in (("batched", "sequential") if r % 2 == 0 else ("sequential", "batched")):
        bs = a.batch_size if mode == "batched" else 1
        runs[mode] = timed(sm, prompts, strategy, GenerationOptions(a.max_new_tokens, bs, dtype=a.dtype))
        prefill[mode] = timed(sm, prompts, strategy, GenerationOptions(1, bs, dtype=a.dtype))[0]
    (sb, tb, ob), (ss, ts, os_) = runs["batched"], runs["sequential"]
    pb, ps = prefill["batched"], prefill["sequential"]
    n = len(prompts)
    out = {"batched_seconds": sb, "batched_tokens": tb, "batched_tokens_per_s": tb / sb,
           "sequential_seconds": ss, "sequential_tokens": ts, "sequential_tokens_per_s": ts / ss,
           "ratio": (tb / sb) / (ts / ss), "same_tokens": sum(x == y for x, y in zip(ob, os_)) / len(ob),
           "batched_prefill_seconds": pb, "sequential_prefill_seconds": ps,
           "decode_ratio": ((tb - n) / max(sb - pb, 1e-9)) / ((ts - n) / max(ss - ps, 1e-9))}
    print(f"round {r}: batched {tb} tokens in {sb:.1f}s ({tb / sb:.1f} tok/s, prefill {pb:.1f}s), one at a time "
          f"{ts} tokens in {ss:.1f}s ({ts / ss:.1f} tok/s, prefill {ps:.1f}s): {out['ratio']:.2f}x end to end, "
          f"{out['decode_ratio']:.2f}x decode only", flush=True)
    return out


def summarize(a, k: int, rounds: list[dict], load_before) -> dict:
    ratios = [x["ratio"] for x in rounds]
    m = machine()
    paired = speedup([x["sequential_seconds"] / max(x["sequential_tokens"], 1) for x in rounds],
                     [x["batched_seconds"] / max(x["batched_tokens"], 1) for x in rounds])
    return {"model": shown_path(a.model), "exit": k, "prompts": a.n, "batch_size": a.batch_size,
            "max_new_tokens": a.max_new_tokens, "dtype": a.dtype, "rounds": rounds,
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "ratio_paired": paired["ratio"], **interval_fields("ratio", paired),
            "decode_ratio_median": statistics.median(x["decode_ratio"] for x in rounds),
            "target": TARGET, "meets_target": statistics.median(ratios) >= TARGET,
            "load_average_before": load_before, "machine": m,
            # the old script's top-level machine facts, kept for readers of earlier files
            "torch_threads": m["threads"], "cpu_count": m["cpu_count"], "load_average_after": m["load_average"],
            "torch": m["torch"], "python": m["python"]}


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    check_args(a, positive=("n", "batch_size", "max_new_tokens", "rounds"))
    started = time.perf_counter()
    sm = SortedModel.from_pretrained(a.model)
    k = a.exit or sm.num_layers
    strategy = Static(k)
    prompts = [r["prompt"] for r in load_examples("pandalm", limit=a.n)]
    generate(sm, prompts[:2], strategy, GenerationOptions(2, 2, dtype=a.dtype))  # warm-up
    load_before = machine()["load_average"]
    rounds = [one_round(sm, prompts, strategy, a, r) for r in range(a.rounds)]
    summary = summarize(a, k, rounds, load_before)
    summary["seconds"] = time.perf_counter() - started
    print()
    print(f"| mode | tokens/s (median over {a.rounds} rounds) |")
    print("|---|---|")
    print(f"| batched ({a.batch_size}) | {statistics.median(x['batched_tokens_per_s'] for x in rounds):.1f} |")
    print(f"| one at a time | {statistics.median(x['sequential_tokens_per_s'] for x in rounds):.1f} |")
    lo, hi = summary["ratio_ci95"]
    print(f"\nbatched/sequential throughput: median {summary['ratio_median']:.2f}x (min {summary['ratio_min']:.2f}x, "
          f"max {summary['ratio_max']:.2f}x; paired {summary['ratio_paired']:.2f}x, 95% interval {lo:.2f}x to "
          f"{hi:.2f}x over {summary['ratio_n']} rounds; target >= {TARGET:g}x); decode only "
          f"{summary['decode_ratio_median']:.2f}x; identical greedy tokens in "
          f"{statistics.mean(x['same_tokens'] for x in rounds):.0%} of prompts")
    write_json(a.out, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
