"""Decode speed and quality of every dynamic-inference method on a SoFT-tuned checkpoint, in the paper's format
(speed-up in time per token vs plain greedy, per task), on PandaLM, TriviaQA and GSM8K prompts.

    sortedllm bench decode [--model M] [--prompts 4] [--max_new_tokens 96] [--threads 1] [--dtype auto]
                           [--draft_exits 9,12,15] [--hf_exits 9] [--draft_layer FILE]
                           [--out benchmarks/results/decode.json]

First the machine's kernel-cost table (inference/costs.py: one layer, the LM head, the draft-vocabulary head on n
new tokens), which the strategies decide with. Then the methods (all greedy, batch size 1, as the paper's table):
  greedy                       plain decoding of the full model on our runtime (`generate`, `--dtype`): the baseline
  greedy (repeat)              the baseline again: an A/A control showing the run's timing noise
  greedy (HF generate)         transformers' `generate` on the float32 model
  greedy (HF generate, bfloat16)  the same on a bfloat16 copy
  HF assisted (sub-model k)    the paper's method: HF assisted generation with the exported k-layer sub-model as a
                               separate assistant (draft length starts at 4, +2 / -1, HF's other defaults)
  HF assistant_early_exit k    HF's self-speculation: shares weights, not the KV cache
  self-speculative k           ours, `Speculative(k)`: one model, one KV cache, drafts from exit k reused by the
                               verifier (exact: the same tokens as greedy)
  self-speculative k (draft layer)  the same drafted by a trained draft layer (`--draft_layer`, or the one attached
                               to the model)
  early exit (paper)           `EarlyExit()`: per-token confidence early exit, the paper's max-probability thresholds
  early exit (calibrated 95%)  thresholds calibrated for 95% token agreement on training-split prompts
  early exit (calibrated 1.5x) thresholds calibrated for a 1.5x estimated speed-up (the best agreement there)

Timing: for each prompt every method runs once, in an order rotated per prompt, so load on this shared machine hits
all methods alike. `speedup` = the paired ratio over prompts of plain greedy's CPU seconds per token to the method's
(sum over prompts of each, sortedllm.stats.paired_ratio), with its bootstrap 95% interval (`speedup_ci95`), the
number of prompts (`speedup_n`) and whether the interval lies above 1 (`speedup_verdict`); `speedup_wall` the same
in wall-clock time, which on a shared machine swings by tens of percent between identical runs (see the A/A row).
A decode-only study times static exits against their FLOP share.
Quality: `identical_rate` = share of prompts whose tokens equal plain greedy's (1.0 expected for the exact methods:
the repeat and self-speculative rows, `exact`); `accuracy` = GSM8K final-answer accuracy / TriviaQA exact match
(PandaLM has no reference answers: none). A batch section compares batch size 4 with one-at-a-time decoding for
early exit and speculation (rows wait for each other vs each row alone).

The model defaults to runs/draft-quality/final (a checkpoint trained for drafting) when it exists, else
runs/quickstart/final, else the default model.
"""

from __future__ import annotations

import copy

import torch

from ..adapters.draft_layer import load_draft_layer
from ..data import load_examples
from ..errors import SortedError
from ..evaluate import gsm8k, triviaqa
from ..exits import SortedModel
from ..export import submodel
from ..inference import EarlyExit, GenerationOptions, Runtime, Sampling, Speculative, Static, generate, summary
from ..inference.batch import Batch, encode_prompts, stop_ids
from ..inference.calibrate import Calibration, exit_statistics, search
from ..inference.costs import cost_table
from ..models import DEFAULT_MODEL, parameter_counts
from ..stats import at_least
from .common import (ROOT, Clock, check_args, default_out, exits_list, interval_fields, machine, parser, shown_path,
                     speedup, write_json)
from .kernels import cost_summary, print_costs

TASKS = {"pandalm": "pandalm", "triviaqa": "triviaqa:test", "gsm8k": "gsm8k:test"}
CALIBRATION = "gsm8k:train+triviaqa:train+alpaca:train"  # interleaved rows of the three training splits
TARGETS = {"speculative_speedup": 1.5, "speculative_vs_hf_early_exit": 1.3, "early_exit_speedup": 1.5,
           "early_exit_max_accuracy_loss": 0.01, "early_exit_agreement": 0.95, "static_vs_flop_share": 1.1,
           # per task, against our plain greedy in the same run (the paper: 1.41x / 1.16x / 0.82x speculative,
           # 1.82x / 1.34x / 1.12x early exit)
           "speculative_by_task": {"gsm8k": 1.6, "pandalm": 1.3, "triviaqa": 1.1},
           "early_exit_by_task": {"gsm8k": 1.5, "pandalm": 1.25, "triviaqa": 1.25}}
