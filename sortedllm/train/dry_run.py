"""`sortedllm train --dry-run`: what a run will cost, before any weight is downloaded or any GPU is booked.

The model is built on the meta device from its config alone (shapes, no storage), the exits are checked against
it, and three things are printed: the parameter count, the memory per GPU under each engine (DDP, FSDP, DeepSpeed
ZeRO-2/3) for the run's batch, precision and GPU count, and the FLOPs of one optimizer step for SoFT vs SFT.

These are estimates from counting, not measurements: model states from bytes per parameter (the ZeRO paper's
accounting), activations from the tensors autograd keeps for a pre-norm attention + gated-MLP decoder layer with
fused (SDPA/flash) attention, FLOPs from 2 per multiply-add (6 per parameter per token for training). Buffers of
the engines themselves (DDP buckets, NCCL, allocator fragmentation) are not included: leave ~10-20% headroom.
`Counts` + `step_flops` work on any model (meta or real), for benchmarks that need the same FLOP model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SortedError
from ..exits import resolve_exits
from ..models import ALIASES, DTYPES, Architecture, resolve_folder
from .chunked import TILE_ELEMENTS
from .schedules import make_schedule

GiB = 1024**3

# Published config.json shapes of the paper's model family, so the dry run needs neither the network nor access
# to the gated repositories. Anything else is read with AutoConfig (local folder, config.json, hub id).
_LLAMA2 = dict(model_type="llama", vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
               hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
PUBLISHED_CONFIGS = {
    "meta-llama/Llama-2-7b-hf": dict(_LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=32),
    "meta-llama/Llama-2-13b-hf": dict(_LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                      num_attention_heads=40, num_key_value_heads=40),
    "meta-llama/Llama-2-70b-hf": dict(_LLAMA2, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                      num_attention_heads=64, num_key_value_heads=8),
}
for _name in list(PUBLISHED_CONFIGS):
    PUBLISHED_CONFIGS[_name.replace("-hf", "-chat-hf")] = PUBLISHED_CONFIGS[_name]

# Engine -> which model states are divided by the number of GPUs: (weights, gradients, optimizer states).
ENGINES = {
    "ddp": ("DDP", (False, False, False)),
    "fsdp": ("FSDP (full shard)", (True, True, True)),
    "zero2": ("DeepSpeed ZeRO-2", (False, True, True)),
    "zero3": ("DeepSpeed ZeRO-3", (True, True, True)),
}


def model_config(spec: str, trust_remote_code: bool = False):
    """(config, where it came from) for a model spec, without loading weights."""
    from transformers import AutoConfig, LlamaConfig

    if spec in PUBLISHED_CONFIGS:
        cfg = dict(PUBLISHED_CONFIGS[spec])
        cfg.pop("model_type")
        return LlamaConfig(**cfg), f"built-in copy of {spec}'s published config.json (nothing downloaded)"
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".json":
        try:
            return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code), str(path)
        except (OSError, ValueError) as e:
            raise SortedError(f"cannot read model config {spec}: {str(e).splitlines()[0]}") from e
    if spec in ALIASES or spec.endswith(".gguf"):
        folder = resolve_folder(spec, trust_remote_code)  # a GGUF is converted once into a cached HF folder
        return AutoConfig.from_pretrained(folder), f"{folder}/config.json"
    try:
        return AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code), spec
    except Exception as e:  # OSError (offline, gated, missing), ValueError (unknown model type)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SortedError(f"cannot read the config of '{spec}' ({first[:160]}); pass --model with a local folder "
                          f"or a config.json file") from e


def meta_model(config, dtype: torch.dtype):
    """The model with every tensor on the meta device: real module structure and shapes, zero bytes."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


