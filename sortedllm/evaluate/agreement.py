"""Draft quality of every exit for self-speculative decoding: how often exit k predicts the last layer's token on
the model's own greedy output, how many drafted tokens a speculation cycle would accept, and what speedup that buys
at the step costs measured on this machine.

1. The full model answers the prompts greedily (default: GSM8K test questions).
2. Prompt + answer are teacher-forced once per batch (`SortedModel.hidden_at_exits`); at every generated position
   each exit's top token is compared with the last layer's (the reference is the teacher-forced last layer, so the
   last exit agrees exactly). `top1_agreement` uses the exit's full head; `draft_agreement` the head
   self-speculation drafts with (`Speculative.draft_vocab`: the model's most frequent tokens, adapters/vocab.py).
3. Accepted tokens per cycle for draft length g = 1..8, from the actual runs of draft agreement: a cycle starting
   at generated position j accepts min(g, number of consecutive agreeing positions from j); averaged over every
   start position of every answer (no independence assumption: runs of easy tokens count as runs).
4. Step costs from the machine's cost table (inference/costs.py: the decode runtime's measured seconds per layer
   and per head read for n tokens), exactly the pieces `inference/speculative.py` spends per round of g drafts:
   g x `t_draft` (one token through layers 1..k + the draft head), `t_feed` (the last draft through layers 1..k, no
   head) and `t_verify(g)` (g + 1 tokens through layers k+1..L + the full head); a plain step `t_full` is one token
   through all L layers + the full head. Predicted speedup(g) = (accepted(g) + 1) x t_full /
   (g x t_draft + t_feed + t_verify(g)).
5. The same runs bound confidence early exit from above (`oracle_early_exit` in the task's details): an oracle that
   stops every position at the shallowest exit whose token is the last layer's, paying that exit's static step
   (`t_exit`: layers 1..k + the full head) and nothing for confidence checks or the skipped layers' KV. No real
   rule can be faster at that agreement; at a lower target agreement a, the oracle spends its (1 - a) share of
   wrong tokens where they save the most (those positions stop at the cheapest exit).

Written by hand: no library measures per-position agreement runs of a model's own sub-models, nor prices our
shared-cache speculation round.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapters.draft_layer import load_draft_layer
from ..adapters.vocab import restricted_head
from ..data import load_examples
from ..errors import SortedError
from ..inference.batch import encode_prompts
from ..inference.costs import cost_table
from ..inference.runtime import Runtime
from ..inference.speculative import Speculative
from .similarity import right_pad

HEADLINE = ("top1_agreement", True)
DEFAULT_DATA = "gsm8k:test"
MAX_NEW_TOKENS = 256  # as the gsm8k task, so `--tasks gsm8k,agreement` generates the last layer's answers once
MAX_DRAFT = 8
ORACLE_AGREEMENT = (1.0, 0.95, 0.9)  # target token agreements the early-exit oracle is priced at
CHUNK = 512  # positions per head call (a [CHUNK, vocab] logits tile)


def prepare(ctx, name: str) -> list[dict]:
    layer = ctx.options.get("draft_layer")
    if layer and not Path(layer).exists():
        raise SortedError(f"draft layer file not found: {layer}")
    rows = load_examples(ctx.data.get(name, DEFAULT_DATA), limit=ctx.limit)
    if not rows:
        raise SortedError(f"the agreement task's data ({ctx.data.get(name, DEFAULT_DATA)}) has no prompts")
    return rows


def accepted_tokens(runs: list[list[bool]], max_draft: int = MAX_DRAFT) -> list[float | None]:
    """Expected accepted drafts per cycle for g = 1..max_draft: the mean over every start position j of every
    sequence of min(g, consecutive agreeing positions from j). `runs[i][j]`: does the draft agree at position j."""
    capped = [0] * max_draft
    starts = 0
    for seq in runs:
        streak = 0
        for ok in reversed(seq):  # run length from each position to the first disagreement (or the end)
            streak = streak + 1 if ok else 0
            starts += 1
            for g in range(1, max_draft + 1):
                capped[g - 1] += min(g, streak)
    return [c / starts if starts else None for c in capped]


def draft_ids(sm, k: int, draft_vocab: int | None) -> torch.Tensor | None:
    """Token ids the self-speculative draft head of exit k can propose (None: the full head)."""
    head = restricted_head(sm, k, draft_vocab)
    return None if head is None else head.ids


@torch.no_grad()
def agreement_runs(sm, prompt_ids: list[list[int]], continuations: list[list[int]], exits: list[int],
                   draft_vocab: int | None = None, batch_size: int = 16, progress: bool = False) -> dict:
    """Teacher-force prompt + continuation (right padding) and, at every continuation position, compare each exit's
    top token with the last layer's. Returns {"top1": {k: [[bool, ...] per sequence]}, "draft": {...}, "greedy":
    fraction of positions where the last layer's teacher-forced top token is the continuation's token}."""
    L = sm.num_layers
    exits = sorted(set(exits) | {L})
    device = next(sm.model.parameters()).device
    pad = sm.tokenizer.pad_token_id if sm.tokenizer.pad_token_id is not None else 0
    subsets = {k: draft_ids(sm, k, draft_vocab) for k in exits}
    top1 = {k: [] for k in exits}
    draft = {k: [] for k in exits}
    same = total = 0
    for start in tqdm(range(0, len(prompt_ids), batch_size), desc="agreement", disable=not progress):
        idx = range(start, min(start + batch_size, len(prompt_ids)))
        b_idx, t_idx, lengths = [], [], []
        for b, i in enumerate(idx):
            n = len(continuations[i])
            b_idx += [b] * n
            t_idx += range(len(prompt_ids[i]) - 1, len(prompt_ids[i]) - 1 + n)  # predicts continuation token j
            lengths.append(n)
        if not b_idx:  # nothing generated in this batch
            for k in exits:
                top1[k] += [[] for _ in idx]
                draft[k] += [[] for _ in idx]
            continue
        ids, mask = right_pad([prompt_ids[i] + continuations[i] for i in idx], pad, device)
        hidden = sm.hidden_at_exits(ids, mask, exits)
        b_t, t_t = torch.tensor(b_idx, dtype=torch.long), torch.tensor(t_idx, dtype=torch.long)
        tops = {}
        for k in exits:
            full, sub = [], []
            for c in range(0, len(b_idx), CHUNK):
                z = sm.exit_logits(hidden[k][b_t[c:c + CHUNK], t_t[c:c + CHUNK]], k)
                full.append(z.argmax(-1))
                s = subsets[k]
                sub.append(full[-1] if s is None else s[z[:, s].argmax(-1)])
            tops[k] = (torch.cat(full).cpu(), torch.cat(sub).cpu())
        ref = tops[L][0]
        target = torch.tensor([t for i in idx for t in continuations[i]], dtype=torch.long)
        same += int((ref == target).sum())
        total += len(target)
        for k in exits:
            for name, top, out in (("top1", tops[k][0], top1), ("draft", tops[k][1], draft)):
                agree = (top == ref).tolist()
                at = 0
                for n in lengths:
                    out[k].append(agree[at:at + n])
                    at += n
    return {"top1": top1, "draft": draft, "greedy": same / total if total else None}


@torch.no_grad()
def draft_layer_runs(sm, draft, prompt_ids: list[list[int]], continuations: list[list[int]],
                     progress: bool = False) -> list[list[bool]]:
    """Per generated position: the trained draft layer's token is the last layer's (one unpadded sequence at a
    time, teacher-forced as `agreement_runs` does)."""
    arch, L, s = sm.arch, sm.num_layers, draft.shared
    device = next(sm.model.parameters()).device
    runs = []
    for p, c in tqdm(list(zip(prompt_ids, continuations)), desc="agreement draft layer", disable=not progress):
        if not c:
            runs.append([])
            continue
        ids = torch.tensor([p + c], device=device)
        h = arch.run_layers(arch.embed(ids), 0, s)
        at = torch.arange(len(p) - 1, len(p) - 1 + len(c), device=device)
        ref = sm.exit_logits(arch.run_layers(h, s, L)[0, at], L).argmax(-1)
        top = draft.head.ids[draft.logits(arch, draft.hidden(arch, h)[0, at]).argmax(-1)]
        runs.append((top == ref).cpu().tolist())
    return runs


def measure_draft_layer(sm, draft, prompt_ids, continuations, dtype: str = "auto", progress: bool = False) -> dict:
    """The agreement task's metrics for a trained draft layer (inference/draft_layer.py), priced as its
    self-speculation round costs: g x (layers 1..s + its own + its head) + a feed + verify(g) on layers s+1..L."""
    runs = draft_layer_runs(sm, draft, prompt_ids, continuations, progress)
    cost = step_costs(sm, [], draft=draft, dtype=dtype)
    accepted = accepted_tokens(runs)
    t_verify = [cost[("verify", draft.shared, g)] for g in range(1, MAX_DRAFT + 1)]
    sp = speedups(accepted, cost[("full",)], cost[("draft", "layer")], cost[("feed", "layer")], t_verify)
    best = best_length(sp)
    flat = [a for seq in runs for a in seq]
    return {"exit": draft.exit, "shared": draft.shared, "own_layers": len(draft.layers), "vocab": len(draft.head.ids),
            "top1_agreement": sum(flat) / len(flat) if flat else None, "positions": len(flat),
            "accepted_by_draft_length": accepted, "speedup_by_draft_length": sp,
            "best_draft_length": best + 1 if sp[best] is not None else None, "best_speedup": sp[best],
            "t_draft_ms": 1e3 * cost[("draft", "layer")], "t_feed_ms": 1e3 * cost[("feed", "layer")],
            "t_full_ms": 1e3 * cost[("full",)], "t_verify_ms_by_draft_length": [1e3 * t for t in t_verify]}


def step_costs(sm, exits: list[int], draft_vocab: int | None = None, draft=None, dtype: str = "auto") -> dict:
    """Seconds of the pieces of a self-speculative round at each draft exit and of a plain full-model step (module
    doc, step 4), from the decode runtime's cost table. With a trained `draft` layer also its ("draft", "layer") and
    ("feed", "layer") steps (layers 1..s + its own layers) and ("verify", s, g)."""
    rt = Runtime.of(sm, dtype)
    L = sm.num_layers
    vocab = sm.draft_vocab[:draft_vocab] if draft_vocab and sm.draft_vocab is not None else None
    costs = cost_table(rt, vocab)
    subset = vocab is not None
    out = {("full",): costs.step(L, 1)}
    for k in exits:
        if k >= L:
            continue
        out[("draft", k)] = costs.forward(k, 1) + costs.read(1, subset=subset)
        out[("feed", k)] = costs.forward(k, 1)
        out[("exit", k)] = costs.forward(k, 1) + costs.read(1)
        for g in range(1, MAX_DRAFT + 1):
            out[("verify", k, g)] = costs.forward(L - k, g + 1) + costs.read(g + 1)
    if draft is not None:
        s, own = draft.shared, len(draft.layers)
        out[("feed", "layer")] = costs.forward(s + own, 1)
        out[("draft", "layer")] = out[("feed", "layer")] + costs.read(1, subset=True)
        for g in range(1, MAX_DRAFT + 1):
            out[("verify", s, g)] = costs.forward(L - s, g + 1) + costs.read(g + 1)
    return out


def typical_context(prompt_ids: list[list[int]], continuations: list[list[int]]) -> list[int]:
    """Steps are timed at a typical context: the median-length prompt + answer."""
    lengths = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]) + len(continuations[i]))
    mid = lengths[len(lengths) // 2]
    return prompt_ids[mid] + continuations[mid]


def best_length(sp: list[float | None]) -> int:
    """Index of the best predicted speedup (a None, where nothing was accepted, never wins)."""
    return max(range(len(sp)), key=lambda i: sp[i] if sp[i] is not None else -1.0)


def speedups(accepted: list[float | None], t_full: float, t_draft: float, t_feed: float,
             t_verify: list[float]) -> list[float | None]:
    """Predicted speedup over plain greedy for g = 1..len(t_verify): tokens per round x plain step cost / round cost."""
    return [None if a is None else (a + 1) * t_full / (g * t_draft + t_feed + t_verify[g - 1])
            for g, a in enumerate(accepted, start=1)]


def oracle_early_exit(top1: dict[int, list[list[bool]]], exit_ms: dict[int, float],
                      targets=ORACLE_AGREEMENT) -> list[dict]:
    """Upper bound for per-token early exit on these runs (module docstring, step 5). `top1[k][i][j]`: exit k's token
    is the last layer's at position j of answer i (the last exit always is); `exit_ms[k]`: static step cost of exit
    k, the last exit's being the plain step. One row per target agreement: mean exit layer, speedup over plain."""
    exits = sorted(exit_ms)
    L = exits[-1]
    cheapest = min(exits, key=lambda k: exit_ms[k])
    right = [next(k for k in exits if k == L or top1[k][i][j])  # the shallowest exit that gets position j right
             for i in range(len(top1[L])) for j in range(len(top1[L][i]))]
    if not right:
        return []
    gain = sorted(right, key=lambda k: exit_ms[k], reverse=True)  # most to save by stopping at `cheapest` first
    rows = []
    for a in targets:
        wrong = int((1 - a) * len(right) + 1e-9)
        stops = [cheapest] * wrong + gain[wrong:]
        rows.append({"agreement": a, "mean_exit": sum(stops) / len(stops),
                     "speedup": len(stops) * exit_ms[L] / sum(exit_ms[k] for k in stops)})
    return rows