EXACT_PREFIXES = ("greedy (repeat)", "self-speculative")


def build_parser():
    p = parser("decode", __doc__)
    p.add_argument("--model", default=None, help="default: runs/draft-quality/final, else runs/quickstart/final")
    p.add_argument("--prompts", type=int, default=4, help="prompts per task")
    p.add_argument("--max_new_tokens", type=int, default=96)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--draft_exits", default="9,12,15", help="draft exits of the speculative methods")
    p.add_argument("--hf_exits", default="9", help="draft exits of the two HF baselines")
    p.add_argument("--draft_layer", help="a trained draft layer (sortedllm train --mode draft) to draft with too "
                   "(default: the one attached to the model, if any; 'none' = off)")
    p.add_argument("--skip_hf_assisted", action="store_true", help="leave out HF assisted decoding with the exported "
                   "sub-model (the slowest baseline; HF assistant_early_exit stays)")
    p.add_argument("--skip_early_exit", action="store_true", help="leave out the early-exit methods (and their "
                   "calibration)")
    p.add_argument("--calibration_prompts", type=int, default=8)
    p.add_argument("--static_rounds", type=int, default=3, help="rounds of the static-depth study (0 = skip)")
    p.add_argument("--batch_study", type=int, default=4, help="batch size of the batch section (0 = skip)")
    p.add_argument("--out", default=default_out("decode.json"))
    return p


def default_model() -> str:
    for path in ("runs/draft-quality/final", "runs/quickstart/final"):
        if (ROOT / path / "config.json").is_file():
            return str(ROOT / path)
    return DEFAULT_MODEL


def model_note(path: str) -> str:
    if "draft-quality" in path:
        return "a checkpoint trained for drafting (runs/draft-quality)"
    if "quickstart" in path:
        return "the quickstart checkpoint (40 SoFT steps on GSM8K): its shallow exits draft poorly"
    return "an untuned model" if path == DEFAULT_MODEL else ""


def check(a) -> tuple[list[int], list[int], list[str]]:
    """(draft exits, HF exits, tasks) after every check that needs no model."""
    check_args(a, positive=("prompts", "max_new_tokens"),
               at_least_zero=("calibration_prompts", "static_rounds", "batch_study"))
    tasks = [t for t in a.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise SortedError(f"unknown task '{unknown[0] if unknown else a.tasks}': choose from {', '.join(TASKS)}")
    if not a.skip_early_exit and a.calibration_prompts < 1:
        raise SortedError("--calibration_prompts must be at least 1 (or pass --skip_early_exit)")
    return exits_list(a.draft_exits, "--draft_exits"), exits_list(a.hf_exits, "--hf_exits"), tasks


# -- methods: each maps (prompt ids, max new tokens) to (token ids, stats) --------------------------------------


def hf_method(sm, model, **gen_kwargs):
    """transformers' `generate` on one prompt with `model` (the float32 model or a copy), cut after a stop token."""
    stop = sorted(stop_ids(sm))

    @torch.inference_mode()
    def run(ids, max_new_tokens):
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, eos_token_id=stop,
                             pad_token_id=sm.tokenizer.pad_token_id, max_new_tokens=max_new_tokens, **gen_kwargs)
        toks = out[0, len(ids):].tolist()
        cut = next((i for i, t in enumerate(toks) if t in stop), None)
        return (toks if cut is None else toks[:cut + 1]), {}
    return run


def ours(sm, strategy, dtype: str):
    def run(ids, max_new_tokens):
        g = generate(sm, [ids], strategy, GenerationOptions(max_new_tokens=max_new_tokens, batch_size=1, dtype=dtype))
        return g[0].token_ids, summary(g)
    return run


def draft_layer_of(sm, a):
    """The draft layer to draft with: --draft_layer, else the model's own; None with 'none' or neither."""
    if a.draft_layer == "none":
        return None
    if a.draft_layer:
        return load_draft_layer(a.draft_layer, sm)
    return sm.draft_layer