@dataclass
class Counts:
    """Parameter counts the estimates need (shared parameters counted once)."""

    total: int
    per_layer: int
    num_layers: int
    embed: int
    head: int  # 0 when tied to the embeddings
    hidden: int
    kv_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, model) -> "Counts":
        arch = Architecture(model)
        cfg = arch.config
        unique = {id(p): p for p in arch.model.parameters()}
        embed = arch.base.embed_tokens.weight
        head = 0 if arch.head.weight is embed else arch.head.weight.numel()
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(total=sum(p.numel() for p in unique.values()),
                   per_layer=sum(p.numel() for p in arch.layers[0].parameters()), num_layers=arch.num_layers,
                   embed=embed.numel(), head=head, hidden=cfg.hidden_size,
                   kv_dim=getattr(cfg, "num_key_value_heads", heads) * head_dim,
                   intermediate=cfg.intermediate_size, vocab=arch.head.weight.shape[0])


def step_flops(counts: Counts, seq_len: int, tokens: int, labelled_tokens: int, exits_per_step: int,
               checkpointing: bool = False) -> dict:
    """FLOPs of one optimizer step: decoder layers over all tokens, the LM head at each exit over labelled tokens.

    Layers: 2 FLOPs per weight per token forward, x3 for forward + backward (x4 when activation checkpointing
    recomputes the forward), plus causal attention scores (QK^T and AV over on average half the sequence). Exits:
    the shared head (h x V) runs once per exit per labelled token, forward + backward = 6 h V; SoFT runs it at
    every exit, SFT at the last only. The embedding lookup costs nothing.
    """
    layers_fwd = tokens * counts.num_layers * (2 * counts.per_layer + 2 * counts.hidden * seq_len)
    layers = layers_fwd * (4 if checkpointing else 3)
    heads = exits_per_step * labelled_tokens * 6 * counts.hidden * counts.vocab
    return {"layers": layers, "heads": heads, "total": layers + heads}


def activation_bytes(counts: Counts, micro_batch: int, seq_len: int, exits_per_step: int, act_bytes: int,
                     checkpointing: bool, label_fraction: float = 1.0) -> dict:
    """Activations one GPU keeps for backward for one micro-batch.

    Per token, a decoder layer keeps: the two RMSNorms' inputs and outputs (4h), rotated q and k, v and the
    attention output for SDPA/o_proj (2h + 2kv), and gate, up, silu(gate), their product for the MLP (4i). With
    checkpointing only each layer's input (h) is kept, plus one layer's full set while it is recomputed. The exits
    go through the tiled linear + cross-entropy (train/chunked.py): per labelled token each exit keeps its normed
    hidden state and an fp32 gradient for it (h each); one tile of logits and the fp32 head gradient are shared by
    all exits. No exit's `[tokens x vocab]` logits are ever held.
    """
    tokens = micro_batch * seq_len
    labelled = tokens * label_fraction
    per_layer = (6 * counts.hidden + 2 * counts.kv_dim + 4 * counts.intermediate) * act_bytes * tokens
    layers = (counts.num_layers * counts.hidden * act_bytes * tokens + per_layer) if checkpointing \
        else counts.num_layers * per_layer
    exits = labelled * exits_per_step * counts.hidden * (act_bytes + 4) \
        + 2 * 4 * TILE_ELEMENTS + 4 * counts.vocab * counts.hidden
    return {"layers": layers, "exits": exits, "total": layers + exits}


def state_bytes(counts: Counts, engine: str, gpus: int, weight_bytes: int, mixed: bool, compute_bytes: int) -> dict:
    """Weights, gradients and optimizer states per GPU (AdamW: two moments per weight).

    DDP/FSDP keep gradients and Adam moments in the weights' dtype (fp32 weights + bf16 autocast = 16 bytes per
    parameter). DeepSpeed with bf16/fp16 keeps 16-bit weights and gradients and an fp32 master copy plus moments
    (2 + 2 + 12 bytes). Sharded engines also hold gathered 16-bit copies of the unit being computed and the next
    one (prefetch) and of the root unit (embeddings, final norm, LM head), which stays gathered from forward to
    backward; SoFT reads that head at every exit at no extra gather.
    """
    sharded = ENGINES[engine][1]
    if engine.startswith("zero") and mixed:
        per_param = (2, 2, 12)
    else:
        per_param = (weight_bytes, weight_bytes, 2 * weight_bytes)
    states = [counts.total * b / (gpus if s else 1) for b, s in zip(per_param, sharded)]
    gathered = 0
    if sharded[0]:
        root = counts.total - counts.num_layers * counts.per_layer
        gathered = (2 * counts.per_layer + root) * compute_bytes
    return {"weights": states[0], "grads": states[1], "optimizer": states[2], "gathered": gathered,
            "total": sum(states) + gathered}


