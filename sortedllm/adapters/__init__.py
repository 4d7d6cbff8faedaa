"""Adapters: small weights trained on top of a base model, one registry for every kind.

    ict_heads    a trained (norm, LM head) per intermediate exit        adapters/ict.py
    draft_layer  a trained draft branch for self-speculative decoding  adapters/draft_layer.py
    lora         a peft LoRA adapter of the decoder layers              adapters/lora.py

Each is a folder: `sorted_adapter.json` (`type`, `base_model`, `base_fingerprint`, the type's fields) and one
safetensors file (peft's own files for LoRA). `SortedModel.from_pretrained(folder)` loads the base the folder names
and attaches the adapter; `sm.load_adapter(path)` attaches one to a model already loaded; `adapter.save_pretrained`
writes one. The fingerprint refuses an adapter on the wrong base (adapters/base.py). Formats from before
sorted_adapter.json load too: ICT folders (`exit_heads.safetensors` + sorted_config.json with mode ict), lone
`draft_layer.safetensors` files and peft LoRA folders.

The draft vocabulary (adapters/vocab.py) is saved beside a model, not as an adapter: it restricts the draft head.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SortedError
from .base import ADAPTER_CONFIG, Adapter, fingerprint, read_adapter_config
from .draft_layer import DraftLayer
from .ict import ICTHeads
from .lora import LoraAdapter

ADAPTERS: dict[str, type[Adapter]] = {cls.adapter_type: cls for cls in (ICTHeads, DraftLayer, LoraAdapter)}


def adapter_kind(path) -> type[Adapter] | None:
    """The adapter class stored at `path` (a folder, or a lone draft-layer file), or None when it is no adapter."""
    path = Path(path)
    config = read_adapter_config(path) if path.is_dir() else None
    if config is not None:
        kind = ADAPTERS.get(config["type"])
        if kind is None:
            raise SortedError(f"{path / ADAPTER_CONFIG}: unknown adapter type '{config['type']}' (known: "
                              f"{', '.join(ADAPTERS)}); it was written by a newer sortedllm?")
        return kind
    return next((kind for kind in ADAPTERS.values() if kind.is_legacy(path)), None)


def load_adapter(path, sm) -> Adapter:
    """The adapter at `path` built for `sm` (checked against its fingerprint), not yet attached."""
    kind = adapter_kind(path)
    if kind is None:
        raise SortedError(f"{path} is not an adapter ({', '.join(ADAPTERS)}): no {ADAPTER_CONFIG}, ICT heads, "
                          "draft-layer file or peft adapter found there")
    return kind.load(Path(path), sm)


__all__ = ["ADAPTERS", "ADAPTER_CONFIG", "Adapter", "DraftLayer", "ICTHeads", "LoraAdapter", "adapter_kind",
           "fingerprint", "load_adapter"]
