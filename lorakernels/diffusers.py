"""Shortcut: ``lorakernels.diffusers.patch(pipe)`` / ``lorakernels.diffusers.generate(pipe, …)``.

Re-exports :mod:`lorakernels.integrations.diffusers` (importing this module imports the
formats and prompt modules; diffusers itself is only needed by the pipeline you pass in).
"""

from .integrations.diffusers import TARGETS, DiffusersLoRA, generate, patch

__all__ = ["TARGETS", "DiffusersLoRA", "generate", "patch"]
