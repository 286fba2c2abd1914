"""``LoRABank``: one layer's resident adapters, packed by rank rows in preallocated buffers.

Layout (the kernel contract of :mod:`lorakernels.kernels`)::

    lora_a     [R_cap, K]   rank rows of every resident adapter's A (down)
    lora_bt    [R_cap, N]   the same rank rows of B.T (up, transposed)
    slot_start int32 [L_cap]  first row of each slot
    slot_rank  int32 [L_cap]  rank of each slot in this layer, 0 = no weights here
    slot_scale f32   [L_cap]  alpha / r of each slot in this layer

A *slot* is a global adapter id shared by every layer (the manager's name -> slot table); an
adapter that does not touch this layer has rank 0 here.

Storage (the choice DESIGN.md records): each slot's ``r`` rank rows are **contiguous**
(the kernels read rows ``start .. start + r``), allocated first-fit from a free list inside
buffers of fixed capacity. Rows are allocated one by one, so there is no page slack: the rows
in use are exactly ``Σ real ranks`` and the bytes in use exactly
``Σ r × (K + N) × itemsize`` (:attr:`used_bytes`). Removing an adapter frees (and zeroes)
its rows without moving anything (safe while other callers' forwards read the other slots);
when no free run is long enough although enough rows are free, :meth:`add` compacts (moves
the live rows to the front, in place) if allowed. Neither ever reallocates, so tensor
pointers stay valid for captured CUDA graphs and ``torch.compile`` never recompiles.

Growth: a bank built with ``growable=True`` (the default, for managers without a budget)
doubles its buffers when full, which reallocates (invalidates captured CUDA graphs);
``growable=False`` raises :class:`BankFullError` instead (the residency pool then evicts).

Slot ids: :meth:`register` marks a slot id as holding an adapter whose weights in this layer
may be absent (rank 0, legal); :meth:`check_slots` raises for ids that are neither registered
nor resident, so a mixture naming an empty slot cannot silently run as the base model.
``slot_version[slot]`` (host ints) increases on every add and remove of that slot, and
``version`` on every change of the bank: caches of merged weights key on them.

``lora_a``/``lora_bt`` have the layer's dtype (factors are converted on :meth:`add`);
``slot_scale`` stays float32 even across ``module.half()``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

_ROW_PAGE = 16  # growable banks grow in multiples of 16 rank rows


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class BankFullError(ValueError):
    """A fixed-capacity bank has too few free rank rows or slot ids for an adapter."""


class LoRABank(nn.Module):
    """Adapter storage for one layer with ``K`` in-features and ``N`` out-features.

    Args:
        in_features, out_features: ``K`` and ``N``.
        rows: rank rows to preallocate (``R_cap``).
        slots: slot ids to preallocate (``L_cap``).
        growable: grow (reallocate) when full instead of raising :class:`BankFullError`.

    The tensors are non-persistent buffers: they follow ``module.to(device)`` but stay out of
    the layer's ``state_dict`` (the patched layer keeps ``nn.Linear``'s keys). Not thread-safe
    by itself: the manager serialises mutations; reads of other slots may run concurrently
    with :meth:`add`/:meth:`remove` (only :meth:`compact` moves rows of live slots).
    """

    lora_a: Tensor
    lora_bt: Tensor
    slot_start: Tensor
    slot_rank: Tensor
    slot_scale: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        rows: int = 0,
        slots: int = 0,
        growable: bool = True,
    ) -> None:
        super().__init__()
        if rows < 0 or slots < 0:
            raise ValueError(f"rows and slots must be >= 0, got {rows} and {slots}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.growable = bool(growable)
        fk = {"dtype": dtype, "device": device}
        self.register_buffer("lora_a", torch.zeros(rows, self.in_features, **fk), persistent=False)
        self.register_buffer(
            "lora_bt", torch.zeros(rows, self.out_features, **fk), persistent=False
        )
        ik = {"dtype": torch.int32, "device": device}
        self.register_buffer("slot_start", torch.zeros(slots, **ik), persistent=False)
        self.register_buffer("slot_rank", torch.zeros(slots, **ik), persistent=False)
        self.register_buffer(
            "slot_scale", torch.zeros(slots, dtype=torch.float32, device=device), persistent=False
        )
        # host mirror: slot -> (start, rank, scale); the source of truth for planning
        self._slots: dict[int, tuple[int, int, float]] = {}
        self._free: list[tuple[int, int]] = [(0, rows)] if rows else []  # (start, length)
        self._registered: set[int] = set()
        self._used = 0
        self._max_rank = 0  # kept as a plain int so torch.compile reads it as a constant
        self.slot_version: list[int] = [0] * slots
        self.version = 0

    # ------------------------------------------------------------------ queries
    @property
    def used_rows(self) -> int:
        """Sum of the ranks of the resident adapters."""
        return self._used

    @property
    def capacity_rows(self) -> int:
        """``R_cap``: rank rows allocated."""
        return int(self.lora_a.shape[0])

    @property
    def capacity_slots(self) -> int:
        """``L_cap``: slot ids allocated."""
        return int(self.slot_rank.shape[0])

    @property
    def row_bytes(self) -> int:
        """Bytes of one rank row: ``(K + N) × itemsize``."""
        return (self.in_features + self.out_features) * self.lora_a.element_size()

    @property
    def used_bytes(self) -> int:
        """``Σ real ranks × (K + N) × itemsize``: no page slack (see the module docstring)."""
        return self._used * self.row_bytes

    @property
    def max_rank(self) -> int:
        """Largest resident rank (0 when empty): the kernels' rank bound."""
        return self._max_rank

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(lora_a, lora_bt, slot_start, slot_rank, slot_scale)``, the kernels' bank tensors."""
        return self.lora_a, self.lora_bt, self.slot_start, self.slot_rank, self.slot_scale

    def slots(self) -> dict[int, tuple[int, int, float]]:
        """``{slot: (start, rank, scale)}`` of the resident adapters (a copy)."""
        return dict(self._slots)

    def __contains__(self, slot: int) -> bool:
        return slot in self._slots

    def extra_repr(self) -> str:
        return (
            f"K={self.in_features}, N={self.out_features}, adapters={len(self._slots)}, "
            f"rows={self._used}/{self.capacity_rows}"
        )

    # ------------------------------------------------------------------ slot ids
    def register(self, slot: int) -> None:
        """Mark ``slot`` as an adapter's id even if it has no weights here (rank 0, legal)."""
        self._registered.add(int(slot))

    def unregister(self, slot: int) -> None:
        """Forget ``slot`` as an id (its weights, if any, must have been removed)."""
        self._registered.discard(int(slot))

    def check_slots(self, slots: Iterable[int]) -> None:
        """Raise ``KeyError`` naming every slot id that holds no adapter at all."""
        bad = sorted(s for s in slots if s not in self._slots and s not in self._registered)
        if bad:
            raise KeyError(
                f"slot id(s) {bad} hold no adapter (resident slots: "
                f"{sorted(self._registered | set(self._slots)) or 'none'})"
            )

    # ------------------------------------------------------------------ capacity
    def reserve(self, rows: int, slots: int) -> None:
        """Grow capacity to at least ``rows`` rank rows and ``slots`` slot ids (reallocates)."""
        if rows > self.capacity_rows:
            old = self.capacity_rows
            cap = _round_up(max(rows, 2 * old), _ROW_PAGE)
            self.lora_a = self._grown(self.lora_a, cap)
            self.lora_bt = self._grown(self.lora_bt, cap)
            self._release(old, cap - old)
        if slots > self.capacity_slots:
            cap = max(slots, 2 * self.capacity_slots, 8)
            self.slot_version += [0] * (cap - self.capacity_slots)
            self.slot_start = self._grown(self.slot_start, cap)
            self.slot_rank = self._grown(self.slot_rank, cap)
            self.slot_scale = self._grown(self.slot_scale, cap)

    @staticmethod
    def _grown(t: Tensor, rows: int) -> Tensor:
        out = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
        out[: t.shape[0]] = t
        return out

    def _release(self, start: int, length: int) -> None:
        """Return rows to the free list, merging neighbours (kept sorted by start)."""
        free = sorted([*self._free, (start, length)])
        merged: list[tuple[int, int]] = []
        for s, n in free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((s, n))
        self._free = merged

    def _first_fit(self, r: int) -> int | None:
        for i, (s, n) in enumerate(self._free):
            if n >= r:
                self._free[i : i + 1] = [(s + r, n - r)] if n > r else []
                return s
        return None

    def fits(self, r: int, *, compact: bool = True) -> bool:
        """Whether ``r`` more rows can be placed without growing (after compaction if allowed)."""
        if any(n >= r for _, n in self._free):
            return True
        return compact and self.capacity_rows - self._used >= r

    def compact(self) -> None:
        """Move every live slot's rows to the front, in start order (moves rows in place:
        no forward may read this bank meanwhile)."""
        at = 0
        for slot, (start, r, scale) in sorted(self._slots.items(), key=lambda kv: kv[1][0]):
            if start != at:
                # clone: source and destination may overlap
                self.lora_a[at : at + r] = self.lora_a[start : start + r].clone()
                self.lora_bt[at : at + r] = self.lora_bt[start : start + r].clone()
                self.slot_start[slot] = at
                self._slots[slot] = (at, r, scale)
            at += r
        self.lora_a[at:].zero_()
        self.lora_bt[at:].zero_()
        self._free = [(at, self.capacity_rows - at)] if at < self.capacity_rows else []
        self.version += 1

    # ------------------------------------------------------------------ mutation
    def check(self, slot: int, A: Tensor, B: Tensor, scale: float, where: str = "") -> None:
        """Raise if ``(A, B, scale)`` cannot be added as ``slot``; changes nothing."""
        self.check_factors(A, B, scale, where)
        at = f" for {where}" if where else ""
        r = A.shape[0]
        if slot < 0:
            raise ValueError(f"slot must be >= 0, got {slot}")
        if slot in self._slots:
            raise ValueError(f"slot {slot} is already resident{at}")
        if not self.growable:
            if slot >= self.capacity_slots:
                raise BankFullError(
                    f"slot {slot}{at} is past this bank's {self.capacity_slots} slot ids"
                )
            if r > self.capacity_rows - self._used:
                raise BankFullError(
                    f"rank {r}{at} needs {r} rank rows; this bank has {self.capacity_rows} of "
                    f"which {self.capacity_rows - self._used} are free"
                )

    def check_factors(self, A: Tensor, B: Tensor, scale: float, where: str = "") -> None:
        """Raise if ``(A, B, scale)`` does not fit this layer's shapes (capacity aside)."""
        at = f" for {where}" if where else ""
        if not isinstance(A, Tensor) or not isinstance(B, Tensor):
            raise TypeError(f"A and B{at} must be tensors")
        if A.dim() != 2 or B.dim() != 2:
            raise ValueError(
                f"A{at} must be [r, K] and B [N, r]; got {tuple(A.shape)} and {tuple(B.shape)}"
            )
        r = A.shape[0]
        if A.shape[1] != self.in_features or B.shape[0] != self.out_features or B.shape[1] != r:
            raise ValueError(
                f"LoRA shapes{at}: A {tuple(A.shape)}, B {tuple(B.shape)} do not fit a layer "
                f"with K={self.in_features}, N={self.out_features} (need A [r, K], B [N, r])"
            )
        if r < 1:
            raise ValueError(f"rank{at} must be >= 1, got {r}")
        if r > min(self.in_features, self.out_features):
            raise ValueError(
                f"rank {r}{at} exceeds min(K, N) = {min(self.in_features, self.out_features)}: "
                "a LoRA that wide is not low-rank for this layer"
            )
        if not A.is_floating_point() or not B.is_floating_point():
            raise TypeError(f"A and B{at} must be floating point, got {A.dtype} and {B.dtype}")
        if not math.isfinite(scale):
            raise ValueError(f"scale{at} must be finite, got {scale}")

    def add(
        self,
        slot: int,
        A: Tensor,
        B: Tensor,
        scale: float,
        where: str = "",
        *,
        compact: bool = True,
    ) -> None:
        """Make adapter ``slot`` resident: ``A [r, K]``, ``B [N, r]``, ``scale = alpha / r``.

        ``compact=False`` raises :class:`BankFullError` rather than moving live rows when the
        free rows are fragmented.
        """
        self.check(slot, A, B, scale, where)
        r = A.shape[0]
        start = self._first_fit(r)
        if start is None:
            if self.capacity_rows - self._used >= r and compact:
                self.compact()
            elif self.growable:
                self.reserve(self.capacity_rows + r, 0)
            else:
                free = self.capacity_rows - self._used
                raise BankFullError(
                    f"rank {r}{' for ' + where if where else ''}: the {free} free rank rows "
                    "are fragmented and compaction is not allowed now"
                )
            start = self._first_fit(r)
            assert start is not None  # compaction/growth made a long enough run
        if self.growable:
            self.reserve(0, slot + 1)
        self.lora_a[start : start + r].copy_(A)
        self.lora_bt[start : start + r].copy_(B.T)
        self.slot_start[slot] = start
        self.slot_rank[slot] = r
        self.slot_scale[slot] = scale
        self._slots[slot] = (start, r, float(scale))
        self._registered.add(slot)
        self._used += r
        self._max_rank = max(self._max_rank, r)
        self.slot_version[slot] += 1
        self.version += 1

    def remove(self, slot: int) -> None:
        """Drop adapter ``slot`` (and its registration); its rows return to the free list
        without moving any other slot's rows. A no-op for unknown slots."""
        self._registered.discard(slot)
        if slot not in self._slots:
            return
        start, r, _ = self._slots.pop(slot)
        self.slot_rank[slot] = 0
        self.slot_scale[slot] = 0.0
        self.slot_start[slot] = 0
        # free rows are kept zero, so a bank's bytes depend only on its live adapters (a
        # rolled-back load leaves the buffers bit-identical)
        self.lora_a[start : start + r].zero_()
        self.lora_bt[start : start + r].zero_()
        self._release(start, r)
        self._used -= r
        self._max_rank = max((rk for _, rk, _ in self._slots.values()), default=0)
        self.slot_version[slot] += 1
        self.version += 1

    def get(self, slot: int) -> tuple[Tensor, Tensor, float]:
        """``(A [r, K], B [N, r], scale)`` of a resident slot (views into the bank)."""
        start, r, scale = self._slots[slot]
        return self.lora_a[start : start + r], self.lora_bt[start : start + r].T, scale

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # module.half()/.to(dtype) must not round the scales or turn the int metadata
        # into floats: only lora_a/lora_bt follow the layer's dtype.
        super()._apply(fn, recurse)
        if self.slot_scale.dtype != torch.float32:
            exact = torch.zeros(self.slot_scale.shape, dtype=torch.float32)
            for slot, (_, _, scale) in self._slots.items():
                exact[slot] = scale  # from the host mirror: the cast already rounded the buffer
            self.slot_scale = exact.to(self.slot_scale.device)
        return self
