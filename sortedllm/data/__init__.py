"""Data: built-in tasks in the paper's formats, user JSONL, HF datasets -> prompt/completion -> tokens.

Every source becomes a list of rows with `prompt` (user text) and `completion` (assistant text) plus the task's own
fields (e.g. `final_answer`, `answers`). Tokenisation applies the tokenizer's chat template when it has one and
masks the prompt, so the loss is on the response only.

Built-in names: `gsm8k`, `alpaca`, `triviaqa`, `pandalm`, with `:train` / `:test` splits (GSM8K has its own test
file; Alpaca holds out its first 200 rows and TriviaQA its first 500 as `:test`). Join sources with `+`
(`gsm8k+alpaca`, rows interleaved). Anything else is a JSONL path or a Hugging Face dataset id (`hf:name[:split]`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import SortedError

BUILTIN_DIR = Path(__file__).parent / "builtin"
TASKS = ("gsm8k", "alpaca", "triviaqa", "pandalm")
HOLDOUT = {"alpaca": 200, "triviaqa": 500}
FILES = {"gsm8k": {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
         "alpaca": {"train": "alpaca/train.jsonl"}, "triviaqa": {"train": "triviaqa/validation.jsonl"},
         "pandalm": {"test": "pandalm/test.jsonl"}}


def data_dir() -> Path:
    """Full data sets when SORTEDLLM_DATA_DIR is set (same layout as the built-in folder), else the subsets."""
    env = os.environ.get("SORTEDLLM_DATA_DIR")
    return Path(env) if env else BUILTIN_DIR


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file; a malformed line is reported as file:line."""
    path = Path(path)
    if not path.is_file():
        raise SortedError(f"data file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SortedError(f"{path}:{n}: malformed JSON ({e.msg}); fix or remove this line")
            if not isinstance(row, dict):
                raise SortedError(f"{path}:{n}: each line must be a JSON object, got {type(row).__name__}")
            row["_where"] = f"{path}:{n}"
            rows.append(row)
    return rows


def _gsm8k(row):
    answer = re.sub(r"<<[^>]*>>", "", row["answer"])  # drop calculator annotations
    final = row.get("final_answer") or answer.split("####")[-1].strip().replace(",", "")
    return {"prompt": row["question"], "completion": answer, "final_answer": final}


def _alpaca(row):
    inp = (row.get("input") or "").strip()
    prompt = row["instruction"] + (f"\n\n{inp}" if inp else "")
    return {"prompt": prompt, "completion": row.get("output", "")}


def _triviaqa(row):
    answers = row.get("answers") or [row["answer"], *row.get("aliases", [])]
    return {"prompt": f"Answer the question in a few words.\nQuestion: {row['question']}",
            "completion": row["answer"], "answers": answers}


def _pandalm(row):
    return _alpaca({**row, "output": ""})


def from_row(row: dict) -> dict:
    """A user's row in any supported shape -> prompt/completion; names the line and the fields when it cannot."""
    where = row.get("_where", "row")
    try:
        if "messages" in row:
            msgs = row["messages"]
            if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m and
                                                                   "content" in m for m in msgs):
                raise SortedError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
            if msgs[-1]["role"] != "assistant":
                raise SortedError(f"{where}: the last message must be the assistant's reply to train on")
            out = {"prompt": msgs[:-1], "completion": msgs[-1]["content"]}
        elif "prompt" in row:
            out = {"prompt": row["prompt"], "completion": row.get("completion", "")}
        elif "instruction" in row:
            out = _alpaca(row)
        elif "question" in row and "answer" in row:
            out = _gsm8k(row) if "####" in str(row["answer"]) else _triviaqa(row)
        else:
            fields = ", ".join(k for k in row if k != "_where")
            raise SortedError(f"{where}: row has no prompt/completion, messages, instruction/output or "
                              f"question/answer fields (found: {fields})")
    except KeyError as e:
        raise SortedError(f"{where}: missing field {e}") from None
    if not isinstance(out["completion"], str) or not (isinstance(out["prompt"], (str, list))):
        raise SortedError(f"{where}: prompt and completion must be strings")
    extra = {k: v for k, v in row.items() if k not in out and k not in ("messages", "_where")}
    return {**extra, **out, "where": where}


