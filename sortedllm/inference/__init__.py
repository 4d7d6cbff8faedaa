"""Dynamic inference from one set of weights: static depth, self-speculative decoding and confidence early exit.

    from sortedllm.inference import generate, Speculative, EarlyExit, calibrate
    generate(sm, prompts, exit_layer=12)                       # the first 12 layers only
    generate(sm, prompts, speculative=9)                       # exact full-model output, drafted by exit 9
    generate(sm, prompts, early_exit=True)                     # per-token exit, paper thresholds
    generate(sm, prompts, early_exit=calibrate(sm, calib_prompts, target_agreement=0.95))
"""

from .calibrate import calibrate
from .early_exit import EarlyExit
from .generation import Generation, generate, summary
from .sampling import Sampling
from .speculative import Speculative

__all__ = ["EarlyExit", "Generation", "Sampling", "Speculative", "calibrate", "generate", "summary"]
