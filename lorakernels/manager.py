"""``MultiLoRA``: patch a model's layers, load/unload adapters, choose mixtures per forward.

The manager owns the name -> slot table shared by all layers of one model (slot ``k`` is the
same adapter in every layer) and the :class:`~lorakernels.modules.LoRAContext` the patched
layers read::

    mlora = MultiLoRA(unet, targets=["*attn2.to_*"])
    mlora.load("ink", {"down_blocks.0...attn2.to_q": (A, B, alpha), ...})
    with mlora.use([{"ink": 0.8}, {"ink": 0.3, "cyber": 1.0}, {}]):
        out = unet(...)                       # sample 0: ink, 1: a mix, 2: the base model

Loading is all-or-nothing: every layer is checked before any bank changes, and a failure
while writing rolls back what was written. ``W`` is never modified.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .bank import LoRABank
from .batch import LoRABatch, Mixture
from .modules import LoRAContext, MultiLoRAConv2d, MultiLoRALinear

Target = str | Callable[[str, nn.Module], bool]
LayerWeights = Any  # (A, B, alpha) tuple or an object with .down, .up, .alpha


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


class MultiLoRA:
    """Patch ``model`` in place and serve many adapters at once.

    Args:
        model: any ``nn.Module``.
        targets: which ``nn.Linear``/``nn.Conv2d`` layers to patch now: glob patterns on the
            module path (``"*attn2.to_*"``), predicates ``(name, module) -> bool``, or a list
            of them. ``None`` patches nothing up front and patches, at load time, exactly the
            layers an adapter touches.
        backend: backend for every patched layer (``None``: the usual resolution, see ``ops``).
    """

    def __init__(
        self,
        model: nn.Module,
        targets: Target | Sequence[Target] | None = None,
        *,
        backend: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.context = LoRAContext(backend)
        self.auto_patch = targets is None
        self.slots: dict[str, int] = {}
        self._free: list[int] = []
        self._next_slot = 0
        self.layers: dict[str, MultiLoRALinear | MultiLoRAConv2d] = {}
        self._batches: dict[tuple[int, tuple[int, ...] | None], LoRABatch] = {}
        if targets is not None:
            pred = _as_predicate(targets)
            names = [
                n
                for n, m in model.named_modules()
                if isinstance(m, nn.Linear | nn.Conv2d) and n and pred(n, m)
            ]
            for n in names:
                self._patch(n)

    # ------------------------------------------------------------------ patching
    def patch(self, name: str) -> MultiLoRALinear | MultiLoRAConv2d:
        """Patch one more layer by module path (idempotent); it starts with no adapters."""
        return self._patch(name)

    def _patch(self, name: str) -> MultiLoRALinear | MultiLoRAConv2d:
        if name in self.layers:
            return self.layers[name]
        mod = self.model.get_submodule(name)
        if isinstance(mod, MultiLoRALinear | MultiLoRAConv2d):
            raise ValueError(f"{name} is already patched by another MultiLoRA")
        if isinstance(mod, nn.Linear):
            new: MultiLoRALinear | MultiLoRAConv2d = MultiLoRALinear.from_linear(mod, self.context)
        elif isinstance(mod, nn.Conv2d):
            new = MultiLoRAConv2d.from_conv(mod, self.context)
        else:
            raise TypeError(f"{name} is a {type(mod).__name__}; only Linear and Conv2d take LoRA")
        new.lora_bank.reserve(0, self._next_slot)
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, new)
        self.layers[name] = new
        return new

    def unpatch(self) -> None:
        """Put the original layer types back (parameters untouched) and forget all adapters."""
        for name, layer in self.layers.items():
            if isinstance(layer, MultiLoRALinear):
                orig: nn.Module = layer.unpatched()
            else:
                orig = nn.Conv2d.__new__(nn.Conv2d)
                orig.__dict__.update({k: v for k, v in layer.__dict__.items()})
                orig._modules.pop("lora_bank", None)
                orig.__dict__.pop("lora_context", None)
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, orig)
        self.layers.clear()
        self.slots.clear()

    # ------------------------------------------------------------------ adapters
    @property
    def adapters(self) -> list[str]:
        """Names of the loaded adapters, in load order."""
        return list(self.slots)

    def _layer_for_load(self, path: str) -> MultiLoRALinear | MultiLoRAConv2d | None:
        if path in self.layers:
            return self.layers[path]
        if not self.auto_patch:
            return None
        try:
            mod = self.model.get_submodule(path)
        except AttributeError:
            return None
        return mod if isinstance(mod, nn.Linear | nn.Conv2d) else None

    def load(self, name: str, weights: Mapping[str, LayerWeights], *, strict: bool = True) -> None:
        """Load adapter ``name`` from ``{module_path: (A, B, alpha)}`` (or weight objects).

        ``A`` is ``[r, K]`` (``[r, C_in, kh, kw]`` for convs), ``B`` is ``[N, r]``
        (``[C_out, r, 1, 1]``); ``alpha=None`` means scale 1, else scale ``alpha / r``.
        Paths that name no patched layer raise ``KeyError`` listing them (``strict=False``:
        they are skipped with a warning). All-or-nothing: on any error nothing changes.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty string, got {name!r}")
        if name in self.slots:
            raise ValueError(f"adapter {name!r} is already loaded; unload it first")
        if not isinstance(weights, Mapping) or not weights:
            raise ValueError(
                f"weights for {name!r} must be a non-empty mapping path -> (A, B, alpha)"
            )
        slot = self._free[-1] if self._free else self._next_slot
        plan, unmatched = [], []
        for path, value in weights.items():
            layer = self._layer_for_load(path)
            if layer is None:
                unmatched.append(path)
                continue
            a, b, scale = _unpack(value, f"{name!r} layer {path}")
            a = a.reshape(a.shape[0], -1)  # conv [r, C, kh, kw] -> [r, C*kh*kw]
            b = b.reshape(b.shape[0], -1)  # conv [C_out, r, 1, 1] -> [C_out, r]
            plan.append((path, layer, a, b, scale))
        if unmatched:
            listed = ", ".join(sorted(unmatched)[:10])
            more = f" (+{len(unmatched) - 10} more)" if len(unmatched) > 10 else ""
            msg = (
                f"adapter {name!r}: {len(unmatched)} path(s) match no patchable layer: "
                f"{listed}{more}"
            )
            if strict:
                raise KeyError(msg)
            warnings.warn(msg + "; skipped", stacklevel=2)
        if not plan:
            raise ValueError(f"adapter {name!r} touches no layer of this model")
        for path, layer, a, b, scale in plan:
            bank = getattr(layer, "lora_bank", None)
            if bank is None:  # not patched yet (auto-patch): check against a scratch bank
                w = layer.weight
                k, n = w[0].numel(), w.shape[0]
                bank = LoRABank(k, n, dtype=w.dtype)
            bank.check(slot, a, b, scale, where=f"adapter {name!r} layer {path}")
        done: list[MultiLoRALinear | MultiLoRAConv2d] = []
        try:
            for path, _, a, b, scale in plan:
                layer = self._patch(path)
                layer.lora_bank.reserve(0, slot + 1)
                bank = layer.lora_bank
                bank.add(slot, a.to(bank.lora_a.dtype), b.to(bank.lora_a.dtype), scale, path)
                done.append(layer)
        except BaseException:
            for layer in done:
                layer.lora_bank.remove(slot)
            raise
        if self._free:
            self._free.pop()
        else:
            self._next_slot += 1
            for layer in self.layers.values():
                layer.lora_bank.reserve(0, self._next_slot)
        self.slots[name] = slot

    def unload(self, name: str) -> None:
        """Remove adapter ``name`` from every layer (raises if the active batch uses it)."""
        if name not in self.slots:
            raise KeyError(f"unknown adapter {name!r}; loaded: {', '.join(self.slots) or '(none)'}")
        slot = self.slots[name]
        active = self.context.batch
        if active is not None and slot in active.slots_in_use():
            raise ValueError(f"adapter {name!r} is used by the active batch; leave use() first")
        for layer in self.layers.values():
            layer.lora_bank.remove(slot)
        del self.slots[name]
        self._free.append(slot)

    # ------------------------------------------------------------------ batches
    def _device(self) -> torch.device:
        for layer in self.layers.values():
            return layer.weight.device
        return torch.device("cpu")

    def batch(
        self, mixtures: Sequence[Mixture], *, rows_per_sample: Sequence[int] | None = None
    ) -> LoRABatch:
        """A :class:`LoRABatch` for this model, reusing the tensors of an earlier batch of the
        same sample count (so compiled graphs holding them stay valid)."""
        rows = tuple(rows_per_sample) if rows_per_sample is not None else None
        key = (len(mixtures), rows)
        cached = self._batches.get(key)
        if (
            cached is not None
            and cached is not self.context.batch
            and cached.device == self._device()
        ):
            try:
                cached.fill_(mixtures, self.slots)
                return cached
            except ValueError as exc:
                if "at most" not in str(exc):
                    raise
        n = sum(len(m) for m in mixtures)
        batch = LoRABatch.from_mixtures(
            mixtures, self.slots, device=self._device(), rows_per_sample=rows,
            entry_capacity=max(16, 2 * n), max_entries=4,
        )  # fmt: skip
        self._batches[key] = batch
        return batch

    @contextlib.contextmanager
    def use(
        self,
        mixtures: Sequence[Mixture] | LoRABatch,
        *,
        rows_per_sample: Sequence[int] | None = None,
    ) -> Iterator[LoRABatch]:
        """Make ``mixtures`` (one ``{adapter: strength}`` per sample) active inside the block."""
        batch = (
            mixtures
            if isinstance(mixtures, LoRABatch)
            else self.batch(mixtures, rows_per_sample=rows_per_sample)
        )
        if isinstance(mixtures, LoRABatch):
            known = set(self.slots.values())
            unknown = sorted(batch.slots_in_use() - known)
            if unknown:
                raise KeyError(f"batch uses slot ids {unknown} that hold no loaded adapter")
        previous = self.context.batch
        self.context.batch = batch
        try:
            yield batch
        finally:
            self.context.batch = previous
