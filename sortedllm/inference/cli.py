"""`sortedllm generate`: replies on stdout (text, or one JSON line per prompt with --jsonl), tokens/s on stderr.

    sortedllm generate --model runs/quickstart/final --prompt "What is 7*6?"             # full model
    sortedllm generate --model M --prompt "..." --exit 12                               # first 12 layers
    sortedllm generate --model M --prompts_file prompts.txt --speculative 9 --jsonl     # exact, drafted by exit 9
    sortedllm generate --model M --prompt "..." --speculative 9 --draft_layer D/draft_layer.safetensors  # trained
    sortedllm generate --model M --prompt "..." --early-exit [--calibrate gsm8k]        # per-token exit
    sortedllm generate --model M --prompt "..." --dtype float32                          # float32 weights
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ..checkpoint import writable_folder
from ..config import ArgumentParser
from ..data import from_row, load_examples, read_jsonl
from ..errors import SortedError
from ..exits import SortedModel
from ..models import DEFAULT_MODEL
from .calibrate import Calibration, calibrate
from .early_exit import EarlyExit
from .generate import GenerationOptions, generate, summary
from .speculative import Speculative
from .static import Static


def read_prompts(path: str) -> list:
    """Prompts from a file: JSONL rows (`prompt` text or messages, or any row shape the data loader knows) or
    plain text with one prompt per line."""
    p = Path(path)
    if not p.is_file():
        raise SortedError(f"prompts file not found: {path}")
    try:
        if p.suffix == ".jsonl":
            prompts = [_row_prompt(r) for r in read_jsonl(p)]
        else:
            prompts = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise SortedError(f"prompts file {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as "
                          "UTF-8") from None
    if not prompts:
        raise SortedError(f"prompts file {path} has no prompts")
    return prompts


def _row_prompt(row: dict):
    """The prompt of one JSONL row: `prompt` (text or messages), `messages` (a conversation to continue: a final
    assistant turn is dropped, the reply is what we generate), or any row shape the data loader knows."""
    where = row.get("_where", "row")
    msgs = row.get("messages")
    if "prompt" in row:
        prompt = row["prompt"]
    elif isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") != "assistant":
        prompt = msgs  # from_row wants a final assistant turn to train on; here the reply is ours to generate
    else:
        prompt = from_row(row)["prompt"]
    text = isinstance(prompt, str)
    chat = isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m and
                                                      isinstance(m.get("content"), str) for m in prompt)
    if not (text or chat):
        raise SortedError(f"{where}: 'prompt' must be text or a non-empty list of {{role, content}} messages, got "
                          f"{type(prompt).__name__}")
    return prompt


def parse_thresholds(text: str) -> dict[int, float]:
    try:
        pairs = [p.split(":") for p in text.replace(" ", "").split(",") if p]
        return {int(k): float(v) for k, v in pairs}
    except ValueError:
        raise SortedError(f"--thresholds '{text}' not understood: give exit:threshold pairs like 9:0.95,15:0.9 "
                          "or a JSON file written by --save_thresholds")


def build_parser():
    p = ArgumentParser(prog="sortedllm generate", description="Generate with a static exit, self-speculative "
                       "decoding or confidence early exit. Text on stdout, tokens/s on stderr.")
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint folder, hub id, .gguf or alias")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompts_file", help="prompts: .jsonl rows with 'prompt', or text with one prompt per line")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--exit", type=int, dest="exit_layer", help="static depth: decode with the first K layers")
    mode.add_argument("--speculative", type=int, metavar="K", help="self-speculative decoding drafted by exit K")
    mode.add_argument("--early-exit", "--early_exit", action="store_true", dest="early_exit",
                      help="per-token confidence early exit")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--seed", type=int)
    g = p.add_argument_group("speculative")
    g.add_argument("--draft_tokens", type=int, default=4, help="initial draft length")
    g.add_argument("--max_draft_tokens", type=int, default=16)
    g.add_argument("--fixed_draft", action="store_true", help="keep the draft length fixed (no adaptation)")
    g.add_argument("--draft_vocab", type=int, default=8192, help="draft head restricted to the N most frequent "
                   "tokens (0 = full head)")
    g.add_argument("--draft_confidence", type=float, default=0.0, help="stop a draft below this confidence")
    g.add_argument("--draft_layer", metavar="FILE", help="draft with a trained draft layer (draft_layer.safetensors "
                   "from `sortedllm train --mode draft`); K must be its exit")
    e = p.add_argument_group("early exit")
    e.add_argument("--exits", help="candidate exits, e.g. 9,15,21 (default: the checkpoint's exits)")
    e.add_argument("--thresholds", help="exit:threshold pairs (9:0.95,15:0.9) or a JSON file from "
                   "--save_thresholds (default: the paper's by relative depth)")
    e.add_argument("--measure", default="max_prob", help="max_prob, margin, entropy or saturation")
    e.add_argument("--screen", type=int, default=8192, help="max_prob screen vocabulary (0 = full head always)")
    e.add_argument("--calibrate", metavar="DATA", help="pick thresholds on this data first (e.g. gsm8k:train)")
    e.add_argument("--calibrate_limit", type=int, default=32, help="calibration prompts")
    e.add_argument("--target_agreement", type=float, default=0.95)
    e.add_argument("--target_speedup", type=float)
    e.add_argument("--save_thresholds", help="write the thresholds used to this JSON file")
    p.add_argument("--jsonl", action="store_true", help="one JSON object per prompt on stdout")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 where the CPU has bfloat16 instructions, else "
                   "float32), bfloat16 or float32: the weights decoding runs with")
    p.add_argument("--threads", type=int, help="torch CPU threads (one is often fastest on a busy machine)")
    p.add_argument("--trust_remote_code", action="store_true")
    return p


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    prompts = check_arguments(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    sm = SortedModel.from_pretrained(a.model, dtype=a.dtype, trust_remote_code=a.trust_remote_code)
    gens = generate(sm, prompts, strategy_of(sm, a), GenerationOptions(
        max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, temperature=a.temperature, top_p=a.top_p,
        top_k=a.top_k, seed=a.seed, dtype=a.dtype))
    for i, (prompt, g) in enumerate(zip(prompts, gens)):
        if a.jsonl:
            row = {"prompt": prompt, "text": g.text, "new_tokens": len(g.token_ids), "finish_reason": g.finish_reason}
            if "exit_layers" in g.stats:
                row["mean_exit"] = sum(g.stats["exit_layers"]) / max(len(g.stats["exit_layers"]), 1)
            print(json.dumps(row, ensure_ascii=False), flush=True)
        else:
            print(("\n" if i else "") + g.text, flush=True)
    s = summary(gens)
    extra = ""
    if "acceptance" in s:
        extra = f", draft acceptance {s['acceptance']:.1%}, {s['tokens_per_round']:.2f} tokens/round"
    if "mean_exit" in s:
        extra = f", mean exit layer {s['mean_exit']:.1f} of {sm.num_layers}"
    print(f"{s['new_tokens']} tokens in {s['seconds']:.2f} s: {s['tokens_per_s']:.1f} tokens/s{extra}",
          file=sys.stderr)
    return 0


def check_arguments(a) -> list:
    """The prompts, after every check that needs no model (so bad input fails before loading)."""
    prompts = list(a.prompt) + (read_prompts(a.prompts_file) if a.prompts_file else [])
    if not prompts:
        raise SortedError("no prompt given: pass --prompt TEXT or --prompts_file FILE")
    early_only = [f for f, v in (("--calibrate", a.calibrate), ("--thresholds", a.thresholds),
                                 ("--save_thresholds", a.save_thresholds)) if v]
    if early_only and not a.early_exit:
        raise SortedError(f"{early_only[0]} needs --early-exit")
    if a.draft_layer and a.speculative is None:
        raise SortedError("--draft_layer needs --speculative K (K = the draft layer's exit)")
    for flag, value, least in (("--max_new_tokens", a.max_new_tokens, 0), ("--batch_size", a.batch_size, 1)):
        if value < least:
            raise SortedError(f"{flag} must be at least {least} (got {value})")
    if a.dtype not in ("auto", "bfloat16", "float32"):
        raise SortedError(f"unknown dtype '{a.dtype}': use auto, bfloat16 or float32")
    if a.save_thresholds:
        writable_folder(Path(a.save_thresholds).expanduser().absolute().parent, "--save_thresholds")
    return prompts


def strategy_of(sm, a):
    """The decoding strategy the flags ask for (calibrating early-exit thresholds first if asked)."""
    if a.speculative is not None:
        return Speculative(a.speculative, draft_tokens=a.draft_tokens,
                           max_draft_tokens=max(a.max_draft_tokens, a.draft_tokens), adaptive=not a.fixed_draft,
                           draft_vocab=a.draft_vocab or None, draft_confidence=a.draft_confidence,
                           draft_layer=a.draft_layer)
    if not a.early_exit:
        return Static(a.exit_layer)
    screen = a.screen or None
    if a.calibrate:
        rows = load_examples(a.calibrate, a.calibrate_limit)
        ee = calibrate(sm, [r["prompt"] for r in rows], Calibration(
            target_agreement=a.target_agreement, target_speedup=a.target_speedup, exits=a.exits, measure=a.measure,
            screen=screen, batch_size=a.batch_size, dtype=a.dtype))
        c = ee.calibration
        print(f"calibrated on {c['prompts']} prompts ({c['tokens']} tokens): agreement {c['agreement']:.1%}, "
              f"estimated speedup {c['estimated_speedup']:.2f}x; thresholds "
              + ",".join(f"{k}:{v:g}" for k, v in ee.thresholds.items()), file=sys.stderr)
    elif a.thresholds and Path(a.thresholds).suffix == ".json":
        ee = EarlyExit.load(a.thresholds)
    else:
        ee = EarlyExit(exits=a.exits, measure=a.measure, screen=screen,
                       thresholds=parse_thresholds(a.thresholds) if a.thresholds else {})
    ee.check(sm)
    if a.save_thresholds:
        ee.save(a.save_thresholds)
    return ee
