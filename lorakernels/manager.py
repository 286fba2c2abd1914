"""``MultiLoRA``: patch a model's layers, keep adapters resident, choose mixtures per forward.

The manager owns the name -> slot table shared by all layers of one model (slot ``k`` is the
same adapter in every layer; the table is the source of truth for which slot ids hold an
adapter) and the :class:`~lorakernels.modules.LoRAContext` the patched layers read::

    mlora = MultiLoRA(unet, targets=["*attn2.to_*"])
    mlora.load("ink", {"down_blocks.0...attn2.to_q": (A, B, alpha), ...})
    mlora.load("cyber", {...})
    with mlora.use([{"ink": 0.8}, {"ink": 0.3, "cyber": 1.0}, {}]):
        out = unet(...)                       # sample 0: ink, 1: a mix, 2: the base model

Adapters beyond memory: give an :class:`~lorakernels.AdapterLibrary` (thousands of files)
and a budget (``max_resident_adapters`` and/or ``resident_bytes``). ``use()`` then makes the
batch's adapters resident on demand and evicts the least recently used ones the batch does
not need; ``pin``/``unpin``, ``prefetch`` (background reads) and ``stats()`` complete it.

Loading is all-or-nothing: every layer is checked before any bank changes, and a failure
while writing rolls back what was written (layers patched for it are unpatched again).
``W`` is never modified.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import itertools
import math
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor, nn

from .adapters import AdapterLibrary, Budget, ResidencyPool
from .bank import LoRABank
from .batch import LoRABatch, Mixture
from .formats import LoRAFile, resolve_modules
from .modules import LoRAContext, MultiLoRAConv2d, MultiLoRALinear

Target = str | Callable[[str, nn.Module], bool]
LayerWeights = Any  # (A, B, alpha) tuple or an object with .down, .up, .alpha
Layer = MultiLoRALinear | MultiLoRAConv2d
# (module path, A [r, K'], B [N, r], scale): one layer of an adapter, ready for a bank
Plan = list[tuple[str, Tensor, Tensor, float]]

# Bound on mixture entries per sample that batches report to the kernels. A fixed bound keeps
# torch.compile from specialising on the mixtures of the first batch; 4 covers the usual mixes
# (a style + a character + 2 more) and a larger mixture raises it to its real count. It also
# enters the Triton tile choice, so changing it changes kernel configs.
_MAX_ENTRIES_HINT = 4
_TOKENS = itertools.count()


def _as_predicate(targets: Target | Sequence[Target] | None) -> Callable[[str, nn.Module], bool]:
    if targets is None:
        return lambda name, mod: True
    if isinstance(targets, str) or callable(targets):
        targets = [targets]
    preds = []
    for t in targets:
        if isinstance(t, str):
            preds.append(lambda name, mod, pat=t: fnmatch.fnmatchcase(name, pat))
        elif callable(t):
            preds.append(t)
        else:
            raise TypeError(f"targets: expected glob patterns or predicates, got {t!r}")
    return lambda name, mod: any(p(name, mod) for p in preds)


def _unpack(value: LayerWeights, where: str) -> tuple[Tensor, Tensor, float]:
    """``(A, B, scale)`` from a ``(A, B, alpha)`` tuple or a weights object; alpha None -> 1."""
    if isinstance(value, tuple | list):
        if len(value) != 3:
            raise ValueError(f"{where}: expected (A, B, alpha), got {len(value)} items")
        a, b, alpha = value
    elif hasattr(value, "down") and hasattr(value, "up"):
        if getattr(value, "mid", None) is not None:
            raise ValueError(f"{where}: Tucker lora_mid must be folded into down before loading")
        a, b, alpha = value.down, value.up, getattr(value, "alpha", None)
    else:
        raise TypeError(f"{where}: expected (A, B, alpha) or LoRA weights, got {type(value)}")
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError(f"{where}: A and B must be tensors")
    r = a.shape[0] if a.dim() else 0
    if alpha is None:
        scale = 1.0
    else:
        alpha = float(alpha.item() if isinstance(alpha, Tensor) else alpha)
        if not math.isfinite(alpha):
            raise ValueError(f"{where}: alpha must be finite, got {alpha}")
        scale = alpha / r if r else 0.0
    return a, b, scale


def _plain_conv(layer: MultiLoRAConv2d) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` sharing ``layer``'s parameters (built on the meta device, so
    nothing is allocated before the parameters are swapped in)."""
    conv = nn.Conv2d(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=layer.groups,
        bias=False,
        padding_mode=layer.padding_mode,
        device="meta",
    )
    conv.weight = layer.weight
    conv.bias = layer.bias
    return conv


