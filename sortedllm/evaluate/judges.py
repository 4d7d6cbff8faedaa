"""Pairwise judges for the tournament, and their validation against PandaLM's human labels.

A judge reads (instruction, input, response 1, response 2) and returns 1 (response 1 is better), 2 (response 2 is
better) or 0 (tie), PandaLM's label convention. Three kinds, chosen with `--judge`:

- `offline` (default, needs no model): **novel-content judge**. Each response scores the number of distinct word
  bigrams it contains that do not occur in the instruction or input; the higher score wins, equal scores tie. It
  measures how much new, non-repetitive text a reply adds: empty replies, repetition loops ("and, and, and") and
  parroting the prompt score low. It does NOT read for correctness, fluency or instruction following, and a longer
  reply with more distinct content wins. Validated against PandaLM's 999 human-labelled pairs (see
  `docs/evaluation.md` and `validate`): close to PandaLM-7B's published agreement, far above "always 2".
- `hf:<model>`: any local Hugging Face causal LM (PandaLM-7B when available: `hf:WeOpenML/PandaLM-7B-v1` or a
  folder) prompted with PandaLM's judge format. The verdict is the label ("1", "2", "Tie") whose first token the
  judge ranks highest right after "### Evaluation:\\n" -- PandaLM-7B's greedy verdict, read in one forward pass.
- `openai:<model>`: an OpenAI-compatible chat-completions endpoint (`--judge_url`, default $OPENAI_BASE_URL or
  https://api.openai.com/v1; key from $OPENAI_API_KEY) with the same PandaLM prompt; the reply's first line is
  parsed as PandaLM's own parser does.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..config import ArgumentParser
from ..data import BUILTIN_DIR, data_dir, read_jsonl
from ..errors import SortedError
from ..inference.batch import left_pad, positions
from ..models import load_model

LABELS = (0, 1, 2)  # tie, response 1 better, response 2 better
_SPECIAL = re.compile(r"<unk>|<pad>|<s>|</s>|\[PAD\]|<\|endoftext\|>|\[UNK\]|\[CLS\]|\[MASK\]")


@dataclass(frozen=True)
class Item:
    instruction: str
    input: str
    response1: str
    response2: str

    def swapped(self) -> "Item":
        return Item(self.instruction, self.input, self.response2, self.response1)


def pandalm_prompt(item: Item) -> str:
    """PandaLM's judge prompt (WeOpenML/PandaLM, `build_pandalm_prompt`): the model continues after "### Evaluation:"
    with "1", "2" or "Tie", then a reason and a reference answer."""
    r1 = _SPECIAL.sub("", item.response1.strip()).strip()
    r2 = _SPECIAL.sub("", item.response2.strip()).strip()
    responses = f"### Response 1:\n{r1}\n\n### Response 2:\n{r2}"
    if item.input:
        return ("Below are two responses for a given task. The task is defined by the Instruction with an Input that "
                "provides further context. Evaluate the responses and generate a reference answer for the task.\n\n"
                f"### Instruction:\n{item.instruction}\n\n### Input:\n{item.input}\n\n{responses}\n\n### Evaluation:\n")
    return ("Below are two responses for a given task. The task is defined by the Instruction. Evaluate the responses "
            f"and generate a reference answer for the task.\n\n### Instruction:\n{item.instruction}\n\n{responses}"
            "\n\n### Evaluation:\n")


def parse_verdict(text: str) -> int:
    """PandaLM's parser: the first line "1" or "2", else tie; also accepts "Response 1", "1." and markdown."""
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    line = line.strip().strip("*#:.` ").lower()
    if line in ("1", "2"):
        return int(line)
    m = re.match(r"(?:response|answer|output)?\s*([12])\b", line)
    return int(m.group(1)) if m else 0


# -- the offline judge -----------------------------------------------------------------------------------------

def _bigrams(text: str) -> set:
    words = re.findall(r"\w+", text.lower())
    return set(zip(words, words[1:])) | ({(words[0],)} if len(words) == 1 else set())


def novel_content(item_prompt: str, response: str) -> int:
    """Distinct word bigrams of `response` absent from the prompt (a one-word reply counts as one)."""
    return len(_bigrams(response) - _bigrams(item_prompt))


class OfflineJudge:
    name = "offline"
    description = ("novel-content heuristic: more distinct word bigrams not copied from the prompt wins "
                   "(no model; ignores correctness and fluency)")

    def __call__(self, items: list[Item], progress: bool = False) -> list[int]:
        out = []
        for it in items:
            prompt = f"{it.instruction}\n{it.input}"
            a, b = novel_content(prompt, it.response1), novel_content(prompt, it.response2)
            out.append(0 if a == b else (1 if a > b else 2))
        return out


# -- a local Hugging Face judge --------------------------------------------------------------------------------

