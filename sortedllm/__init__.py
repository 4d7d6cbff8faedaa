"""sortedllm: Sorted Fine-Tuning (SoFT) makes every first-k-layer sub-model of a decoder LLM usable.

    from sortedllm import SortedModel, SoFTTrainer, SoFTConfig
"""

from .errors import SortedError
from .exits import SortedConfig, SortedModel, resolve_exits
from .models import Architecture, load_model

__version__ = "0.1.0"


def __getattr__(name):  # the trainer pulls in TRL; import it only when asked for
    if name in ("SoFTTrainer", "SoFTConfig"):
        from .train import trainer

        return getattr(trainer, name)
    raise AttributeError(name)


__all__ = ["SortedError", "SortedConfig", "SortedModel", "resolve_exits", "Architecture", "load_model",
           "SoFTTrainer", "SoFTConfig"]