def _builtin(task: str, split: str) -> list[dict]:
    if split not in ("train", "test"):
        raise SortedError(f"unknown split '{split}' for {task}: use {task}:train or {task}:test")
    files = FILES[task]
    convert = {"gsm8k": _gsm8k, "alpaca": _alpaca, "triviaqa": _triviaqa, "pandalm": _pandalm}[task]
    if task in HOLDOUT:  # one file; its first rows are the test split
        rows = read_jsonl(data_dir() / files["train"])
        rows = rows[:HOLDOUT[task]] if split == "test" else rows[HOLDOUT[task]:]
    elif split in files:
        rows = read_jsonl(data_dir() / files[split])
    else:
        raise SortedError(f"{task} has no {split} split")
    out = []
    for row in rows:
        try:
            out.append({**convert(row), "where": row["_where"]})
        except KeyError as e:
            raise SortedError(f"{row['_where']}: missing field {e}") from None
    return out


def _hf(spec: str) -> list[dict]:
    name, _, split = spec[3:].partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:
        raise SortedError(f"could not load Hugging Face dataset '{name}': {str(e).splitlines()[0][:200]}") from e
    return [from_row({**r, "_where": f"{name}[{i}]"}) for i, r in enumerate(ds)]


def load_examples(source: str, limit: int | None = None) -> list[dict]:
    """Rows with `prompt` and `completion` for a data spec (see module doc). An empty result is an error."""
    if not source:
        raise SortedError("no data given: pass --data with a built-in task (gsm8k, alpaca, triviaqa), a JSONL "
                          "file or hf:<dataset>")
    parts = source.split("+")
    if len(parts) > 1:
        groups = [load_examples(p) for p in parts]
        rows = [g[i] for i in range(max(map(len, groups))) for g in groups if i < len(g)]
    else:
        task, _, split = source.partition(":")
        if task in TASKS and not Path(source).exists():
            rows = _builtin(task, split or ("test" if task == "pandalm" else "train"))
        elif source.startswith("hf:"):
            rows = _hf(source)
        else:
            rows = [from_row(r) for r in read_jsonl(source)]
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise SortedError(f"data set '{source}' is empty")
    return rows


def default_eval_data(train_source: str) -> str:
    """Held-out data for a training source: the test split of each built-in task; user files need --eval_data."""
    parts = []
    for p in train_source.split("+"):
        task, _, split = p.partition(":")
        if task in TASKS and split in ("", "train") and not Path(p).exists():
            parts.append(f"{task}:test")
    return "+".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# Tokenisation


def prompt_messages(prompt) -> list[dict]:
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def encode_prompt(tokenizer, prompt) -> list[int]:
    """Token ids of a prompt ready for generation (chat template + generation prompt when the model has one)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(prompt_messages(prompt), add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return list(ids)


def encode_example(tokenizer, row: dict, max_length: int | None = None) -> dict | None:
    """`input_ids` and `completion_mask` (1 on response tokens) for one row; None if the prompt alone fills
    `max_length` (nothing left to learn from)."""
    prompt_ids = encode_prompt(tokenizer, row["prompt"])
    if getattr(tokenizer, "chat_template", None):
        msgs = prompt_messages(row["prompt"]) + [{"role": "assistant", "content": row["completion"]}]
        full = tokenizer.apply_chat_template(msgs, tokenize=True)
        full = list(full["input_ids"] if hasattr(full, "keys") else full)
    else:
        full = prompt_ids + tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        full.append(tokenizer.eos_token_id)
    n = 0  # the completion starts where the prompt and the full conversation diverge
    while n < min(len(prompt_ids), len(full)) and prompt_ids[n] == full[n]:
        n += 1
    if max_length is not None:
        if n >= max_length:
            return None
        full = full[:max_length]
    return {"input_ids": full, "completion_mask": [0] * n + [1] * (len(full) - n)}


def encode_dataset(tokenizer, rows: list[dict], max_length: int | None, source: str = "data"):
    """A `datasets.Dataset` of tokenised rows (what TRL's SFTTrainer takes as already processed)."""
    import datasets

    encoded = [e for e in (encode_example(tokenizer, r, max_length) for r in rows) if e is not None]
    dropped = len(rows) - len(encoded)
    if not encoded:
        raise SortedError(f"every prompt in '{source}' is longer than max_length={max_length}: raise --max_length")
    if dropped:
        import logging

        logging.getLogger(__name__).warning("%d of %d rows of %s dropped: prompt longer than max_length=%s",
                                            dropped, len(rows), source, max_length)
    return datasets.Dataset.from_list(encoded)