def measure_model(sm, prompt_ids: list[list[int]], continuations: list[list[int]], exits: list[int], *,
                  draft_vocab: int | None, batch_size: int, dtype: str = "auto",
                  progress: bool = False) -> tuple[dict, dict, list[dict]]:
    """Per-exit metrics ({exit: {...}}), the model's timing details and its early-exit oracle rows."""
    L = sm.num_layers
    runs = agreement_runs(sm, prompt_ids, continuations, exits, draft_vocab=draft_vocab, batch_size=batch_size,
                          progress=progress)
    context = typical_context(prompt_ids, continuations)
    cost = step_costs(sm, exits, draft_vocab=draft_vocab, dtype=dtype)
    t_full = cost[("full",)]
    out = {}
    for k in exits:
        flat = [a for seq in runs["top1"][k] for a in seq]
        flat_d = [a for seq in runs["draft"][k] for a in seq]
        accepted = accepted_tokens(runs["draft"][k])
        m = {"top1_agreement": sum(flat) / len(flat) if flat else None,
             "draft_agreement": sum(flat_d) / len(flat_d) if flat_d else None,
             "positions": len(flat),
             "accepted_by_draft_length": accepted}
        if k < L:
            t_verify = [cost[("verify", k, g)] for g in range(1, MAX_DRAFT + 1)]
            sp = speedups(accepted, t_full, cost[("draft", k)], cost[("feed", k)], t_verify)
            best = best_length(sp)
            m.update(speedup_by_draft_length=sp, best_draft_length=best + 1 if sp[best] is not None else None,
                     best_speedup=sp[best], t_draft_ms=1e3 * cost[("draft", k)], t_feed_ms=1e3 * cost[("feed", k)],
                     t_verify_ms_by_draft_length=[1e3 * t for t in t_verify], t_exit_ms=1e3 * cost[("exit", k)])
        else:  # the last layer verifies; it is no draft
            m.update(speedup_by_draft_length=None, best_draft_length=None, best_speedup=None)
        out[k] = m
    timing = {"t_full_ms": 1e3 * t_full, "context_tokens": len(context), "rounds": None,
              "teacher_forced_matches_generation": runs["greedy"]}
    exit_ms = {k: 1e3 * cost[("exit", k)] for k in exits if k < L} | {L: 1e3 * t_full}
    return out, timing, oracle_early_exit(runs["top1"], exit_ms)


