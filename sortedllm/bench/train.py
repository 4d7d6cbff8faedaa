"""Training step cost of SoFT vs SFT on the default model with real GSM8K batches.

    sortedllm bench train [--model M] [--steps 3] [--batch-size 2] [--methods hf_sft,soft_uniform,...] [--no-memory]
                          [--dtype auto] [--threads N] [--out benchmarks/results/train.json]

Methods (each one training step: forward, backward, AdamW step, on the same batch in each round; AdamW runs at
learning rate 0, so the whole update is computed but the weights stay put and every method's loss on a batch is
comparable: sft must equal hf_sft and soft_uniform naive_soft, which is checked):
  hf_sft         transformers' own loss: `model(labels=...)` (full logits at every position)
  sft            our SFT path: the SoFT trainer's loss with the last exit only (head at labelled positions, tiled)
  naive_soft     full-vocabulary logits at every position of every exit, F.cross_entropy, mean over exits
  soft_<sched>   our SoFT loss (tiled head at labelled positions) with exit schedule uniform / weights /
                 sample:1 / rotate, one AdamW on the joint loss (exit_optimizer joint, the paper's)
  split_<sched>  the same exits with exit_optimizer split (train/split.py): the intermediate exits' gradient by
                 its own backward into a second AdamW stream, then the last exit's backward

Time: methods alternate within each round in one process; a method's ratio is the median over rounds of its
time / hf_sft's time in the same round (wall clock; the process CPU time ratio is reported too, as it is less
disturbed by other processes on a shared machine). Peak memory: one subprocess per method (CPU: peak RSS of one
step after the AdamW state exists, read from /proc with the peak reset first; GPU: torch.cuda.max_memory_allocated).
`ideal_ratio` is the FLOP model (sortedllm.train.dry_run.step_flops): decoder FLOPs plus head FLOPs of the rows
the method projects, over the same for hf_sft. The same model is applied to LLaMA-2 13B (8 exits 12..40, the
paper's setup) with this run's label fraction: the paper reports SoFT at ~0.98x SFT's time.
`cpu_time_sum_ratio` is the method's summed CPU time over hf_sft's over the same rounds, with its paired bootstrap
95% interval over rounds (`_ci95`, `_n`, `_verdict`). `--dtype` is the training weights' dtype (auto = float32,
the trainer's default).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import encode_dataset, load_examples
from ..errors import SortedError
from ..exits import hidden_from_outputs, resolve_exits
from ..models import DEFAULT_MODEL, Architecture, load_model
from ..stats import paired_ratio
from ..train.dry_run import Counts, meta_model, model_config, step_flops
from ..train.loss import multi_exit_loss
from ..train.schedules import make_schedule
from ..train.split import SplitAdamW
from .common import Clock, check_args, default_out, interval_fields, machine, parser, shown_path, write_json

SCHEDULES = {"uniform": "uniform", "weights": "weights", "sample1": "sample:1", "rotate": "rotate"}
SPLIT_SCHEDULES = {"uniform": "uniform", "sample2": "sample:2", "rotate": "rotate"}
METHODS = ["hf_sft", "sft", "naive_soft"] + [f"soft_{s}" for s in SCHEDULES] + [f"split_{s}" for s in SPLIT_SCHEDULES]
LLAMA2_13B = "meta-llama/Llama-2-13b-hf"  # the published config, built in (nothing downloaded)


def make_batches(tokenizer, n: int, batch_size: int, max_length: int) -> list[dict]:
    """Real GSM8K rows, prompt masked out of the labels, padded by TRL's collator as SFTTrainer does."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    ds = encode_dataset(tokenizer, load_examples("gsm8k", limit=n * batch_size), max_length, "gsm8k")
    rows = [{"input_ids": r["input_ids"],
             "labels": [t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"])]} for r in ds]
    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    return [collate(rows[i * batch_size:(i + 1) * batch_size]) for i in range(n)]


def exit_weights(exits: list[int]) -> str:
    """Fixed per-exit weights for the `weights` schedule: growing with depth (a typical user choice)."""
    return ",".join(str(i + 1) for i in range(len(exits)))


class Step:
    """One training step of a method; all methods share the model and the optimizer."""

    def __init__(self, model, exits: list[int], loss_impl: str, chunk_size: int | None):
        self.model, self.arch, self.exits = model, Architecture(model), exits
        self.impl, self.chunk = loss_impl, chunk_size
        self.schedules = {name: make_schedule(spec, exits, exit_weights(exits)) for name, spec in SCHEDULES.items()}
        self.schedules |= {f"split_{name}": make_schedule(spec, exits) for name, spec in SPLIT_SCHEDULES.items()}
        self.calls = {m: 0 for m in METHODS}
        self.opt = torch.optim.AdamW(model.parameters(), lr=0.0)
        self.split_opt = SplitAdamW(model.parameters(), lr=0.0)

    def init_optimizer_state(self, method: str = "hf_sft"):
        """Allocate the optimizer's moments now, so one measured step has the memory of any later training step."""
        opt = self.split_opt if method.startswith("split_") else self.opt
        for p in self.model.parameters():
            p.grad = torch.zeros_like(p)
        if method.startswith("split_"):
            opt.add_rest([torch.zeros_like(p) for p in opt.parameters()])
        opt.step()
        opt.zero_grad(set_to_none=True)

    def loss(self, method: str, batch: dict) -> torch.Tensor:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        L = self.arch.num_layers
        if method == "hf_sft":
            return self.model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        # As SoFTTrainer.compute_loss: the model's own forward with hidden states, no full logits.
        out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1,
                         use_cache=False)
        if method == "naive_soft":
            losses = []
            for k in self.exits:
                h, normed = hidden_from_outputs(out.hidden_states, k, L)
                logits = self.arch.logits(h, normed=normed).float()
                losses.append(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                              labels[:, 1:].reshape(-1), ignore_index=-100))
            return sum(losses) / len(losses)
        if method == "sft":
            weights = {L: 1.0}
        elif method.startswith("split_"):
            weights = self.schedules[method].weights(self.calls[method])
            rest = {k: w for k, w in weights.items() if k != L}
            total = sum(rest.values())
            rest_loss = multi_exit_loss(out.hidden_states, labels, {k: w / total for k, w in rest.items()}, self.arch,
                                        impl=self.impl, chunk_size=self.chunk).loss
            params = self.split_opt.parameters()
            self.split_opt.add_rest(torch.autograd.grad(rest_loss, params, retain_graph=True, allow_unused=True))
            weights = {L: 1.0}
        else:
            weights = self.schedules[method.removeprefix("soft_")].weights(self.calls[method])
        return multi_exit_loss(out.hidden_states, labels, weights, self.arch, impl=self.impl,
                               chunk_size=self.chunk).loss

    def __call__(self, method: str, batch: dict) -> tuple[float, float, float]:
        """(wall seconds, process CPU seconds, loss) of one step."""
        sync()
        with Clock() as c:
            loss = self.loss(method, batch)
            loss.backward()
            opt = self.split_opt if method.startswith("split_") else self.opt
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
        self.calls[method] += 1
        return c.wall, c.cpu, loss.item()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(args, method: str) -> dict:
    """Peak memory of one step of `method` in this (fresh) process, in MB: total, and above the state before it."""
    model, tok = load_model(args.model, dtype=train_dtype(args), device=args.device)
    model.train()
    batch = {k: v.to(args.device) for k, v in make_batches(tok, 1, args.batch_size, args.max_length)[0].items()}
    exits = resolve_exits(args.exits, Architecture(model).num_layers)
    step = Step(model, exits, args.loss_impl, args.chunk_size)
    step.init_optimizer_state(method)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(method, batch)
        peak = torch.cuda.max_memory_allocated()
        return {"peak_mb": peak / 2**20, "step_extra_mb": (peak - base) / 2**20, "metric": "cuda_max_allocated"}
    try:  # reset the kernel's peak-RSS mark so loading the model does not count
        Path("/proc/self/clear_refs").write_text("5")
        metric = "peak_rss"
    except OSError:
        metric = "max_rss_since_start"
    base = rss_kb("VmRSS")
    step(method, batch)
    peak = rss_kb("VmHWM") if metric == "peak_rss" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mb": peak / 1024, "step_extra_mb": (peak - base) / 1024, "metric": metric}


# ---------------------------------------------------------------------------------------------------------------
# FLOP model (the package's own, shared with `sortedllm train --dry_run`)


def exits_per_step(method: str, exits: list[int]) -> float:
    """Exits whose head runs per step (hf_sft and naive_soft run it at every position, the others at labels)."""
    return {"hf_sft": 1, "sft": 1, "naive_soft": len(exits), "soft_uniform": len(exits), "soft_weights": len(exits),
            "soft_sample1": min(2, len(exits)), "soft_rotate": min(2, len(exits)), "split_uniform": len(exits),
            "split_sample2": min(3, len(exits)), "split_rotate": min(2, len(exits))}[method]


def ideal_ratios(config, exits: list[int], seqs: int, seq_len: float, labelled: float) -> dict[str, float]:
    """Each method's step FLOPs over hf_sft's for batches of `seqs` x `seq_len` with `labelled` label tokens."""
    counts = Counts.of(meta_model(config, torch.float32))
    tokens = seqs * seq_len

    def flops(m):
        rows = tokens if m in ("hf_sft", "naive_soft") else labelled
        f = step_flops(counts, seq_len, tokens, rows, exits_per_step(m, exits))
        if m.startswith("split_") and len(exits) > 1:  # the second backward reaches the deepest intermediate exit
            f["total"] += f["layers"] * 2 / 3 * expected_deepest(exits[:-1], exits_per_step(m, exits) - 1) / \
                counts.num_layers
        return f["total"]

    return {m: flops(m) / flops("hf_sft") for m in METHODS}


def expected_deepest(layers: list[int], m: int) -> float:
    """The expected deepest of m layers drawn without replacement from `layers`."""
    v = sorted(layers)
    if m >= len(v):
        return v[-1]
    return sum(x * math.comb(i, m - 1) for i, x in enumerate(v)) / math.comb(len(v), m)


def train_dtype(args) -> str:
    return "float32" if args.dtype == "auto" else args.dtype


def build_parser():
    p = parser("train", __doc__, dtype_help="the trained weights' dtype: auto (float32, as training runs here), "
               "bfloat16 or float32", threads=None)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--steps", type=int, default=3, help="measured rounds (every method once per round)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--exits", default="count:8")
    p.add_argument("--loss-impl", default="auto")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset (hf_sft is always run)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=default_out("train.json"))
    p.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: measure one method's memory, print JSON
    return p


