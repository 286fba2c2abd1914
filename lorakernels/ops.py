"""The one functional entry point: :func:`multi_lora_linear`, and backend selection.

``ops`` checks *meaning* (shapes, dtypes, devices, batch vs rows) and picks a backend; the
backends in :mod:`lorakernels.kernels` check their own constraints and compute.

Backend choice, first match wins: the ``backend=`` argument, the innermost
:func:`use_backend` context, the ``LORAKERNELS_BACKEND`` environment variable, then automatic
selection (CUDA tensors: triton, else cuda, else reference; CPU tensors: cpu). An explicitly
requested backend that cannot run raises ``RuntimeError`` with the reason; only automatic
selection moves on.

All backends but ``reference`` run behind the custom op ``torch.ops.lorakernels.multi_lora_linear``
so that ``torch.compile(fullgraph=True)`` traces through a patched model without graph breaks and
without specialising on the batch's contents (the op is opaque; its inputs are tensors of fixed
capacity). ``reference`` is called directly so that it stays differentiable.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from . import plan as _plan
from .bank import LoRABank
from .batch import LoRABatch
from .kernels import LaunchMeta

BACKENDS = ("reference", "cpu", "triton", "cuda")
_MODULES = {
    "reference": "lorakernels.kernels.reference",
    "cpu": "lorakernels.kernels.cpu",
    "triton": "lorakernels.kernels.triton",
    "cuda": "lorakernels.kernels.cuda",
}
_EAGER_DIRECT = ("reference", "cpu")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_backend_stack: list[str] = []


def _check_name(name: str, argname: str) -> str:
    if name not in BACKENDS:
        raise ValueError(
            f"{argname}: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}"
        )
    return name


def backend_module(name: str) -> ModuleType:
    """Import a backend module lazily (triton and the native library are optional)."""
    return importlib.import_module(_MODULES[_check_name(name, "backend")])


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (``None`` if it can)."""
    try:
        mod = backend_module(name)
    except ImportError as exc:  # an optional dependency of that backend is missing
        return f"importing the {name} backend failed: {exc}"
    return mod.unavailable_reason(device)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed calls with backend ``name`` unless a call passes ``backend=``."""
    _backend_stack.append(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _backend_stack.pop()


@torch.compiler.assume_constant_result
def resolve_backend(
    device: torch.device, backend: str | None = None, dtype: torch.dtype | None = None
) -> str:
    """The backend a call on ``device`` will use (raises if an explicit choice cannot run).

    Under ``torch.compile`` this runs once at trace time and the choice is baked into the
    graph (it imports modules and reads the environment, which dynamo must not trace).
    """
    explicit, source = backend, "backend="
    if explicit is None and _backend_stack:
        explicit, source = _backend_stack[-1], "use_backend()"
    if explicit is None and os.environ.get("LORAKERNELS_BACKEND"):
        explicit, source = os.environ["LORAKERNELS_BACKEND"], "LORAKERNELS_BACKEND"
    if explicit is not None:
        _check_name(explicit, source)
        reason = unavailable_reason(explicit, device)
        if reason is not None:
            raise RuntimeError(f"backend {explicit!r} (from {source}) cannot run: {reason}")
        return explicit
    if device.type == "cuda":
        # the GPU kernels have no float64 path: the reference serves float64 on CUDA
        candidates = ("reference",) if dtype == torch.float64 else ("triton", "cuda", "reference")
    else:
        candidates = ("cpu",)
    for name in candidates:
        if unavailable_reason(name, device) is None:
            return name
    return "reference"


# ---------------------------------------------------------------------- the custom op
@torch.library.custom_op("lorakernels::multi_lora_linear", mutates_args=())
def _multi_lora_linear_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_bt: Tensor,
    slot_start: Tensor,
    slot_rank: Tensor,
    slot_scale: Tensor,
    row_ptr: Tensor,
    entry_ptr: Tensor,
    entry_slot: Tensor,
    entry_weight: Tensor,
    max_rows: int,
    max_entries: int,
    max_rank: int,
    backend: str,
) -> Tensor:
    meta = LaunchMeta(max_rows=max_rows, max_entries=max_entries, max_rank=max_rank)
    return backend_module(backend).multi_lora_linear(
        x, weight, bias, lora_a, lora_bt, slot_start, slot_rank, slot_scale,
        row_ptr, entry_ptr, entry_slot, entry_weight, meta,
    )  # fmt: skip


@_multi_lora_linear_op.register_fake
def _(x, weight, bias, *args, **kwargs):  # noqa: ANN001 - mirrors the op's signature
    return x.new_empty(x.shape[0], weight.shape[0])


def _setup_context(ctx, inputs, output):  # noqa: ANN001 - torch.library signature
    ctx.inputs = inputs
    ctx.bias_shape = None if inputs[2] is None else inputs[2].shape


def _backward(ctx, grad):  # noqa: ANN001 - torch.library signature
    """Gradients for x, weight and bias (the bank and batch are constants).

    The input gradient is the same op on the transposed problem:
    ``dx = dy @ W + Σ coef * (dy @ B) @ A`` is ``multi_lora_linear`` with ``W.T`` as the
    weight and the bank's ``A``/``B.T`` rows swapped.
    """
    x, weight, bias, lora_a, lora_bt, *rest = ctx.inputs
    slot_start, slot_rank, slot_scale, row_ptr, entry_ptr, entry_slot, entry_weight = rest[:7]
    max_rows, max_entries, max_rank, backend = rest[7:]
    grad = grad.contiguous()
    dx = _multi_lora_linear_op(
        grad, weight.T.contiguous(), None, lora_bt, lora_a, slot_start, slot_rank, slot_scale,
        row_ptr, entry_ptr, entry_slot, entry_weight, max_rows, max_entries, max_rank, backend,
    )  # fmt: skip
    dw = grad.T @ x
    db = grad.sum(0) if bias is not None else None
    return (dx, dw, db) + (None,) * 13


_multi_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------- validation
def _validate(x: Tensor, weight: Tensor, bias: Tensor | None, bank: LoRABank, batch: LoRABatch):
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(
            f"weight must be a 2-D [N, K] tensor, got {getattr(weight, 'shape', weight)}"
        )
    if not isinstance(bank, LoRABank):
        raise TypeError(f"bank must be a LoRABank, got {type(bank).__name__}")
    if not isinstance(batch, LoRABatch):
        raise TypeError(f"batch must be a LoRABatch, got {type(batch).__name__}")
    n, k = weight.shape
    if x.dim() < 2 or x.shape[-1] != k:
        raise ValueError(
            f"x has shape {tuple(x.shape)}; expected [M, K] or [S, T, K] with K={k} "
            "(weight.shape[1])"
        )
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if bias is not None:
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape [N]=({n},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from x dtype {x.dtype}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if bank.in_features != k or bank.out_features != n:
        raise ValueError(
            f"bank is for K={bank.in_features}, N={bank.out_features}; weight is [N={n}, K={k}]"
        )
    if bank.lora_a.dtype != x.dtype:
        raise TypeError(f"bank dtype {bank.lora_a.dtype} differs from x dtype {x.dtype}")
    if bank.lora_a.device != x.device:
        raise ValueError(f"bank is on {bank.lora_a.device} but x is on {x.device}")
    if batch.device != x.device:
        raise ValueError(f"batch is on {batch.device} but x is on {x.device} (use batch.to())")
    if not torch.compiler.is_compiling():
        # host-side checks on the batch's contents; skipped while tracing so that a compiled
        # graph does not specialise on them (the manager validates at use() time anyway)
        # every patched layer runs this per call: compare one cached int, and only build the
        # list of offending slots for the error message
        cap = bank.slot_rank.shape[0]
        if batch.max_slot >= cap:
            bad = sorted(k for k in batch.slots_in_use() if k >= cap)
            raise ValueError(
                f"batch uses slot(s) {bad} but this bank has only {cap} slot ids "
                "(was the adapter loaded into this layer's manager?)"
            )


def multi_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    bank: LoRABank,
    batch: LoRABatch,
    backend: str | None = None,
    plan: str | None = None,
) -> Tensor:
    """``y = x @ weight.T + bias + Σ strength * (alpha/r) * (x @ A.T) @ B.T`` per sample.

    Args:
        x: ``[M, K]`` or ``[S, T, K]`` (any ``[..., K]``), float32/float16/bfloat16/float64;
            rows are in sample order (see :class:`~lorakernels.batch.LoRABatch` for the rule).
        weight: ``[N, K]`` base weight, same dtype and device as ``x``.
        bias: ``[N]`` or ``None``.
        bank: this layer's :class:`~lorakernels.bank.LoRABank` (same dtype and device).
        batch: the :class:`~lorakernels.batch.LoRABatch` of this forward pass.
        backend: ``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"`` or ``None`` (see module doc).
        plan: ``"auto"``, ``"merged"``, ``"unmerged"`` or ``None``: merged weights or the
            unmerged LoRA term per group of samples (cpu backend; see :mod:`lorakernels.plan`).

    Returns:
        ``[..., N]`` in ``x.dtype``. Numerics: fp32 accumulation, fp32 rank intermediate, one
        rounding to ``x.dtype``; float64 inputs compute in float64.
    """
    if plan is not None:  # per-call planner override, read at run time by the cpu backend
        with _plan.call_plan(plan):
            return multi_lora_linear(x, weight, bias, bank, batch, backend)
    _validate(x, weight, bias, bank, batch)
    name = resolve_backend(x.device, backend, x.dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    row_ptr, max_rows = batch.rows_for(x2.shape[0])
    args = (
        x2, weight, bias, bank.lora_a, bank.lora_bt, bank.slot_start, bank.slot_rank,
        bank.slot_scale, row_ptr, batch.entry_ptr, batch.entry_slot, batch.entry_weight,
    )  # fmt: skip
    if name in _EAGER_DIRECT and not torch.compiler.is_compiling():
        # reference and cpu are plain differentiable torch code: in eager mode call them
        # directly and skip the custom op's Python dispatch (~100 us a call, which is 2-3 % of
        # a 77-row text layer); under torch.compile the opaque op keeps the graph unspecialised
        meta = LaunchMeta(max_rows, batch.max_entries, bank.max_rank)
        y = backend_module(name).multi_lora_linear(*args, meta)
    else:
        y = _multi_lora_linear_op(*args, max_rows, batch.max_entries, bank.max_rank, name)
    return y.reshape(*lead, weight.shape[0])


def multi_lora_conv2d(
    x: Tensor,
    base: Tensor,
    bank: LoRABank,
    batch: LoRABatch,
    weight_shape: tuple[int, ...] | torch.Size,
    stride: tuple[int, int],
    padding: tuple[int, int] | str,
    dilation: tuple[int, int],
) -> Tensor:
    """``base + Σ strength * (alpha/r) * conv2d(conv2d(x, A), B)`` per sample (k x k convs).

    The unfused LoCon path: ``A`` is the bank's ``[r, C_in*kh*kw]`` rows viewed as a
    ``[r, C_in, kh, kw]`` convolution with the layer's stride, padding and dilation; ``B`` is a
    1x1 convolution ``[C_out, r]``. Samples are the ``N`` of ``x [N, C_in, H, W]`` (split into
    ``S`` equal groups). Computes in float32 (float64 for float64 input) and rounds once.

    Args:
        x: ``[N, C_in, H, W]`` layer input; ``base``: the base ``conv2d`` output.
    """
    c_out, c_in, kh, kw = weight_shape
    if x.dim() != 4 or x.shape[1] != c_in:
        raise ValueError(f"x must be [N, {c_in}, H, W], got {tuple(x.shape)}")
    if batch.rows_per_sample is not None:
        raise ValueError("batch: k x k convolutions need equal-length samples (no rows_per_sample)")
    if x.shape[0] % batch.num_samples != 0:
        raise ValueError(
            f"x has batch size {x.shape[0]}, which the batch's {batch.num_samples} samples "
            "do not divide"
        )
    per = x.shape[0] // batch.num_samples
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = base.to(ct)
    slots = bank.slots()
    for s, mix in enumerate(batch.mixtures):
        items = [(slots[k], w) for k, w in mix if k in slots]
        if not items:
            continue
        a = torch.cat([bank.lora_a[st : st + r] for (st, r, _), _ in items]).to(ct)
        b = torch.cat([bank.lora_bt[st : st + r] for (st, r, _), _ in items]).to(ct)
        coef = torch.tensor([w * sc for (_, r, sc), w in items for _ in range(r)], dtype=ct)
        xs = x[s * per : (s + 1) * per].to(ct)
        t = F.conv2d(xs, a.view(-1, c_in, kh, kw), None, stride, padding, dilation)
        t = t * coef.to(t.device).view(1, -1, 1, 1)  # the rank intermediate, fp32
        out[s * per : (s + 1) * per] += F.conv2d(t, b.T.reshape(c_out, -1, 1, 1))
    return out.to(x.dtype)