def run(ctx, name: str, rows: list[dict]) -> dict:
    n_new = ctx.new_tokens(MAX_NEW_TOKENS)
    dtype = ctx.options.get("dtype", "auto")
    draft_vocab = ctx.options.get("draft_vocab", Speculative.draft_vocab)
    prompts = [r["prompt"] for r in rows]
    out, timing, oracle = {}, {}, {}
    for model, exits in ctx.exits.items():
        sm = ctx.models[model]
        gens = ctx.generate(model, sm.num_layers, prompts, n_new, name)
        ctx.record(name, model, sm.num_layers, rows, gens)
        out[model], timing[model], oracle[model] = measure_model(
            sm, encode_prompts(sm, prompts), [g.token_ids for g in gens], exits, draft_vocab=draft_vocab,
            batch_size=ctx.batch_size, dtype=dtype, progress=ctx.progress)
    layers = {}
    if ctx.options.get("draft_layer"):  # a trained draft layer of the first model, measured the same way
        model = next(iter(ctx.exits))
        sm = ctx.models[model]
        gens = ctx.generate(model, sm.num_layers, prompts, n_new, name)
        draft = load_draft_layer(ctx.options["draft_layer"], sm)
        layers[model] = {"file": str(ctx.options["draft_layer"]), **measure_draft_layer(
            sm, draft, encode_prompts(sm, prompts), [g.token_ids for g in gens], dtype, ctx.progress)}
    ctx.details[name] = {"data": ctx.data.get(name, DEFAULT_DATA), "n_prompts": len(rows), "max_new_tokens": n_new,
                         "draft_layer": layers,
                         "draft_lengths": list(range(1, MAX_DRAFT + 1)), "draft_vocab": draft_vocab,
                         "reference": "last layer of the same model, teacher-forced on its own greedy answers",
                         "clock": "the decode runtime's cost table (inference/costs.py), batch of one",
                         "torch_threads": torch.get_num_threads(), "timing": timing, "oracle_early_exit": oracle}
    return out
