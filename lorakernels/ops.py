"""The functional entry points :func:`multi_lora_linear` and :func:`multi_lora_conv2d`, and
backend selection.

``ops`` checks *meaning* (shapes, dtypes, devices, batch vs rows and slots), picks a backend
and hands it the kernel bundles of :mod:`lorakernels.kernels`; the backends check their own
constraints and compute. ``ops`` does no arithmetic of its own.

Backend choice, first match wins: the ``backend=`` argument, the innermost
:func:`use_backend` context (per thread and per asyncio task), the ``LORAKERNELS_BACKEND``
environment variable, then automatic selection (CUDA tensors: triton, else cuda, else
reference, and reference for float64; CPU tensors: cpu). An explicitly requested backend that
cannot run (unavailable on the device, or without kernels for the dtype) raises
``RuntimeError``/``TypeError`` with the reason; only automatic selection moves on. The answer
is cached per (device, dtype, request), so availability is checked once, not per call.

How a linear call reaches its backend: in eager mode ``reference`` and ``cpu`` are called
directly (plain differentiable torch code; the custom op's Python dispatch costs ~100 us a
call, 2-3 % of a 77-row text layer). ``triton`` and ``cuda`` always, and every backend under
``torch.compile``, run behind the custom op ``torch.ops.lorakernels.multi_lora_linear``
(schema in :mod:`lorakernels._ops`), so that ``torch.compile(fullgraph=True)`` traces through
a patched model without graph breaks and without specialising on the batch's contents.

Convolutions go to the backend's ``multi_lora_conv2d`` (cpu, reference: base ``conv2d``
included); backends without one (triton, cuda) run pointwise convolutions as their linear op
over pixel rows and k x k ones as the base ``conv2d`` plus the reference's LoRA term.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ops
from . import plan as _plan
from .bank import LoRABank
from .batch import LoRABatch, _capturing
from .kernels import BankTensors, ConvMeta, LaunchMeta, LoRAArgs

BACKENDS = ("reference", "cpu", "triton", "cuda")
check_plan = _plan.check_plan  # for the modules, which reach the planner through ops only
_MODULES = {
    "reference": "lorakernels.kernels.reference",
    "cpu": "lorakernels.kernels.cpu",
    "triton": "lorakernels.kernels.triton",
    "cuda": "lorakernels.kernels.cuda",
}
_EAGER_DIRECT = ("reference", "cpu")
_NO_FLOAT64 = ("triton", "cuda")  # the GPU kernels have fp32/fp16/bf16 paths only
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# use_backend() choices, innermost last; a context variable, so each thread and asyncio task
# has its own
_backend_stack: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "lorakernels_backend", default=()
)
# (device, dtype, explicit choice, its source) -> backend name; only successes are cached
_resolved: dict[tuple, str] = {}


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
    with _plan.scoped(_backend_stack, (*_backend_stack.get(), _check_name(name, "use_backend"))):
        yield


@torch.compiler.assume_constant_result
def resolve_backend(
    device: torch.device, backend: str | None = None, dtype: torch.dtype | None = None
) -> str:
    """The backend a call on ``device`` will use (raises if an explicit choice cannot run).

    Under ``torch.compile`` this runs once at trace time and the choice is baked into the
    graph (it imports modules and reads the environment, which dynamo must not trace).
    """
    explicit, source = backend, "backend="
    if explicit is None:
        stack = _backend_stack.get()
        if stack:
            explicit, source = stack[-1], "use_backend()"
        elif os.environ.get("LORAKERNELS_BACKEND"):
            explicit, source = os.environ["LORAKERNELS_BACKEND"], "LORAKERNELS_BACKEND"
    key = (device, dtype, explicit, source)
    name = _resolved.get(key)
    if name is None:
        name = _resolve(device, dtype, explicit, source)
        _resolved[key] = name
    return name


def _resolve(
    device: torch.device, dtype: torch.dtype | None, explicit: str | None, source: str
) -> str:
    if explicit is not None:
        _check_name(explicit, source)
        reason = unavailable_reason(explicit, device)
        if reason is not None:
            raise RuntimeError(f"backend {explicit!r} (from {source}) cannot run: {reason}")
        if dtype == torch.float64 and explicit in _NO_FLOAT64:
            raise TypeError(
                f"backend {explicit!r} (from {source}) has no float64 kernels; use 'reference' "
                "(or float32/float16/bfloat16 inputs)"
            )
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


def bank_tensors(bank: LoRABank) -> BankTensors:
    """The bank's storage as the kernels take it: :meth:`LoRABank.tensors` (a host-side tuple
    the bank keeps current, so no ``nn.Module.__getattr__`` per buffer: ~4 us of a 75 us call
    on a tiny layer) wrapped in the kernels' named bundle."""
    return BankTensors(*bank.tensors())