class HFJudge:
    """A causal LM prompted with PandaLM's format; the verdict is its top-ranked label token after the prompt."""

    CANDIDATES = {1: "1", 2: "2", 0: "Tie"}

    def __init__(self, spec: str, batch_size: int = 4, max_length: int = 2048, dtype=None):
        self.name = f"hf:{spec}"
        self.description = f"{spec} prompted with PandaLM's judge format (label token ranked first)"
        try:
            self.model, self.tokenizer = load_model(spec, dtype=dtype)
        except SortedError as e:  # say which flag named the model: the evaluated model loads fine
            raise SortedError(f"--judge hf:{spec}: {e}") from None
        self.batch_size = batch_size
        self.max_length = min(max_length, getattr(self.model.config, "max_position_embeddings", max_length) or
                              max_length)
        self.label_tokens = self._label_tokens()

    def _label_tokens(self) -> dict[int, int]:
        """First token of each label as it follows "### Evaluation:\\n" (tokenizers merge differently after a
        newline than at the start of a text, so it is read off a tokenised prompt, not tokenised alone)."""
        tok = self.tokenizer
        base = tok(pandalm_prompt(Item("x", "", "a", "b")), add_special_tokens=False)["input_ids"]
        out = {}
        for label, word in self.CANDIDATES.items():
            full = tok(pandalm_prompt(Item("x", "", "a", "b")) + word, add_special_tokens=False)["input_ids"]
            if full[:len(base)] == base and len(full) > len(base):
                out[label] = full[len(base)]
            else:
                out[label] = tok(word, add_special_tokens=False)["input_ids"][0]
        if len(set(out.values())) != 3:
            raise SortedError(f"judge {self.name}: its tokenizer gives the labels 1/2/Tie the same first token")
        return out

    def _encode(self, item: Item) -> list[int]:
        ids = self.tokenizer(pandalm_prompt(item), add_special_tokens=True)["input_ids"]
        if len(ids) > self.max_length:  # keep the end (responses and "### Evaluation:"), as the judge must see it
            ids = ids[:1] + ids[-(self.max_length - 1):]
        return ids

    def __call__(self, items: list[Item], progress: bool = False) -> list[int]:
        encoded = [self._encode(it) for it in items]
        order = sorted(range(len(items)), key=lambda i: -len(encoded[i]))
        out = [0] * len(items)
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        labels = list(self.label_tokens)
        cand = torch.tensor([self.label_tokens[c] for c in labels], device=device)
        for start in tqdm(range(0, len(order), self.batch_size), desc="judge", disable=not progress):
            idx = order[start:start + self.batch_size]
            ids, mask = left_pad([encoded[i] for i in idx], pad, device)
            with torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=mask.long(), position_ids=positions(mask),
                                    logits_to_keep=1).logits[:, -1]
            best = logits[:, cand].argmax(-1).tolist()
            for i, b in zip(idx, best):
                out[i] = labels[b]
        return out


# -- an OpenAI-compatible endpoint -----------------------------------------------------------------------------

class OpenAIJudge:
    """Chat completions at `base_url` with PandaLM's prompt. Plain urllib: the `openai` client is not a dependency
    and one JSON POST per item is all this needs."""

    SYSTEM = ("You compare two responses to a task. Answer with exactly one of: 1, 2 or Tie on the first line "
              "(1 if Response 1 is better, 2 if Response 2 is better), then a short reason.")

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None, workers: int = 4,
                 timeout: float = 120.0):
        self.model = model
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
        self.workers, self.timeout = workers, timeout
        self.name = f"openai:{model}"
        self.description = f"{model} at {self.base_url} with PandaLM's judge prompt"

    def ask(self, item: Item) -> int:
        import urllib.error
        import urllib.request

        body = {"model": self.model, "temperature": 0, "max_tokens": 64,
                "messages": [{"role": "system", "content": self.SYSTEM},
                             {"role": "user", "content": pandalm_prompt(item)}]}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(f"{self.base_url}/chat/completions", data=json.dumps(body).encode(),
                                     headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                reply = json.loads(resp.read().decode())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:200].replace("\n", " ")
            raise SortedError(f"judge endpoint {self.base_url} answered HTTP {e.code} ({detail}); check --judge_url, "
                              f"the model name and OPENAI_API_KEY") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise SortedError(f"judge endpoint {self.base_url} unreachable ({getattr(e, 'reason', e)}); check "
                              f"--judge_url") from None
        except json.JSONDecodeError:
            raise SortedError(f"judge endpoint {self.base_url} did not answer JSON; is it OpenAI-compatible?") from None
        try:
            text = reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise SortedError(f"judge endpoint {self.base_url} answered without choices[0].message.content") from None
        return parse_verdict(text)

    def __call__(self, items: list[Item], progress: bool = False) -> list[int]:
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(tqdm(pool.map(self.ask, items), total=len(items), desc="judge", disable=not progress))


