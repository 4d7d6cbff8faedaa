"""`generate`: one entry point for every decoding strategy, for many prompts, in left-padded batches.

    generate(sm, prompts)                                   full model (greedy, or sampling with temperature > 0)
    generate(sm, prompts, Static(12))                       static depth: the first 12 layers only
    generate(sm, prompts, Speculative(9))                   exact full-model output, drafted by exit 9
    generate(sm, prompts, EarlyExit())                      per-token confidence early exit (paper thresholds)
    generate(sm, prompts, Static(12), GenerationOptions(max_new_tokens=64, temperature=0.7, dtype="float32"))

A strategy is an object with `check(sm)` (validate it against the model) and `decode(rt, batch, sampling) -> stats`
(decode every row of a batch to the end on the runtime `rt`); static.py, speculative.py and early_exit.py hold one
each.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from ..errors import SortedError
from .batch import Batch, context_length, encode_prompts, stop_ids
from .runtime import Runtime
from .sampling import Sampling
from .static import Static


@dataclass
class GenerationOptions:
    """How much to generate and how: reply length, batch size, sampling (temperature 0 = greedy), the runtime's
    dtype (`auto`: bfloat16 where the CPU has bfloat16 instructions), a progress bar."""

    max_new_tokens: int = 128
    batch_size: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    dtype: str = "auto"
    progress: bool = False
    desc: str = "generate"

    def check(self) -> "GenerationOptions":
        if self.max_new_tokens < 0:
            raise SortedError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise SortedError(f"batch_size must be >= 1, got {self.batch_size}")
        return self


@dataclass
class Generation:
    """One reply. `finish_reason`: "stop" (a stop token, kept as the last id), "length" (`max_new_tokens`) or
    "context" (the prompt and reply filled the model's context)."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    stats: dict = field(default_factory=dict)
    finish_reason: str = "length"


def generate(sm, prompts, strategy=None, options: GenerationOptions | None = None, **overrides) -> list[Generation]:
    """A reply for each prompt (a string, chat messages or token ids), with `strategy` (default: the full model).
    `overrides` set `GenerationOptions` fields (`generate(sm, prompts, max_new_tokens=32)`). Prompts are batched by
    length; each `Generation.stats` holds the strategy's counters for its batch and the batch's wall time.

    Edge cases: an empty prompt still gets the chat template (or starts from BOS); `max_new_tokens=0` returns empty
    replies without running the model; a prompt longer than the model's context (`max_position_embeddings`) is a
    `SortedError` naming it, and a prompt that fits gets at most the room left (prompt + reply <= context; a
    prompt that fills the context exactly gets an empty reply), with `finish_reason` "context"."""
    options = _options(options, overrides)
    strategy = (strategy or Static()).check(sm)
    encoded = encode_prompts(sm, prompts)
    context = context_length(sm)
    room = [min(options.max_new_tokens, context - len(ids)) if context else options.max_new_tokens for ids in encoded]
    results: list[Generation | None] = [None] * len(encoded)
    for i, r in enumerate(room):  # nothing to generate: no model call
        if r == 0:
            results[i] = Generation("", [], len(encoded[i]), {"strategy": strategy.name, "batch": None,
                                                               "batch_size": 0},
                                    "length" if options.max_new_tokens == 0 else "context")
    order = sorted((i for i in range(len(encoded)) if room[i]), key=lambda i: -len(encoded[i]))
    if not order:
        return results
    rt = Runtime.of(sm, options.dtype)
    sampling = Sampling(options.temperature, options.top_p, options.top_k, options.seed).start(rt.device)
    stop = stop_ids(sm)
    bar = tqdm(total=len(encoded), desc=options.desc, disable=not options.progress)
    bar.update(len(encoded) - len(order))
    for n, start in enumerate(range(0, len(order), options.batch_size)):
        idx = order[start:start + options.batch_size]
        batch = Batch(rt, [encoded[i] for i in idx], [room[i] for i in idx], stop, spare=strategy.spare)
        t0 = time.perf_counter()
        stats = {"strategy": strategy.name, "batch": n, "batch_size": len(idx), **strategy.decode(rt, batch, sampling)}
        stats["batch_seconds"] = time.perf_counter() - t0
        stats["batch_new_tokens"] = sum(len(o) for o in batch.out)
        per_row = stats.pop("per_row", {})
        for j, (i, toks) in enumerate(zip(idx, batch.out)):
            results[i] = _generation(sm, toks, len(encoded[i]), {**stats, **{k: v[j] for k, v in per_row.items()}},
                                     stop, options.max_new_tokens)
        bar.update(len(idx))
    bar.close()
    return results


def _options(options: GenerationOptions | None, overrides: dict) -> GenerationOptions:
    options = options or GenerationOptions()
    old = sorted(set(overrides) & {"exit_layer", "speculative", "early_exit"})
    if old:
        raise SortedError(f"generate() takes the strategy as an object now: Static(k), Speculative(k) or EarlyExit(...) "
                          f"in place of {old[0]}= (e.g. generate(sm, prompts, Static(12)))")
    unknown = sorted(set(overrides) - set(GenerationOptions.__dataclass_fields__))
    if unknown:
        raise SortedError(f"generate() got an unknown option '{unknown[0]}'; options are the fields of "
                          f"GenerationOptions: {', '.join(GenerationOptions.__dataclass_fields__)}")
    if overrides:
        options = GenerationOptions(**{**options.__dict__, **overrides})
    return options.check()


def _generation(sm, toks: list[int], prompt_tokens: int, stats: dict, stop: set[int], limit: int) -> Generation:
    reason = "stop" if toks and toks[-1] in stop else "length" if len(toks) >= limit else "context"
    text_toks = [t for t in toks if t not in stop]
    text = sm.tokenizer.decode(text_toks, skip_special_tokens=True) if sm.tokenizer is not None else ""
    return Generation(text, toks, prompt_tokens, stats, reason)


def summary(generations: list[Generation]) -> dict:
    """Totals over a `generate` call: new tokens, seconds (each batch counted once), tokens/s and, for the
    dynamic strategies, draft acceptance or the mean exit layer."""
    batches = {}
    for g in generations:
        batches.setdefault(g.stats.get("batch"), g.stats)
    tokens = sum(len(g.token_ids) for g in generations)
    seconds = sum(s.get("batch_seconds", 0.0) for s in batches.values())
    out = {"prompts": len(generations), "new_tokens": tokens, "seconds": seconds,
           "tokens_per_s": tokens / seconds if seconds else 0.0}
    if any("drafted" in s for s in batches.values()):
        for key in ("drafted", "accepted", "rounds", "emitted", "plain_rounds"):
            out[key] = sum(s.get(key, 0) for s in batches.values())
        out["acceptance"] = out["accepted"] / out["drafted"] if out["drafted"] else 0.0
        out["tokens_per_round"] = out["emitted"] / max(out["rounds"], 1)
    exits = [e for g in generations for e in g.stats.get("exit_layers", [])]
    if exits:
        out["mean_exit"] = sum(exits) / len(exits)
    return out