def _rows_per_layer(plan: Plan) -> dict[str, int]:
    """``{layer path: rank rows}`` an adapter's plan writes (its ``A`` factors' rows)."""
    rows: dict[str, int] = {}
    for path, a, _, _ in plan:
        rows[path] = rows.get(path, 0) + a.shape[0]
    return rows


class MultiLoRA:
    """Patch ``model`` in place and serve many adapters at once.

    Args:
        model: any ``nn.Module``.
        targets: which ``nn.Linear``/``nn.Conv2d`` layers to patch now: glob patterns on the
            module path (``"*attn2.to_*"``), predicates ``(name, module) -> bool``, or a list
            of them. ``None`` patches nothing up front and patches, at load time, exactly the
            layers an adapter touches.
        library: where adapter names come from (:class:`~lorakernels.AdapterLibrary`; a
            private one by default). ``use()`` loads any of its adapters on demand.
        max_resident_adapters: at most this many adapters resident at once (slot ids).
        resident_bytes: bytes of bank storage, preallocated up front: every patched layer
            gets ``R = resident_bytes // Σ_layers (K + N) × itemsize`` rank rows (with
            ``targets=None`` the sum runs over every Linear/Conv2d of the model, since any
            may get patched). An adapter of rank ``r`` uses ``r`` rows in each layer it
            touches, so small ranks fit more adapters. Without it, banks grow on demand
            (reallocating, which invalidates captured CUDA graphs).
        backend: backend for every patched layer (``None``: the usual resolution, see ``ops``).
        component: which part of a LoRA file this model is (``"unet"``, ``"text_encoder"``,
            …); ``None`` takes a file's only component.
        plan: ``"auto"``, ``"merged"`` or ``"unmerged"`` for every patched layer (merged
            weights or the unmerged LoRA term per group of samples, see
            :mod:`lorakernels.plan`); ``None``: :func:`~lorakernels.plan.use_plan` /
            ``LORAKERNELS_PLAN`` / auto.

    Thread safety: ``use()`` may be entered from several threads or asyncio tasks at once;
    each sees its own batch (eager mode; see :class:`~lorakernels.modules.LoRAContext` for
    ``torch.compile``). Loading, eviction, ``pin``, ``unpin`` and ``prefetch`` are serialised
    by one lock and never touch an adapter that an open ``use()`` block uses; loading writes
    only free rank rows and free slot ids, so concurrent forwards of other callers are safe.
    The one exception, compacting fragmented rows, waits until no ``use()`` block is open.
    """

    def __init__(
        self,
        model: nn.Module,
        targets: Target | Sequence[Target] | None = None,
        *,
        library: AdapterLibrary | None = None,
        max_resident_adapters: int | None = None,
        resident_bytes: int | None = None,
        backend: str | None = None,
        component: str | None = None,
        plan: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if library is not None and not isinstance(library, AdapterLibrary):
            raise TypeError(f"library must be an AdapterLibrary, got {type(library).__name__}")
        for arg, v in (
            ("max_resident_adapters", max_resident_adapters),
            ("resident_bytes", resident_bytes),
        ):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{arg} must be an int >= 1 or None, got {v!r}")
        self.model = model
        self.context = LoRAContext(backend, plan)
        self.library = library if library is not None else AdapterLibrary()
        self.component = component
        self.auto_patch = targets is None
        self.drop_empty = False  # the diffusers wiring drops adapters with no weights here
        self.slots: dict[str, int] = {}  # resident adapter -> slot id
        self._free: list[int] = []
        self._next_slot = 0
        self.layers: dict[str, Layer] = {}
        self._banks: dict[str, LoRABank] = {}  # the layers' banks (module getattr costs ~1 µs)
        self._batches: dict[tuple[int, tuple[int, ...] | None], list[LoRABatch]] = {}
        self._active_batches: Counter[int] = Counter()  # batch id -> open use() blocks
        self._held: dict[int, set[str]] = {}  # batch id -> adapters its open blocks hold
        self._owned: set[str] = set()  # library entries that load() created
        self._empty: dict[str, Any] = {}  # adapter -> stamp: known to have no layer here
        self._stamps: dict[str, Any] = {}  # resident adapter -> stamp of what the banks hold
        self._mappings: dict[str, tuple[Any, list[tuple[str, int]]]] = {}
        self._module_names: list[str] | None = None
        self._token = next(_TOKENS)  # this manager's key for what it memoises in the library
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._open_threads: dict[int, int] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        self._events: dict[str, Any] = {}  # CUDA events of background writes
        self.reallocations = 0

        candidates = self._candidates(model, targets)
        rows = None
        biggest = self._largest_known_rank()  # (name, rank) of the library's largest adapter
        if resident_bytes is not None:
            per_row = self.bytes_per_row(model, targets)
            if per_row == 0:
                raise ValueError("resident_bytes: the model has no Linear/Conv2d layer to patch")
            rows = resident_bytes // per_row
            if rows < 1:
                raise ValueError(
                    f"resident_bytes={resident_bytes} is smaller than one adapter: a rank-1 "
                    f"adapter over the {len(candidates)} patchable layers takes {per_row} bytes"
                )
            if biggest is not None and biggest[1] > rows:
                raise ValueError(
                    f"resident_bytes={resident_bytes} gives {rows} rank rows per layer, smaller "
                    f"than adapter {biggest[0]!r} (rank {biggest[1]}); it needs at least "
                    f"{biggest[1] * per_row} bytes"
                )
        self.pool = ResidencyPool(Budget(max_resident_adapters, resident_bytes, rows))
        self._rank_floor = biggest[1] if biggest is not None else 0
        self._slot_cap = max_resident_adapters or (rows if rows is not None else None)
        if rows is None and max_resident_adapters is not None:
            self._prealloc_rows = max_resident_adapters * (biggest[1] if biggest else 0)
        else:
            self._prealloc_rows = rows or 0
        if targets is not None:
            for n in candidates:
                self._patch(n)

    @staticmethod
    def _candidates(model: nn.Module, targets: Target | Sequence[Target] | None) -> list[str]:
        pred = _as_predicate(targets)
        return [
            n
            for n, m in model.named_modules()
            if n and isinstance(m, nn.Linear | nn.Conv2d) and pred(n, m)
        ]

    @staticmethod
    def bytes_per_row(model: nn.Module, targets: Target | Sequence[Target] | None = None) -> int:
        """``Σ (K + N) × itemsize`` over the layers ``targets`` selects (every Linear/Conv2d
        for ``None``): the bytes one rank row costs across them, the unit of
        ``resident_bytes``."""
        total = 0
        for n in MultiLoRA._candidates(model, targets):
            w = model.get_submodule(n).weight
            total += (w[0].numel() + w.shape[0]) * w.element_size()
        return total

    def _largest_known_rank(self) -> tuple[str, int] | None:
        """The library adapter with the largest rank its header shows (no tensor read)."""
        best: tuple[str, int] | None = None
        for name in self.library.names():
            rank = self.library.info(name).max_rank
            if rank is not None and (best is None or rank > best[1]):
                best = (name, rank)
        return best

    # ------------------------------------------------------------------ patching
    def patch(self, name: str) -> Layer:
        """Patch one more layer by module path (idempotent); it starts with no adapters."""
        with self._lock:
            return self._patch(name)

    def _patch(self, name: str) -> Layer:
        if name in self.layers:
            return self.layers[name]
        mod = self.model.get_submodule(name)
        if isinstance(mod, MultiLoRALinear | MultiLoRAConv2d):
            raise ValueError(f"{name} is already patched by another MultiLoRA")
        if isinstance(mod, nn.Linear):
            new: Layer = MultiLoRALinear.from_linear(mod, self.context)
        elif isinstance(mod, nn.Conv2d):
            new = MultiLoRAConv2d.from_conv(mod, self.context)
        else:
            raise TypeError(f"{name} is a {type(mod).__name__}; only Linear and Conv2d take LoRA")
        w = mod.weight
        bounded = self.pool.budget.rows_per_layer is not None
        new.lora_bank = LoRABank(
            new.lora_bank.in_features,
            new.lora_bank.out_features,
            dtype=w.dtype,
            device=w.device,
            rows=self._prealloc_rows,
            slots=self._slot_cap if self._slot_cap is not None else max(8, self._next_slot),
            growable=not bounded,
        )
        for slot in self.slots.values():
            new.lora_bank.register(slot)
        if self.pool.bounded:  # keep the kernels' rank bound fixed (see LoRABank.rank_floor)
            new.lora_bank.rank_floor = self._rank_floor
        self._set(name, new)
        self.layers[name] = new
        self._banks[name] = new.lora_bank
        return new

    def _set(self, name: str, module: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, module)

    def _unpatch_one(self, name: str) -> None:
        layer = self.layers.pop(name)
        self._banks.pop(name, None)
        orig = layer.unpatched() if isinstance(layer, MultiLoRALinear) else _plain_conv(layer)
        self._set(name, orig)

    def unpatch(self) -> None:
        """Put the original layer types back (parameters untouched) and forget all adapters."""
        with self._lock:
            for name in list(self.layers):
                self._unpatch_one(name)
            for name in list(self._owned):
                self.library.remove(name)
            self._owned.clear()
            self.slots.clear()
            self._free.clear()
            self._next_slot = 0
            self.pool.lru.clear()
            self.pool.pinned.clear()

    # ------------------------------------------------------------------ adapters
    @property
    def adapters(self) -> list[str]:
        """Names of the resident adapters, least recently used first."""
        with self._lock:
            return [n for n in self.pool.lru if n in self.slots]

    def _names(self) -> list[str]:
        if self._module_names is None:
            self._module_names = [n for n, _ in self.model.named_modules() if n]
        return self._module_names

    def _layer_for_load(self, path: str) -> nn.Module | None:
        if path in self.layers:
            return self.layers[path]
        if not self.auto_patch:
            return None
        try:
            mod = self.model.get_submodule(path)
        except AttributeError:
            return None
        return mod if isinstance(mod, nn.Linear | nn.Conv2d) else None

    def _component_of(self, name: str, components: Iterable[str]) -> str | None:
        comps = list(components)
        if self.component is not None:
            return self.component if self.component in comps else None
        if len(comps) > 1:
            raise ValueError(
                f"adapter {name!r} has weights for {comps}; build MultiLoRA(component=...) to "
                "say which one this model is"
            )
        return comps[0] if comps else None

    def _plan(self, name: str, *, strict: bool = True) -> Plan | None:
        """The adapter's layers for this model (``None``: no weights here), checked against
        the layers' shapes. Reads the file through the library (host cache) and memoises the
        plan with the cache entry; runs outside the manager lock."""
        source, stamp = self.library.get(name)
        return self.library.derived(
            name,
            stamp,
            (self._token, strict),
            lambda: self._build_plan(name, source, stamp, strict),
        )

    def _build_plan(self, name: str, source: Any, stamp: Any, strict: bool) -> Plan | None:
        if isinstance(source, LoRAFile):
            comp = self._component_of(name, dict.fromkeys(lay.component for lay in source.layers))
            if comp is None:
                return None
            cached = self._mappings.get(name)
            if cached is None or cached[0] != stamp:
                mine = [i for i, lay in enumerate(source.layers) if lay.component == comp]
                sub = dataclasses.replace(source, layers=tuple(source.layers[i] for i in mine))
                resolved = resolve_modules(sub, {comp: self._names()}, strict=strict)[comp]
                by_key = {id(w): p for p, w in resolved.items()}
                mapping = [
                    (by_key[id(source.layers[i].weights)], i)
                    for i in mine
                    if id(source.layers[i].weights) in by_key
                ]
                self._mappings[name] = cached = (stamp, mapping)
            items: list[tuple[str, Any]] = [(p, source.layers[i].weights) for p, i in cached[1]]
        else:
            comp = self._component_of(name, source)
            if comp is None:
                return None
            items = list(source[comp].items())
        plan: Plan = []
        unmatched = []
        for path, value in items:
            layer = self._layer_for_load(path)
            if layer is None:
                unmatched.append(path)
                continue
            a, b, scale = _unpack(value, f"{name!r} layer {path}")
            a = a.reshape(a.shape[0], -1)  # conv [r, C, kh, kw] -> [r, C*kh*kw]
            b = b.reshape(b.shape[0], -1)  # conv [C_out, r, 1, 1] -> [C_out, r]
            bank = getattr(layer, "lora_bank", None)
            if bank is None:  # not patched yet (auto-patch): check the shapes directly
                w = layer.weight  # type: ignore[union-attr]
                bank = LoRABank(w[0].numel(), w.shape[0], dtype=w.dtype)
            bank.check_factors(a, b, scale, where=f"adapter {name!r} layer {path}")
            plan.append((path, a, b, scale))
        if unmatched:
            listed = ", ".join(sorted(unmatched)[:10])
            more = f" (+{len(unmatched) - 10} more)" if len(unmatched) > 10 else ""
            msg = (
                f"adapter {name!r}: {len(unmatched)} path(s) match no patchable layer: "
                f"{listed}{more}"
            )
            if strict:
                raise KeyError(msg)
            warnings.warn(msg + "; skipped", stacklevel=3)
        return plan or None

    def load(self, name: str, weights: Mapping[str, LayerWeights], *, strict: bool = True) -> None:
        """Load adapter ``name`` from ``{module_path: (A, B, alpha)}`` (or weight objects).

        ``A`` is ``[r, K]`` (``[r, C_in, kh, kw]`` for convs), ``B`` is ``[N, r]``
        (``[C_out, r, 1, 1]``); ``alpha=None`` means scale 1, else scale ``alpha / r``.
        Paths that name no patched layer raise ``KeyError`` listing them (``strict=False``:
        they are skipped with a warning). Factors holding NaN/inf raise. The weights join
        :attr:`library` (so the pool may evict and reload them). All-or-nothing: on any
        error nothing changes.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty string, got {name!r}")
        if name in self.slots or name in self._owned:
            raise ValueError(f"adapter {name!r} is already loaded; unload it first")
        if not isinstance(weights, Mapping) or not weights:
            raise ValueError(
                f"weights for {name!r} must be a non-empty mapping path -> (A, B, alpha)"
            )
        self.library.add(name, {self.component or "model": weights})
        try:
            plan = self._plan(name, strict=strict)
            if plan is None:
                raise ValueError(f"adapter {name!r} touches no layer of this model")
            with self._lock:
                self._make_resident(name, plan, needed={name})
        except BaseException:
            self.library.remove(name)
            raise
        self._owned.add(name)

    def load_from_library(self, name: str, *, strict: bool = True) -> bool:
        """Make library adapter ``name`` resident now (evicting if the budget requires).

        Returns ``False`` when the adapter has no weights in this model (nothing loaded).
        """
        canon = self.library.resolve(name)
        with self._lock:
            if canon in self.slots:
                self.pool.touch(canon)
                return True
        plan = self._plan(canon, strict=strict)
        with self._lock:
            if plan is None:
                self._empty[canon] = self.library.stamp(canon)
                return False
            self._empty.pop(canon, None)
            if canon not in self.slots:
                self._make_resident(canon, plan, needed={canon})
            return True

    def unload(self, name: str) -> None:
        """Remove adapter ``name`` from every layer (raises if an open ``use()`` uses it)."""
        with self._lock:
            if name not in self.slots:
                raise KeyError(
                    f"unknown adapter {name!r}; loaded: {', '.join(self.slots) or '(none)'}"
                )
            if self.pool.refs[name]:
                raise ValueError(f"adapter {name!r} is used by the active batch; leave use() first")
            self._evict(name)
            self.pool.forget(name)
            if name in self._owned:
                self._owned.discard(name)
                self.library.remove(name)

    # ------------------------------------------------------------------ residency
    def _make_resident(self, name: str, plan: Plan, needed: set[str]) -> None:
        """Write ``plan`` into the banks under a fresh slot, evicting LRU adapters outside
        ``needed`` as the budget requires. Caller holds the lock. All-or-nothing."""
        need_rows = _rows_per_layer(plan)
        cap = self.pool.budget.rows_per_layer
        if cap is not None:
            too_big = {p: r for p, r in need_rows.items() if r > cap}
            if too_big:
                p, r = next(iter(too_big.items()))
                raise ValueError(
                    f"adapter {name!r} has rank {r} in {p}, more than the budget allows "
                    f"({self.pool.budget.describe()})"
                )
        while not self._fits(name, need_rows):
            victims = self.pool.victims(needed)
            if victims:
                self._evict(victims[0])
                self.pool.evictions += 1
                continue
            if self._fits(name, need_rows, compact=True) and self._may_wait():
                # compaction moves live rows: wait until no caller holds any adapter (refs
                # are taken under this lock before a caller's forward can start)
                self._idle.wait_for(lambda: not self.pool.refs)
                for path in need_rows:
                    if path in self.layers and not self.layers[path].lora_bank.fits(
                        need_rows[path], compact=False
                    ):
                        self.layers[path].lora_bank.compact()
                continue
            busy = sorted(n for n in self.pool.lru if self.pool.refs[n] or n in self.pool.pinned)
            raise ValueError(
                f"adapter {name!r} does not fit the budget ({self.pool.budget.describe()}): "
                f"the batch needs {sorted(needed)}; in use or pinned: {busy}"
            )
        slot = self._free.pop() if self._free else self._take_new_slot()
        patched: list[str] = []
        done: list[LoRABank] = []
        try:
            for path, a, b, scale in plan:
                if path not in self.layers:
                    self._patch(path)
                    patched.append(path)
                bank = self._banks[path]
                before = bank.tensors()[0]
                bank.add(
                    slot, a, b, scale, f"adapter {name!r} layer {path}", compact=False, checked=True
                )
                if bank.tensors()[0] is not before:
                    self.reallocations += 1
                done.append(bank)
            for bank in self._banks.values():
                bank.register(slot)
        except BaseException:
            for bank in done:
                bank.remove(slot)
            for bank in self._banks.values():
                bank.unregister(slot)
            for path in patched:
                self._unpatch_one(path)
            self._free.append(slot)
            raise
        self.slots[name] = slot
        self._stamps[name] = self._stamp_or_none(name)
        self.pool.touch(name)

    def _take_new_slot(self) -> int:
        slot = self._next_slot
        self._next_slot += 1
        if self._slot_cap is None:
            for layer in self.layers.values():
                layer.lora_bank.reserve(0, self._next_slot)
        return slot

    def _fits(self, name: str, need_rows: dict[str, int], *, compact: bool = False) -> bool:
        if self._slot_cap is not None and len(self.slots) >= self._slot_cap:
            return False
        if self.pool.budget.rows_per_layer is None:
            return True
        rows = self.pool.budget.rows_per_layer
        for path, r in need_rows.items():
            bank = self._banks.get(path)
            if bank is None:
                if r > rows:
                    return False
            elif not bank.fits(r, compact=compact):
                return False
        return True

    def _may_wait(self) -> bool:
        if not self.pool.refs:
            return True
        if self._open_threads.get(threading.get_ident()):
            raise RuntimeError(
                "the banks are fragmented and compacting them needs every use() block closed, "
                "but this thread (or an asyncio task on it) has one open"
            )
        return True

    def _evict(self, name: str) -> None:
        slot = self.slots.pop(name)
        self._stamps.pop(name, None)
        for bank in self._banks.values():
            bank.remove(slot)
        self._free.append(slot)
        self.pool.lru.pop(name, None)

    def pin(self, name: str) -> None:
        """Load ``name`` if needed and keep it resident until :meth:`unpin`."""
        canon = self.library.resolve(name)
        if self.load_from_library(canon):
            with self._lock:
                self.pool.pinned.add(canon)

    def unpin(self, name: str) -> None:
        """Let ``name`` be evicted again (a no-op if it was not pinned)."""
        with self._lock:
            self.pool.pinned.discard(self.library.resolve(name))

    def prefetch(self, names: Iterable[str]) -> Future:
        """Load ``names`` in the background (file read, conversion and bank writes on a worker
        thread; on CUDA the copies run on a side stream and ``use()`` waits for their event).

        Eviction for a prefetch takes only adapters no open ``use()`` block uses and never
        compacts, so it is safe while other threads run forwards. Unknown names raise here;
        a failing file fails its own prefetch (the future's exception), not later batches.
        Returns a future that resolves when all are resident (or found to have no weights).
        """
        canon = [self.library.resolve(n) for n in names]
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="lorakernels-prefetch")
            self._pending = [f for f in self._pending if not f.done()]
            future = self._executor.submit(self._prefetch_all, canon)
            self._pending.append(future)
        return future

    def _prefetch_all(self, names: list[str]) -> None:
        errors = []
        for name in names:
            with self._lock:
                if name in self.slots or name in self._empty:
                    continue
            try:
                plan = self._plan(name)
                with self._lock:
                    if plan is None:
                        self._empty[name] = self.library.stamp(name)
                        continue
                    if name in self.slots or not self._prefetch_fits(name, plan):
                        continue
                    stream = self._side_stream()
                    if stream is not None:
                        # rows being evicted may still be read by kernels queued on the
                        # compute stream for a batch that has left use() on the host
                        stream.wait_stream(torch.cuda.default_stream(stream.device))
                    on_side = torch.cuda.stream(stream) if stream is not None else None
                    with on_side or contextlib.nullcontext():
                        self._make_resident(name, plan, needed=set(names))
                    if stream is not None:
                        event = torch.cuda.Event()
                        event.record(stream)
                        self._events[name] = event
                    self.pool.prefetched += 1
            except Exception as exc:  # noqa: BLE001 (collected and re-raised below)
                errors.append(exc)
        if errors:
            raise errors[0]

    def _prefetch_fits(self, name: str, plan: Plan) -> bool:
        need = _rows_per_layer(plan)
        # room after evicting everything evictable, without compaction (others may be reading)
        return self._fits(name, need) or bool(self.pool.victims(()))

    def _side_stream(self):
        dev = self._device()
        if dev.type != "cuda":
            return None
        if not hasattr(self, "_stream"):
            self._stream = torch.cuda.Stream(device=dev)
        return self._stream

    def wait_prefetch(self) -> None:
        """Block until every submitted prefetch finished (re-raising the first failure)."""
        for f in list(self._pending):
            f.result()

    def stats(self) -> dict[str, Any]:
        """``resident`` (names, LRU first), ``resident_bytes`` (Σ real ranks × (K + N) ×
        itemsize over the patched layers: no page slack), ``capacity_bytes`` (what the banks
        allocated), ``hits``/``misses`` (adapters a ``use()`` found resident / had to load),
        ``evictions``, ``prefetched``, ``pinned``, ``reallocations``, ``budget``."""
        with self._lock:
            return {
                "resident": [n for n in self.pool.lru if n in self.slots],
                "resident_bytes": sum(ly.lora_bank.used_bytes for ly in self.layers.values()),
                "capacity_bytes": sum(
                    ly.lora_bank.capacity_rows * ly.lora_bank.row_bytes
                    for ly in self.layers.values()
                ),
                "hits": self.pool.hits,
                "misses": self.pool.misses,
                "evictions": self.pool.evictions,
                "prefetched": self.pool.prefetched,
                "pinned": sorted(self.pool.pinned),
                "reallocations": self.reallocations,
                "budget": self.pool.budget.describe(),
            }

    # ------------------------------------------------------------------ batches
    def _device(self) -> torch.device:
        for layer in self.layers.values():
            return layer.weight.device
        return torch.device("cpu")

    def batch(
        self, mixtures: Sequence[Mixture], *, rows_per_sample: Sequence[int] | None = None
    ) -> LoRABatch:
        """A :class:`LoRABatch` of resident adapters for this model, reusing the tensors of an
        earlier batch of the same sample count that no open ``use()`` holds (so compiled
        graphs holding them stay valid)."""
        with self._lock:
            return self._batch(mixtures, rows_per_sample)

    def _batch(self, mixtures: Sequence[Mixture], rows_per_sample) -> LoRABatch:
        rows = tuple(rows_per_sample) if rows_per_sample is not None else None
        key = (len(mixtures), rows)
        n = sum(len(m) for m in mixtures if m)
        device = self._device()
        for cached in self._batches.get(key, []):
            if (
                id(cached) not in self._active_batches
                and cached.device == device
                and cached.entry_slot.numel() >= n
            ):
                cached.fill_(mixtures, self.slots)
                return cached
        batch = LoRABatch.from_mixtures(
            mixtures,
            self.slots,
            device=device,
            rows_per_sample=rows,
            entry_capacity=max(16, 2 * n),
            max_entries=_MAX_ENTRIES_HINT,
        )
        self._batches.setdefault(key, []).append(batch)
        return batch

    def _canonical(self, mixtures: Sequence[Mixture]) -> tuple[list[dict], set[str]]:
        """Mixtures with names resolved through the library (aliases), and the names."""
        if isinstance(mixtures, Mapping) or not isinstance(mixtures, Sequence):
            raise TypeError("mixtures must be a sequence with one {adapter: strength} per sample")
        out, names = [], set()
        for s, mix in enumerate(mixtures):
            if mix is None:
                out.append({})
                continue
            if not isinstance(mix, Mapping):
                raise TypeError(f"mixtures[{s}] must be a mapping adapter -> strength, got {mix!r}")
            canon: dict = {}
            for key, w in mix.items():
                if isinstance(key, str) and key not in self.slots:
                    try:
                        key = self.library.resolve(key)
                    except KeyError as exc:
                        raise KeyError(f"mixtures[{s}]: {exc.args[0]}") from None
                if isinstance(key, str):
                    names.add(key)
                canon[key] = canon.get(key, 0.0) + w if key in canon else w
            out.append(canon)
        return out, names

    def _acquire(self, names: set[str]) -> None:
        """Make ``names`` resident and reference them (caller then opens a use() block)."""
        plans: dict[str, Plan | None] = {}
        stale: list[str] = []
        for name in sorted(names):
            with self._lock:
                resident = name in self.slots
                known = resident or self._empty.get(name) == self._stamp_or_none(name)
                held = self._stamps.get(name)
            if resident and held is not None and self.library.current_stamp(name) != held:
                stale.append(name)  # its file changed on disk: never serve the old weights
                known = False
            if not known:
                plans[name] = self._plan(name)
        with self._lock:
            for name in stale:
                if name in self.slots:
                    if self.pool.refs[name]:
                        raise ValueError(
                            f"adapter {name!r} changed on disk while another caller's use() "
                            "block uses it; retry when that block has closed"
                        )
                    self._evict(name)
            for name, plan in plans.items():
                if plan is None:
                    self._empty[name] = self.library.stamp(name)
                else:  # a file rewritten with weights for this model is no longer empty
                    self._empty.pop(name, None)
            if plans:  # otherwise every adapter the batch needs is resident: it fits already
                self._check_budget(names, plans)
            for name in sorted(names):
                if name in self.slots:
                    self.pool.hits += 1
                    self.pool.touch(name)
                elif name not in self._empty:
                    plan = plans.get(name) or self._plan(name)
                    if plan is None:
                        continue
                    self._make_resident(name, plan, needed=names)
                    self.pool.misses += 1
            self.pool.acquire(n for n in names if n in self.slots)

    def _stamp_or_none(self, name: str) -> Any:
        try:
            return self.library.stamp(name)
        except KeyError:
            return None

    def _check_budget(self, names: set[str], plans: Mapping[str, Plan | None]) -> None:
        with_weights = [n for n in sorted(names) if n not in self._empty]
        b = self.pool.budget
        if b.max_adapters is not None and len(with_weights) > b.max_adapters:
            raise ValueError(
                f"the batch needs {len(with_weights)} adapters {with_weights}, more than the "
                f"budget holds ({b.describe()})"
            )
        if b.rows_per_layer is None:
            return
        rows: dict[str, int] = {}
        for name in with_weights:
            if name in self.slots:
                slot = self.slots[name]
                for path, bank in self._banks.items():
                    rows[path] = rows.get(path, 0) + bank.rank_of(slot)
            else:
                for path, r in _rows_per_layer(plans.get(name) or []).items():
                    rows[path] = rows.get(path, 0) + r
        over = {p: r for p, r in rows.items() if r > b.rows_per_layer}
        if over:
            p, r = next(iter(over.items()))
            raise ValueError(
                f"the batch's adapters {with_weights} need {r} rank rows in {p}, more than the "
                f"budget holds ({b.describe()})"
            )

    @contextlib.contextmanager
    def use(
        self,
        mixtures: Sequence[Mixture] | LoRABatch,
        *,
        rows_per_sample: Sequence[int] | None = None,
    ) -> Iterator[LoRABatch]:
        """Make ``mixtures`` (one ``{adapter: strength}`` per sample) active inside the block,
        for the calling thread or asyncio task only.

        Names are resolved through :attr:`library` (aliases too); adapters that are not
        resident are loaded first, evicting least recently used ones the batch does not
        need. Unknown names raise ``KeyError``; a batch needing more than the budget raises
        ``ValueError`` naming it. A ready :class:`LoRABatch` must use resident slot ids only.
        """
        if isinstance(mixtures, LoRABatch):
            batch = mixtures
            with self._lock:
                by_slot = {s: n for n, s in self.slots.items()}
                unknown = sorted(batch.slots_in_use() - set(by_slot))
                if unknown:
                    raise KeyError(f"batch uses slot ids {unknown} that hold no loaded adapter")
                names = {by_slot[s] for s in batch.slots_in_use()}
                self.pool.acquire(names)
                self._active_batches[id(batch)] += 1
                for n in names:
                    self.pool.touch(n)
        else:
            canon, names = self._canonical(mixtures)
            self._acquire(names)
            try:
                with self._lock:
                    if self.drop_empty:
                        canon = [
                            {k: w for k, w in m.items() if k not in self._empty} for m in canon
                        ]
                    else:
                        empty = sorted(n for n in names if n in self._empty)
                        if empty:
                            raise ValueError(f"adapter(s) {empty} have no weights in this model")
                    batch = self._batch(canon, rows_per_sample)
                    # claimed in the same locked section, or another caller could refill it
                    self._active_batches[id(batch)] += 1
            except BaseException:
                with self._lock:
                    self.pool.release(n for n in names if n in self.slots)
                raise
            names = {n for n in names if n in self.slots}
        with self._lock:
            self._held.setdefault(id(batch), set()).update(names)
        self._wait_events(names)
        tid = threading.get_ident()
        with self._lock:
            self._open_threads[tid] = self._open_threads.get(tid, 0) + 1
        handle = self.context.enter(batch)
        try:
            yield batch
        finally:
            self.context.exit(handle)
            with self._lock:
                self._active_batches[id(batch)] -= 1
                if self._active_batches[id(batch)] <= 0:
                    del self._active_batches[id(batch)]
                    self._held.pop(id(batch), None)
                self._open_threads[tid] -= 1
                if not self._open_threads[tid]:
                    del self._open_threads[tid]
                self.pool.release(names)
                self._idle.notify_all()

    def refill(self, batch: LoRABatch, mixtures: Sequence[Mixture]) -> None:
        """Rewrite the strengths of ``batch``, the batch of an open :meth:`use` block, in place.

        For strength schedules: the block's layers read the new strengths on their next call,
        the batch tensors keep their identity (compiled graphs and captured CUDA graphs stay
        valid, nothing recompiles). ``mixtures`` has one ``{adapter: strength}`` per sample, as
        for :meth:`use`, and may name only adapters the block holds (those of the mixtures it
        was opened with, strength-0 entries included): ``KeyError`` names any other, since
        it could be evicted mid-block. Raises ``ValueError`` if no use() block has ``batch``
        open and :class:`~lorakernels.batch.BatchCapacityError` if the entries outgrow it.
        """
        canon, names = self._canonical(mixtures)
        with self._lock:
            held = self._held.get(id(batch))
            if held is None:
                raise ValueError("batch: no open use() block of this manager has it")
            # adapters without weights here were never held; use() drops them the same way
            empty = self._empty if self.drop_empty else {}
            outside = sorted(n for n in names - held if n not in empty)
            if outside:
                raise KeyError(
                    f"mixtures name adapter(s) {outside} that the use() block does not hold; "
                    "open the block with them (strength 0 holds an adapter without using it)"
                )
            batch.fill_([{k: w for k, w in m.items() if k not in empty} for m in canon], self.slots)

    def _wait_events(self, names: Iterable[str]) -> None:
        if not self._events:
            return
        with self._lock:
            events = [self._events.pop(n) for n in names if n in self._events]
        for ev in events:
            torch.cuda.current_stream().wait_event(ev)
