"""lorakernels: many LoRA adapters in one pass, without merging weights.

``y = x @ W.T + b + Σ strength * (alpha / r) * (x @ A.T) @ B.T``, where every sample of a batch
may use a different adapter or a weighted mix. ``import lorakernels`` needs torch only; triton,
diffusers, peft and the native library are imported lazily when used.
"""

from __future__ import annotations

from .adapters import AdapterLibrary
from .bank import LoRABank
from .batch import LoRABatch
from .manager import MultiLoRA
from .modules import LoRAContext, MultiLoRAConv2d, MultiLoRALinear
from .ops import BACKENDS, multi_lora_conv2d, multi_lora_linear, resolve_backend, use_backend
from .plan import use_plan

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "AdapterLibrary",
    "LoRABank",
    "LoRABatch",
    "LoRAContext",
    "MultiLoRA",
    "MultiLoRAConv2d",
    "MultiLoRALinear",
    "__version__",
    "multi_lora_conv2d",
    "multi_lora_linear",
    "resolve_backend",
    "use_backend",
    "use_plan",
]
