"""Per-exit evaluation: `evaluate(models, tasks, exits=...)` -> the results dict written as `results.json`.

Schema (documented in docs/evaluation.md):
    {"sortedllm_version": str,
     "models": {name: {"path", "mode", "exits"}},           # names "A", "B", ... (or --names)
     "settings": {limit, batch_size, max_new_tokens, judge, pairs, ...},
     "tasks": {task: {name: {exit (str): {metric: value}}}},
     "details": {task: {"headline": {"metric", "higher_is_better"}, ...task-specific extras}}}

A task is one module with `HEADLINE = (metric, higher_is_better)`, `prepare(ctx, name) -> rows` (reads and checks
its data before any model is loaded) and `run(ctx, name, rows) -> {model: {exit: {metric: value}}}`, plus one entry
in `TASKS` below.
"""

from __future__ import annotations

import importlib

from ..errors import SortedError
from ..exits import VERSION
from ..inference.runtime import DTYPES
from .base import EvalContext, headline, split_data_option

# task name -> module in this package. `lm_eval:<task>` runs any lm-evaluation-harness task.
TASKS = {"loss": "loss", "gsm8k": "gsm8k", "triviaqa": "triviaqa", "tournament": "tournament",
         "similarity": "similarity", "agreement": "agreement"}
PREFIXED = {"lm_eval": "lm_eval"}
TASK_NAMES = (*TASKS, "lm_eval:<task>")


def task_module(name: str):
    module = TASKS.get(name)
    if module is None and ":" in name:
        module = PREFIXED.get(name.split(":", 1)[0])
    if module is None:
        raise SortedError(f"unknown task '{name}': choose from {', '.join(TASK_NAMES)}")
    try:
        return importlib.import_module(f".{module}", __name__)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "lm_eval":
            raise SortedError(f"task '{name}' needs lm-evaluation-harness: pip install 'sortedllm[lm-eval]'") from e
        raise


def prepare(tasks: list[str], *, limit: int | None = None, data_file: str | None = None, batch_size: int = 16,
            max_length: int = 512, max_new_tokens: int | None = None, progress: bool = True,
            **options) -> tuple[EvalContext, dict]:
    """Check task names, options and data, before any model is loaded (a bad input fails in a second)."""
    if not tasks:
        raise SortedError(f"no task given: --tasks takes a comma-separated list of {', '.join(TASK_NAMES)}")
    dup = next((t for t in tasks if tasks.count(t) > 1), None)
    if dup:
        raise SortedError(f"task '{dup}' is listed twice in --tasks")
    for flag, value in (("--limit", limit), ("--batch_size", batch_size), ("--max_new_tokens", max_new_tokens),
                        ("--max_length", max_length)):
        if value is not None and value < 1:
            raise SortedError(f"{flag} must be at least 1 (got {value})")
    if options.get("dtype", "auto") not in DTYPES:
        raise SortedError(f"unknown dtype '{options['dtype']}': use {', '.join(DTYPES)}")
    modules = {t: task_module(t) for t in tasks}
    ctx = EvalContext(limit=limit, data=split_data_option(data_file, tasks), batch_size=batch_size,
                      max_length=max_length, max_new_tokens=max_new_tokens, progress=progress, options=options)
    rows = {t: m.prepare(ctx, t) for t, m in modules.items()}
    return ctx, rows


def evaluate(models: dict, tasks: list[str], exits=None, *, prepared: tuple | None = None,
             samples: list | None = None, **options) -> dict:
    """Run `tasks` on every chosen exit of every model; `samples`, when given, receives every generation.
    `options` are `prepare`'s (limit, data_file, batch_size, max_length, max_new_tokens, progress and the tasks'
    own, e.g. judge, pairs, draft_layer), used unless `prepared` (what `prepare` returned) is given."""
    ctx, rows = prepared or prepare(tasks, **options)
    ctx.models = dict(models)
    ctx.exits = {name: sm.check_exits(exits) for name, sm in models.items()}
    settings = {"limit": ctx.limit, "batch_size": ctx.batch_size, "max_new_tokens": ctx.max_new_tokens,
                "data": ctx.data or None}
    settings.update({k: v for k, v in ctx.options.items() if not k.startswith("_")})
    results = {"sortedllm_version": VERSION,
               "models": {name: {"path": sm.source, "mode": sm.config.mode, "exits": ctx.exits[name]}
                          for name, sm in models.items()},
               "settings": settings, "tasks": {}, "details": {}}
    for task in tasks:
        module = task_module(task)
        per_model = module.run(ctx, task, rows[task])
        results["tasks"][task] = {name: {str(k): v for k, v in by_exit.items()} for name, by_exit in per_model.items()}
        detail = ctx.details.get(task, {})
        if "headline" not in detail:
            metric, higher = module.HEADLINE
            detail["headline"] = {"metric": metric, "higher_is_better": higher}
        results["details"][task] = detail
    if samples is not None:
        samples.extend(ctx.samples)
    return results


def format_table(results: dict) -> str:
    """A plain-text per-exit table of every task's headline metric."""
    lines = []
    for task, per_model in results["tasks"].items():
        metric, _ = headline(results, task)
        names = list(per_model)
        exits = sorted({int(k) for m in per_model.values() for k in m})
        lines.append(f"{task} ({metric})")
        lines.append("exit  " + "  ".join(f"{n:>10}" for n in names))
        for k in exits:
            cells = [per_model[n].get(str(k), {}).get(metric) for n in names]
            lines.append(f"{k:>4}  " + "  ".join(f"{c:>10.4f}" if isinstance(c, (int, float)) else f"{'-':>10}"
                                                 for c in cells))
    return "\n".join(lines)
