"""Adapters beyond memory: the :class:`AdapterLibrary` (every adapter a process knows: files,
folders, in-memory factor dicts; header-only scans; a host cache bounded in bytes) and the
residency pool's bookkeeping (budget, LRU, pins) that :class:`lorakernels.MultiLoRA` uses to
keep a bounded set of adapters resident in its banks.
"""

from .library import LORA_SUFFIXES, AdapterInfo, AdapterLibrary
from .pool import Budget, ResidencyPool

__all__ = ["LORA_SUFFIXES", "AdapterInfo", "AdapterLibrary", "Budget", "ResidencyPool"]
