"""Decode speed and quality of every dynamic-inference method on a SoFT-tuned checkpoint, in the paper's format
(speedup in time per token vs plain greedy, per task), on PandaLM, TriviaQA and GSM8K prompts.

    python benchmarks/bench_decode.py [--model M] [--prompts 4] [--max_new_tokens 96] [--threads 1]
                                      [--draft_exits 9,12,15] [--out benchmarks/results/decode.json]

Methods (all greedy, batch size 1, as the paper's table):
  greedy                       plain decoding of the full model (sortedllm's KV-cache loop): the baseline
  greedy (repeat)              the baseline again: an A/A control showing the run's timing noise
  greedy (HF generate)         the same with transformers' `generate`
  HF assisted (sub-model k)    the paper's method: HF assisted generation with the exported k-layer sub-model as a
                               separate assistant (draft length starts at 4, +2 / -1, HF's other defaults)
  HF assistant_early_exit k    HF's self-speculation: shares weights, not the KV cache
  self-speculative k           ours: one model, one KV cache, drafts from exit k reused by the verifier
  self-speculative k (draft layer)  the same drafted by a trained draft layer at exit k's cost (`--draft_layer`;
                               default runs/draft-layer/draft_layer.safetensors beside runs/draft-quality/final)
  early exit (paper)           per-token confidence early exit, the paper's max-probability thresholds
  early exit (calibrated 95%)  thresholds calibrated for 95% token agreement on training-split prompts
  early exit (calibrated 1.5x) thresholds calibrated for a 1.5x estimated speedup (the best agreement there)

Timing: for each prompt every method runs once, in an order rotated per prompt, so load on this shared machine hits
all methods alike; a method's time per token is its total time over its total new tokens on that task. `speedup`
uses CPU time of this (single-threaded) process, which other processes' load barely moves; `speedup_wall` uses
wall-clock time, which on a shared machine swings by tens of percent between identical runs (see the A/A row).
A separate decode-only study times static exits 9/12/15 against their FLOP share.
Quality: `identical_rate` = share of prompts whose tokens equal plain greedy's; `accuracy` = GSM8K final-answer
accuracy / TriviaQA exact match (PandaLM has no reference answers: none). A batch section compares batch size 4
with one-at-a-time decoding for early exit and speculation (rows wait for each other vs each row alone).

The model defaults to runs/draft-quality/final (a checkpoint trained for drafting) when it exists, else
runs/quickstart/final. On a loaded 2-core machine one torch thread is much faster than two (`--threads`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sortedllm import SortedModel  # noqa: E402
from sortedllm.data import load_examples  # noqa: E402
from sortedllm.evaluate import gsm8k, triviaqa  # noqa: E402
from sortedllm.export import submodel  # noqa: E402
from sortedllm.errors import SortedError  # noqa: E402
from sortedllm.inference import EarlyExit, Speculative, generate, summary  # noqa: E402
from sortedllm.inference.calibrate import exit_statistics, search  # noqa: E402
from sortedllm.inference.batch import encode_prompts, stop_ids  # noqa: E402
from sortedllm.models import parameter_counts  # noqa: E402

TASKS = {"pandalm": "pandalm", "triviaqa": "triviaqa:test", "gsm8k": "gsm8k:test"}
CALIBRATION = ("gsm8k:train", "triviaqa:train", "alpaca:train")
TARGETS = {"speculative_speedup": 1.5, "speculative_vs_hf_early_exit": 1.3, "early_exit_speedup": 1.5,
           "early_exit_max_accuracy_loss": 0.01, "early_exit_agreement": 0.95, "static_vs_flop_share": 1.1}


def default_model() -> str:
    for path in ("runs/draft-quality/final", "runs/quickstart/final"):
        if (ROOT / path / "config.json").is_file():
            return str(ROOT / path)
    return "smollm2-135m"


def default_draft_layer(model_path: str) -> str | None:
    path = ROOT / "runs" / "draft-layer" / "draft_layer.safetensors"
    return str(path) if "draft-quality" in model_path and path.is_file() else None


def hf_method(sm, **gen_kwargs):
    """A method running transformers' `generate` on one prompt: (token ids, stats)."""
    stop = sorted(stop_ids(sm.tokenizer, sm.model))

    def run(ids, max_new_tokens):
        x = torch.tensor([ids])
        out = sm.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, eos_token_id=stop,
                                pad_token_id=sm.tokenizer.pad_token_id, max_new_tokens=max_new_tokens,
                                **gen_kwargs)
        toks = out[0, len(ids):].tolist()
        cut = next((i for i, t in enumerate(toks) if t in stop), None)
        return (toks if cut is None else toks[:cut + 1]), {}
    return run


