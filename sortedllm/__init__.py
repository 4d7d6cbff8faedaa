"""sortedllm: Sorted Fine-Tuning (SoFT) makes every first-k-layer sub-model of a decoder LLM usable.

    from sortedllm import SortedModel, SoFTTrainer, SoFTConfig
"""

import importlib

from .errors import SortedError
from .exits import SortedConfig, SortedModel, resolve_exits
from .models import Architecture, load_model

__version__ = "0.1.0"


def __getattr__(name):
    """`SoFTTrainer` / `SoFTConfig` from train/trainer.py, imported on first use: it pulls in TRL, which the core
    (loading, exits, adapters) does not need."""
    if name in ("SoFTTrainer", "SoFTConfig"):
        return getattr(importlib.import_module(".train.trainer", __name__), name)
    raise AttributeError(name)


__all__ = ["SortedError", "SortedConfig", "SortedModel", "resolve_exits", "Architecture", "load_model",
           "SoFTTrainer", "SoFTConfig"]