def run_rounds(args, methods: list[str]) -> dict:
    """Every method once per round on that round's batch; the measured rounds' times and losses, and the batches."""
    model, tok = load_model(args.model, dtype=train_dtype(args), device=args.device)
    model.train()
    arch = Architecture(model)
    exits = resolve_exits(args.exits, arch.num_layers)
    batches = [{k: v.to(args.device) for k, v in b.items()}
               for b in make_batches(tok, args.warmup + args.steps, args.batch_size, args.max_length)]
    step = Step(model, exits, args.loss_impl, args.chunk_size)
    got = {"times": {m: [] for m in methods}, "cpu": {m: [] for m in methods}, "losses": {m: [] for m in methods}}
    print(f"{args.model}: {arch.num_layers} layers, exits {exits}, batch {args.batch_size} x <= {args.max_length} "
          f"GSM8K tokens, {args.warmup} warmup + {args.steps} rounds, {torch.get_num_threads()} threads", flush=True)
    for r, batch in enumerate(batches):
        for m in methods:
            dt, ct, loss = step(m, batch)
            if r >= args.warmup:
                got["times"][m].append(dt)
                got["cpu"][m].append(ct)
                got["losses"][m].append(loss)
            print(f"  round {r}{' (warmup)' if r < args.warmup else ''} {m:13s} {dt:7.2f} s (cpu {ct:7.2f} s)  "
                  f"loss {loss:.4f}", flush=True)
    got.update(config=arch.config, num_layers=arch.num_layers, exits=exits, measured=batches[args.warmup:])
    return got