def calibrated(sm, a) -> tuple[dict, dict]:
    """Early-exit thresholds for 95% agreement and for a 1.5x estimated speed-up, from one calibration pass over
    training-split prompts: ({name: EarlyExit}, calibration facts)."""
    if a.skip_early_exit:
        return {}, {"calibration_prompts": 0, "calibration_tokens": 0}
    prompts = [r["prompt"] for r in load_examples(CALIBRATION, limit=a.calibration_prompts)]
    print(f"calibrating early-exit thresholds on {len(prompts)} training prompts ...", flush=True)
    stats = exit_statistics(sm, prompts, EarlyExit().check(sm), Calibration(max_new_tokens=32, dtype=a.dtype))
    tuned = {}
    for name, target in (("calibrated 95%", {"target_agreement": TARGETS["early_exit_agreement"]}),
                         ("calibrated 1.5x", {"target_speedup": TARGETS["early_exit_speedup"]})):
        try:
            taus, agreement, estimate = search(stats, **target)
        except SortedError as e:  # the target speed-up is out of reach on this checkpoint
            print(f"  {name}: {e}", flush=True)
            continue
        ee = EarlyExit(thresholds=dict(zip(stats["exits"], taus))).check(sm)
        ee.calibration = {"agreement": agreement, "estimated_speedup": estimate, **target}
        tuned[name] = ee
        print(f"  {name}: thresholds {ee.thresholds}; calibration agreement {agreement:.1%}, estimated speed-up "
              f"{estimate:.2f}x", flush=True)
    return tuned, {"calibration_prompts": len(prompts), "calibration_tokens": int(stats["conf"].shape[0])}


def build_methods(sm, a, drafts: list[int], hf_exits: list[int], tuned: dict) -> tuple[dict, str | None]:
    """Method name -> run function, in the table's order; and the draft layer's file as results show it."""
    bf16 = copy.deepcopy(sm.model).to(torch.bfloat16)
    methods = {"greedy": ours(sm, Static(), a.dtype), "greedy (HF generate)": hf_method(sm, sm.model),
               "greedy (HF generate, bfloat16)": hf_method(sm, bf16)}
    methods["greedy (repeat)"] = methods["greedy"]
    hf_drafting = {"num_assistant_tokens": 4, "num_assistant_tokens_schedule": "heuristic_transient"}
    for k in hf_exits:
        if not a.skip_hf_assisted:
            methods[f"HF assisted (sub-model {k})"] = hf_method(sm, sm.model, assistant_model=submodel(sm, k),
                                                               **hf_drafting)
        methods[f"HF assistant_early_exit {k}"] = hf_method(sm, sm.model, assistant_early_exit=k, **hf_drafting)
    for k in drafts:
        methods[f"self-speculative {k}"] = ours(sm, Speculative(k), a.dtype)
    layer = draft_layer_of(sm, a)
    if layer is not None:
        methods[f"self-speculative {layer.exit} (draft layer)"] = ours(
            sm, Speculative(layer.exit, draft_layer=layer), a.dtype)
    if not a.skip_early_exit:
        methods["early exit (paper)"] = ours(sm, EarlyExit(), a.dtype)
    for name, ee in tuned.items():
        methods[f"early exit ({name})"] = ours(sm, ee, a.dtype)
    warm = encode_prompts(sm, ["warm up"])[0]
    for m in methods.values():  # warm-up: runtime copies, restricted heads, cost tables, HF's first-call setup
        m(warm, 4)
    return methods, (None if layer is None else shown_path(a.draft_layer) if a.draft_layer else "attached")


# -- measurement ------------------------------------------------------------------------------------------------


def run_task(methods: dict, ids_list: list, max_new_tokens: int, offset: int, label: str) -> dict:
    """Every method once per prompt, in an order rotated per prompt (`offset` continues the rotation across tasks):
    per method and prompt, CPU and wall seconds, new tokens, output and stats."""
    names = list(methods)
    acc = {m: {"cpu": [], "wall": [], "tokens": [], "outputs": [], "stats": []} for m in names}
    for i, ids in enumerate(ids_list):
        turn = (offset + i) % len(names)
        for m in names[turn:] + names[:turn]:
            with Clock() as c:
                toks, stats = methods[m](ids, max_new_tokens)
            for key, value in (("cpu", c.cpu), ("wall", c.wall), ("tokens", len(toks)), ("outputs", toks),
                               ("stats", stats)):
                acc[m][key].append(value)
        print(f"  {label} prompt {i + 1}/{len(ids_list)} done", flush=True)
    return acc


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


