"""`sortedllm evaluate`: check every input first (tasks, data, judge, output folder), then load the models, run the
tasks and write the output folder in one atomic step: results.json, generations.jsonl, PNG plots, report.md."""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import atomic_dir, writable_folder
from ..config import ArgumentParser
from ..errors import SortedError
from ..exits import SortedModel
from . import TASK_NAMES, evaluate, format_table, prepare
from .plots import write_all
from .report import build


def check_output_dir(path: str) -> Path:
    """The folder is replaced as a whole, so it must be new, empty or a previous evaluation's output."""
    folder = writable_folder(path)
    if folder.exists():
        if not folder.is_dir():
            raise SortedError(f"--output_dir {path} is a file; choose a folder")
        if any(folder.iterdir()) and not (folder / "results.json").is_file():
            raise SortedError(f"--output_dir {path} is not empty and holds no results.json; it would be replaced: "
                              f"choose a new or empty folder")
    return folder


def write_output(folder: Path, results: dict, samples: list) -> None:
    with atomic_dir(folder, manifest=False) as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        with open(tmp / "generations.jsonl", "w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(s, ensure_ascii=False, default=str) + "\n")
        plots = write_all(results, tmp)
        (tmp / "report.md").write_text(build(results, plots))


def main(argv: list[str]) -> int:
    p = ArgumentParser(prog="sortedllm evaluate", description="Evaluate every exit (sub-model) of a checkpoint, "
                       "optionally beside other checkpoints: JSON, plots and a Markdown report.")
    p.add_argument("--model", required=True, help="checkpoint folder, hub id, .gguf or alias")
    p.add_argument("--compare", help="comma-separated models evaluated on the same exits (e.g. the SFT baseline)")
    p.add_argument("--names", help="comma-separated display names for --model and --compare (default A,B,...)")
    p.add_argument("--tasks", default="loss", help=f"comma-separated: {', '.join(TASK_NAMES)}")
    p.add_argument("--exits", help="subset of exits, e.g. 9,18,30 (default: all the checkpoint's exits)")
    p.add_argument("--limit", type=int, help="evaluate on the first N rows / prompts of each data set")
    p.add_argument("--data_file", help="data for the loss task, or per task: gsm8k=F,triviaqa=G,tournament=H")
    p.add_argument("--output_dir", help="write results.json, generations.jsonl, plots and report.md here")
    p.add_argument("--batch_size", type=int, default=16, help="prompts per generation batch (left padded)")
    p.add_argument("--max_length", type=int, default=512, help="token cap of a held-out example (loss task)")
    p.add_argument("--max_new_tokens", type=int, help="generation cap (default: gsm8k 256, tournament 128; "
                   "triviaqa never more than 50)")
    p.add_argument("--judge", default="offline", help="tournament judge: offline, hf:<model>, openai:<model>")
    p.add_argument("--judge_url", help="OpenAI-compatible base URL for openai:<model> (key: $OPENAI_API_KEY)")
    p.add_argument("--judge_batch_size", type=int, default=4)
    p.add_argument("--judge_dtype", help="weights dtype of an hf: judge (float32 default; bfloat16 for PandaLM-7B)")
    p.add_argument("--validate_judge", type=int, help="check a model judge on N of PandaLM's human-labelled pairs "
                   "(the offline judge is always checked on all 999)")
    p.add_argument("--pairs", default="cross", help="tournament pairs: cross (paper's matrix), diagonal, last")
    p.add_argument("--positions", type=int, default=20, help="generated positions compared by the similarity task")
    p.add_argument("--lm_eval_include", help="folder of extra lm-eval task YAMLs for lm_eval:<task>")
    p.add_argument("--draft_layer", metavar="FILE", help="agreement task: also measure this trained draft layer "
                   "(from `sortedllm train --mode draft`) of --model")
    p.add_argument("--dtype", default="auto", help="weights dtype generation runs with: auto (bfloat16 where the CPU "
                   "has bfloat16 instructions, else float32), bfloat16 or float32; the loss task reads the model as "
                   "loaded (float32)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.add_argument("--trust_remote_code", action="store_true")
    a = p.parse_args(argv)

    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    folder = check_output_dir(a.output_dir) if a.output_dir else None
    specs = [a.model] + [m.strip() for m in (a.compare or "").split(",") if m.strip()]
    names = [n.strip() for n in a.names.split(",")] if a.names else [chr(ord("A") + i) for i in range(len(specs))]
    if len(names) != len(specs) or len(set(names)) != len(names) or not all(names):
        raise SortedError(f"--names needs {len(specs)} distinct names, one per model (got '{a.names}')")
    prepared = prepare(tasks, limit=a.limit, data_file=a.data_file, batch_size=a.batch_size,
                       max_length=a.max_length, max_new_tokens=a.max_new_tokens, progress=not a.no_progress,
                       judge=a.judge, judge_url=a.judge_url, judge_batch_size=a.judge_batch_size,
                       judge_dtype=a.judge_dtype,
                       validate_judge=a.validate_judge, pairs=a.pairs, positions=a.positions,
                       lm_eval_include=a.lm_eval_include, draft_layer=a.draft_layer, dtype=a.dtype)
    models = {n: SortedModel.from_pretrained(s, trust_remote_code=a.trust_remote_code) for n, s in zip(names, specs)}
    samples: list = []
    results = evaluate(models, tasks, exits=a.exits, prepared=prepared, samples=samples)
    print(format_table(results))
    if folder is not None:
        write_output(folder, results, samples)
        print(f"wrote {folder}/results.json, report.md, plots and generations.jsonl")
    return 0
