"""Generation throughput of the evaluation path: one left-padded batch of 16 prompts vs the same prompts one at a
time, with the KV-cache decoder `sortedllm.inference.generate` (greedy, static depth) on the default model.

    python benchmarks/bench_batched_generation.py [--n 16] [--batch-size 16] [--max-new-tokens 128] [--rounds 3]
                                                  [--exit 30] [--threads N]
                                                  [--out benchmarks/results/batched_generation.json]

`--n` PandaLM prompts are generated in left-padded batches of `--batch-size` (sorted by length, as the evaluation
does for its 170 prompts) and one at a time. The default, one batch of 16, is the worst case for padding.
Both modes generate for the same prompts; they alternate within each round (the order flips every round) so
machine load hits both alike, and each round's ratio compares the two runs of that round. Throughput counts only real
new tokens, and the time includes the prompts' prefill (unpadded since issue 8: prompts of equal length run
together, the others one length at a time, then decoding shares one left-padded batch).
`decode` numbers subtract a prefill-only run (1 new token) of the same mode and round, to show where time goes.
Target: >= 4x end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sortedllm import SortedModel  # noqa: E402
from sortedllm.data import load_examples  # noqa: E402
from sortedllm.inference import generate  # noqa: E402


def timed(sm, prompts, k, max_new_tokens, batch_size):
    t0 = time.perf_counter()
    gens = generate(sm, prompts, exit_layer=k, max_new_tokens=max_new_tokens, batch_size=batch_size)
    seconds = time.perf_counter() - t0
    return seconds, sum(len(g.token_ids) for g in gens), [g.token_ids for g in gens]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, default=16, help="prompts")
    p.add_argument("--batch-size", type=int, default=16, help="batch size of the batched mode")
    p.add_argument("--max-new-tokens", type=int, default=128, help="the tournament's default reply length")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--exit", type=int, help="exit layer (default: the last layer)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "batched_generation.json"))
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    sm = SortedModel.from_pretrained(a.model)
    k = a.exit or sm.num_layers
    prompts = [r["prompt"] for r in load_examples("pandalm", limit=a.n)]
    generate(sm, prompts[:2], exit_layer=k, max_new_tokens=2, batch_size=2)  # warm-up
    load_before = os.getloadavg()
    rounds = []
    for r in range(a.rounds):
        runs, prefill = {}, {}
        for mode in (("batched", "sequential") if r % 2 == 0 else ("sequential", "batched")):
            bs = a.batch_size if mode == "batched" else 1
            runs[mode] = timed(sm, prompts, k, a.max_new_tokens, bs)
            prefill[mode] = timed(sm, prompts, k, 1, bs)[0]
        (sb, tb, ob), (ss, ts, os_) = runs["batched"], runs["sequential"]
        pb, ps = prefill["batched"], prefill["sequential"]
        rounds.append({"batched_seconds": sb, "batched_tokens": tb, "batched_tokens_per_s": tb / sb,
                       "sequential_seconds": ss, "sequential_tokens": ts, "sequential_tokens_per_s": ts / ss,
                       "ratio": (tb / sb) / (ts / ss), "same_tokens": sum(x == y for x, y in zip(ob, os_)) / len(ob),
                       "batched_prefill_seconds": pb, "sequential_prefill_seconds": ps,
                       "decode_ratio": ((tb - a.n) / max(sb - pb, 1e-9)) / ((ts - a.n) / max(ss - ps, 1e-9))})
        print(f"round {r}: batched {tb} tokens in {sb:.1f}s ({tb / sb:.1f} tok/s, prefill {pb:.1f}s), one at a time "
              f"{ts} tokens in {ss:.1f}s ({ts / ss:.1f} tok/s, prefill {ps:.1f}s): {rounds[-1]['ratio']:.2f}x end to "
              f"end, {rounds[-1]['decode_ratio']:.2f}x decode only", flush=True)
    ratios = [x["ratio"] for x in rounds]
    summary = {"model": a.model, "exit": k, "prompts": a.n, "batch_size": a.batch_size,
               "max_new_tokens": a.max_new_tokens,
               "rounds": rounds, "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
               "ratio_max": max(ratios), "decode_ratio_median": statistics.median(x["decode_ratio"] for x in rounds),
               "target": 4.0, "meets_target": statistics.median(ratios) >= 4.0,
               "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
               "load_average_before": load_before, "load_average_after": os.getloadavg(),
               "torch": torch.__version__, "python": platform.python_version()}
    print()
    print(f"| mode | tokens/s (median over {a.rounds} rounds) |")
    print("|---|---|")
    print(f"| batched ({a.batch_size}) | {statistics.median(x['batched_tokens_per_s'] for x in rounds):.1f} |")
    print(f"| one at a time | {statistics.median(x['sequential_tokens_per_s'] for x in rounds):.1f} |")
    print(f"\nbatched/sequential throughput: median {summary['ratio_median']:.2f}x (min {min(ratios):.2f}x, max "
          f"{max(ratios):.2f}x; target >= 4x); decode only {summary['decode_ratio_median']:.2f}x; identical greedy "
          f"tokens in "
          f"{statistics.mean(x['same_tokens'] for x in rounds):.0%} of prompts")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
