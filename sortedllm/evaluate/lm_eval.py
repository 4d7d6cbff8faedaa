"""lm-evaluation-harness on any exit: a `sortedllm` model type for lm-eval, and the `lm_eval:<task>` task.

    python -m sortedllm.evaluate.lm_eval --model sortedllm \\
        --model_args pretrained=CKPT,exit_layer=12 --tasks arc_easy [any lm-eval flag, e.g. --include_path DIR]
    sortedllm evaluate --model CKPT --tasks lm_eval:arc_easy [--lm_eval_include DIR]   # every exit -> results.json

lm-eval 0.4 finds a model only in its registry, which a module fills when it is imported; the plain `lm-eval`
command never imports sortedllm, so `python -m sortedllm.evaluate.lm_eval` registers `sortedllm` and then runs
lm-eval's own command line unchanged. Exit k is evaluated through lm-eval's HF backend (`HFLM`) on the exported
k-layer model (`sortedllm.export.submodel`: its logits equal exit k's), so loglikelihood, rolling perplexity and
generation (with HF's KV cache) all behave exactly as for any HF model.
"""

from __future__ import annotations

import functools
import logging
import sys

import lm_eval.models  # noqa: F401  -- lm-eval's own lazy entries first: get_model fills them only if empty
from lm_eval.api.registry import model_registry, register_model
from lm_eval.models.huggingface import HFLM

from ..errors import SortedError
from ..exits import SortedModel
from ..export import submodel

PREFIX = "lm_eval:"


class _ModelInstanceNotes(logging.Filter):
    """HFLM warns whenever it is handed a model object; here that is the design, not a misuse."""

    def filter(self, record):
        msg = record.getMessage()
        return not msg.startswith(("`pretrained` model kwarg is not of type", "Passed an already-initialized model"))


logging.getLogger("lm_eval.models.huggingface").addFilter(_ModelInstanceNotes())


def _register(cls):
    return cls if "sortedllm" in model_registry else register_model("sortedllm")(cls)


@_register
class SortedLM(HFLM):
    """`--model sortedllm --model_args pretrained=<checkpoint>,exit_layer=<k>` (default: the last layer)."""

    def __init__(self, pretrained=None, exit_layer=None, sorted_model=None, dtype="float32",
                 trust_remote_code=False, **kwargs):
        if sorted_model is None:
            if not pretrained:
                raise SortedError("lm-eval model 'sortedllm' needs --model_args pretrained=<checkpoint>")
            sorted_model = SortedModel.from_pretrained(str(pretrained), dtype=dtype,
                                                       trust_remote_code=bool(trust_remote_code))
        sm = sorted_model
        k = sm.num_layers if exit_layer in (None, "") else int(exit_layer)
        sm.check_exits([k])
        model = sm.arch.model if k == sm.num_layers and not sm.exit_heads else submodel(sm, k)
        kwargs.pop("device", None)  # the model is already placed; HFLM ignores device for a model instance
        super().__init__(pretrained=model, tokenizer=sm.tokenizer, **kwargs)
        self.exit_layer = k


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None = None):
    """lm-eval's task index (it reads every task YAML it ships: seconds), built once per include path."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def harness_task(name: str) -> str:
    task = name[len(PREFIX):]
    if not task:
        raise SortedError("lm_eval: needs a task name, e.g. --tasks lm_eval:arc_easy")
    return task


def prepare(ctx, name: str):
    task = harness_task(name)
    if "_lm_eval_tasks" not in ctx.options:
        ctx.options["_lm_eval_tasks"] = task_manager(ctx.options.get("lm_eval_include"))
    tm = ctx.options["_lm_eval_tasks"]
    if task not in tm.all_tasks:
        hint = "" if ctx.options.get("lm_eval_include") else "; a local YAML task needs --lm_eval_include DIR"
        raise SortedError(f"unknown lm-eval task '{task}' (list them with `lm-eval ls tasks`{hint})")
    return None


def metrics_of(task_result: dict) -> dict:
    """lm-eval's "acc,none" / "acc_stderr,none" keys -> "acc" / "acc_stderr" (other filters keep their name)."""
    out = {}
    for key, value in task_result.items():
        if key == "alias" or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt in ("", "none") else f"{metric},{filt}"] = value if isinstance(value, int) else float(value)
    return out


def run(ctx, name: str, rows) -> dict:
    from lm_eval import simple_evaluate

    task = harness_task(name)
    tm = ctx.options["_lm_eval_tasks"]
    out, higher = {}, {}
    for model, exits in ctx.exits.items():
        out[model] = {}
        for k in exits:
            lm = SortedLM(sorted_model=ctx.models[model], exit_layer=k, batch_size=ctx.batch_size)
            res = simple_evaluate(model=lm, tasks=[task], limit=ctx.limit, task_manager=tm, log_samples=False,
                                  bootstrap_iters=1000)
            results = res["results"]
            for sub, values in results.items():  # a group reports its subtasks too; keep the task's own line
                if sub == task or len(results) == 1:
                    out[model][k] = metrics_of(values)
            higher.update(res.get("higher_is_better", {}).get(task, {}))
    first = next(iter(next(iter(out.values())).values()), {})
    metric = next((m for m in first if m in higher), None) or next((m for m in first if "_stderr" not in m), None)
    ctx.details[name] = {"harness_task": task, "higher_is_better": higher,
                         "headline": {"metric": metric, "higher_is_better": bool(higher.get(metric, True))}}
    return out


def main(argv: list[str] | None = None) -> int:
    """Run lm-eval's command line with the `sortedllm` model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except SortedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
