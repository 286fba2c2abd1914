"""The residency pool's bookkeeping: which adapters are resident, in what LRU order, which
are pinned or in use by an open ``use()`` block, the budget, and the counters of ``stats()``.

The manager (:class:`lorakernels.MultiLoRA`) owns the banks and does the writes; this class
decides *what* to evict. Victims are chosen least recently used first among adapters that
are neither pinned, nor used by any open ``use()`` block (of any thread or task), nor needed
by the batch being prepared. It is not thread-safe by itself: the manager holds its lock
around every call.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """The capacity a pool was built with.

    Attributes:
        max_adapters: resident adapters at most (slot ids ``L_cap``), or ``None``.
        resident_bytes: the byte budget the banks were preallocated from, or ``None``.
        rows_per_layer: rank rows preallocated in every patched layer (``R_cap``), or ``None``
            when the banks grow on demand.
    """

    max_adapters: int | None
    resident_bytes: int | None
    rows_per_layer: int | None

    def describe(self) -> str:
        parts = []
        if self.max_adapters is not None:
            parts.append(f"max_resident_adapters={self.max_adapters}")
        if self.resident_bytes is not None:
            parts.append(
                f"resident_bytes={self.resident_bytes} ({self.rows_per_layer} rank rows per layer)"
            )
        return ", ".join(parts) or "unbounded"


class ResidencyPool:
    """LRU order, pins, open-block references and counters for one manager's adapters."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.lru: OrderedDict[str, None] = OrderedDict()  # resident names, LRU first
        self.pinned: set[str] = set()
        self.refs: Counter[str] = Counter()  # name -> open use() blocks using it
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.prefetched = 0

    @property
    def bounded(self) -> bool:
        return self.budget.max_adapters is not None or self.budget.resident_bytes is not None

    def touch(self, name: str) -> None:
        self.lru[name] = None
        self.lru.move_to_end(name)

    def forget(self, name: str) -> None:
        self.lru.pop(name, None)
        self.pinned.discard(name)

    def victims(self, needed: Iterable[str]) -> list[str]:
        """Evictable names, least recently used first."""
        keep = set(needed)
        return [n for n in self.lru if n not in keep and n not in self.pinned and self.refs[n] == 0]

    def acquire(self, names: Iterable[str]) -> None:
        for n in names:
            self.refs[n] += 1

    def release(self, names: Iterable[str]) -> None:
        for n in names:
            self.refs[n] -= 1
            if self.refs[n] <= 0:
                del self.refs[n]
