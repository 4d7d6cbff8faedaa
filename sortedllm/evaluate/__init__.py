"""Per-exit evaluation: `evaluate(model, tasks=..., exits=...)` -> results dict (the `results.json` schema).

Schema:
    {"sortedllm_version": str,
     "models": {name: {"path", "mode", "exits"}},           # name = "A" (and "B" with --compare)
     "tasks": {task: {name: {exit (str): {metric: value}}}}}
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SortedError
from ..exits import VERSION, SortedModel

TASK_NAMES = ("loss",)


def default_data(sm: SortedModel) -> str:
    from ..data import default_eval_data

    trained_on = sm.config.data or "gsm8k"
    return default_eval_data(trained_on) or "gsm8k:test"


def evaluate(models: dict[str, SortedModel], tasks: list[str], exits=None, limit: int | None = None,
             data_file: str | None = None, batch_size: int = 8, max_length: int = 512) -> dict:
    unknown = [t for t in tasks if t not in TASK_NAMES]
    if unknown:
        raise SortedError(f"unknown task '{unknown[0]}': choose from {', '.join(TASK_NAMES)}")
    chosen = {name: sm.check_exits(exits) for name, sm in models.items()}
    results = {"sortedllm_version": VERSION,
               "models": {name: {"path": sm.source, "mode": sm.config.mode, "exits": chosen[name]}
                          for name, sm in models.items()},
               "tasks": {}}
    for task in tasks:
        per_model = {}
        for name, sm in models.items():
            if task == "loss":
                from . import loss

                out = loss.run(sm, chosen[name], data_file or default_data(sm), limit, max_length, batch_size)
            per_model[name] = {str(k): v for k, v in out.items()}
        results["tasks"][task] = per_model
    return results


def format_table(results: dict) -> str:
    """A plain-text per-exit table of every task's headline metric."""
    headline = {"loss": "loss"}
    lines = []
    for task, per_model in results["tasks"].items():
        metric = headline.get(task)
        names = list(per_model)
        exits = sorted({int(k) for m in per_model.values() for k in m})
        lines.append(f"{task} ({metric})")
        lines.append("exit  " + "  ".join(f"{n:>10}" for n in names))
        for k in exits:
            cells = [per_model[n].get(str(k), {}).get(metric) for n in names]
            lines.append(f"{k:>4}  " + "  ".join(f"{c:>10.4f}" if c is not None else f"{'-':>10}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from ..config import ArgumentParser

    p = ArgumentParser(prog="sortedllm evaluate", description="Evaluate every exit of a checkpoint.")
    p.add_argument("--model", required=True, help="checkpoint folder, hub id, .gguf or alias")
    p.add_argument("--compare", help="a second model evaluated on the same exits (e.g. the SFT baseline)")
    p.add_argument("--tasks", default="loss", help=f"comma-separated: {', '.join(TASK_NAMES)}")
    p.add_argument("--exits", help="subset of exits, e.g. 9,18,30 (default: all the checkpoint's exits)")
    p.add_argument("--limit", type=int, help="evaluate on the first N rows of each data set")
    p.add_argument("--data_file", help="data for the loss task (default: the checkpoint's held-out split)")
    p.add_argument("--output_dir", help="write results.json here")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--trust_remote_code", action="store_true")
    a = p.parse_args(argv)
    models = {"A": SortedModel.from_pretrained(a.model, trust_remote_code=a.trust_remote_code)}
    if a.compare:
        models["B"] = SortedModel.from_pretrained(a.compare, trust_remote_code=a.trust_remote_code)
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    results = evaluate(models, tasks, exits=a.exits, limit=a.limit, data_file=a.data_file,
                       batch_size=a.batch_size, max_length=a.max_length)
    print(format_table(results))
    if a.output_dir:
        from ..checkpoint import atomic_write_text

        out = Path(a.output_dir) / "results.json"
        atomic_write_text(out, json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")
    return 0