@functools.lru_cache(maxsize=1024)
def _meta(max_rows: int, max_entries: int, max_rank: int) -> LaunchMeta:
    """Shared immutable bounds (building the frozen dataclass costs ~1 us a layer call)."""
    return LaunchMeta(max_rows, max_entries, max_rank)


def _run_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora: LoRAArgs, backend: str
) -> Tensor:
    """The custom op's kernel: the backend named by the op's ``backend`` argument."""
    return backend_module(backend).multi_lora_linear(x, weight, bias, lora)


_ops.register_linear_impl(_run_linear)


# ---------------------------------------------------------------------- validation
def _check_same(name: str, t: Tensor, x: Tensor, hint: str = "") -> None:
    """``t`` has ``x``'s device (tensor devices are normalised: cuda:0, never bare cuda)."""
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}{hint}")


def _check_params(x: Tensor, weight: Tensor, bias: Tensor | None, n: int, dim: str) -> None:
    """``weight`` and ``bias`` (``[n]``, ``dim`` names that size) have ``x``'s dtype and device."""
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (n,):
            raise ValueError(
                f"bias must have shape [{dim}]=({n},), got {tuple(getattr(bias, 'shape', ()))}"
            )
        if bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from x dtype {x.dtype}")
        _check_same("bias", bias, x)
    _check_same("weight", weight, x)


def _check_bank(bank: LoRABank, x: Tensor, k: int, n: int, what: str) -> BankTensors:
    if not isinstance(bank, LoRABank):
        raise TypeError(f"bank must be a LoRABank, got {type(bank).__name__}")
    if bank.in_features != k or bank.out_features != n:
        raise ValueError(
            f"bank is for K={bank.in_features}, N={bank.out_features}; {what} is [N={n}, K={k}]"
        )
    bank_t = bank_tensors(bank)
    if bank_t.lora_a.dtype != x.dtype:
        raise TypeError(f"bank dtype {bank_t.lora_a.dtype} differs from x dtype {x.dtype}")
    _check_same("bank", bank_t.lora_a, x)
    return bank_t


def _check_batch(
    batch: LoRABatch, bank: LoRABank, bank_t: BankTensors, x: Tensor, items: int | None
) -> None:
    """The batch fits ``x`` (``items``: size of x's sample dimension, None for ``[M, K]``)
    and names only slots that hold an adapter."""
    if not isinstance(batch, LoRABatch):
        raise TypeError(f"batch must be a LoRABatch, got {type(batch).__name__}")
    _check_same("batch", batch.entry_ptr, x, " (use batch.to())")
    s = batch.num_samples
    if items is not None and batch.rows_per_sample is None and items % s:
        # rows would still divide while samples got each other's adapters
        raise ValueError(
            f"the batch has {s} samples, x has {items}: {s} samples do not divide x's first "
            f"dimension (each sample owns whole items of it); x has shape {tuple(x.shape)}"
        )
    if torch.compiler.is_compiling():
        # host-side checks on the batch's contents are skipped while tracing, so that a
        # compiled graph does not specialise on them (the manager validates at use() time)
        return
    # every patched layer runs this per call: compare one cached int, and scan the few used
    # slots; the lists of offenders are built only for the error message
    cap = bank_t.slot_rank.shape[0]
    if batch.max_slot >= cap:
        bad = sorted(k for k in batch.used_slots if k >= cap)
        raise ValueError(
            f"batch uses slot(s) {bad} but this bank has only {cap} slot ids "
            "(was the adapter loaded into this layer's manager?)"
        )
    known = batch.known_slots
    for slot in batch.used_slots:
        # legal: resident here, or an adapter's slot id without weights in this layer (rank 0)
        # that the bank's manager registered or the batch's name -> slot table names
        if (
            slot not in bank
            and not bank.is_registered(slot)
            and (known is None or slot not in known)
        ):
            raise ValueError(
                f"batch uses slot {slot}, which holds no adapter: it is neither resident in nor "
                "registered with this layer's bank, and the batch was built without a name -> "
                "slot table naming it (pass slots= to LoRABatch.from_mixtures, or load the adapter)"
            )


