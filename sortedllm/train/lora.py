"""LoRA for SoFT and SFT: the `--lora r=16,alpha=32,targets=q_proj,v_proj` option, and merging an adapter.

Everything LoRA is peft's: `LoraConfig` (TRL's SFTTrainer applies it with `get_peft_model`), the adapter folder
(`adapter_config.json` + `adapter_model.safetensors`, written by `PeftModel.save_pretrained`), loading it back with
`AutoPeftModelForCausalLM.from_pretrained` (what `load_model` does for a folder with only an adapter) and
`merge_and_unload`. This module parses the option, checks target names against the model and merges.

    python -m sortedllm.train.lora --model runs/lora/final --out runs/lora/merged
"""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from ..errors import SortedError

DEFAULTS = {"r": 16, "alpha": 32, "dropout": 0.05, "targets": "all-linear"}
ALL_LINEAR = "all-linear"  # peft's shorthand: every linear layer except the output head


def parse_lora(spec) -> dict | None:
    """`r=16,alpha=32,targets=q_proj,v_proj` (a key without '=' continues the previous key's list), a YAML mapping
    `{r: 16, alpha: 32, targets: [q_proj, v_proj]}`, or `true` for the defaults. None/''/'none'/false: no LoRA."""
    if spec is None or spec is False or (isinstance(spec, str) and spec.strip().lower() in ("", "none", "false")):
        return None
    if spec is True or (isinstance(spec, str) and spec.strip().lower() == "true"):
        spec = {}
    if isinstance(spec, str):
        parsed, key = {}, None
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            if "=" in part or ":" in part:
                key, _, value = part.replace(":", "=", 1).partition("=")
                key = key.strip()
                parsed[key] = [value.strip()] if key == "targets" else value.strip()
            elif key == "targets":
                parsed[key].append(part)
            else:
                raise SortedError(f"--lora '{spec}' not understood at '{part}': use r=16,alpha=32,targets=q_proj,v_proj")
        spec = parsed
    if not isinstance(spec, dict):
        raise SortedError(f"--lora {spec!r} not understood: use r=16,alpha=32,targets=q_proj,v_proj or a YAML mapping")
    unknown = sorted(set(spec) - set(DEFAULTS))
    if unknown:
        raise SortedError(f"--lora: unknown key '{unknown[0]}'; use {', '.join(DEFAULTS)}")
    out = {**DEFAULTS, **spec}
    try:
        out["r"], out["alpha"], out["dropout"] = int(out["r"]), float(out["alpha"]), float(out["dropout"])
    except (TypeError, ValueError):
        raise SortedError(f"--lora {spec}: r must be an integer, alpha and dropout numbers")
    if out["r"] < 1 or out["alpha"] <= 0 or not 0 <= out["dropout"] < 1:
        raise SortedError(f"--lora {spec}: need r >= 1, alpha > 0 and 0 <= dropout < 1")
    targets = out["targets"]
    if isinstance(targets, str):
        targets = ALL_LINEAR if targets.strip().lower() == ALL_LINEAR else [t.strip() for t in targets.split(",")]
    if targets != ALL_LINEAR:
        targets = [str(t).strip() for t in targets if str(t).strip()]
        if not targets:
            raise SortedError("--lora targets is empty: name modules like q_proj,v_proj or use all-linear")
    out["targets"] = targets
    return out


def linear_names(model: nn.Module) -> list[str]:
    """Short names of the linear layers inside the decoder layers (q_proj, ..., down_proj): what `targets` may name.
    The LM head is left out: every exit shares it (and it is often tied to the input embeddings)."""
    from ..models import Architecture

    layers = Architecture(model).layers
    return sorted({name.rsplit(".", 1)[-1] for name, m in layers.named_modules() if isinstance(m, nn.Linear)})


def lora_config(spec, model: nn.Module):
    """A peft `LoraConfig` for `--lora`, with each target checked against the model's linear layers."""
    from peft import LoraConfig

    opts = parse_lora(spec)
    if opts is None:
        return None
    if opts["targets"] != ALL_LINEAR:
        valid = linear_names(model)
        bad = [t for t in opts["targets"] if t not in valid]
        if bad:
            raise SortedError(f"--lora target '{bad[0]}' is not a linear layer of this model's decoder layers; "
                              f"valid names: {', '.join(valid)} (or all-linear)")
    return LoraConfig(r=opts["r"], lora_alpha=opts["alpha"], lora_dropout=opts["dropout"],
                      target_modules=opts["targets"], bias="none", task_type="CAUSAL_LM")


def describe(config) -> dict:
    """What goes in sorted_config.json's `extra.lora` (JSON-friendly)."""
    targets = config.target_modules
    return {"r": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
            "targets": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets}


def is_adapter(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merge(sm):
    """A plain HF `SortedModel` with the adapter folded into the weights (peft's `merge_and_unload`).

    The adapter model is consumed: peft merges in place. Per-exit logits equal the adapter's up to float rounding.
    """
    from ..exits import SortedModel

    if not is_adapter(sm.model):
        raise SortedError(f"{sm.source or 'this model'} is not a LoRA adapter: there is nothing to merge")
    merged = sm.model.merge_and_unload()
    config = copy.deepcopy(sm.config)
    config.extra = {**config.extra, "lora": {**config.extra.get("lora", {}), "merged": True}}
    out = SortedModel(merged.eval(), sm.tokenizer, config=config)
    out.source = sm.source
    return out


def main(argv: list[str]) -> int:
    """Merge a LoRA adapter folder into a plain HF model folder (with its sorted_config.json)."""
    from ..config import ArgumentParser
    from ..exits import SortedModel

    p = ArgumentParser(prog="python -m sortedllm.train.lora", description="Merge a LoRA adapter into the model.")
    p.add_argument("--model", required=True, help="adapter folder written by `sortedllm train --lora ...`")
    p.add_argument("--out", required=True, help="folder for the merged plain Hugging Face model")
    p.add_argument("--trust_remote_code", action="store_true")
    a = p.parse_args(argv)
    merged = merge(SortedModel.from_pretrained(a.model, trust_remote_code=a.trust_remote_code))
    out = merged.save_pretrained(Path(a.out))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    import sys

    try:
        sys.exit(main(sys.argv[1:]))
    except SortedError as e:  # as `sortedllm <command>` does: one line, exit code 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
