"""CUDA backend: the csrc SGMV shrink/expand kernels, called through the native C library.

Semantics, argument table and the ``t`` layout: :mod:`lorakernels.kernels`.

* :func:`multi_lora_linear` -> ``[M, N]`` in ``x.dtype``: the base GEMM in torch (cuBLAS,
  fp32 output for fp16/bf16 inputs), bias added in fp32, then :func:`lora_shrink` and an
  expand that reads the fp32 base and writes ``x.dtype`` -- one rounding, as the contract asks.
* :func:`lora_shrink` -> fp32 ``t [M, meta.max_entries * meta.max_rank]``; columns past an
  entry's rank (and entries a sample lacks) are zero.
* :func:`lora_expand` adds the LoRA term onto ``y`` (same dtype as the bank) in place.

Kernels (``csrc/cuda``): grids come from shapes and the ``LaunchMeta`` capacities only, so
launches are CUDA-graph safe. fp16/bf16 shrink on mma.sync m16n8k16 tensor cores with fp32
accumulation; the expand keeps ``t`` in fp32 on tf32 tensor cores (``t`` split into two tf32
parts, about 22 mantissa bits); fp32 inputs use fp32 FMAs throughout. Any K and N, any mix of
ranks up to ``meta.max_rank``.

Ops: ``torch.ops.lorakernels.sgmv_shrink``, ``sgmv_expand`` (functional: fp32 or bank-dtype
``y`` in, bank dtype out) and ``sgmv_expand_`` (in place). Their schemas and fake kernels live
in :mod:`lorakernels._ops` (they exist with or without the native library, torchao style);
this module registers their CUDA kernels, which call the library through ctypes on
``torch.cuda.current_stream()``.

Constraints checked here (``ops.py`` checks meaning): CUDA tensors, float32/float16/bfloat16
(no float64), a device of compute capability 8.0+, and a library built for it. Tensors with a
non-unit innermost stride are copied contiguous; index tensors must be int32.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools

import torch
from torch import Tensor

from .. import _native, _ops
from . import LoRAArgs

__all__ = ["lora_expand", "lora_shrink", "multi_lora_linear", "unavailable_reason"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_ARGS = ("slot_start", "slot_rank", "row_ptr", "entry_ptr", "entry_slot")


# ---------------------------------------------------------------------------- checks
def _dtype_code(t: Tensor, name: str) -> int:
    if t.dtype not in _FLOATS:
        raise TypeError(
            f"{name}: the cuda backend supports float32, float16 and bfloat16, got {t.dtype}"
        )
    return _native.DTYPE_CODES[str(t.dtype).removeprefix("torch.")]


def _rows(t: Tensor, name: str, dtype: torch.dtype | None = None) -> Tensor:
    """A 2-D tensor with unit innermost stride (copied if needed), optionally of ``dtype``."""
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


def _vector(t: Tensor, name: str, dtype: torch.dtype) -> Tensor:
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    return t.contiguous()


def _ptr(t: Tensor) -> int:
    return t.data_ptr()


def _ld(t: Tensor) -> int:
    """Leading (row) stride in elements; a 1-row matrix may report anything, so use its width."""
    return t.stride(0) if t.shape[0] > 1 else max(t.shape[1], 1)


# ---------------------------------------------------------------------------- raw launches
# These take tensors on any device and hand their pointers to the library; the op kernels
# below are the only callers with CUDA tensors. Without a GPU the library answers with a
# CUDA error, raised here as RuntimeError (tests use that to check the error path).
def _sizes(idx: dict[str, Tensor], bank: Tensor, width: int, *caps: int) -> tuple[int, ...]:
    """The size arguments both library calls end with: samples, slots, bank rows, the row
    width (K for the shrink, N for the expand), then ``max_rows, max_entries, max_rank``."""
    return (idx["row_ptr"].numel() - 1, idx["slot_rank"].numel(), bank.shape[0], width, *caps)


def _launch_shrink(
    lib: ctypes.CDLL,
    x: Tensor,
    lora_a: Tensor,
    idx: dict[str, Tensor],
    t: Tensor,
    max_rows: int,
    max_entries: int,
    max_rank: int,
    stream: int,
) -> None:
    code = lib.lk_sgmv_shrink(
        _dtype_code(x, "x"),
        _ptr(x),
        _ld(x),
        _ptr(lora_a),
        _ld(lora_a),
        _ptr(t),
        t.stride(0),
        _ptr(idx["slot_start"]),
        _ptr(idx["slot_rank"]),
        _ptr(idx["row_ptr"]),
        _ptr(idx["entry_ptr"]),
        _ptr(idx["entry_slot"]),
        *_sizes(idx, lora_a, x.shape[1], max_rows, max_entries, max_rank),
        stream,
    )
    _native.check(lib, code, "lorakernels sgmv_shrink")


def _launch_expand(
    lib: ctypes.CDLL,
    y_in: Tensor,
    y_out: Tensor,
    t: Tensor,
    lora_bt: Tensor,
    idx: dict[str, Tensor],
    slot_scale: Tensor,
    entry_weight: Tensor,
    max_rows: int,
    max_entries: int,
    max_rank: int,
    stream: int,
) -> None:
    code = lib.lk_sgmv_expand(
        _dtype_code(y_out, "y_out"),
        _dtype_code(y_in, "y"),
        _ptr(y_in),
        _ld(y_in),
        _ptr(y_out),
        _ld(y_out),
        _ptr(t),
        t.stride(0),
        _ptr(lora_bt),
        _ld(lora_bt),
        _ptr(idx["slot_start"]),
        _ptr(idx["slot_rank"]),
        _ptr(slot_scale),
        _ptr(idx["row_ptr"]),
        _ptr(idx["entry_ptr"]),
        _ptr(idx["entry_slot"]),
        _ptr(entry_weight),
        *_sizes(idx, lora_bt, y_out.shape[1], max_rows, max_entries, max_rank),
        stream,
    )
    _native.check(lib, code, "lorakernels sgmv_expand")


def _index_tensors(**named: Tensor) -> dict[str, Tensor]:
    return {k: _vector(v, k, torch.int32) for k, v in named.items()}


def _same_device(device: torch.device, **named: Tensor) -> None:
    for k, v in named.items():
        if v.device != device:
            raise ValueError(f"{k} is on {v.device}, expected {device}")


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def _on(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Make ``device`` current for the library's launches (it uses the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# ---------------------------------------------------------------------------- op kernels
# Registered for CUDA below. They do not insist on CUDA tensors themselves: with the host
# emulation of the library (csrc/emulate, tests only) the same code runs on CPU tensors.
# Each takes its op's schema arguments (``lorakernels._ops``) positionally; ``rest`` is what
# follows the leading tensors, in schema order.
def _shrink_impl(x, lora_a, *rest):  # noqa: ANN001, ANN002, ANN202
    """``rest``: ``slot_start, slot_rank, row_ptr, entry_ptr, entry_slot`` (the order of
    ``_INDEX_ARGS``), then ``max_rows, max_entries, max_rank``."""
    lib = _native.load()
    max_rows, max_entries, max_rank = rest[5:]
    x = _rows(x, "x")
    lora_a = _rows(lora_a, "lora_a", x.dtype)
    idx = _index_tensors(**dict(zip(_INDEX_ARGS, rest[:5], strict=True)))
    _same_device(x.device, lora_a=lora_a, **idx)
    # zeros, not empty: columns past a rank are never written and must not leak old memory
    t = torch.zeros((x.shape[0], max_entries * max_rank), dtype=torch.float32, device=x.device)
    with _on(x.device):
        _launch_shrink(lib, x, lora_a, idx, t, max_rows, max_entries, max_rank, _stream(x.device))
    return t


def _expand_args(y, t, lora_bt, rest):  # noqa: ANN001, ANN202
    """Checked expand arguments; ``rest``: ``slot_start, slot_rank, slot_scale, row_ptr,
    entry_ptr, entry_slot, entry_weight, max_rows, max_entries, max_rank``."""
    slot_start, slot_rank, slot_scale, row_ptr, entry_ptr, entry_slot, entry_weight = rest[:7]
    _, max_entries, max_rank = rest[7:]
    lora_bt = _rows(lora_bt, "lora_bt")
    _dtype_code(lora_bt, "lora_bt")
    t = _rows(t, "t", torch.float32)
    if t.shape[1] < max_entries * max_rank or t.shape[0] != y.shape[0]:
        raise ValueError(
            f"t has shape {tuple(t.shape)}; expected [{y.shape[0]}, >= {max_entries * max_rank}]"
        )
    if y.dim() != 2 or y.shape[1] != lora_bt.shape[1]:
        raise ValueError(f"y must be [M, N={lora_bt.shape[1]}], got {tuple(y.shape)}")
    idx = _index_tensors(
        slot_start=slot_start,
        slot_rank=slot_rank,
        row_ptr=row_ptr,
        entry_ptr=entry_ptr,
        entry_slot=entry_slot,
    )
    scale = _vector(slot_scale, "slot_scale", torch.float32)
    weight = _vector(entry_weight, "entry_weight", torch.float32)
    _same_device(y.device, t=t, lora_bt=lora_bt, slot_scale=scale, entry_weight=weight, **idx)
    return t, lora_bt, idx, scale, weight


def _expand_impl(y, t, lora_bt, *rest):  # noqa: ANN001, ANN002, ANN202
    lib = _native.load()
    t, lora_bt, idx, scale, weight = _expand_args(y, t, lora_bt, rest)
    if y.dtype not in (torch.float32, lora_bt.dtype):
        raise TypeError(f"y must be float32 or {lora_bt.dtype}, got {y.dtype}")
    y = _rows(y, "y")
    out = torch.empty(y.shape, dtype=lora_bt.dtype, device=y.device)
    with _on(y.device):
        _launch_expand(lib, y, out, t, lora_bt, idx, scale, weight, *rest[7:], _stream(y.device))
    return out


def _expand_inplace_impl(y, t, lora_bt, *rest):  # noqa: ANN001, ANN002, ANN202
    lib = _native.load()
    t, lora_bt, idx, scale, weight = _expand_args(y, t, lora_bt, rest)
    if y.dtype != lora_bt.dtype:
        raise TypeError(f"y must be {lora_bt.dtype} (the bank dtype) for the in-place expand")
    if y.dim() != 2 or y.stride(1) != 1:
        raise ValueError("y must be a 2-D tensor with unit column stride for the in-place expand")
    with _on(y.device):
        _launch_expand(lib, y, y, t, lora_bt, idx, scale, weight, *rest[7:], _stream(y.device))


OP_IMPLS = {
    "sgmv_shrink": _shrink_impl,
    "sgmv_expand": _expand_impl,
    "sgmv_expand_": _expand_inplace_impl,
}
for _name, _fn in OP_IMPLS.items():
    _ops.LIB.impl(_name, _fn, "CUDA")


# ---------------------------------------------------------------------------- backend API
@functools.cache
def _device_reason(index: int) -> str | None:
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:
        return (
            f"the cuda backend needs compute capability 8.0 or newer (mma.sync bf16/tf32); "
            f"{torch.cuda.get_device_name(index)} is {major}.{minor}"
        )
    lib = _native.load()
    return _native.device_problem(lib, index)


def unavailable_reason(device: torch.device) -> str | None:
    """``None`` when the kernels can run on ``device`` tensors, else the reason."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors only (got a {device.type} device)"
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        return f"torch {torch.__version__} ({build}) sees no CUDA device"
    present, why = _native.status()
    if not present:
        return why
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_reason(index)