def launch_engine(args) -> tuple[str, str]:
    """The engine this run would use: from --deepspeed/--fsdp or the `accelerate launch` environment."""
    env = os.environ
    if args.deepspeed or env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        ds = args.deepspeed
        if isinstance(ds, str) and Path(ds).is_file():
            ds = json.loads(Path(ds).read_text())
        if isinstance(ds, dict):
            stage = ds.get("zero_optimization", {}).get("stage", stage)
        stage = int(stage) if str(stage) in ("2", "3") else 2
        return f"zero{stage}", "--deepspeed" if args.deepspeed else "accelerate launch config"
    if args.fsdp or env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp", "--fsdp" if args.fsdp else "accelerate launch config"
    return "ddp", "no FSDP/DeepSpeed configured: a plain torchrun / accelerate launch is DDP"


def plan(script, args) -> dict:
    """Everything the dry run prints, as plain data (tests and benchmarks read it)."""
    if script.dtype not in DTYPES:
        raise SortedError(f"unknown dtype '{script.dtype}': use one of {', '.join(DTYPES)}")
    config, config_source = model_config(script.model, args.trust_remote_code)
    model = meta_model(config, DTYPES[script.dtype])
    counts = Counts.of(model)  # Architecture() refuses unsupported model types here
    exits = resolve_exits(args.exits, counts.num_layers)
    trained = exits[-1:] if args.mode == "sft" else exits
    per_step = {m: len(make_schedule(args.exit_schedule if m != "sft" else "uniform", t, args.exit_weights).weights(0))
                for m, t in (("soft", exits), ("sft", exits[-1:]))}

    world = int(os.environ.get("WORLD_SIZE", "1"))
    gpus = script.dry_run_gpus or (world if world > 1 else 8)
    if gpus < 1:
        raise SortedError(f"--dry_run_gpus {gpus}: give a number of GPUs >= 1")
    engine, engine_source = launch_engine(args)
    # On a machine without a GPU the run's precision flags resolve to fp32; plan for the GPU default instead.
    mixed = bool(args.bf16 or args.fp16 or not torch.cuda.is_available())
    weight_bytes = torch.finfo(DTYPES[script.dtype]).bits // 8
    compute_bytes = 2 if mixed else weight_bytes
    checkpointing = bool(args.activation_checkpointing or
                         (isinstance(args.fsdp_config, dict) and args.fsdp_config.get("activation_checkpointing")))

    micro, accum, seq = args.per_device_train_batch_size, args.gradient_accumulation_steps, args.max_length or 1024
    global_batch = micro * accum * gpus
    tokens = global_batch * seq
    memory = {}
    for name in ENGINES:
        states = state_bytes(counts, name, gpus, weight_bytes, mixed, compute_bytes)
        acts = {m: activation_bytes(counts, micro, seq, per_step[m], compute_bytes, checkpointing)
                for m in ("soft", "sft")}
        memory[name] = {**states, "activations": acts[args.mode if args.mode in acts else "soft"]["total"],
                        "activations_sft": acts["sft"]["total"], "activations_soft": acts["soft"]["total"]}
        memory[name]["total"] = states["total"] + memory[name]["activations"]
    flops = {m: step_flops(counts, seq, tokens, tokens, per_step[m], checkpointing) for m in ("soft", "sft")}
    return {
        "model": script.model, "config_source": config_source, "model_type": config.model_type,
        "num_layers": counts.num_layers, "hidden_size": counts.hidden, "vocab_size": counts.vocab,
        "parameters": {"total": counts.total, "per_layer": counts.per_layer, "embeddings": counts.embed,
                       "lm_head": counts.head, "tied": counts.head == 0},
        "exits": exits, "mode": args.mode, "trained_exits": trained, "exits_per_step": per_step,
        "gpus": gpus, "engine": engine, "engine_source": engine_source,
        "batch": {"per_device": micro, "accumulation": accum, "global": global_batch, "max_length": seq,
                  "tokens_per_step": tokens},
        "precision": {"weights": script.dtype, "compute": "bfloat16" if mixed and not args.fp16 else
                      "float16" if args.fp16 else script.dtype, "activation_checkpointing": checkpointing},
        "memory_per_gpu": memory, "flops_per_step": flops,
        "soft_over_sft_flops": flops["soft"]["total"] / flops["sft"]["total"],
    }