def per_token(r: dict, key: str) -> list[float]:
    """Seconds per new token of each prompt."""
    return [s / max(t, 1) for s, t in zip(r[key], r["tokens"])]


def dynamic_stats(stats: list[dict]) -> dict:
    """Draft acceptance and tokens per round (speculation), mean exit layer (early exit), over a task's prompts."""
    out = {}
    if any("drafted" in s for s in stats):
        total = {key: sum(s.get(key, 0) for s in stats) for key in ("drafted", "accepted", "rounds", "emitted")}
        out["acceptance"] = total["accepted"] / max(total["drafted"], 1)
        out["tokens_per_round"] = total["emitted"] / max(total["rounds"], 1)
    if any("mean_exit" in s for s in stats):
        weighted = [(s["mean_exit"], s["new_tokens"]) for s in stats if "mean_exit" in s]
        out["mean_exit"] = sum(e * n for e, n in weighted) / max(sum(n for _, n in weighted), 1)
    return out


def method_row(sm, task: str, m: str, acc: dict, examples: list[dict]) -> dict:
    r, g, hf = acc[m], acc["greedy"], acc["greedy (HF generate)"]
    stop = stop_ids(sm)
    texts = [sm.tokenizer.decode([t for t in o if t not in stop], skip_special_tokens=True) for o in r["outputs"]]
    scores = [score(task, t, ex) for t, ex in zip(texts, examples)]
    cpu, wall = speedup(per_token(g, "cpu"), per_token(r, "cpu")), speedup(per_token(g, "wall"), per_token(r, "wall"))
    tokens, n = sum(r["tokens"]), len(r["tokens"])
    return {"method": m, "task": task, "speedup": cpu["ratio"], **interval_fields("speedup", cpu),
            "speedup_wall": wall["ratio"], **interval_fields("speedup_wall", wall),
            "speedup_vs_hf_greedy": speedup(per_token(hf, "cpu"), per_token(r, "cpu"))["ratio"],
            "ms_per_token": 1000 * sum(r["cpu"]) / max(tokens, 1),
            "wall_ms_per_token": 1000 * sum(r["wall"]) / max(tokens, 1), "tokens": tokens, "prompts": n,
            "exact": m.startswith(EXACT_PREFIXES),
            "identical_rate": sum(o == b for o, b in zip(r["outputs"], g["outputs"])) / n,
            "prefix_agreement": sum(common_prefix(o, b) for o, b in zip(r["outputs"], g["outputs"]))
            / max(sum(len(b) for b in g["outputs"]), 1),
            "accuracy": None if scores[0] is None else sum(scores) / n, **dynamic_stats(r["stats"]),
            "per_prompt": {"cpu_s": r["cpu"], "wall_s": r["wall"], "tokens": r["tokens"]}}


def flop_share(sm, k: int) -> float:
    """Weights read per token by exit k over the full model's (decoder layers + the LM head)."""
    c = parameter_counts(sm.model)
    return (k * c["per_layer"] + c["head"]) / (sm.num_layers * c["per_layer"] + c["head"])


@torch.inference_mode()
def static_depth_study(sm, exits: list[int], n_tokens: int, a) -> list[dict]:
    """Decode-only time per token of static exit k vs the full model, on the same prompt with stop tokens ignored
    (so every exit decodes exactly n tokens); prefill subtracted; CPU time; exits alternate within each round."""
    if a.static_rounds < 1 or n_tokens < 2:
        return []
    rt = Runtime.of(sm, a.dtype)
    prompt = encode_prompts(sm, [load_examples("gsm8k:test", limit=1)[0]["prompt"]])
    L = sm.num_layers
    ks = [L] + list(exits)
    decode = {k: 0.0 for k in ks}
    for r in range(a.static_rounds):
        for k in (ks if r % 2 == 0 else ks[::-1]):
            times = {}
            for n in (1, n_tokens):
                batch = Batch(rt, prompt, [n], stop=set())
                with Clock() as c:
                    Static(k).decode(rt, batch, Sampling().start(rt.device))
                times[n] = c.cpu
            decode[k] += (times[n_tokens] - times[1]) / (n_tokens - 1)
    out = []
    for k in exits:
        share, flops = decode[k] / decode[L], flop_share(sm, k)
        out.append({"exit": k, "ms_per_token": 1000 * decode[k] / a.static_rounds,
                    "full_ms_per_token": 1000 * decode[L] / a.static_rounds, "time_share": share,
                    "flop_share": flops, "time_vs_flop_share": share / flops})
        print(f"static exit {k}: decode {out[-1]['ms_per_token']:.1f} ms/token = {share:.3f} of the full model's; "
              f"FLOP share {flops:.3f} (ratio {share / flops:.2f})", flush=True)
    return out


