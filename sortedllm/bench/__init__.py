"""`sortedllm bench <benchmark>`: the repository's benchmarks, one module each.

    sortedllm bench train    [--model M] [--steps 3] [--batch-size 2] ...      SoFT vs SFT step time and memory
    sortedllm bench decode   [--model M] [--prompts 4] [--max_new_tokens 96]    dynamic-inference speed and quality
    sortedllm bench batch    [--model M] [--n 16] [--batch-size 16] ...         batched vs one-at-a-time generation
    sortedllm bench kernels  [--model M] [--reps 7]                             relative cost of n-token forwards
"""

from __future__ import annotations

import importlib

from ..errors import SortedError

# benchmark -> (module with `main(argv) -> int`, one-line description, default output)
BENCHMARKS = {
    "train": ("sortedllm.bench.train", "SoFT variants vs SFT: training step time and peak memory", "train.json"),
    "decode": ("sortedllm.bench.decode", "every decoding method vs plain greedy: speed-up with 95% intervals, "
               "identical output, accuracy", "decode.json"),
    "batch": ("sortedllm.bench.batch", "batched vs one-at-a-time generation throughput", "batched_generation.json"),
    "kernels": ("sortedllm.bench.kernels", "cost of one forward of n new tokens relative to one (HF float32, HF "
                "bfloat16, our runtime, the LM head)", "kernels.json"),
}

USAGE = "usage: sortedllm bench <benchmark> [--model M] [--threads N] [--dtype auto|float32|bfloat16] [--out FILE] " \
        "[options]\n\nbenchmarks:\n" + "\n".join(
            f"  {name:<8} {desc} (writes benchmarks/results/{out})" for name, (_, desc, out) in BENCHMARKS.items()) + \
        "\n\nRun `sortedllm bench <benchmark> --help` for its options."


def main(argv: list[str]) -> int:
    """Dispatch to the benchmark's module (imported on demand: `bench train` needs TRL, the others do not)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        raise SortedError(f"unknown benchmark '{name}'; choose from {', '.join(BENCHMARKS)}")
    return importlib.import_module(BENCHMARKS[name][0]).main(rest) or 0
