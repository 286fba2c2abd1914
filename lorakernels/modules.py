"""Drop-in layers: ``nn.Linear`` / ``nn.Conv2d`` subclasses that add the per-sample LoRA term.

Each patched layer keeps the original ``weight``/``bias`` parameters (same objects, same
``state_dict`` keys), owns a :class:`~lorakernels.bank.LoRABank` (non-persistent buffers), and
reads the active :class:`~lorakernels.batch.LoRABatch` from a :class:`LoRAContext` shared by
all layers of a model: setting ``context.batch`` once reaches every layer, with no per-layer
hooks. With no active batch, or a batch where nobody uses an adapter, a layer runs exactly the
original ``F.linear``/``F.conv2d`` (bit-identical output).

Convolutions go through :func:`~lorakernels.ops.multi_lora_conv2d` with the layer's own
weight and bias: the cpu backend plans merged/unmerged groups in NCHW (SD1.5's 1x1
``proj_in``/``proj_out`` without layout copies); GPU backends run a 1x1 convolution (stride 1,
no padding) as their fused linear kernel over the ``B*H*W`` pixel rows and a k x k one (LoCon's
resnet convs) as the base ``conv2d`` plus ``conv2d(conv2d(x, A), B)``: correct, not fused.
Padding modes other than zeros pad the input once for both.
"""

from __future__ import annotations

import contextvars
import threading
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bank import LoRABank
from .batch import LoRABatch
from .ops import check_plan, multi_lora_conv2d, multi_lora_linear

_M = TypeVar("_M", bound=nn.Module)


class _Conflict:
    """What a compiled graph reads while several callers are inside ``use()`` at once."""

    def __getattr__(self, name: str):
        raise RuntimeError(
            "several threads or asyncio tasks are inside use() of one model while it runs "
            "under torch.compile; a compiled graph reads one model-wide batch, so enter use() "
            "from one caller at a time there (eager mode keeps each caller's batch apart)"
        )


class LoRAContext:
    """State shared by every patched layer of one model: the active batch and backend.

    ``batch`` belongs to its caller: it lives in a :class:`contextvars.ContextVar`, so each
    thread and each asyncio task sees the batch it set (a new thread starts with none, a new
    task with its creator's). :meth:`enter`/:meth:`exit` (what ``MultiLoRA.use`` calls) also
    track how many callers are inside; code traced by ``torch.compile`` cannot read a
    ``ContextVar`` and reads the one model-wide batch instead, which raises while two callers
    are inside at once (eager mode needs no such restriction).
    """

    def __init__(self, backend: str | None = None, plan: str | None = None) -> None:
        self.backend = backend
        # merged/unmerged override for every layer (lorakernels.plan); checked here, not at
        # the first forward
        self.plan = None if plan is None else check_plan(plan, "plan")
        self._var: contextvars.ContextVar[LoRABatch | None] = contextvars.ContextVar(
            f"lorakernels_batch_{id(self)}", default=None
        )
        self._lock = threading.Lock()
        self._inside: dict[int, LoRABatch] = {}  # entry id -> batch, for the compiled view
        self._shared: LoRABatch | _Conflict | None = None
        self._entries = 0

    @property
    def batch(self) -> LoRABatch | None:
        """The calling thread's/task's active batch (``None``: the base model)."""
        if torch.compiler.is_compiling():
            return self._shared  # type: ignore[return-value]
        return self._var.get()

    @batch.setter
    def batch(self, value: LoRABatch | None) -> None:
        self._var.set(value)
        with self._lock:
            if not self._inside:
                self._shared = value

    def enter(self, batch: LoRABatch) -> tuple[int, contextvars.Token]:
        """Make ``batch`` the caller's active batch; returns what :meth:`exit` needs."""
        token = self._var.set(batch)
        with self._lock:
            self._entries += 1
            key = self._entries
            self._inside[key] = batch
            self._shared = batch if len(self._inside) == 1 else _Conflict()
        return key, token

    def exit(self, handle: tuple[int, contextvars.Token]) -> None:
        """Undo :meth:`enter` (restores the caller's previous batch)."""
        key, token = handle
        self._var.reset(token)
        with self._lock:
            self._inside.pop(key, None)
            if len(self._inside) == 1:
                self._shared = next(iter(self._inside.values()))
            elif not self._inside:
                self._shared = self._var.get()
            else:
                self._shared = _Conflict()

    @property
    def callers(self) -> int:
        """How many ``use()`` blocks (any thread or task) are open on this model."""
        return len(self._inside)


def _active(ctx: LoRAContext | None, bank: LoRABank) -> LoRABatch | None:
    if ctx is None or ctx.batch is None:
        return None
    if not torch.compiler.is_compiling() and (ctx.batch.is_empty or bank.used_rows == 0):
        # host-known "nobody uses a LoRA here": run the original layer exactly; while
        # compiling, skip this data-dependent shortcut so the graph never specialises on it
        return None
    return ctx.batch


