"""`report.md`: the models, every task's per-exit table (models side by side), the judge's validation, the
tournament matches and the plots, from a results dict alone (so it can be rebuilt from results.json:
`python -m sortedllm.evaluate.report DIR`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..checkpoint import atomic_write_text
from .base import headline
from .plots import write_all

# Secondary metrics worth a column beside the headline.
EXTRA_COLUMNS = {"loss": ["perplexity"], "gsm8k": ["answered"], "triviaqa": ["contains"],
                 "tournament": ["wins", "losses", "ties"], "similarity": ["cosine", "top1_agreement"],
                 "agreement": ["draft_agreement", "best_draft_length", "best_speedup"]}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def task_table(results: dict, task: str) -> list[str]:
    metric, higher = headline(results, task)
    per_model = results["tasks"][task]
    names = list(per_model)
    columns = [metric] + [c for c in EXTRA_COLUMNS.get(task, []) if c != metric]
    exits = sorted({int(k) for m in per_model.values() for k in m})
    head = ["exit"] + [f"{n}: {c}" if len(names) > 1 else c for n in names for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in exits:
        cells = [str(k)] + [_fmt(per_model[n].get(str(k), {}).get(c)) for n in names for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Headline metric: `{metric}` ({'higher' if higher else 'lower'} is better).")
    return lines


def judge_section(detail: dict) -> list[str]:
    j = detail["judge"]
    lines = [f"Judge: `{j['name']}` -- {j['description']}. Pairs: `{detail['pairs']}`, {detail['n_prompts']} prompts, "
             f"up to {detail['max_new_tokens']} new tokens, both answer orders (half a point each)."]
    v = j.get("validation")
    if v:
        b = v["baselines"]
        lines += ["", f"Judge validation on PandaLM's {v['n']} human-labelled pairs (majority label, both orders "
                      f"combined): accuracy **{v['accuracy']:.3f}**, macro-F1 {v['macro_f1']:.3f}. Baselines: "
                      f"always '2' {b['always_2']:.3f}, always '1' {b['always_1']:.3f}, always tie "
                      f"{b['always_tie']:.3f}, longer reply wins {b['longer_wins']:.3f}; PandaLM-7B "
                      f"{v['reference']['pandalm_7b_accuracy']:.3f}, GPT-3.5 {v['reference']['gpt_3.5_accuracy']:.3f} "
                      f"(published)."]
    else:
        lines += ["", "Judge not validated in this run (`--validate_judge N` checks it on N human-labelled pairs)."]
    lines += ["", "| row | column | wins | losses | ties | (W-L)/n |", "|---|---|---|---|---|---|"]
    for m in detail["matches"]:
        lines.append(f"| {m['a'][0]} exit {m['a'][1]} | {m['b'][0]} exit {m['b'][1]} | {m['wins']:g} | "
                     f"{m['losses']:g} | {m['ties']:g} | {m['score']:+.3f} |")
    return lines


def agreement_section(results: dict, detail: dict) -> list[str]:
    """How to read the agreement task, then accepted drafts / predicted speedup per draft length and exit."""
    lines = [f"Over {detail['n_prompts']} prompts of `{detail['data']}`, each model's own greedy answers (up to "
             f"{detail['max_new_tokens']} new tokens), teacher-forced: `top1_agreement` = exit k's top token is the "
             f"last layer's; `draft_agreement` the same with the draft head self-speculation uses (the "
             f"{detail['draft_vocab'] or 'full'} most frequent tokens); accepted(g) = mean accepted drafts per cycle "
             f"of g drafts, from the actual runs of agreeing positions; speedup(g) = (accepted(g) + 1) x t_full / "
             f"(g x t_draft + t_feed + t_verify(g)), step costs measured in this run ({detail['clock']}, "
             f"{detail['torch_threads']} torch threads).", ""]
    for name, by_exit in results["tasks"]["agreement"].items():
        t = detail["timing"][name]
        g_max = len(detail["draft_lengths"])
        lines += [f"{name}: plain step t_full = {t['t_full_ms']:.2f} ms at {t['context_tokens']} tokens of context; "
                  f"teacher-forced last layer = generated token at {_fmt(t['teacher_forced_matches_generation'])} "
                  f"of positions. Cells: accepted(g) / predicted speedup.", "",
                  "| exit | t_draft ms | " + " | ".join(f"g={g}" for g in detail["draft_lengths"]) + " |",
                  "|" + "---|" * (g_max + 2)]
        rows = [(k, by_exit[k]) for k in sorted(by_exit, key=int)]
        d = detail.get("draft_layer", {}).get(name)
        if d:  # a trained draft layer at exit k's cost (adapters/draft_layer.py)
            rows.append((f"draft layer {d['exit']} ({_fmt(d['top1_agreement'])} agree)", d))
        for label, m in rows:
            sp = m.get("speedup_by_draft_length") or [None] * g_max
            cells = [f"{_fmt(a)} / {_fmt(s)}" if s is not None else _fmt(a)
                     for a, s in zip(m["accepted_by_draft_length"], sp)]
            lines.append(f"| {label} | {_fmt(m.get('t_draft_ms'))} | " + " | ".join(cells) + " |")
        lines.append("")
        oracle = detail.get("oracle_early_exit", {}).get(name)
        if oracle:
            lines += [f"{name}, early-exit oracle (an upper bound for any confidence rule: each token stops at the "
                      "shallowest exit that has the last layer's token, at that exit's static step cost, with no "
                      "confidence checks and free KV for the skipped layers): " + "; ".join(
                          f"agreement {r['agreement']:g}: mean exit {r['mean_exit']:.1f}, speedup "
                          f"{r['speedup']:.2f}x" for r in oracle) + ".", ""]
    return lines


def build(results: dict, plots: dict[str, str]) -> str:
    out = ["# sortedllm evaluation report", "", f"sortedllm {results['sortedllm_version']}.", "",
           "| model | path | mode | exits |", "|---|---|---|---|"]
    for name, m in results["models"].items():
        out.append(f"| {name} | `{m['path']}` | {m['mode']} | {', '.join(map(str, m['exits']))} |")
    settings = results.get("settings", {})
    if settings:
        out += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None) + "."]
    for task in results["tasks"]:
        out += ["", f"## {task}", ""]
        detail = results.get("details", {}).get(task, {})
        if task == "tournament" and detail.get("matches"):
            out += judge_section(detail) + [""]
        if task == "similarity" and detail:
            out += [f"Over {detail['n_prompts']} prompts, the first {detail['positions']} tokens the last layer "
                    f"generates; `kl` = KL(last || exit) in nats, `cosine` between the normed hidden states the "
                    f"heads read, `top1_agreement` = same most likely token.", ""]
        if task == "agreement" and detail:
            out += agreement_section(results, detail) + [""]
        if task == "loss" and detail.get("data"):
            out += [f"Held-out data: `{detail['data']}` (completion tokens only).", ""]
        out += task_table(results, task)
        for key, file in plots.items():
            if key == task or key.startswith(f"{task}_"):
                out += ["", f"![{key}]({file})"]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Rebuild plots and report.md in a folder that has results.json."""
    folder = Path((sys.argv[1:] if argv is None else argv)[0])
    results = json.loads((folder / "results.json").read_text())
    atomic_write_text(folder / "report.md", build(results, write_all(results, folder)))
    print(f"wrote {folder / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