def _gib(x: float) -> str:
    return f"{x / GiB:7.1f}"


def _flops(x: float, scale: float) -> str:
    unit = {1e18: "EF", 1e15: "PF", 1e12: "TF", 1e9: "GF"}[scale]
    return f"{x / scale:9.1f} {unit}"


def _scale(x: float) -> float:
    return next((s for s in (1e18, 1e15, 1e12) if x >= 10 * s), 1e9)


def format_plan(p: dict) -> str:
    par, b, pr = p["parameters"], p["batch"], p["precision"]
    head = "tied to the embeddings" if par["tied"] else f"LM head {par['lm_head'] / 1e6:,.1f} M"
    lines = [
        f"dry run: {p['model']} ({p['model_type']}) on the meta device, no weights loaded",
        f"  config       {p['config_source']}",
        f"  parameters   {par['total']:,} ({par['total'] / 1e9:.2f} B): {p['num_layers']} layers x "
        f"{par['per_layer'] / 1e6:,.1f} M, embeddings {par['embeddings'] / 1e6:,.1f} M, {head}",
        f"  exits        {', '.join(map(str, p['exits']))} ({len(p['exits'])} sub-models, mode {p['mode']}; "
        f"{p['exits_per_step']['soft']} exits in the loss per SoFT step)",
        f"  batch        {b['per_device']} per GPU x {b['accumulation']} accumulation x {p['gpus']} GPUs = "
        f"{b['global']} sequences of <= {b['max_length']} tokens ({b['tokens_per_step']:,} tokens per step)",
        f"  precision    weights {pr['weights']}, compute {pr['compute']}, activation checkpointing "
        f"{'on' if pr['activation_checkpointing'] else 'off'}",
        "",
        f"memory per GPU, GiB ({p['gpus']} GPU{'s' * (p['gpus'] != 1)}, AdamW)   weights    grads  optimizer  gathered  activations    total",
    ]
    for name, (label, _) in ENGINES.items():
        m = p["memory_per_gpu"][name]
        mark = "*" if name == p["engine"] else " "
        lines.append(f"{mark} {label:<36}{_gib(m['weights'])}  {_gib(m['grads'])}  {_gib(m['optimizer'])}   "
                     f"{_gib(m['gathered'])}      {_gib(m['activations'])}  {_gib(m['total'])}")
    m = p["memory_per_gpu"][p["engine"]]
    lines += [
        f"  * this run's engine ({p['engine_source']}); others: accelerate launch --config_file "
        f"configs/accelerate/<ddp|fsdp|deepspeed-zero2|deepspeed-zero3>.yaml",
        f"  SoFT vs SFT activations: {m['activations_soft'] / GiB:.1f} vs {m['activations_sft'] / GiB:.1f} GiB "
        f"(each exit keeps its normed hidden state and its gradient per labelled token; the head runs in tiles, "
        f"so no exit's logits are held; upper bound: every token labelled)",
        "",
        "FLOPs per optimizer step             SFT          SoFT",
    ]
    sft, soft = p["flops_per_step"]["sft"], p["flops_per_step"]["soft"]
    s = _scale(sft["total"])
    lines += [
        f"  decoder layers              {_flops(sft['layers'], s)}  {_flops(soft['layers'], s)}",
        f"  LM head at the exits        {_flops(sft['heads'], s)}  {_flops(soft['heads'], s)}",
        f"  total                       {_flops(sft['total'], s)}  {_flops(soft['total'], s)}   "
        f"SoFT/SFT = {p['soft_over_sft_flops']:.3f}",
    ]
    return "\n".join(lines)


def dry_run(script, args) -> dict:
    p = plan(script, args)
    print(format_plan(p))
    return p