def ours(sm, **kwargs):
    def run(ids, max_new_tokens):
        g = generate(sm, [ids], batch_size=1, max_new_tokens=max_new_tokens, **kwargs)
        return g[0].token_ids, summary(g)
    return run


def score(task: str, text: str, row: dict):
    if task == "gsm8k":
        return gsm8k.is_correct(gsm8k.extract_answer(text), str(row["final_answer"]))
    if task == "triviaqa":
        return triviaqa.exact_match(triviaqa.prediction(text), row["answers"])
    return None


def common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def flop_share(sm, k: int) -> float:
    """Weights read per token by exit k over the full model's (decoder layers + the LM head)."""
    c = parameter_counts(sm.model)
    return (k * c["per_layer"] + c["head"]) / (sm.num_layers * c["per_layer"] + c["head"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: runs/draft-quality/final, else runs/quickstart/final")
    p.add_argument("--prompts", type=int, default=4, help="prompts per task")
    p.add_argument("--max_new_tokens", type=int, default=96)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--draft_exits", default="9,12,15", help="draft exits of the speculative methods")
    p.add_argument("--hf_exits", default="9", help="draft exits of the two HF baselines")
    p.add_argument("--draft_layer", help="a trained draft layer (sortedllm train --mode draft) to draft with too; "
                   "default: runs/draft-layer/draft_layer.safetensors with the draft-quality checkpoint; 'none' = off")
    p.add_argument("--skip_early_exit", action="store_true", help="leave out the early-exit methods (and their "
                   "calibration)")
    p.add_argument("--calibration_prompts", type=int, default=8)
    p.add_argument("--batch_study", type=int, default=4, help="batch size of the batch section (0 = skip)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    started = time.perf_counter()
    model_path = a.model or default_model()
    note = ("a checkpoint trained for drafting (runs/draft-quality)" if "draft-quality" in model_path else
            "the quickstart checkpoint (40 SoFT steps on GSM8K): its shallow exits draft poorly"
            if "quickstart" in model_path else "an untuned model")
    print(f"model: {model_path} ({note}); {a.threads} torch thread(s)", flush=True)
    sm = SortedModel.from_pretrained(model_path)
    L = sm.num_layers
    drafts = [int(x) for x in a.draft_exits.split(",") if x]
    hf_exits = [int(x) for x in a.hf_exits.split(",") if x]

    layer_file = None if a.draft_layer == "none" else a.draft_layer or default_draft_layer(model_path)
    draft_layer = None
    if layer_file:
        from sortedllm.inference.draft_layer import load_draft_layer

        draft_layer = load_draft_layer(layer_file, sm)
        print(f"draft layer: {layer_file} (exit {draft_layer.exit}: {draft_layer.shared} shared + "
              f"{len(draft_layer.layers)} own layer(s))", flush=True)
    tuned = {}
    if not a.skip_early_exit:
        print(f"calibrating early-exit thresholds on {a.calibration_prompts} training prompts ...", flush=True)
        calib = [r["prompt"] for src in CALIBRATION for r in load_examples(src, limit=a.calibration_prompts)]
        calib = calib[::len(CALIBRATION)][:a.calibration_prompts] if len(calib) > a.calibration_prompts else calib
        calib_stats = exit_statistics(sm, calib, EarlyExit().check(sm), max_new_tokens=32)
    for name, target in (() if a.skip_early_exit else (
            ("calibrated 95%", dict(target_agreement=TARGETS["early_exit_agreement"])),
            ("calibrated 1.5x", dict(target_speedup=TARGETS["early_exit_speedup"])))):
        try:
            taus, agreement, speedup = search(calib_stats, **target)
        except SortedError as e:  # the target speedup is out of reach on this checkpoint
            print(f"  {name}: {e}", flush=True)
            continue
        tuned[name] = EarlyExit(thresholds=dict(zip(calib_stats["exits"], taus))).check(sm)
        tuned[name].calibration = {"agreement": agreement, "estimated_speedup": speedup, **target}
        print(f"  {name}: thresholds {tuned[name].thresholds}; calibration agreement {agreement:.1%}, estimated "
              f"speedup {speedup:.2f}x", flush=True)

    methods = {"greedy": ours(sm), "greedy (HF generate)": hf_method(sm)}
    methods["greedy (repeat)"] = methods["greedy"]
    for k in hf_exits:
        assistant = submodel(sm, k)
        methods[f"HF assisted (sub-model {k})"] = hf_method(sm, assistant_model=assistant, num_assistant_tokens=4,
                                                           num_assistant_tokens_schedule="heuristic_transient")
        methods[f"HF assistant_early_exit {k}"] = hf_method(sm, assistant_early_exit=k, num_assistant_tokens=4,
                                                            num_assistant_tokens_schedule="heuristic_transient")
    for k in drafts:
        methods[f"self-speculative {k}"] = ours(sm, speculative=Speculative(k))
    if draft_layer is not None:
        methods[f"self-speculative {draft_layer.exit} (draft layer)"] = ours(
            sm, speculative=Speculative(draft_layer.exit, draft_layer=draft_layer))
    if not a.skip_early_exit:
        methods["early exit (paper)"] = ours(sm, early_exit=EarlyExit())
    for name, ee in tuned.items():
        methods[f"early exit ({name})"] = ours(sm, early_exit=ee)
    for m in methods.values():  # warm-up: restricted-head token counts, HF's first-call setup
        m(encode_prompts(sm, ["warm up"])[0], 4)

    rows = []
    for task in [t for t in a.tasks.split(",") if t]:
        examples = load_examples(TASKS[task], limit=a.prompts)
        ids_list = encode_prompts(sm, [r["prompt"] for r in examples])
        names = list(methods)
        acc = {m: {"seconds": 0.0, "cpu": 0.0, "tokens": 0, "outputs": [], "stats": []} for m in names}
        for i, ids in enumerate(ids_list):
            order = names[i % len(names):] + names[:i % len(names)]
            for m in order:
                t0, c0 = time.perf_counter(), time.process_time()
                toks, stats = methods[m](ids, a.max_new_tokens)
                acc[m]["seconds"] += time.perf_counter() - t0
                acc[m]["cpu"] += time.process_time() - c0
                acc[m]["tokens"] += len(toks)
                acc[m]["outputs"].append(toks)
                acc[m]["stats"].append(stats)
            print(f"  {task} prompt {i + 1}/{len(ids_list)} done ({time.perf_counter() - started:.0f}s)", flush=True)
        def per_token(m, key="cpu"):
            return acc[m][key] / max(acc[m]["tokens"], 1)

        stop = stop_ids(sm.tokenizer, sm.model)
        for m in names:
            r = acc[m]
            texts = [sm.tokenizer.decode([t for t in o if t not in stop], skip_special_tokens=True)
                     for o in r["outputs"]]
            scores = [score(task, t, ex) for t, ex in zip(texts, examples)]
            row = {"method": m, "task": task, "speedup": per_token("greedy") / per_token(m),
                   "speedup_wall": per_token("greedy", "seconds") / per_token(m, "seconds"),
                   "speedup_vs_hf_greedy": per_token("greedy (HF generate)") / per_token(m),
                   "ms_per_token": 1000 * per_token(m), "wall_ms_per_token": 1000 * per_token(m, "seconds"),
                   "tokens": r["tokens"], "prompts": len(ids_list),
                   "identical_rate": sum(o == g for o, g in zip(r["outputs"], acc["greedy"]["outputs"])) /
                   len(ids_list),
                   "prefix_agreement": sum(common_prefix(o, g) for o, g in zip(r["outputs"], acc["greedy"]["outputs"]))
                   / max(sum(len(g) for g in acc["greedy"]["outputs"]), 1),
                   "accuracy": None if scores[0] is None else sum(scores) / len(scores)}
            stats = r["stats"]
            if any("drafted" in s for s in stats):
                total = {key: sum(s.get(key, 0) for s in stats) for key in ("drafted", "accepted", "rounds", "emitted")}
                row["acceptance"] = total["accepted"] / max(total["drafted"], 1)
                row["tokens_per_round"] = total["emitted"] / max(total["rounds"], 1)
            if any("mean_exit" in s for s in stats):
                row["mean_exit"] = sum(s["mean_exit"] * s["new_tokens"] for s in stats if "mean_exit" in s) / \
                    max(sum(s["new_tokens"] for s in stats if "mean_exit" in s), 1)
            rows.append(row)

    static_rows = static_depth_study(sm, drafts, a.max_new_tokens)
    batch_rows = batch_study(sm, a, drafts) if a.batch_study > 1 else []
    result = {"model": model_path, "model_note": note, "num_layers": L, "exits": sm.exits,
              "settings": {"prompts_per_task": a.prompts, "max_new_tokens": a.max_new_tokens, "batch_size": 1,
                           "draft_exits": drafts, "hf_exits": hf_exits, "threads": a.threads,
                           "draft_layer": layer_file,
                           "calibration_prompts": 0 if a.skip_early_exit else len(calib),
                           "calibration_tokens": 0 if a.skip_early_exit else int(calib_stats["conf"].shape[0]),
                           "calibrated": {name: {"thresholds": ee.thresholds, **ee.calibration}
                                          for name, ee in tuned.items()}},
              "rows": rows, "static_depth": static_rows, "batch": batch_rows, "targets": TARGETS,
              "checks": checks(rows, static_rows, drafts, hf_exits),
              "seconds": time.perf_counter() - started, "load_average": os.getloadavg(),
              "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count()}
    print_table(rows, a.tasks.split(","))
    for b in batch_rows:
        print(f"batch study ({b['task']}): {b['method']}: batch {b['batch_size']} {b['tokens_per_s']:.1f} tok/s vs "
              f"one at a time {b['sequential_tokens_per_s']:.1f} tok/s (CPU time; {b['ratio']:.2f}x; same output: "
              f"{b['same_output']})")
    for name, c in result["checks"].items():
        print(f"check {name}: {c}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} in {result['seconds']:.0f}s")
    return 0


def checks(rows, static_rows, drafts, hf_exits) -> dict:
    """The issue's targets, each measured in this run."""
    by = {(r["method"], r["task"]): r for r in rows}
    tasks = sorted({r["task"] for r in rows})
    out = {}
    spec = [m for m in dict.fromkeys(r["method"] for r in rows) if m.startswith("self-speculative")]
    best = {t: max((by[(m, t)] for m in spec), key=lambda r: r["speedup"]) for t in tasks}
    out["self-speculative >= 1.5x greedy on every task"] = {
        t: f"{best[t]['speedup']:.2f}x with {best[t]['method']} "
           f"(identical {best[t]['identical_rate']:.0%})" for t in tasks}
    for k in hf_exits:
        if (f"self-speculative {k}", tasks[0]) in by:
            ours_k, hf_k = f"self-speculative {k}", f"HF assistant_early_exit {k}"
            out[f"{ours_k} vs {hf_k} (>= 1.3x)"] = {
                t: f"{by[(ours_k, t)]['speedup'] / by[(hf_k, t)]['speedup']:.2f}x" for t in tasks}
    for name in [m for m in dict.fromkeys(r["method"] for r in rows) if m.startswith("early exit")]:
        cell = {}
        for t in tasks:
            r, g = by[(name, t)], by[("greedy", t)]
            loss = None if r["accuracy"] is None else g["accuracy"] - r["accuracy"]
            cell[t] = f"{r['speedup']:.2f}x, identical {r['identical_rate']:.0%}" + \
                ("" if loss is None else f", accuracy loss {100 * loss:+.1f} points")
        out[f"{name} >= 1.5x at <= 1 point accuracy loss"] = cell
    out["static exit time per token / FLOP share (<= 1.1)"] = {
        f"exit {r['exit']}": f"{r['time_vs_flop_share']:.2f} (time share {r['time_share']:.3f}, FLOP share "
                             f"{r['flop_share']:.3f})" for r in static_rows}
    return out


def print_table(rows, tasks):
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["method"], r["task"]): r for r in rows}
    print()
    print("| method | " + " | ".join(tasks) + " |")
    print("|---|" + "---|" * len(tasks))
    for m in methods:
        cells = []
        for t in tasks:
            r = by.get((m, t))
            if r is None:
                cells.append("-")
                continue
            extra = [f"{r['ms_per_token']:.0f} ms", f"wall {r['speedup_wall']:.2f}x"]
            if r["accuracy"] is not None:
                extra.append(f"acc {100 * r['accuracy']:.0f}")
            extra.append(f"same {100 * r['identical_rate']:.0f}%")
            if "acceptance" in r:
                extra.append(f"accept {r['acceptance']:.2f}")
            if "mean_exit" in r:
                extra.append(f"exit {r['mean_exit']:.1f}")
            cells.append(f"{r['speedup']:.2f}x ({', '.join(extra)})")
        print(f"| {m} | " + " | ".join(cells) + " |")
    print("\nspeedup: CPU time per token vs greedy (ms = CPU ms per token); wall: the same in wall-clock time; acc: "
          "task accuracy in %; same: prompts with output identical to greedy; accept: draft acceptance; exit: mean "
          "exit layer\n")


def static_depth_study(sm, exits, n_tokens: int, rounds: int = 3) -> list[dict]:
    """Decode-only time per token of static exit k vs the full model, on the same prompt with stop tokens ignored
    (so every exit decodes exactly n tokens); prefill subtracted; CPU time; exits alternate within each round."""
    from sortedllm.inference.batch import Batch
    from sortedllm.inference.sampling import Sampling
    from sortedllm.inference.static import decode_static

    prompt = encode_prompts(sm, [load_examples("gsm8k:test", limit=1)[0]["prompt"]])
    L = sm.num_layers
    ks = [L] + list(exits)
    decode = {k: 0.0 for k in ks}
    for r in range(rounds):
        for k in (ks if r % 2 == 0 else ks[::-1]):
            times = {}
            for n in (1, n_tokens):
                batch = Batch(sm, prompt, n, stop=set())
                t0 = time.process_time()
                decode_static(sm, batch, k, Sampling(), {})
                times[n] = time.process_time() - t0
            decode[k] += (times[n_tokens] - times[1]) / (n_tokens - 1)
    out = []
    for k in exits:
        share = decode[k] / decode[L]
        out.append({"exit": k, "ms_per_token": 1000 * decode[k] / rounds,
                    "full_ms_per_token": 1000 * decode[L] / rounds, "time_share": share,
                    "flop_share": flop_share(sm, k), "time_vs_flop_share": share / flop_share(sm, k)})
        print(f"static exit {k}: decode {1000 * decode[k] / rounds:.1f} ms/token = {share:.3f} of the full model's; "
              f"FLOP share {flop_share(sm, k):.3f} (ratio {share / flop_share(sm, k):.2f})", flush=True)
    return out


def batch_study(sm, a, drafts) -> list[dict]:
    """Batch of N vs the same N prompts one at a time (each row alone at its own depth / acceptance), alternated,
    CPU time: early exit with per-row exits (the batch climbs until its slowest row has exited) and speculation
    (the batch accepts its shortest agreeing draft)."""
    prompts = [r["prompt"] for r in load_examples("gsm8k:test", limit=a.batch_study)]
    n_new = min(a.max_new_tokens, 64)
    out = []
    for name, kwargs in (("greedy", {}), ("early exit (paper)", {"early_exit": EarlyExit()}),
                         (f"self-speculative {drafts[0]}", {"speculative": Speculative(drafts[0])})):
        times = {1: 0.0, a.batch_study: 0.0}
        tokens = {1: 0, a.batch_study: 0}
        outputs = {}
        for rnd in range(2):
            for bs in ((1, a.batch_study) if rnd == 0 else (a.batch_study, 1)):
                t0 = time.process_time()
                gens = generate(sm, prompts, batch_size=bs, max_new_tokens=n_new, **kwargs)
                times[bs] += time.process_time() - t0
                tokens[bs] += sum(len(g.token_ids) for g in gens)
                outputs[bs] = [g.token_ids for g in gens]
        tb, ts = tokens[a.batch_study] / times[a.batch_study], tokens[1] / times[1]
        out.append({"task": "gsm8k", "method": name, "batch_size": a.batch_study, "tokens_per_s": tb,
                    "sequential_tokens_per_s": ts, "ratio": tb / ts,
                    "same_output": outputs[1] == outputs[a.batch_study]})
    return out


if __name__ == "__main__":
    raise SystemExit(main())
