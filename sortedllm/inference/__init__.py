"""Dynamic inference: choose depth per call (static exit k); more strategies build on the same layer runner."""

from .static import Generation, generate

__all__ = ["Generation", "generate"]