def memory_runs(argv: list[str], methods: list[str]) -> dict:
    """Each method's peak memory in its own fresh process (peaks of one process would mask each other)."""
    package_root = str(Path(__file__).resolve().parents[2])  # this checkout's sortedllm, not another install's
    env = {**os.environ, "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    memory = {}
    for m in methods:
        cmd = [sys.executable, "-m", "sortedllm.bench.train", "--memory-of", m, *argv]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in out.stdout.splitlines() if x.startswith("MEMORY ")]
        if out.returncode != 0 or not line:
            raise RuntimeError(f"memory run of {m} failed:\n{out.stderr[-2000:]}")
        memory[m] = json.loads(line[-1][len("MEMORY "):])
        print(f"  memory {m:13s} peak {memory[m]['peak_mb']:8.0f} MB  step {memory[m]['step_extra_mb']:7.0f} MB",
              flush=True)
    return memory


def method_row(args, m: str, got: dict, memory: dict, ideal: dict) -> dict:
    """One method's ratios to hf_sft (median over rounds), memory, FLOP model and raw per-round numbers."""
    times, cpu = got["times"], got["cpu"]

    def ratio(series):
        return statistics.median(t / h for t, h in zip(series[m], series["hf_sft"]))

    summed = paired_ratio(cpu[m], cpu["hf_sft"])
    mem = memory.get(m)
    base = memory.get("hf_sft")
    return {"method": m, "time_ratio": round(ratio(times), 3), "cpu_time_ratio": round(ratio(cpu), 3),
            "cpu_time_sum_ratio": round(summed["ratio"], 3), **interval_fields("cpu_time_sum_ratio", summed),
            "peak_mem_ratio": round(mem["peak_mb"] / base["peak_mb"], 3) if memory else None,
            "step_mem_ratio": round(mem["step_extra_mb"] / base["step_extra_mb"], 3) if memory else None,
            "ideal_ratio": round(ideal["here"][m], 3), "time_vs_ideal": round(ratio(times) / ideal["here"][m], 3),
            "cpu_time_vs_ideal": round(ratio(cpu) / ideal["here"][m], 3),
            "ideal_ratio_llama2_13b": round(ideal["13b"][m], 4),
            "step_s": [round(t, 3) for t in times[m]], "cpu_s": [round(t, 3) for t in cpu[m]],
            "loss": [round(x, 4) for x in got["losses"][m]],
            "peak_mb": round(mem["peak_mb"], 1) if memory else None,
            "step_extra_mb": round(mem["step_extra_mb"], 1) if memory else None,
            "memory_metric": mem["metric"] if memory else None,
            "exits": [got["num_layers"]] if m in ("hf_sft", "sft") else got["exits"],
            "model": shown_path(args.model), "batch_size": args.batch_size, "mean_seq_len": ideal["seq_len"],
            "mean_labelled_tokens": ideal["labelled"], "rounds": args.steps, "device": args.device,
            "loss_impl": args.loss_impl, "threads": torch.get_num_threads(), "cpu_bf16": machine()["cpu_bf16"]}


