"""`generate`: one entry point for every decoding strategy, for many prompts, in left-padded batches.

    generate(sm, prompts)                          full model (plain greedy, or sampling with temperature > 0)
    generate(sm, prompts, exit_layer=12)           static depth: the first 12 layers only
    generate(sm, prompts, speculative=9)           self-speculative: draft with exit 9, verify with the full model
    generate(sm, prompts, early_exit=True)         per-token confidence early exit (paper thresholds)

`speculative` and `early_exit` also take a `Speculative` / `EarlyExit` object for the finer options.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from ..errors import SortedError
from .sampling import Sampling


@dataclass
class Generation:
    """One reply. `finish_reason`: "stop" (a stop token, kept as the last id), "length" (`max_new_tokens`) or
    "context" (the prompt and reply filled the model's context)."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    stats: dict = field(default_factory=dict)
    finish_reason: str = "length"


def _strategy(sm, exit_layer, speculative, early_exit):
    from .early_exit import EarlyExit
    from .speculative import Speculative

    # `is not None`, not truthiness: exit 0 or draft exit 0 is an out-of-range layer, not "use the full model".
    speculative = None if speculative is False else speculative
    early_exit = None if early_exit is False else early_exit
    chosen = [name for name, v in (("exit_layer", exit_layer), ("speculative", speculative),
                                   ("early_exit", early_exit)) if v is not None]
    if len(chosen) > 1:
        raise SortedError(f"choose one decoding strategy, got {' and '.join(chosen)} (static exit, speculative "
                          "or early exit)")
    if speculative is not None:
        spec = speculative if isinstance(speculative, Speculative) else Speculative(draft_exit=int(speculative))
        spec.check(sm)
        return "speculative", spec
    if early_exit is not None:
        ee = early_exit if isinstance(early_exit, EarlyExit) else EarlyExit()
        ee.check(sm)
        return "early_exit", ee
    if exit_layer is None:
        return "static", sm.num_layers
    k = int(exit_layer)
    if not 1 <= k <= sm.num_layers:
        raise SortedError(f"exit layer {k} is out of range: this model has layers 1..{sm.num_layers}")
    sm.check_exits([k])  # a trained checkpoint decodes at its own exits only (ICT: no head elsewhere)
    return "static", k


def generate(sm, prompts, *, exit_layer: int | None = None, speculative=None, early_exit=None,
             max_new_tokens: int = 128, batch_size: int = 16, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, seed: int | None = None, progress: bool = False,
             desc: str = "generate") -> list[Generation]:
    """Generate a reply for each prompt (a string, chat messages or token ids). Prompts are batched by length;
    each `Generation.stats` holds the strategy's counters for its batch and the batch's wall time.

    Edge cases: an empty prompt still gets the chat template (or starts from BOS); `max_new_tokens=0` returns empty
    replies without running the model; a prompt longer than the model's context (`max_position_embeddings`) is a
    `SortedError` naming it, and a prompt that fits gets at most the room left (prompt + reply <= context; a
    prompt that fills the context exactly gets an empty reply), with `finish_reason` "context"."""
    from .batch import Batch, context_length, encode_prompts, stop_ids

    if max_new_tokens < 0:
        raise SortedError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if batch_size < 1:
        raise SortedError(f"batch_size must be >= 1, got {batch_size}")
    kind, how = _strategy(sm, exit_layer, speculative, early_exit)
    sampling = Sampling(temperature, top_p, top_k, seed)
    encoded = encode_prompts(sm, prompts)
    stop = stop_ids(sm.tokenizer, sm.model)
    context = context_length(sm)
    room = [min(max_new_tokens, context - len(ids)) if context else max_new_tokens for ids in encoded]
    results: list[Generation | None] = [None] * len(encoded)
    for i, r in enumerate(room):  # nothing to generate: no model call
        if r == 0:
            results[i] = Generation("", [], len(encoded[i]), {"strategy": kind, "batch": None, "batch_size": 0},
                                    "length" if max_new_tokens == 0 else "context")
    order = sorted((i for i in range(len(encoded)) if room[i]), key=lambda i: -len(encoded[i]))
    bar = tqdm(total=len(encoded), desc=desc, disable=not progress)
    bar.update(len(encoded) - len(order))
    sampling.start(next(sm.model.parameters()).device)
    for n, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start:start + batch_size]
        batch = Batch(sm, [encoded[i] for i in idx], max_new_tokens, stop, rollback=kind == "speculative",
                      limits=[room[i] for i in idx])
        stats = {"strategy": kind, "batch": n, "batch_size": len(idx)}
        t0 = time.perf_counter()
        run(sm, batch, kind, how, sampling, stats)
        stats["batch_seconds"] = time.perf_counter() - t0
        stats["batch_new_tokens"] = sum(len(o) for o in batch.out)
        per_row = stats.pop("per_row", {})
        for j, (i, toks) in enumerate(zip(idx, batch.out)):
            text_toks = [t for t in toks if t not in stop]
            row_stats = {**stats, **{key: v[j] for key, v in per_row.items()}}
            reason = "stop" if toks and toks[-1] in stop else "length" if len(toks) >= max_new_tokens else "context"
            text = sm.tokenizer.decode(text_toks, skip_special_tokens=True) if sm.tokenizer is not None else ""
            results[i] = Generation(text, toks, len(encoded[i]), row_stats, reason)
        bar.update(len(idx))
    bar.close()
    return results


def run(sm, batch, kind, how, sampling, stats) -> None:
    if kind == "static":
        from .static import decode_static

        decode_static(sm, batch, how, sampling, stats)
    elif kind == "speculative":
        from .speculative import decode_speculative

        decode_speculative(sm, batch, how, sampling, stats)
    else:
        from .early_exit import decode_early_exit

        decode_early_exit(sm, batch, how, sampling, stats)


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