def make_judge(spec: str | None, url: str | None = None, batch_size: int = 4, dtype: str | None = None):
    spec = (spec or "offline").strip()
    if spec == "offline":
        return OfflineJudge()
    kind, sep, rest = spec.partition(":")
    if sep and rest and kind == "hf":
        return HFJudge(rest, batch_size=batch_size, dtype=dtype)
    if sep and rest and kind == "openai":
        return OpenAIJudge(rest, base_url=url)
    raise SortedError(f"unknown judge '{spec}': use offline, hf:<model folder or hub id> or openai:<model name>")


# -- both orders, and validation against human labels ----------------------------------------------------------

def judge_both_orders(judge, items: list[Item], progress: bool = False) -> list[tuple[float, float, float]]:
    """(points to response 1, points to response 2, tie points) per item, each order worth half a point, as the
    paper counts (half points appear when the two orders disagree). Identical responses tie without a call."""
    todo = [i for i, it in enumerate(items) if it.response1.strip() != it.response2.strip()]
    asked = [items[i] for i in todo] + [items[i].swapped() for i in todo]
    verdicts = judge(asked, progress=progress) if asked else []
    out = [(0.0, 0.0, 1.0)] * len(items)
    n = len(todo)
    for j, i in enumerate(todo):
        first, second = verdicts[j], verdicts[n + j]
        w = 0.5 * (first == 1) + 0.5 * (second == 2)
        l_ = 0.5 * (first == 2) + 0.5 * (second == 1)
        out[i] = (w, l_, 1.0 - w - l_)
    return out


def combined_label(points: tuple[float, float, float]) -> int:
    w, l_, _ = points
    return 1 if w > l_ else (2 if l_ > w else 0)


def read_annotated(path=None, limit: int | None = None) -> tuple[list[Item], list[int]]:
    """PandaLM's human-labelled pairs and each pair's majority label (0 tie, 1, 2)."""
    if path is None:
        path = data_dir() / "pandalm" / "test_annotated.jsonl"
        path = path if path.is_file() else BUILTIN_DIR / "pandalm" / "test_annotated.jsonl"
    rows = read_jsonl(path)[:limit]
    items, labels = [], []
    for r in rows:
        text = {k: r.get(k, "") if isinstance(r.get(k, ""), str) else json.dumps(r[k])
                for k in ("instruction", "input", "response1", "response2")}
        votes = [r[f"annotator{i}"] for i in (1, 2, 3) if f"annotator{i}" in r]
        if not votes:
            raise SortedError(f"{r['_where']}: an annotated pair needs annotator1..3 labels")
        items.append(Item(**text))
        labels.append(Counter(votes).most_common(1)[0][0])
    return items, labels


def agreement(pred: list[int], gold: list[int]) -> dict:
    """Accuracy and macro-F1 over the 3 labels (PandaLM's `compute_metrics`), plus the confusion counts."""
    acc = sum(p == g for p, g in zip(pred, gold)) / len(gold)
    f1s = []
    for c in LABELS:
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    confusion = {f"{g}->{p}": sum(1 for a, b in zip(gold, pred) if a == g and b == p) for g in LABELS for p in LABELS}
    return {"accuracy": acc, "macro_f1": sum(f1s) / 3, "confusion": confusion}


def validate(judge, path=None, limit: int | None = None, progress: bool = False) -> dict:
    """Agreement of `judge` (both orders combined) with the human majority label, beside trivial baselines."""
    items, gold = read_annotated(path, limit)
    pred = [combined_label(p) for p in judge_both_orders(judge, items, progress=progress)]
    n_words = [(len(it.response1.split()), len(it.response2.split())) for it in items]
    baselines = {"always_2": agreement([2] * len(gold), gold)["accuracy"],
                 "always_1": agreement([1] * len(gold), gold)["accuracy"],
                 "always_tie": agreement([0] * len(gold), gold)["accuracy"],
                 "longer_wins": agreement([0 if a == b else (1 if a > b else 2) for a, b in n_words], gold)["accuracy"]}
    return {"judge": judge.name, "n": len(gold), **agreement(pred, gold), "baselines": baselines,
            "reference": {"pandalm_7b_accuracy": 0.6677, "gpt_3.5_accuracy": 0.7107,
                          "source": "PandaLM data/compute_metrics.py, same test set"}}


def main(argv: list[str] | None = None) -> int:
    """`python -m sortedllm.evaluate.judges --judge offline`: a judge's agreement with PandaLM's human labels."""
    p = ArgumentParser(prog="python -m sortedllm.evaluate.judges", description=main.__doc__)
    p.add_argument("--judge", default="offline")
    p.add_argument("--judge_url")
    p.add_argument("--limit", type=int)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--dtype", help="weights dtype of an hf: judge (e.g. bfloat16 for PandaLM-7B)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        report = validate(make_judge(a.judge, a.judge_url, a.batch_size, a.dtype), limit=a.limit, progress=True)
    except SortedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