def batch_study(sm, a, drafts: list[int]) -> list[dict]:
    """Batch of N vs the same N prompts one at a time (each row alone at its own depth / acceptance), alternated,
    CPU time: early exit with per-row exits (the batch climbs until its slowest row has exited) and speculation
    (the batch accepts its shortest agreeing draft)."""
    if a.batch_study < 2:
        return []
    prompts = [r["prompt"] for r in load_examples("gsm8k:test", limit=a.batch_study)]
    n_new, bsz = min(a.max_new_tokens, 64), a.batch_study
    out = []
    strategies = [("greedy", Static())] + ([] if a.skip_early_exit else [("early exit (paper)", EarlyExit())])
    strategies += [(f"self-speculative {drafts[0]}", Speculative(drafts[0]))] if drafts else []
    for name, strategy in strategies:
        times, tokens, outputs = {1: 0.0, bsz: 0.0}, {1: 0, bsz: 0}, {}
        for rnd in range(2):
            for bs in ((1, bsz) if rnd == 0 else (bsz, 1)):
                with Clock() as c:
                    gens = generate(sm, prompts, strategy, GenerationOptions(n_new, bs, dtype=a.dtype))
                times[bs] += c.cpu
                tokens[bs] += sum(len(g.token_ids) for g in gens)
                outputs[bs] = [g.token_ids for g in gens]
        tb, ts = tokens[bsz] / times[bsz], tokens[1] / times[1]
        out.append({"task": "gsm8k", "method": name, "batch_size": bsz, "tokens_per_s": tb,
                    "sequential_tokens_per_s": ts, "ratio": tb / ts, "same_output": outputs[1] == outputs[bsz]})
        print(f"batch study (gsm8k): {name}: batch {bsz} {tb:.1f} tok/s vs one at a time {ts:.1f} tok/s (CPU time; "
              f"{tb / ts:.2f}x; same output: {outputs[1] == outputs[bsz]})", flush=True)
    return out


# -- report -----------------------------------------------------------------------------------------------------


def checks(rows: list[dict], static_rows: list[dict], hf_exits: list[int]) -> dict:
    """The issue's targets, each measured in this run."""
    by = {(r["method"], r["task"]): r for r in rows}
    tasks = sorted({r["task"] for r in rows})
    names = list(dict.fromkeys(r["method"] for r in rows))
    out = {}
    spec = [m for m in names if m.startswith("self-speculative")]
    if spec:
        best = {t: max((by[(m, t)] for m in spec), key=lambda r: r["speedup"]) for t in tasks}
        want = TARGETS["speculative_by_task"]
        out["self-speculative >= " + " / ".join(f"{want[t]}x" for t in tasks) + " greedy (" + " / ".join(tasks) +
            ")"] = {t: f"{b['speedup']:.2f}x [{b['speedup_ci95'][0]:.2f}, {b['speedup_ci95'][1]:.2f}] with "
                       f"{b['method']} (identical {b['identical_rate']:.0%}): "
                       f"{target_verdict(*b['speedup_ci95'], want[t])}" for t, b in best.items()}
    for k in hf_exits:
        ours_k, hf_k = f"self-speculative {k}", f"HF assistant_early_exit {k}"
        if (ours_k, tasks[0]) in by:
            out[f"{ours_k} vs {hf_k} (>= 1.3x)"] = {
                t: f"{by[(ours_k, t)]['speedup'] / by[(hf_k, t)]['speedup']:.2f}x" for t in tasks}
    want = TARGETS["early_exit_by_task"]
    for name in [m for m in names if m.startswith("early exit")]:
        cell = {}
        for t in tasks:
            r, g = by[(name, t)], by[("greedy", t)]
            loss = None if r["accuracy"] is None else g["accuracy"] - r["accuracy"]
            lo, hi = r["speedup_ci95"]
            cell[t] = f"{r['speedup']:.2f}x [{lo:.2f}, {hi:.2f}], identical {r['identical_rate']:.0%}" + \
                ("" if loss is None else f", accuracy loss {100 * loss:+.1f} points") + \
                (f": {target_verdict(lo, hi, want[t])}" if "95%" in name else
                 ": no verdict (the targets are for thresholds calibrated to 95% agreement)")
        out[f"{name} >= " + " / ".join(f"{want[t]}x" for t in tasks) + " at <= 1 point accuracy loss"] = cell
    out["static exit time per token / FLOP share (<= 1.1)"] = {
        f"exit {r['exit']}": f"{r['time_vs_flop_share']:.2f} (time share {r['time_share']:.3f}, FLOP share "
                             f"{r['flop_share']:.3f})" for r in static_rows}
    return out