def flop_model(args, got: dict) -> dict:
    """The FLOP model's ratios for this run's batches, here and for LLaMA-2 13B with the paper's 8 exits."""
    seq_len = statistics.mean(b["input_ids"].shape[1] for b in got["measured"])
    labelled = statistics.mean(float((b["labels"][:, 1:] != -100).sum()) for b in got["measured"])
    big = model_config(LLAMA2_13B)[0]
    big_exits = resolve_exits("count:8", big.num_hidden_layers)  # the paper's 12, 16, ..., 40
    return {"here": ideal_ratios(got["config"], got["exits"], args.batch_size, seq_len, labelled),
            "13b": ideal_ratios(big, big_exits, args.batch_size, seq_len, labelled), "big_exits": big_exits,
            "seq_len": seq_len, "labelled": labelled}


def print_summary(args, rows: list[dict], got: dict, ideal: dict) -> None:
    cols = [("time", "time_ratio"), ("cpu", "cpu_time_ratio"), ("ideal", "ideal_ratio"), ("t/ideal", "time_vs_ideal"),
            ("cpu/ideal", "cpu_time_vs_ideal"), ("peak mem", "peak_mem_ratio"), ("step mem", "step_mem_ratio"),
            ("13B ideal", "ideal_ratio_llama2_13b")]
    seqs, seq_len = args.batch_size, ideal["seq_len"]
    print(f"\nratios to hf_sft (median of {args.steps} alternated rounds; {seqs} x {seq_len:.0f} tokens per batch, "
          f"label fraction {ideal['labelled'] / (seqs * seq_len):.2f})")
    print(f"{'method':14s} " + " ".join(f"{c:>9s}" for c, _ in cols) + "  cpu sum ratio [95% interval]")
    for r in rows:
        lo, hi = r["cpu_time_sum_ratio_ci95"]
        print(f"{r['method']:14s} " + " ".join(f"{r[k]:9.3f}" if r[k] is not None else f"{'-':>9s}" for _, k in cols)
              + f"  {r['cpu_time_sum_ratio']:.3f} [{lo:.3f}, {hi:.3f}]")
    losses = got["losses"]
    for a, b in (("sft", "hf_sft"), ("soft_uniform", "naive_soft")):
        if a in losses and b in losses:
            gap = max(abs(x - y) for x, y in zip(losses[a], losses[b]))
            print(f"check: {a} loss = {b} loss on every batch (max gap {gap:.1e}): {'ok' if gap < 1e-3 else 'FAIL'}")
    big = ideal["13b"]
    print(f"LLaMA-2 13B prediction (FLOP model, exits {ideal['big_exits']}, same label fraction): SoFT uniform "
          f"{big['soft_uniform']:.3f}x HF SFT, rotate {big['soft_rotate']:.3f}x (paper: ~0.98x)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    check_args(args, positive=("steps", "batch_size", "max_length"), at_least_zero=("warmup",))
    if args.memory_of:
        print("MEMORY " + json.dumps(measure_memory(args, args.memory_of)), flush=True)
        return 0
    methods = ["hf_sft"] + [m for m in args.methods.split(",") if m and m != "hf_sft"]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SortedError(f"unknown method {unknown[0]}: choose from {', '.join(METHODS)}")
    got = run_rounds(args, methods)
    ideal = flop_model(args, got)
    memory = {} if args.no_memory else memory_runs(argv, methods)
    rows = [method_row(args, m, got, memory, ideal) for m in methods]
    print_summary(args, rows, got, ideal)
    write_json(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