def lora_shrink(x: Tensor, lora: LoRAArgs) -> Tensor:
    """fp32 ``t [M, meta.max_entries * meta.max_rank]``: entry ``j`` of a row's sample in
    columns ``j * max_rank : j * max_rank + rank`` (zero elsewhere)."""
    return _ops.sgmv_shrink(x, lora)


def lora_expand(y: Tensor, t: Tensor, lora: LoRAArgs) -> None:
    """``y += entry_weight * slot_scale * t_entry @ lora_bt_rows`` per sample, in place
    (``y`` in the bank dtype; the sum is formed in fp32 and rounded once into ``y``)."""
    _ops.sgmv_expand_(y, t, lora)


def _base_fp32(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` as fp32 without rounding to fp16/bf16 in between."""
    if x.dtype == torch.float32:
        y = x @ weight.T
    elif x.device.type == "cuda":
        # cuBLAS with an fp32 output (aten::mm.dtype): the LoRA term is added before the
        # single rounding to x.dtype
        y = torch.mm(x, weight.T, out_dtype=torch.float32)
    else:  # host emulation in the tests: aten::mm.dtype is CUDA-only
        y = x.float() @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    return y


def multi_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora: LoRAArgs) -> Tensor:
    """``y [M, N] = x @ weight.T + bias + sum of each sample's LoRA terms``, in ``x.dtype``."""
    _dtype_code(x, "x")
    base = _base_fp32(x, weight, bias)
    if x.shape[0] == 0 or lora.meta.max_entries == 0 or lora.meta.max_rank == 0:
        return base.to(x.dtype)
    return _ops.sgmv_expand(base, lora_shrink(x, lora), lora)
