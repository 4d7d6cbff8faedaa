"""GSM8K: greedy generation at each exit, final-answer extraction, exact-match accuracy.

The answer is the number after the last `####` (the format SoFT/SFT models are trained on); a reply without `####`
falls back to its last number (what zero-shot chat models write). Numbers compare as values: "1,000", "1000.00"
and "$1000" all equal 1000.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation, localcontext

from ..data import load_examples
from ..errors import SortedError

HEADLINE = ("accuracy", True)  # (metric shown in tables and plots, higher is better)
DEFAULT_DATA = "gsm8k:test"
MAX_NEW_TOKENS = 256

NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+"


def normalize_number(text: str | None) -> str | None:
    """Canonical decimal string of a number as written ("$1,000.50" -> "1000.5"), None if it is not one."""
    if text is None:
        return None
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    with localcontext() as ctx:
        ctx.prec = max(28, len(s) + 2)  # a degenerate reply can write a number longer than the default precision
        return format(d.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The final answer of a reply: the first number after the last `####`, else the last number in the text."""
    if "####" in text:
        found = re.search(NUMBER, text.rsplit("####", 1)[1])
        if found:
            return normalize_number(found.group(0))
    numbers = re.findall(NUMBER, text)
    return normalize_number(numbers[-1]) if numbers else None


def is_correct(prediction: str | None, gold: str) -> bool:
    return prediction is not None and prediction == normalize_number(gold)


def prepare(ctx, name: str) -> list[dict]:
    rows = load_examples(ctx.data.get(name, DEFAULT_DATA), limit=ctx.limit)
    bad = next((r for r in rows if normalize_number(str(r.get("final_answer", ""))) is None), None)
    if bad is not None:
        raise SortedError(f"{bad['where']}: a GSM8K row needs a numeric final answer (`#### <number>` at the end of "
                          f"'answer', or a 'final_answer' field)")
    return rows


def run(ctx, name: str, rows: list[dict]) -> dict:
    gold = [str(r["final_answer"]) for r in rows]

    def score(gens):
        preds = [extract_answer(g.text) for g in gens]
        correct = [is_correct(p, g) for p, g in zip(preds, gold)]
        return ({"prediction": preds, "gold": gold, "correct": correct},
                {"accuracy": sum(correct) / len(rows), "answered": sum(p is not None for p in preds) / len(rows)})

    return ctx.scored(name, rows, ctx.new_tokens(MAX_NEW_TOKENS), score)
