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
may be absent (rank 0, legal); ``multi_lora_linear`` raises for ids that are neither registered
nor resident, so a mixture naming an empty slot cannot silently run as the base model.
``slot_version[slot]`` (host ints) increases on every add and remove of that slot, and
``version`` on every change of the bank: caches of merged weights key on them.

``lora_a``/``lora_bt`` have the layer's dtype (factors are converted on :meth:`add`);
``slot_scale`` stays float32 even across ``module.half()``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.autograd.graph import increment_version

_ROW_PAGE = 16
# same-size integer types: rows are copied and zeroed bit for bit through numpy on CPU
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
try:  # numpy is optional: without it, metadata writes go through torch (slower, same result)
    import numpy  # noqa: F401

    _HAS_NUMPY = True
except ImportError:
    _HAS_NUMPY = False  # growable banks grow in multiples of 16 rank rows


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class BankFullError(ValueError):
    """A fixed-capacity bank has too few free rank rows or slot ids for an adapter."""


class _Host:
    """Host-side state of a bank, kept off ``nn.Module`` attribute handling (whose
    ``__setattr__``/``__getattr__`` cost ~10 µs per bank update: 30 % of a warm switch)."""

    __slots__ = (
        "used",
        "max_rank",
        "rank_floor",
        "version",
        "free",
        "slots",
        "registered",
        "slot_version",
        "tensors",
        "host_views",
    )

    def __init__(self, rows: int, slots: int) -> None:
        self.used = 0
        self.max_rank = 0
        self.rank_floor = 0
        self.version = 0
        self.free: list[tuple[int, int]] = [(0, rows)] if rows else []  # (start, length)
        self.slots: dict[int, tuple[int, int, float]] = {}  # slot -> (start, rank, scale)
        self.registered: set[int] = set()
        self.slot_version: list[int] = [0] * slots
        self.tensors: tuple[Tensor, ...] = ()
        # CPU banks: numpy views sharing the buffers' memory (slot_start, slot_rank,
        # slot_scale, and lora_a, lora_bt as same-size integers). A scalar write through
        # numpy costs ~0.1 µs against ~5 µs for ``tensor[i] = v``: a warm switch of 128
        # SD1.5 layers does ~1,000.
        self.host_views: tuple | None = None


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
        self._h = _Host(rows, slots)
        self._refresh()

    def _refresh(self) -> None:
        b = self._buffers
        t = (b["lora_a"], b["lora_bt"], b["slot_start"], b["slot_rank"], b["slot_scale"])
        self._h.tensors = t
        self._h.host_views = None
        if all(x.device.type == "cpu" and x.is_contiguous() for x in t) and _HAS_NUMPY:
            bits = _BITS[t[0].element_size()]
            self._h.host_views = (
                t[2].numpy(),
                t[3].numpy(),
                t[4].numpy(),
                t[0].view(bits).numpy(),
                t[1].view(bits).numpy(),
            )

    # ------------------------------------------------------------------ queries
    @property
    def used_rows(self) -> int:
        """Sum of the ranks of the resident adapters."""
        return self._h.used

    @property
    def capacity_rows(self) -> int:
        """``R_cap``: rank rows allocated."""
        return int(self._h.tensors[0].shape[0])

    @property
    def capacity_slots(self) -> int:
        """``L_cap``: slot ids allocated."""
        return int(self._h.tensors[3].shape[0])

    @property
    def row_bytes(self) -> int:
        """Bytes of one rank row: ``(K + N) × itemsize``."""
        return (self.in_features + self.out_features) * self._h.tensors[0].element_size()

    @property
    def used_bytes(self) -> int:
        """``Σ real ranks × (K + N) × itemsize``: no page slack (see the module docstring)."""
        return self._h.used * self.row_bytes

    @property
    def max_rank(self) -> int:
        """The kernels' rank bound: the largest resident rank (0 when empty), never below
        :attr:`rank_floor`; fixed-capacity banks keep their high-water mark (it does not drop
        when an adapter leaves). A plain int, so torch.compile reads it as a constant and
        recompiles only when it changes."""
        return self._h.max_rank

    @property
    def rank_floor(self) -> int:
        """A lower bound for :attr:`max_rank`. The residency pool sets it to the largest rank
        its library knows, so loading and evicting adapters does not change the bound a
        compiled graph was traced with."""
        return self._h.rank_floor

    @rank_floor.setter
    def rank_floor(self, value: int) -> None:
        h = self._h
        h.rank_floor = int(value)
        h.max_rank = max(h.max_rank, h.rank_floor)

    @property
    def version(self) -> int:
        """Increases on every change of this bank's contents."""
        return self._h.version

    @property
    def slot_version(self) -> list[int]:
        """Per slot id, increases on every add and remove of that slot (host ints)."""
        return self._h.slot_version

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(lora_a, lora_bt, slot_start, slot_rank, slot_scale)``, the kernels' bank tensors."""
        return self._h.tensors  # type: ignore[return-value]

    def slots(self) -> dict[int, tuple[int, int, float]]:
        """``{slot: (start, rank, scale)}`` of the resident adapters (a copy)."""
        return dict(self._h.slots)

    def rank_of(self, slot: int) -> int:
        """The rank ``slot`` has in this layer (0: not resident here)."""
        found = self._h.slots.get(slot)
        return found[1] if found is not None else 0

    def __contains__(self, slot: int) -> bool:
        return slot in self._h.slots

    def extra_repr(self) -> str:
        return (
            f"K={self.in_features}, N={self.out_features}, adapters={len(self._h.slots)}, "
            f"rows={self._h.used}/{self.capacity_rows}"
        )

    # ------------------------------------------------------------------ slot ids
    def register(self, slot: int) -> None:
        """Mark ``slot`` as an adapter's id even if it has no weights here (rank 0, legal)."""
        self._h.registered.add(int(slot))

    def unregister(self, slot: int) -> None:
        """Forget ``slot`` as an id (its weights, if any, must have been removed)."""
        self._h.registered.discard(int(slot))

    def is_registered(self, slot: int) -> bool:
        """Whether ``slot`` is an adapter's id for this bank's manager (resident here or not)."""
        return slot in self._h.registered

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
            self._h.slot_version += [0] * (cap - self.capacity_slots)
            self.slot_start = self._grown(self.slot_start, cap)
            self.slot_rank = self._grown(self.slot_rank, cap)
            self.slot_scale = self._grown(self.slot_scale, cap)
        self._refresh()

    @staticmethod
    def _grown(t: Tensor, rows: int) -> Tensor:
        out = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
        out[: t.shape[0]] = t
        return out

    def _release(self, start: int, length: int) -> None:
        """Return rows to the free list, merging neighbours (kept sorted by start)."""
        free = sorted([*self._h.free, (start, length)])
        merged: list[tuple[int, int]] = []
        for s, n in free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((s, n))
        self._h.free = merged

    def _first_fit(self, r: int) -> int | None:
        free = self._h.free
        for i, (s, n) in enumerate(free):
            if n >= r:
                free[i : i + 1] = [(s + r, n - r)] if n > r else []
                return s
        return None

    def fits(self, r: int, *, compact: bool = True) -> bool:
        """Whether ``r`` more rows can be placed without growing (after compaction if allowed)."""
        if any(n >= r for _, n in self._h.free):
            return True
        return compact and self.capacity_rows - self._h.used >= r

    def compact(self) -> None:
        """Move every live slot's rows to the front, in start order (moves rows in place:
        no forward may read this bank meanwhile)."""
        h = self._h
        a, bt, start_t = h.tensors[0], h.tensors[1], h.tensors[2]
        at = 0
        for slot, (start, r, scale) in sorted(h.slots.items(), key=lambda kv: kv[1][0]):
            if start != at:
                # clone: source and destination may overlap
                a[at : at + r] = a[start : start + r].clone()
                bt[at : at + r] = bt[start : start + r].clone()
                start_t[slot] = at
                h.slots[slot] = (at, r, scale)
            at += r
        a[at:].zero_()
        bt[at:].zero_()
        cap = a.shape[0]
        h.free = [(at, cap - at)] if at < cap else []
        h.version += 1

    # ------------------------------------------------------------------ mutation
    def check(self, slot: int, A: Tensor, B: Tensor, scale: float, where: str = "") -> None:
        """Raise if ``(A, B, scale)`` cannot be added as ``slot``; changes nothing."""
        self.check_factors(A, B, scale, where)
        self._check_place(slot, A.shape[0], where)

    def _check_place(self, slot: int, r: int, where: str) -> None:
        at = f" for {where}" if where else ""
        if slot < 0:
            raise ValueError(f"slot must be >= 0, got {slot}")
        if slot in self._h.slots:
            raise ValueError(f"slot {slot} is already resident{at}")
        if not self.growable:
            if slot >= self.capacity_slots:
                raise BankFullError(
                    f"slot {slot}{at} is past this bank's {self.capacity_slots} slot ids"
                )
            free = self.capacity_rows - self._h.used
            if r > free:
                raise BankFullError(
                    f"rank {r}{at} needs {r} rank rows; this bank has {self.capacity_rows} of "
                    f"which {free} are free"
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
        checked: bool = False,
    ) -> None:
        """Make adapter ``slot`` resident: ``A [r, K]``, ``B [N, r]``, ``scale = alpha / r``.

        ``compact=False`` raises :class:`BankFullError` rather than moving live rows when the
        free rows are fragmented. ``checked=True`` skips :meth:`check_factors` (the caller ran
        it on these factors already).
        """
        if checked:
            self._check_place(slot, A.shape[0], where)
        else:
            self.check(slot, A, B, scale, where)
        h = self._h
        r = A.shape[0]
        start = self._first_fit(r)
        if start is None:
            free = self.capacity_rows - h.used
            if free >= r and compact:
                self.compact()
            elif self.growable:
                self.reserve(self.capacity_rows + r, 0)
            else:
                raise BankFullError(
                    f"rank {r}{' for ' + where if where else ''}: the {free} free rank rows "
                    "are fragmented and compaction is not allowed now"
                )
            start = self._first_fit(r)
            assert start is not None  # compaction/growth made a long enough run
        if self.growable and slot >= self.capacity_slots:
            self.reserve(0, slot + 1)
        a_t, bt_t, start_t, rank_t, scale_t = h.tensors
        v = h.host_views
        if v is not None and A.dtype == B.dtype == a_t.dtype and A.is_cpu and B.is_cpu:
            # same dtype on CPU: a bitwise numpy copy (~1 µs against ~4 µs for copy_)
            bits = _BITS[a_t.element_size()]
            v[3][start : start + r] = A.detach().view(bits).numpy()
            v[4][start : start + r] = B.detach().T.view(bits).numpy()
        else:
            a_t[start : start + r].copy_(A)
            bt_t[start : start + r].copy_(B.T)
        if v is not None:
            v[0][slot], v[1][slot], v[2][slot] = start, r, scale
            # numpy writes bypass the tensors' version counters, which the caches of merged
            # weights and layer outputs key on: bump them (1.3 us)
            increment_version((start_t, rank_t, scale_t))
        else:
            start_t[slot] = start
            rank_t[slot] = r
            scale_t[slot] = scale
        h.slots[slot] = (start, r, float(scale))
        h.registered.add(slot)
        h.used += r
        if r > h.max_rank:
            h.max_rank = r
        h.slot_version[slot] += 1
        h.version += 1

    def remove(self, slot: int) -> None:
        """Drop adapter ``slot`` (and its registration); its rows return to the free list
        without moving any other slot's rows. A no-op for unknown slots."""
        h = self._h
        h.registered.discard(slot)
        if slot not in h.slots:
            return
        start, r, _ = h.slots.pop(slot)
        a_t, bt_t, start_t, rank_t, scale_t = h.tensors
        # free slots and rows are kept zero, so a bank's bytes depend only on its live
        # adapters (a rolled-back load leaves the buffers bit-identical)
        if h.host_views is not None:
            v = h.host_views
            v[0][slot] = v[1][slot] = v[2][slot] = 0
            v[3][start : start + r] = 0
            v[4][start : start + r] = 0
            increment_version(h.tensors)  # see add()
        else:
            rank_t[slot] = 0
            scale_t[slot] = 0.0
            start_t[slot] = 0
            a_t[start : start + r].zero_()
            bt_t[start : start + r].zero_()
        self._release(start, r)
        h.used -= r
        if r == h.max_rank and self.growable:  # fixed banks keep their high-water mark
            h.max_rank = max((rk for _, rk, _ in h.slots.values()), default=h.rank_floor)
            h.max_rank = max(h.max_rank, h.rank_floor)
        h.slot_version[slot] += 1
        h.version += 1

    def get(self, slot: int) -> tuple[Tensor, Tensor, float]:
        """``(A [r, K], B [N, r], scale)`` of a resident slot (views into the bank)."""
        start, r, scale = self._h.slots[slot]
        a_t, bt_t = self._h.tensors[:2]
        return a_t[start : start + r], bt_t[start : start + r].T, scale

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # module.half()/.to(dtype) must not round the scales or turn the int metadata
        # into floats: only lora_a/lora_bt follow the layer's dtype.
        super()._apply(fn, recurse)
        if self.slot_scale.dtype != torch.float32:
            exact = torch.zeros(self.slot_scale.shape, dtype=torch.float32)
            for slot, (_, _, scale) in self._h.slots.items():
                exact[slot] = scale  # from the host mirror: the cast already rounded the buffer
            self.slot_scale = exact.to(self.slot_scale.device)
        self._refresh()
        return self