TARGET_WORDS = {"yes": "met", "no": "missed", "no difference": "undecided (the interval contains the target)"}


def target_verdict(lo: float, hi: float, target: float) -> str:
    """A speed-up's 95% interval against a target (stats.at_least), in the targets' words."""
    return TARGET_WORDS[at_least(lo, hi, target)]


def cell(r: dict | None) -> str:
    if r is None:
        return "-"
    lo, hi = r["speedup_ci95"]
    extra = [f"{r['ms_per_token']:.0f} ms", f"wall {r['speedup_wall']:.2f}x"]
    if r["accuracy"] is not None:
        extra.append(f"acc {100 * r['accuracy']:.0f}")
    extra.append(f"same {100 * r['identical_rate']:.0f}%")
    if "acceptance" in r:
        extra.append(f"accept {r['acceptance']:.2f}")
    if "mean_exit" in r:
        extra.append(f"exit {r['mean_exit']:.1f}")
    return f"{r['speedup']:.2f}x [{lo:.2f}, {hi:.2f}] ({', '.join(extra)})"


def print_table(rows: list[dict], tasks: list[str]) -> None:
    by = {(r["method"], r["task"]): r for r in rows}
    print("\n| method | " + " | ".join(tasks) + " |")
    print("|---|" + "---|" * len(tasks))
    for m in dict.fromkeys(r["method"] for r in rows):
        print(f"| {m} | " + " | ".join(cell(by.get((m, t))) for t in tasks) + " |")
    print("\nspeedup: CPU time per token vs greedy, paired over prompts [95% bootstrap interval] (ms = CPU ms per "
          "token); wall: the same in wall-clock time; acc: task accuracy in %; same: prompts with output identical "
          "to greedy; accept: draft acceptance; exit: mean exit layer\n")


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    drafts, hf_exits, tasks = check(a)
    with Clock() as total:
        model_path = a.model or default_model()
        print(f"model: {shown_path(model_path)}; {a.threads} torch thread(s)", flush=True)
        sm = SortedModel.from_pretrained(model_path)
        subset = sm.draft_vocab[:8192] if sm.draft_vocab is not None else None
        kernel_costs = cost_summary(cost_table(Runtime.of(sm, a.dtype), subset), sm.num_layers)
        print_costs(kernel_costs, "kernel costs (inference/costs.py)")
        tuned, calibration = calibrated(sm, a)
        methods, layer_file = build_methods(sm, a, drafts, hf_exits, tuned)
        rows, offset = [], 0
        for task in tasks:
            examples = load_examples(TASKS[task], limit=a.prompts)
            acc = run_task(methods, encode_prompts(sm, [r["prompt"] for r in examples]), a.max_new_tokens, offset,
                           task)
            offset += len(examples)
            rows += [method_row(sm, task, m, acc, examples) for m in methods]
        static_rows = static_depth_study(sm, drafts, a.max_new_tokens, a)
        batch_rows = batch_study(sm, a, drafts)
    result = {"model": shown_path(model_path), "model_note": model_note(model_path), "num_layers": sm.num_layers,
              "exits": sm.exits,
              "settings": {"prompts_per_task": a.prompts, "max_new_tokens": a.max_new_tokens, "batch_size": 1,
                           "draft_exits": drafts, "hf_exits": hf_exits, "threads": a.threads, "dtype": a.dtype,
                           "runtime_dtype": kernel_costs["dtype"], "draft_layer": layer_file, **calibration,
                           "calibrated": {name: {"thresholds": ee.thresholds, **ee.calibration}
                                          for name, ee in tuned.items()}},
              "kernel_costs": kernel_costs, "rows": rows, "static_depth": static_rows, "batch": batch_rows,
              "targets": TARGETS, "checks": checks(rows, static_rows, hf_exits), "seconds": total.wall,
              **machine()}
    print_table(rows, tasks)
    for name, c in result["checks"].items():
        print(f"check {name}: {c}")
    write_json(a.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
