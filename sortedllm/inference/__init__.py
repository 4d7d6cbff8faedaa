"""Dynamic inference from one set of weights: static depth, self-speculative decoding and confidence early exit,
on a decode runtime in the machine's fastest dtype and weight layout (runtime.py).

    from sortedllm.inference import generate, Static, Speculative, EarlyExit, GenerationOptions, calibrate
    generate(sm, prompts)                                    # the full model
    generate(sm, prompts, Static(12))                        # the first 12 layers only
    generate(sm, prompts, Speculative(9))                    # exact full-model output, drafted by exit 9
    generate(sm, prompts, EarlyExit())                       # per-token exit, paper thresholds
    generate(sm, prompts, calibrate(sm, calibration_prompts, target_agreement=0.95))
    generate(sm, prompts, Static(), GenerationOptions(max_new_tokens=64, dtype="float32"))
"""

from .calibrate import Calibration, calibrate
from .early_exit import EarlyExit
from .generate import Generation, GenerationOptions, generate, summary
from .runtime import Runtime
from .sampling import Sampling
from .speculative import Speculative
from .static import Static

__all__ = ["Calibration", "EarlyExit", "Generation", "GenerationOptions", "Runtime", "Sampling", "Speculative",
           "Static", "calibrate", "generate", "summary"]