def _validate(
    x: Tensor, weight: Tensor, bias: Tensor | None, bank: LoRABank, batch: LoRABatch
) -> BankTensors:
    """Raise on any mismatch; the bank's tensors on success."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(
            f"weight must be a 2-D [N, K] tensor, got {getattr(weight, 'shape', weight)}"
        )
    n, k = weight.shape
    if x.dim() < 2 or x.shape[-1] != k:
        raise ValueError(
            f"x has shape {tuple(x.shape)}; expected [M, K] or [S, T, K] with K={k} "
            "(weight.shape[1])"
        )
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    _check_params(x, weight, bias, n, "N")
    bank_t = _check_bank(bank, x, k, n, "weight")
    _check_batch(batch, bank, bank_t, x, x.shape[0] if x.dim() > 2 else None)
    return bank_t


def _lora_args(
    bank: LoRABank, bank_t: BankTensors, batch: LoRABatch, rows: int, device: torch.device
) -> LoRAArgs:
    """The kernels' arguments for an input of ``rows`` rows (images for convolutions).

    Launch bounds: real maxima in eager mode; capacities while compiling, capturing, or for
    a frozen batch (see :class:`~lorakernels.kernels.LaunchMeta`)."""
    batch_t, max_rows = batch.tensors(rows)
    if batch.frozen or torch.compiler.is_compiling() or _capturing(device):
        meta = _meta(max_rows, batch.max_entries, bank.max_rank)
    else:
        meta = _meta(max_rows, batch.real_max_entries, bank.max_rank)
    return LoRAArgs(bank_t, batch_t, meta)


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
            With more than two dimensions the first is the sample dimension: its size must be
            a multiple of the batch's sample count.
        weight: ``[N, K]`` base weight, same dtype and device as ``x``.
        bias: ``[N]`` or ``None``.
        bank: this layer's :class:`~lorakernels.bank.LoRABank` (same dtype and device).
        batch: the :class:`~lorakernels.batch.LoRABatch` of this forward pass; every slot it
            uses must hold an adapter (resident here, or in its name -> slot table).
        backend: ``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"`` or ``None`` (see module doc).
        plan: ``"auto"``, ``"merged"``, ``"unmerged"`` or ``None``: merged weights or the
            unmerged LoRA term per group of samples (cpu and triton backends; see
            :mod:`lorakernels.plan` and :mod:`lorakernels.kernels.triton.planned`).

    Returns:
        ``[..., N]`` in ``x.dtype``. Numerics: fp32 accumulation, fp32 rank intermediate, one
        rounding to ``x.dtype``; float64 inputs compute in float64.
    """
    if plan is not None:  # per-call planner override, read at run time by the backend
        with _plan.call_plan(plan):
            return multi_lora_linear(x, weight, bias, bank, batch, backend)
    bank_t = _validate(x, weight, bias, bank, batch)
    name = resolve_backend(x.device, backend, x.dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    args = (x2, weight, bias, _lora_args(bank, bank_t, batch, x2.shape[0], x.device))
    if name in _EAGER_DIRECT and not torch.compiler.is_compiling():
        y = backend_module(name).multi_lora_linear(*args)
    else:
        y = _ops.multi_lora_linear(*args, name)
    return y.reshape(*lead, weight.shape[0])


def _pair(v: int | tuple[int, ...] | list[int], name: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not all(isinstance(i, int) for i in t):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return t  # type: ignore[return-value]


def _check_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[int, int, int, int]:
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise ValueError(
            f"weight must be a 4-D [C_out, C_in, kh, kw] tensor, got "
            f"{tuple(getattr(weight, 'shape', ())) or weight!r}"
        )
    c_out, c_in, kh, kw = weight.shape
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != c_in:
        raise ValueError(
            f"x must be [N, C_in={c_in}, H, W] (weight.shape[1]), got "
            f"{tuple(getattr(x, 'shape', ()))}"
        )
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    _check_params(x, weight, bias, c_out, "C_out")
    return c_out, c_in, kh, kw


def multi_lora_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    bank: LoRABank,
    batch: LoRABatch,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    backend: str | None = None,
    plan: str | None = None,
) -> Tensor:
    """``conv2d(x, weight, bias) + Σ strength * (alpha/r) * conv2d(conv2d(x, A), B)`` per sample.

    ``A`` is the bank's ``[r, C_in*kh*kw]`` rows viewed as a ``[r, C_in, kh, kw]`` convolution
    with the layer's stride, padding (zeros; pad ``x`` yourself for other modes) and
    dilation; ``B`` is a 1x1 convolution ``[C_out, r]``. Samples are the ``N`` of
    ``x [N, C_in, H, W]`` (split into ``S`` equal groups of images).

    Backends: cpu plans merged and unmerged groups (``plan``, as for
    :func:`multi_lora_linear`) and computes in NCHW (:mod:`lorakernels.kernels.cpu_conv`;
    under ``torch.compile`` a pointwise convolution runs as the linear op over pixel rows);
    reference computes everything in float32 (float64 for float64) and rounds once. Backends
    without convolutions of their own (triton, cuda) run a pointwise convolution (1x1,
    stride 1, no padding) as their linear op over pixel rows, and a k x k one as the base
    ``conv2d`` in ``x.dtype`` plus the reference's LoRA term.

    Args:
        x: ``[N, C_in, H, W]`` layer input.
        weight: ``[C_out, C_in, kh, kw]``, same dtype and device as ``x``.
        bias: ``[C_out]`` or ``None``.
        stride, padding, dilation: as for ``F.conv2d`` (``padding`` may be "same"/"valid").
        backend, plan: as for :func:`multi_lora_linear`.

    Returns:
        ``[N, C_out, H', W']`` in ``x.dtype``, in ``x``'s memory format.
    """
    if plan is not None:
        with _plan.call_plan(plan):
            return multi_lora_conv2d(
                x, weight, bias, bank, batch, stride, padding, dilation, backend
            )
    c_out, c_in, kh, kw = _check_conv(x, weight, bias)
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    if not isinstance(padding, str):
        padding = _pair(padding, "padding")
    bank_t = _check_bank(bank, x, c_in * kh * kw, c_out, "weight (C_in*kh*kw, C_out)")
    if batch.rows_per_sample is not None:
        raise ValueError("batch: convolutions need equal-length samples (no rows_per_sample)")
    _check_batch(batch, bank, bank_t, x, x.shape[0])
    name = resolve_backend(x.device, backend, x.dtype)
    conv = ConvMeta(c_in, kh, kw, stride, padding, dilation)
    compiling = torch.compiler.is_compiling()
    impl = None if compiling else getattr(backend_module(name), "multi_lora_conv2d", None)
    if conv.pointwise and impl is None:
        # the linear custom op: also what torch.compile traces without graph breaks (the cpu
        # conv plans on the host)
        return _pointwise_as_linear(x, weight, bias, bank, batch, name)
    if compiling:  # k x k: traced through the backend's python (graph breaks on the host plan)
        impl = getattr(backend_module(name), "multi_lora_conv2d", None)
    if impl is not None:
        return impl(x, weight, bias, _lora_args(bank, bank_t, batch, x.shape[0], x.device), conv)
    base = F.conv2d(x, weight, bias, stride, padding, dilation)
    lora = _lora_args(bank, bank_t, batch, x.shape[0], x.device)
    return backend_module("reference").add_conv_lora(x, base, lora, conv)


def _pointwise_as_linear(x, weight, bias, bank, batch, name: str) -> Tensor:
    """A 1x1 convolution as the backend's linear op over the ``N*H*W`` pixel rows (the fused
    GPU kernels take rows; one layout copy in and one back)."""
    b, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # [B, H*W, C]: B checked vs samples
    y = multi_lora_linear(rows, weight.view(weight.shape[0], c), bias, bank, batch, name)
    y = y.view(b, h, w, -1).permute(0, 3, 1, 2)
    # give back the input's memory format: a channels-last view leaking into an NCHW model
    # makes oneDNN reorder every later 3x3 conv's weights (measured: SD1.5 resnet convs
    # 65 -> 166 ms a call at 1280 channels)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return y
    return y.contiguous()
