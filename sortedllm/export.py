"""Export a sub-model: the first k layers + the shared norm and head as an ordinary HF model
(`num_hidden_layers = k`), loadable by `AutoModelForCausalLM` with no sortedllm code."""

from __future__ import annotations

import copy
import re
from pathlib import Path

from .errors import SortedError

LAYER_KEY = re.compile(r"(^|\.)layers\.(\d+)\.")


def submodel_config(config, k: int):
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = k
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types)[:k]
    return cfg


def submodel(sm, k: int):
    """A standalone k-layer HF model (weights copied) whose logits equal exit k of `sm`."""
    from transformers import AutoModelForCausalLM

    if not 1 <= k <= sm.num_layers:
        raise SortedError(f"exit layer {k} is out of range: this model has layers 1..{sm.num_layers}")
    source = sm.arch.model
    cfg = submodel_config(source.config, k)
    small = AutoModelForCausalLM.from_config(cfg, dtype=next(source.parameters()).dtype)
    state = {name: t for name, t in source.state_dict().items()
             if not ((m := LAYER_KEY.search(name)) and int(m.group(2)) >= k)}
    small.load_state_dict(state, strict=True)
    if hasattr(small, "generation_config") and hasattr(source, "generation_config"):
        small.generation_config = copy.deepcopy(source.generation_config)
    return small.eval()


def export(sm, k: int, out_dir: str | Path) -> Path:
    """Write exit k as a standalone HF folder (safetensors + tokenizer), atomically."""
    from .checkpoint import atomic_dir

    model = submodel(sm, k)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if sm.tokenizer is not None:
            sm.tokenizer.save_pretrained(tmp)
    return Path(out_dir)
