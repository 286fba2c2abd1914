"""``LoRABatch``: which adapters each sample of a forward pass uses, as CSR device tensors.

A batch of ``S`` samples is described by one *mixture* per sample: a mapping
``{adapter: strength}`` (empty = the base model). The batch stores them in CSR form::

    entry_ptr    int32 [S+1]    entries of sample s are entry_ptr[s]:entry_ptr[s+1]
    entry_slot   int32 [E_cap]  slot id of each entry (the adapter's global id)
    entry_weight f32   [E_cap]  strength of each entry

``E_cap >= E`` is a capacity: :meth:`LoRABatch.fill_` rewrites the tensors in place, so a batch
object (and a compiled graph or CUDA graph that holds its tensors) can be reused with other
mixtures of the same sample count. A fill that needs more entries than ``E_cap`` raises
:class:`BatchCapacityError`; so does one needing more entries per sample than
:attr:`LoRABatch.max_entries` once the batch is frozen (:meth:`LoRABatch.freeze`: do it before
capturing a graph, which keeps the capacities it was captured with).

Slots: mixtures name adapters (resolved through a name -> slot table) or give slot ids. With a
table, slot ids must be among its values (a slot the table does not hold raises ``KeyError``)
and :attr:`LoRABatch.known_slots` remembers the table's slots: a known slot may have no
weights in a given layer (rank 0 there, which ``ops`` accepts). Without a table a slot id must
hold an adapter in every layer the batch reaches, which ``ops`` checks per layer.

Rows: the input of a layer has ``M`` rows, in sample order. By default every sample owns
``M / S`` consecutive rows (a ``[S, T, K]`` activation flattened, or ``[S*G, T, K]`` where each
sample owns ``G`` consecutive batch items). Packed variable-length samples give
``rows_per_sample`` instead, which fixes ``row_ptr`` (int32 ``[S+1]``).

Expansion for diffusion (:meth:`LoRABatch.expand`), matching diffusers' batch order:
``images_per_prompt`` repeats each sample that many times consecutively
(``[p0, p0, p1, p1]``), then ``guidance=True`` prepends the unconditional half:
``[uncond p0, uncond p0, uncond p1, uncond p1, cond p0, cond p0, cond p1, cond p1]``. The
unconditional half gets the same mixtures as the conditional half (what A1111 does, since it
merges the LoRA into the weights for both halves); ``uncond_mixtures="empty"`` gives the
unconditional half the base model instead.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from .kernels import BatchTensors

Mixture = Mapping[str | int, float]
"""One sample's adapters and strengths, keyed by adapter name or slot id."""


class BatchCapacityError(ValueError):
    """New mixtures do not fit a batch's capacities: build a new batch (or do not freeze)."""


def normalize_device(device: torch.device | str | None) -> torch.device:
    """``device`` as tensors report it: ``"cuda"`` gets the current index, ``"cpu:0"`` none.

    ``torch.device("cuda") != torch.device("cuda:0")``, so devices are compared only after
    this (a tensor's ``.device`` is already in this form).
    """
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu" and device.index is not None:
        return torch.device("cpu")
    return device


