"""LoRA (peft) as an adapter: the `--lora r=16,alpha=32,targets=q_proj,v_proj` option, loading an adapter folder
onto its base, and merging.

Everything LoRA is peft's: `LoraConfig` (TRL's SFTTrainer applies it with `get_peft_model`), the adapter folder
(`adapter_config.json` + `adapter_model.safetensors`, written by `PeftModel.save_pretrained`, so peft's own
`AutoPeftModelForCausalLM.from_pretrained` loads it too), `PeftModel.from_pretrained` and `merge_and_unload`. This
module parses the option, checks target names against the model, records the base fingerprint beside peft's files
(`sorted_adapter.json`, type `lora`) and merges. The base is the one peft records (`base_model_name_or_path`), so
peft folders written by other tools load as they are.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

from torch import nn

from ..errors import SortedError
from ..models import Architecture
from .base import ADAPTER_CONFIG, FORMAT, Adapter, check_fingerprint, fingerprint, read_adapter_config

PEFT_CONFIG = "adapter_config.json"

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
    layers = Architecture(model).layers
    return sorted({name.rsplit(".", 1)[-1] for name, m in layers.named_modules() if isinstance(m, nn.Linear)})


def lora_config(spec, model: nn.Module):
    """A peft `LoraConfig` for `--lora`, with each target checked against the model's linear layers."""
    from peft import LoraConfig  # peft takes seconds to import: only when LoRA is used

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
    peft = sys.modules.get("peft")  # a PeftModel exists only once peft is imported
    return peft is not None and isinstance(model, peft.PeftModel)


class LoraAdapter(Adapter):
    """A peft LoRA adapter; attached, `sm.model` is the `PeftModel` that wraps the base."""

    adapter_type = "lora"
    weights_file = "adapter_model.safetensors"
    skip_lora = True

    def __init__(self, model):
        self.model = model

    def attach(self, sm) -> None:
        sm.model = self.model
        sm.arch = Architecture(self.model)

    def write(self, tmp: Path, target: Path) -> None:
        """peft's own files, plus sorted_adapter.json with the fingerprint of the base (LoRA leaves it frozen, so it
        is read from the wrapped model)."""
        self.model.save_pretrained(tmp)
        config = {"format": FORMAT, "type": self.adapter_type, "base_fingerprint": fingerprint(self.model, True),
                  "weights": self.weights_file}
        (Path(tmp) / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def is_legacy(cls, path: Path) -> bool:
        config = Path(path) / PEFT_CONFIG
        if not Path(path).is_dir() or not config.is_file():
            return False
        try:
            return "peft_type" in json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
            return False

    @classmethod
    def base_spec(cls, folder: Path) -> str:
        """peft's `base_model_name_or_path`, checked (the only record of the base: editing it moves the base)."""
        path = Path(folder) / PEFT_CONFIG
        try:
            base = json.loads(path.read_text()).get("base_model_name_or_path")
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise SortedError(f"{path} is missing or malformed ({e}); re-save the LoRA adapter") from e
        if not base or (not Path(base).exists() and (base.startswith(("/", ".", "~")) or base.count("/") > 1)):
            raise SortedError(f"LoRA adapter '{folder}' needs its base model '{base}', which is not found; restore "
                              f"it or set base_model_name_or_path in {path}")
        return base

    @classmethod
    def load(cls, path: Path, sm) -> "LoraAdapter":
        folder = Path(path)
        check_fingerprint(read_adapter_config(folder) or {}, sm, folder, skip_lora=True)
        if is_adapter(sm.model):
            raise SortedError(f"{sm.source or 'this model'} already has a LoRA adapter; merge it first "
                              f"(python -m sortedllm.train.lora) to add {folder}")
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(sm.model, str(folder))
        except (OSError, ValueError, RuntimeError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SortedError(f"could not load LoRA adapter '{folder}' onto its base: {msg[:200]}") from e
        return cls(model.eval())


def merge(sm):
    """The same kind of `SortedModel` with the LoRA adapter folded into the weights (peft's `merge_and_unload`);
    other adapters (ICT heads, a draft layer) and the draft vocabulary stay attached.

    The adapter model is consumed: peft merges in place. Per-exit logits equal the adapter's up to float rounding.
    """
    if not is_adapter(sm.model):
        raise SortedError(f"{sm.source or 'this model'} is not a LoRA adapter: there is nothing to merge")
    merged = sm.model.merge_and_unload()
    config = copy.deepcopy(sm.config)
    config.extra = {**config.extra, "lora": {**config.extra.get("lora", {}), "merged": True}}
    out = type(sm)(merged.eval(), sm.tokenizer, config=config)
    out.adapters.update({kind: a for kind, a in sm.adapters.items() if kind != LoraAdapter.adapter_type})
    out.draft_vocab, out.draft_vocab_info, out.source = sm.draft_vocab, sm.draft_vocab_info, sm.source
    return out
