"""TriviaQA closed-book: greedy, at most 50 new tokens, exact match against any alias after the standard
normalisation (lower-case, drop punctuation, the articles a/an/the and extra whitespace), per exit.

The prediction is the first non-empty line of the reply, without a leading "Answer:". `contains` (any normalised
alias occurs inside the normalised prediction) is reported beside it for chat models that answer in a sentence.
"""

from __future__ import annotations

import re
import string

from ..data import load_examples
from ..errors import SortedError

HEADLINE = ("exact_match", True)
DEFAULT_DATA = "triviaqa:test"
MAX_NEW_TOKENS = 50  # the cap the issue and the usual closed-book setting use

_PUNCT = set(string.punctuation) | {"‘", "’", "´", "`", "“", "”", "–", "—"}


def normalize(text: str) -> str:
    text = text.lower()
    text = "".join(" " if ch in _PUNCT else ch for ch in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def prediction(reply: str) -> str:
    line = next((ln.strip() for ln in reply.splitlines() if ln.strip()), "")
    return re.sub(r"^answer\s*:\s*", "", line, flags=re.IGNORECASE)


def exact_match(pred: str, answers: list[str]) -> bool:
    p = normalize(pred)
    return bool(p) and any(p == normalize(a) for a in answers)


def contains(pred: str, answers: list[str]) -> bool:
    p = f" {normalize(pred)} "
    return any(n and f" {n} " in p for n in (normalize(a) for a in answers))


def prepare(ctx, name: str) -> list[dict]:
    rows = load_examples(ctx.data.get(name, DEFAULT_DATA), limit=ctx.limit)
    bad = next((r for r in rows if not isinstance(r.get("answers"), list) or not r["answers"]), None)
    if bad is not None:
        raise SortedError(f"{bad['where']}: a TriviaQA row needs 'answers' (a list of accepted strings) or "
                          f"'answer' plus 'aliases'")
    return rows


def run(ctx, name: str, rows: list[dict]) -> dict:
    def score(gens):
        preds = [prediction(g.text) for g in gens]
        em = [exact_match(p, r["answers"]) for p, r in zip(preds, rows)]
        inside = [contains(p, r["answers"]) for p, r in zip(preds, rows)]
        return ({"prediction": preds, "correct": em},
                {"exact_match": sum(em) / len(rows), "contains": sum(inside) / len(rows)})

    return ctx.scored(name, rows, ctx.new_tokens(MAX_NEW_TOKENS, cap=MAX_NEW_TOKENS), score)