def _bare(cls: type[_M], layer: nn.Module, base: type[nn.Module], method: str) -> _M:
    """A new ``cls`` with only ``nn.Module.__init__`` run, for ``method`` to fill from
    ``layer``; TypeError naming ``method`` unless ``layer`` is a ``base``."""
    if not isinstance(layer, base):
        raise TypeError(f"{method} expects an nn.{base.__name__}, got {type(layer).__name__}")
    self = cls.__new__(cls)
    nn.Module.__init__(self)
    return self


class MultiLoRALinear(nn.Linear):
    """``nn.Linear`` plus per-sample LoRA mixtures; build with :meth:`from_linear`."""

    lora_bank: LoRABank

    @classmethod
    def from_linear(cls, linear: nn.Linear, context: LoRAContext | None = None) -> MultiLoRALinear:
        """Wrap ``linear`` in place: the new layer shares its parameters (no copy)."""
        self = _bare(cls, linear, nn.Linear, "from_linear")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        w = linear.weight
        self.lora_bank = LoRABank(
            self.in_features, self.out_features, dtype=w.dtype, device=w.device
        )
        self.lora_context = context
        self.output_cache = None
        return self

    def enable_output_cache(self, enabled: bool = True) -> None:
        """Reuse the last output while the *same* input tensor (same object, unmodified) and
        the same batch come back: cross-attention ``to_k``/``to_v`` see the prompt embedding,
        which is identical at every denoising step. Off by default; eager mode only."""
        self.output_cache = {} if enabled else None

    def forward(self, x: Tensor) -> Tensor:
        batch = _active(self.lora_context, self.lora_bank)
        cache = self.output_cache
        if cache is not None and not torch.compiler.is_compiling():
            # everything the output depends on: the input, the batch, the bank's contents
            # (loads and unloads write its tensors in place) and the layer's own parameters
            bank = self.lora_bank
            held = (x, batch, bank.lora_a, bank.slot_rank, self.weight, self.bias)
            key = (
                x._version,
                None if batch is None else batch.version,
                bank.lora_a._version,
                bank.slot_rank._version,
                self.weight._version,
                None if self.bias is None else self.bias._version,
            )
            # one tuple swapped atomically: callers in other threads update the same cache
            hit = cache.get("entry")
            if hit is not None and hit[2] == key:
                if all(a is b for a, b in zip(hit[0], held, strict=True)):
                    return hit[1]
            y = self._compute(x, batch)
            cache["entry"] = (held, y, key)
            return y
        return self._compute(x, batch)

    def _compute(self, x: Tensor, batch: LoRABatch | None) -> Tensor:
        if batch is None:
            return F.linear(x, self.weight, self.bias)
        ctx = self.lora_context
        return multi_lora_linear(
            x, self.weight, self.bias, self.lora_bank, batch, backend=ctx.backend, plan=ctx.plan
        )

    def unpatched(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this layer's parameters."""
        out = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(out)
        out.in_features, out.out_features = self.in_features, self.out_features
        out.weight, out.bias = self.weight, self.bias
        return out


# nn.Conv2d's configuration attributes, shared with the wrapped layer
_CONV_FIELDS = (
    "in_channels out_channels kernel_size stride padding dilation transposed output_padding "
    "groups padding_mode _reversed_padding_repeated_twice"
).split()


class MultiLoRAConv2d(nn.Conv2d):
    """``nn.Conv2d`` plus per-sample LoRA mixtures (NCHW); build with :meth:`from_conv`.

    The bank stores ``A`` flattened to ``[r, C_in * kh * kw]`` and ``B`` as ``[C_out, r]``.
    """

    lora_bank: LoRABank

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, context: LoRAContext | None = None) -> MultiLoRAConv2d:
        """Wrap ``conv`` in place: the new layer shares its parameters (no copy)."""
        self = _bare(cls, conv, nn.Conv2d, "from_conv")
        for name in _CONV_FIELDS:
            setattr(self, name, getattr(conv, name))
        self.weight = conv.weight
        self.bias = conv.bias
        if conv.groups != 1:
            raise ValueError("grouped convolutions have no LoRA support (groups must be 1)")
        k = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        w = conv.weight
        self.lora_bank = LoRABank(k, conv.out_channels, dtype=w.dtype, device=w.device)
        self.lora_context = context
        return self

    @property
    def is_pointwise(self) -> bool:
        """1x1, stride 1, no padding: NCHW GEMMs on the cpu backend, pixel rows on GPUs."""
        return (
            self.kernel_size == (1, 1)
            and self.stride == (1, 1)
            and self.padding in ((0, 0), "valid")
            and self.padding_mode == "zeros"
        )

    def forward(self, x: Tensor) -> Tensor:
        batch = _active(self.lora_context, self.lora_bank)
        if batch is None:
            return self._conv_forward(x, self.weight, self.bias)
        padding = self.padding
        if self.padding_mode != "zeros":
            # as nn.Conv2d does: pad once with the mode, then convolve without padding (the
            # LoRA term used to zero-pad here, silently disagreeing with the base at the edges)
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0, 0)
        ctx = self.lora_context
        return multi_lora_conv2d(
            x,
            self.weight,
            self.bias,
            self.lora_bank,
            batch,
            self.stride,
            padding,
            self.dilation,
            backend=ctx.backend,
            plan=ctx.plan,
        )
