"""What every evaluation task receives: the models, each model's chosen exits, the run's options, a place for
per-task details and generated samples, and one generation call shared by all tasks (so progress bars, batching and
the KV-cache decoder are the same everywhere, and identical requests are generated once)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..errors import SortedError
from ..inference import GenerationOptions, Static, generate


@dataclass
class EvalContext:
    models: dict = field(default_factory=dict)  # name -> SortedModel (filled after the data checks)
    exits: dict = field(default_factory=dict)  # name -> [exit, ...]
    limit: int | None = None
    data: dict = field(default_factory=dict)  # task -> data spec given by the user (--data_file)
    batch_size: int = 16
    max_length: int = 512
    max_new_tokens: int | None = None  # None: each task's own default
    progress: bool = True
    options: dict = field(default_factory=dict)  # judge, pairs, lm_eval_include, ...
    details: dict = field(default_factory=dict)  # task -> JSON-able extras (results.json "details")
    samples: list = field(default_factory=list)  # generated texts (generations.jsonl)
    _cache: dict = field(default_factory=dict, repr=False)

    def new_tokens(self, default: int, cap: int | None = None) -> int:
        n = self.max_new_tokens if self.max_new_tokens is not None else default
        return min(n, cap) if cap is not None else n

    def generate(self, name: str, k: int, prompts: list, max_new_tokens: int, task: str):
        """Greedy generations of model `name` at exit `k` (batched, left-padded, KV cache), cached per request."""
        key = (name, k, max_new_tokens, json.dumps(prompts, sort_keys=True, default=str))
        if key not in self._cache:
            self._cache[key] = generate(self.models[name], prompts, Static(k), GenerationOptions(
                max_new_tokens=max_new_tokens, batch_size=self.batch_size, dtype=self.options.get("dtype", "auto"),
                progress=self.progress, desc=f"{task} {name} exit {k}"))
        return self._cache[key]

    def scored(self, task: str, rows: list, max_new_tokens: int, score) -> dict:
        """Every model's greedy replies to `rows` at each of its exits, scored: `score(generations)` returns
        (per-row lists kept in generations.jsonl, the exit's summary). Returns {model: {exit: summary}}."""
        prompts = [r["prompt"] for r in rows]
        out = {}
        for name, exits in self.exits.items():
            out[name] = {}
            for k in exits:
                gens = self.generate(name, k, prompts, max_new_tokens, task)
                per_row, summary = score(gens)
                self.record(task, name, k, rows, gens, **per_row)
                out[name][k] = {**summary, "n": len(rows),
                                "mean_new_tokens": sum(len(g.token_ids) for g in gens) / len(rows)}
        return out

    def record(self, task: str, name: str, k: int, rows: list, generations: list, **per_row) -> None:
        """Keep every generation for generations.jsonl (`per_row` values are lists aligned with `rows`)."""
        for i, (row, g) in enumerate(zip(rows, generations)):
            sample = {"task": task, "model": name, "exit": k, "where": row.get("where"),
                      "prompt": row["prompt"], "output": g.text, "new_tokens": len(g.token_ids)}
            sample.update({key: values[i] for key, values in per_row.items()})
            self.samples.append(sample)


def split_data_option(value: str | None, tasks: list[str]) -> dict:
    """`--data_file F` (data of the loss task, or of the only task chosen) or `--data_file task=F,task2=G`."""
    if not value:
        return {}
    default_task = "loss" if "loss" in tasks else (tasks[0] if len(tasks) == 1 else None)
    out = {}
    for part in value.split(","):
        task, sep, path = part.partition("=")
        if not sep:
            if default_task is None:
                raise SortedError(f"--data_file {part}: say which task it is for, e.g. --data_file gsm8k={part}")
            task, path = default_task, part
        task, path = task.strip(), path.strip()
        if task not in tasks:
            raise SortedError(f"--data_file names task '{task}', which is not in --tasks ({','.join(tasks)})")
        if not path:
            raise SortedError(f"--data_file {part}: no file given for task '{task}'")
        out[task] = path
    return out


def headline(results: dict, task: str) -> tuple[str | None, bool]:
    """The metric a task is summarised by (tables, per-exit plots) and whether higher is better."""
    h = results.get("details", {}).get(task, {}).get("headline") or {}
    return h.get("metric"), h.get("higher_is_better", True)