def _capturing(device: torch.device) -> bool:
    """True while a CUDA graph is being captured on the current stream of ``device``."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _resolve_slot(
    key: str | int, slots: Mapping[str, int] | None, known: frozenset[int] | None, sample: int
) -> int:
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise TypeError(f"mixtures[{sample}]: adapter keys must be names or slot ids, got {key!r}")
    if isinstance(key, int):
        if key < 0:
            raise ValueError(f"mixtures[{sample}]: slot id must be >= 0, got {key}")
        if known is not None and key not in known:
            held = ", ".join(map(str, sorted(known))) or "(none)"
            raise KeyError(
                f"mixtures[{sample}]: slot {key} holds no adapter in the name -> slot table "
                f"(slots in use: {held})"
            )
        return key
    if slots is None:
        raise TypeError(
            f"mixtures[{sample}] names adapter {key!r} but no name -> slot table was given "
            "(pass slots=..., or use slot ids)"
        )
    if key not in slots:
        known = ", ".join(sorted(slots)) or "(none loaded)"
        raise KeyError(f"mixtures[{sample}]: unknown adapter {key!r}; known adapters: {known}")
    return slots[key]


def _known(slots: Mapping[str, int] | None) -> frozenset[int] | None:
    return None if slots is None else frozenset(slots.values())


def _canonical(
    mixtures: Sequence[Mixture], slots: Mapping[str, int] | None
) -> tuple[tuple[tuple[int, float], ...], ...]:
    """Validate mixtures and turn them into ``((slot, strength), ...)`` per sample."""
    if isinstance(mixtures, Mapping) or not isinstance(mixtures, Sequence):
        raise TypeError("mixtures must be a sequence with one {adapter: strength} per sample")
    out = []
    known = _known(slots)
    for s, mix in enumerate(mixtures):
        if mix is None:
            mix = {}
        if not isinstance(mix, Mapping):
            raise TypeError(f"mixtures[{s}] must be a mapping adapter -> strength, got {mix!r}")
        merged: dict[int, float] = {}
        for key, strength in mix.items():
            slot = _resolve_slot(key, slots, known, s)
            try:
                w = float(strength)
            except (TypeError, ValueError):
                raise TypeError(
                    f"mixtures[{s}][{key!r}]: strength must be a number, got {strength!r}"
                ) from None
            if not math.isfinite(w):
                raise ValueError(f"mixtures[{s}][{key!r}]: strength must be finite, got {w}")
            # the same adapter named twice (by name and by slot) adds up, as stacked tags do
            merged[slot] = merged.get(slot, 0.0) + w
        # strength-0 entries cost compute and change nothing: drop them
        out.append(tuple((k, w) for k, w in merged.items() if w != 0.0))
    return tuple(out)


class LoRABatch:
    """The per-forward adapter map shared by every patched layer.

    Build it once per forward pass with :meth:`from_mixtures`; every layer reads the same
    tensors. See the module docstring for the CSR layout, the row layout and expansion.

    Attributes:
        num_samples: ``S``.
        mixtures: host copy, ``((slot, strength), ...)`` per sample (strength-0 entries dropped).
        rows_per_sample: ``None`` (every sample owns ``M / S`` rows) or the row count of each.
        max_entries: capacity bound on entries per sample (``>=`` the real maximum).
        real_max_entries: the largest entry count of any sample in the current mixtures.
        known_slots: the slots of the name -> slot table the mixtures were resolved with, or
            ``None`` (bare slot ids); see the module docstring.
        frozen: capacities fixed by :meth:`freeze`.
        device: where the tensors live (normalised, taken from the tensors themselves).
    """

    def __init__(
        self,
        mixtures: tuple[tuple[tuple[int, float], ...], ...],
        *,
        device: torch.device | str | None = None,
        rows_per_sample: Sequence[int] | None = None,
        entry_capacity: int | None = None,
        max_entries: int | None = None,
        known_slots: Collection[int] | None = None,
    ) -> None:
        dev = normalize_device(device)
        self.num_samples = len(mixtures)
        if self.num_samples == 0:
            raise ValueError("mixtures: a batch needs at least one sample")
        self.rows_per_sample: tuple[int, ...] | None = None
        self.row_ptr: Tensor | None = None
        if rows_per_sample is not None:
            rows = [int(r) for r in rows_per_sample]
            if len(rows) != self.num_samples:
                raise ValueError(
                    f"rows_per_sample has {len(rows)} entries for {self.num_samples} samples"
                )
            if any(r < 0 for r in rows):
                raise ValueError("rows_per_sample: row counts must be >= 0")
            self.rows_per_sample = tuple(rows)
            ptr = [0]
            for r in rows:
                ptr.append(ptr[-1] + r)
            self.row_ptr = torch.tensor(ptr, dtype=torch.int32, device=dev)
        num_entries = sum(len(m) for m in mixtures)
        cap = max(num_entries, entry_capacity or 0, 1)
        self.entry_ptr = torch.zeros(self.num_samples + 1, dtype=torch.int32, device=dev)
        self.entry_slot = torch.zeros(cap, dtype=torch.int32, device=dev)
        self.entry_weight = torch.zeros(cap, dtype=torch.float32, device=dev)
        self._max_entries_cap = max_entries or 0
        self.frozen = False
        self.mixtures = mixtures
        self.version = 0  # bumped by every rewrite, so caches keyed on a batch can tell
        # num_rows -> (BatchTensors, max_rows); the tensors keep their identity across fill_
        self._row_cache: dict[int, tuple[BatchTensors, int]] = {}
        self._write(mixtures, None if known_slots is None else frozenset(known_slots))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_mixtures(
        cls,
        mixtures: Sequence[Mixture],
        slots: Mapping[str, int] | None = None,
        *,
        device: torch.device | str | None = None,
        rows_per_sample: Sequence[int] | None = None,
        entry_capacity: int | None = None,
        max_entries: int | None = None,
    ) -> LoRABatch:
        """Build a batch from one ``{adapter: strength}`` mapping per sample.

        Args:
            mixtures: ``S`` mappings; keys are adapter names (resolved through ``slots``) or
                integer slot ids; strengths are finite floats (0 drops the entry).
            slots: name -> slot table (``MultiLoRA`` owns one); unknown names raise ``KeyError``
                listing the known ones.
            device: where the CSR tensors live (the layer's device).
            rows_per_sample: packed variable-length rows; default equal-length samples.
            entry_capacity: minimum ``E_cap`` so that later :meth:`fill_` calls fit in place.
            max_entries: minimum bound on entries per sample reported to kernels; a fixed
                bound keeps compiled graphs from specialising on the current mixtures.
        """
        return cls(
            _canonical(mixtures, slots),
            device=device,
            rows_per_sample=rows_per_sample,
            entry_capacity=entry_capacity,
            max_entries=max_entries,
            known_slots=_known(slots),
        )

    def _write(
        self, mixtures: tuple[tuple[tuple[int, float], ...], ...], known: frozenset[int] | None
    ) -> None:
        real_max = max((len(m) for m in mixtures), default=0)
        if self.frozen and real_max > self._max_entries_cap:
            raise BatchCapacityError(
                f"mixtures have {real_max} entries in one sample; this frozen batch holds at "
                f"most {self._max_entries_cap} per sample (graphs captured with it keep that "
                "bound): build a new batch"
            )
        ptr, slot, weight = [0], [], []
        for mix in mixtures:
            for k, w in mix:
                slot.append(k)
                weight.append(w)
            ptr.append(len(slot))
        e = len(slot)
        # One host->device copy per tensor; the tail past E keeps stale values that no
        # sample's entry range reaches.
        self.entry_ptr.copy_(torch.tensor(ptr, dtype=torch.int32))
        if e:
            self.entry_slot[:e].copy_(torch.tensor(slot, dtype=torch.int32))
            self.entry_weight[:e].copy_(torch.tensor(weight, dtype=torch.float32))
        self.mixtures = mixtures
        self.max_slot = max(slot, default=-1)  # host copy, so layers need not scan mixtures
        self.used_slots = frozenset(slot)  # host copy, checked by every layer
        self.known_slots = known
        self.version += 1
        self.real_max_entries = real_max
        self._max_entries_cap = max(self._max_entries_cap, real_max)

    def fill_(self, mixtures: Sequence[Mixture], slots: Mapping[str, int] | None = None) -> None:
        """Rewrite this batch in place with new mixtures for the same samples.

        Raises ``ValueError`` if the sample count differs, :class:`BatchCapacityError` if the
        entries exceed the capacity (or, frozen, the entries per sample exceed
        :attr:`max_entries`): then build a new batch. Tensors keep their identity, so graphs
        holding them stay valid.
        """
        canon = _canonical(mixtures, slots)
        if len(canon) != self.num_samples:
            raise ValueError(
                f"mixtures has {len(canon)} samples; this batch was built for {self.num_samples}"
            )
        e = sum(len(m) for m in canon)
        if e > self.entry_slot.numel():
            raise BatchCapacityError(
                f"mixtures have {e} entries; this batch holds at most {self.entry_slot.numel()}"
            )
        self._write(canon, _known(slots))

    def bind_slots(self, known: Collection[int]) -> LoRABatch:
        """Declare which slot ids hold an adapter (a manager's name -> slot table values) for
        a batch built from bare slot ids: raises ``KeyError`` naming the used slots outside
        ``known``, else remembers them as :attr:`known_slots` (a known slot may have rank 0
        in a layer). Returns ``self``."""
        known = frozenset(known)
        unknown = sorted(self.used_slots - known)
        if unknown:
            raise KeyError(f"batch uses slot ids {unknown} that hold no loaded adapter")
        self.known_slots = known
        return self

    def freeze(self) -> LoRABatch:
        """Fix the capacities: from now on :meth:`fill_` raises instead of growing
        :attr:`max_entries`, and kernels are launched with the capacities (not the current
        maxima), so a CUDA graph captured with this batch stays valid for every later fill.
        Returns ``self``."""
        self.frozen = True
        return self

    @property
    def device(self) -> torch.device:
        """Where the batch's tensors are (normalised: ``cuda:0``, never bare ``cuda``)."""
        return self.entry_ptr.device

    # ------------------------------------------------------------------ queries
    @property
    def max_entries(self) -> int:
        """Upper bound on mixture entries per sample (never shrinks across :meth:`fill_`)."""
        return self._max_entries_cap

    @property
    def num_entries(self) -> int:
        return int(sum(len(m) for m in self.mixtures))

    @property
    def is_empty(self) -> bool:
        """True when no sample uses any adapter (the base model for everyone)."""
        return all(len(m) == 0 for m in self.mixtures)

    def rows_for(self, num_rows: int, argname: str = "x") -> tuple[Tensor, int]:
        """``(row_ptr, max_rows)`` for a layer input with ``num_rows`` rows.

        Equal-length batches split the rows into ``S`` equal consecutive segments; packed
        batches require ``num_rows == sum(rows_per_sample)``.
        """
        if self.rows_per_sample is not None:
            total = sum(self.rows_per_sample)
            if num_rows != total:
                raise ValueError(
                    f"{argname} has {num_rows} rows but the batch's rows_per_sample sum to {total}"
                )
            assert self.row_ptr is not None
            return self.row_ptr, max(self.rows_per_sample)
        s = self.num_samples
        if num_rows % s != 0:
            raise ValueError(
                f"{argname} has {num_rows} rows (batch x tokens), which the batch's {s} samples "
                "do not divide; pass rows_per_sample for packed variable-length samples"
            )
        per = num_rows // s
        ptr = torch.arange(0, s + 1, dtype=torch.int32, device=self.device) * per
        return ptr, per

    def tensors(self, num_rows: int, argname: str = "x") -> tuple[BatchTensors, int]:
        """``(BatchTensors, max_rows)`` for a layer input of ``num_rows`` rows (see
        :meth:`rows_for`): the kernels' view of this batch.

        Cached per row count in eager mode, so every layer with that row count shares one
        ``row_ptr``. Not cached while tracing, nor during CUDA-graph capture: the ``arange``
        of ``row_ptr`` would then only be recorded, never run, and a later eager call would
        read uninitialised memory.
        """
        eager = not torch.compiler.is_compiling() and not _capturing(self.entry_ptr.device)
        if eager:
            cached = self._row_cache.get(num_rows)
            if cached is not None:
                return cached
        row_ptr, max_rows = self.rows_for(num_rows, argname)
        out = BatchTensors(row_ptr, self.entry_ptr, self.entry_slot, self.entry_weight), max_rows
        if eager:
            self._row_cache[num_rows] = out
        return out

    # ------------------------------------------------------------------ expansion
    def expand(
        self,
        *,
        images_per_prompt: int = 1,
        guidance: bool = False,
        uncond_mixtures: Literal["same", "empty"] = "same",
    ) -> LoRABatch:
        """Expand a per-prompt batch to the UNet's batch (see the module docstring for order)."""
        if not isinstance(images_per_prompt, int) or images_per_prompt < 1:
            raise ValueError(f"images_per_prompt must be an int >= 1, got {images_per_prompt!r}")
        if uncond_mixtures not in ("same", "empty"):
            raise ValueError(f"uncond_mixtures must be 'same' or 'empty', got {uncond_mixtures!r}")
        mixes = tuple(m for m in self.mixtures for _ in range(images_per_prompt))
        rows = None
        if self.rows_per_sample is not None:
            rows = tuple(r for r in self.rows_per_sample for _ in range(images_per_prompt))
        if guidance:
            uncond = mixes if uncond_mixtures == "same" else tuple(() for _ in mixes)
            mixes = uncond + mixes
            rows = None if rows is None else rows + rows
        return LoRABatch(
            mixes, device=self.device, rows_per_sample=rows, known_slots=self.known_slots
        )

    def to(self, device: torch.device | str) -> LoRABatch:
        """The same batch with its tensors on ``device``."""
        if normalize_device(device) == self.device:
            return self
        out = LoRABatch(
            self.mixtures,
            device=device,
            rows_per_sample=self.rows_per_sample,
            entry_capacity=self.entry_slot.numel(),
            max_entries=self._max_entries_cap,
            known_slots=self.known_slots,
        )
        out.frozen = self.frozen
        return out

    def slots_in_use(self) -> set[int]:
        """The slot ids the current mixtures use (a copy)."""
        return set(self.used_slots)

    def __repr__(self) -> str:
        return (
            f"LoRABatch(S={self.num_samples}, E={self.num_entries}, "
            f"E_cap={self.entry_slot.numel()}, device={self.device})"
        )
