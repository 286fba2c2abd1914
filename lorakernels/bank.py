"""``LoRABank``: one layer's resident adapters, packed by rank rows.

Layout (the kernel contract of :mod:`lorakernels.kernels`)::

    lora_a     [R_cap, K]   rank rows of every resident adapter's A (down), packed
    lora_bt    [R_cap, N]   the same rank rows of B.T (up, transposed)
    slot_start int32 [L_cap]  first row of each slot
    slot_rank  int32 [L_cap]  rank of each slot in this layer, 0 = not resident here
    slot_scale f32   [L_cap]  alpha / r of each slot in this layer

A *slot* is a global adapter id shared by every layer (the manager's name -> slot table); an
adapter that does not touch this layer simply has rank 0 here. Storage grows with the sum of
the real ranks (plus capacity slack), never with ``L * max_rank``. Removing an adapter compacts
the rows behind it; nothing else changes, so no kernel ever recompiles, and ``W`` is never
touched. Growth reallocates (doubling), which invalidates captured CUDA graphs; call
:meth:`reserve` up front to avoid it.

``lora_a``/``lora_bt`` have the layer's dtype (file weights are converted on :meth:`add`);
``slot_scale`` stays float32 even across ``module.half()``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

_ROW_PAGE = 16  # capacity grows in pages of rank rows


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class LoRABank(nn.Module):
    """Adapter storage for one layer with ``K`` in-features and ``N`` out-features.

    The tensors are non-persistent buffers: they follow ``module.to(device)`` but stay out of
    the layer's ``state_dict`` (the patched layer keeps ``nn.Linear``'s keys).
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
    ) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        fk = {"dtype": dtype, "device": device}
        self.register_buffer("lora_a", torch.zeros(0, self.in_features, **fk), persistent=False)
        self.register_buffer("lora_bt", torch.zeros(0, self.out_features, **fk), persistent=False)
        ik = {"dtype": torch.int32, "device": device}
        self.register_buffer("slot_start", torch.zeros(0, **ik), persistent=False)
        self.register_buffer("slot_rank", torch.zeros(0, **ik), persistent=False)
        self.register_buffer(
            "slot_scale", torch.zeros(0, dtype=torch.float32, device=device), persistent=False
        )
        # host mirror: slot -> (start, rank, scale); the source of truth for planning
        self._slots: dict[int, tuple[int, int, float]] = {}
        self._used = 0
        self._max_rank = 0  # kept as a plain int so torch.compile reads it as a constant

    # ------------------------------------------------------------------ queries
    @property
    def used_rows(self) -> int:
        """Sum of the ranks of the resident adapters."""
        return self._used

    @property
    def max_rank(self) -> int:
        """Largest resident rank (0 when empty): the kernels' rank bound."""
        return self._max_rank

    def slots(self) -> dict[int, tuple[int, int, float]]:
        """``{slot: (start, rank, scale)}`` of the resident adapters (a copy)."""
        return dict(self._slots)

    def __contains__(self, slot: int) -> bool:
        return slot in self._slots

    def extra_repr(self) -> str:
        return (
            f"K={self.in_features}, N={self.out_features}, adapters={len(self._slots)}, "
            f"rows={self._used}/{self.lora_a.shape[0]}"
        )

    # ------------------------------------------------------------------ capacity
    def reserve(self, rows: int, slots: int) -> None:
        """Grow capacity to at least ``rows`` rank rows and ``slots`` slot ids."""
        if rows > self.lora_a.shape[0]:
            cap = _round_up(max(rows, 2 * self.lora_a.shape[0]), _ROW_PAGE)
            self.lora_a = self._grown(self.lora_a, cap)
            self.lora_bt = self._grown(self.lora_bt, cap)
        if slots > self.slot_rank.shape[0]:
            cap = max(slots, 2 * self.slot_rank.shape[0], 8)
            self.slot_start = self._grown(self.slot_start, cap)
            self.slot_rank = self._grown(self.slot_rank, cap)
            self.slot_scale = self._grown(self.slot_scale, cap)

    @staticmethod
    def _grown(t: Tensor, rows: int) -> Tensor:
        out = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
        out[: t.shape[0]] = t
        return out

    # ------------------------------------------------------------------ mutation
    def check(self, slot: int, A: Tensor, B: Tensor, scale: float, where: str = "") -> None:
        """Raise if ``(A, B, scale)`` cannot be added as ``slot``; changes nothing."""
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
        if slot < 0:
            raise ValueError(f"slot must be >= 0, got {slot}")
        if slot in self._slots:
            raise ValueError(f"slot {slot} is already resident{at}")

    def add(self, slot: int, A: Tensor, B: Tensor, scale: float, where: str = "") -> None:
        """Make adapter ``slot`` resident: ``A [r, K]``, ``B [N, r]``, ``scale = alpha / r``."""
        self.check(slot, A, B, scale, where)
        r = A.shape[0]
        self.reserve(self._used + r, slot + 1)
        start = self._used
        self.lora_a[start : start + r].copy_(A)
        self.lora_bt[start : start + r].copy_(B.T)
        self.slot_start[slot] = start
        self.slot_rank[slot] = r
        self.slot_scale[slot] = scale
        self._slots[slot] = (start, r, float(scale))
        self._used += r
        self._max_rank = max(self._max_rank, r)

    def remove(self, slot: int) -> None:
        """Drop adapter ``slot`` and compact the rows behind it (a no-op if not resident)."""
        if slot not in self._slots:
            return
        start, r, _ = self._slots.pop(slot)
        end = self._used
        if start + r < end:
            # clone: source and destination overlap
            self.lora_a[start : end - r] = self.lora_a[start + r : end].clone()
            self.lora_bt[start : end - r] = self.lora_bt[start + r : end].clone()
        self._used -= r
        self._max_rank = max((rk for _, rk, _ in self._slots.values()), default=0)
        self.slot_rank[slot] = 0
        self.slot_scale[slot] = 0.0
        self.slot_start[slot] = 0
        for k, (s0, rk, sc) in list(self._slots.items()):
            if s0 > start:
                self._slots[k] = (s0 - r, rk, sc)
                self.slot_start[k] = s0 - r

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
