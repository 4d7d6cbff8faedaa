"""Pairwise tournament (the paper's main evaluation): sub-models answer PandaLM's 170 test prompts, a judge compares
every pair of answers in both orders, and each match gets wins / losses / ties (each order worth half a point, so
W + L + T = n and half points appear) and the paper's score (W - L) / n.

Pairs (`--pairs`): `cross` (default) = every exit of the first model against every exit of each other model (the
paper's SoFT x SFT matrix), or every pair of exits of a single model; `diagonal` = first model's exit k against
each other model's exit k; `last` = every exit against its own model's last layer.
"""

from __future__ import annotations

from ..data import data_dir, from_row, read_jsonl
from ..errors import SortedError
from .judges import Item, judge_both_orders, make_judge, validate

HEADLINE = ("score", True)
MAX_NEW_TOKENS = 128
PAIRS = ("cross", "diagonal", "last")


def load_prompts(spec: str | None, limit: int | None) -> list[dict]:
    """PandaLM-style rows (instruction + optional input) from the built-in test set or a JSONL file."""
    path = data_dir() / "pandalm" / "test.jsonl" if spec in (None, "pandalm", "pandalm:test") else spec
    rows = [from_row(r) for r in read_jsonl(path)][:limit]
    if not rows:
        raise SortedError(f"prompt file {path} is empty")
    for r in rows:
        if "instruction" not in r:  # prompt/completion or messages rows: the prompt is the instruction
            p = r["prompt"]
            r["instruction"] = p if isinstance(p, str) else next(m["content"] for m in reversed(p)
                                                                 if m["role"] == "user")
        r["input"] = r.get("input") or ""
    return rows


def matches(exits: dict[str, list[int]], pairs: str) -> list[tuple[tuple[str, int], tuple[str, int]]]:
    names = list(exits)
    first, others = names[0], names[1:]
    if pairs == "last" or (pairs == "diagonal" and not others):
        return [((m, k), (m, exits[m][-1])) for m in names for k in exits[m] if k != exits[m][-1]]
    if pairs == "diagonal":
        return [((first, k), (m, k)) for m in others for k in exits[first] if k in exits[m]]
    if not others:
        ks = exits[first]
        return [((first, a), (first, b)) for i, a in enumerate(ks) for b in ks[i + 1:]]
    return [((first, a), (m, b)) for m in others for a in exits[first] for b in exits[m]]


def prepare(ctx, name: str) -> list[dict]:
    pairs = ctx.options.get("pairs", "cross")
    if pairs not in PAIRS:
        raise SortedError(f"unknown --pairs '{pairs}': choose from {', '.join(PAIRS)}")
    rows = load_prompts(ctx.data.get(name), ctx.limit)
    if "_judge" not in ctx.options:  # load the judge now: a bad judge spec fails before any generation
        ctx.options["_judge"] = make_judge(ctx.options.get("judge"), ctx.options.get("judge_url"),
                                           ctx.options.get("judge_batch_size", 4), ctx.options.get("judge_dtype"))
        judge, n = ctx.options["_judge"], ctx.options.get("validate_judge")
        if judge.name == "offline" or n:  # the offline judge costs nothing to validate; others on request
            ctx.options["_judge_validation"] = validate(judge, limit=None if judge.name == "offline" else int(n),
                                                        progress=ctx.progress)
    return rows


def run(ctx, name: str, rows: list[dict]) -> dict:
    judge = ctx.options["_judge"]
    pairs = ctx.options.get("pairs", "cross")
    n_new = ctx.new_tokens(MAX_NEW_TOKENS)
    prompts = [r["prompt"] for r in rows]
    plan = matches(ctx.exits, pairs)
    if not plan:
        raise SortedError(f"the tournament has no pairs to judge with --pairs {pairs} and these exits; choose at "
                          f"least two exits or compare two models")
    answers = {}
    for player in sorted({p for m in plan for p in m}, key=lambda p: (list(ctx.exits).index(p[0]), p[1])):
        gens = ctx.generate(player[0], player[1], prompts, n_new, name)
        ctx.record(name, player[0], player[1], rows, gens)
        answers[player] = [g.text for g in gens]
    # Judge every distinct (prompt, answer, answer) once: converged exits often answer identically.
    unique: dict[Item, int] = {}
    for a, b in plan:
        for i, r in enumerate(rows):
            unique.setdefault(Item(r["instruction"], r["input"], answers[a][i], answers[b][i]), len(unique))
    points = judge_both_orders(judge, list(unique), progress=ctx.progress)
    results, per_player = [], {}
    for a, b in plan:
        w = l_ = t = 0.0
        for i, r in enumerate(rows):
            pw, pl, pt = points[unique[Item(r["instruction"], r["input"], answers[a][i], answers[b][i])]]
            w, l_, t = w + pw, l_ + pl, t + pt
        n = len(rows)
        results.append({"a": list(a), "b": list(b), "wins": w, "losses": l_, "ties": t, "n": n, "score": (w - l_) / n})
        for player, (pw, pl) in ((a, (w, l_)), (b, (l_, w))):
            s = per_player.setdefault(player, {"wins": 0.0, "losses": 0.0, "ties": 0.0, "n": 0, "matches": 0})
            s["wins"] += pw
            s["losses"] += pl
            s["ties"] += t
            s["n"] += n
            s["matches"] += 1
    judge_info = {"name": judge.name, "description": judge.description}
    if "_judge_validation" in ctx.options:
        judge_info["validation"] = ctx.options["_judge_validation"]
    ctx.details[name] = {"judge": judge_info, "pairs": pairs, "n_prompts": len(rows), "max_new_tokens": n_new,
                         "matches": results}
    out = {}
    for (model, k), s in per_player.items():
        out.setdefault(model, {})[k] = {**s, "score": (s["wins"] - s["losses"]) / s["n"]}
    return {m: dict(sorted(v.items())) for m, v in out.items()}
