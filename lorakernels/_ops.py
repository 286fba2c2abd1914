"""Every ``torch.library`` schema and fake kernel of the package, in one file.

The schemas exist as soon as :mod:`lorakernels` is imported, with or without the native
library or triton (torchao and bitsandbytes keep theirs the same way), so tracing and
``torch.compile`` see them everywhere. Implementations are registered where they live:
``lorakernels.ops`` registers the one of ``multi_lora_linear`` (it dispatches on its
``backend`` argument), ``lorakernels.kernels.cuda`` the CUDA kernels of the ``sgmv_*`` ops.

Schemas take flat tensors (they cannot take Python objects); the kernel arguments
(:class:`~lorakernels.kernels.LoRAArgs`: the bank's and the batch's tensors and the launch
bounds) are flattened and rebuilt here and nowhere else.

Ops (namespace ``torch.ops.lorakernels``):

* ``multi_lora_linear(x, weight, bias?, <bank>, <batch>, max_rows, max_entries, max_rank,
  backend) -> y [M, N]`` in ``x.dtype``; differentiable in ``x``, ``weight`` and ``bias``.
* ``sgmv_shrink(x, lora_a, slot_start, slot_rank, row_ptr, entry_ptr, entry_slot,
  <caps>) -> t`` fp32 ``[M, max_entries * max_rank]``.
* ``sgmv_expand(y, t, <bank minus lora_a>, <batch>, <caps>) -> y'`` in the bank dtype
  (``y`` fp32 or bank dtype), and ``sgmv_expand_`` the same in place on ``y``.

The fakes check every shape relation with ``torch._check``, so a traced graph fails at trace
time, not inside a kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .kernels import BankTensors, BatchTensors, LaunchMeta, LoRAArgs

LIB = torch.library.Library("lorakernels", "FRAGMENT")

_BANK = "Tensor lora_a, Tensor lora_bt, Tensor slot_start, Tensor slot_rank, Tensor slot_scale"
_BATCH = "Tensor row_ptr, Tensor entry_ptr, Tensor entry_slot, Tensor entry_weight"
_CAPS = "int max_rows, int max_entries, int max_rank"
_EXPAND = (
    "Tensor t, Tensor lora_bt, Tensor slot_start, Tensor slot_rank, Tensor slot_scale, "
    f"{_BATCH}, {_CAPS}"
)
LIB.define(
    f"multi_lora_linear(Tensor x, Tensor weight, Tensor? bias, {_BANK}, {_BATCH}, {_CAPS}, "
    "str backend) -> Tensor"
)
LIB.define(
    "sgmv_shrink(Tensor x, Tensor lora_a, Tensor slot_start, Tensor slot_rank, Tensor row_ptr, "
    f"Tensor entry_ptr, Tensor entry_slot, {_CAPS}) -> Tensor"
)
LIB.define(f"sgmv_expand(Tensor y, {_EXPAND}) -> Tensor")
LIB.define(f"sgmv_expand_(Tensor(a!) y, {_EXPAND}) -> ()")


# ---------------------------------------------------------------------- flattening
def _caps(meta: LaunchMeta) -> tuple[int, int, int]:
    return meta.max_rows, meta.max_entries, meta.max_rank


def _unflatten(args: tuple) -> LoRAArgs:
    """:class:`LoRAArgs` from the 12 schema arguments after ``x, weight, bias``."""
    return LoRAArgs(BankTensors(*args[:5]), BatchTensors(*args[5:9]), LaunchMeta(*args[9:12]))


def multi_lora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora: LoRAArgs, backend: str
) -> Tensor:
    """Call ``torch.ops.lorakernels.multi_lora_linear`` with ``lora`` flattened."""
    flat = (*lora.bank, *lora.batch, *_caps(lora.meta))
    return torch.ops.lorakernels.multi_lora_linear(x, weight, bias, *flat, backend)


LinearImpl = Callable[[Tensor, Tensor, "Tensor | None", LoRAArgs, str], Tensor]


def register_linear_impl(fn: LinearImpl) -> None:
    """Register ``fn(x, weight, bias, lora, backend)`` as the op's kernel for every device
    (it picks the backend module by name)."""

    def kernel(x: Tensor, weight: Tensor, bias: Tensor | None, *rest: object) -> Tensor:
        return fn(x, weight, bias, _unflatten(rest[:12]), rest[12])

    torch.library.register_kernel("lorakernels::multi_lora_linear", None, kernel, lib=LIB)


def sgmv_shrink(x: Tensor, lora: LoRAArgs) -> Tensor:
    """``torch.ops.lorakernels.sgmv_shrink`` on ``lora``."""
    a, _, start, rank, _ = lora.bank
    return torch.ops.lorakernels.sgmv_shrink(x, a, start, rank, *lora.batch[:3], *_caps(lora.meta))


def sgmv_expand(y: Tensor, t: Tensor, lora: LoRAArgs) -> Tensor:
    """``torch.ops.lorakernels.sgmv_expand`` (functional) on ``lora``."""
    flat = (*lora.bank[1:], *lora.batch, *_caps(lora.meta))
    return torch.ops.lorakernels.sgmv_expand(y, t, *flat)


def sgmv_expand_(y: Tensor, t: Tensor, lora: LoRAArgs) -> None:
    """``torch.ops.lorakernels.sgmv_expand_`` (in place on ``y``) on ``lora``."""
    torch.ops.lorakernels.sgmv_expand_(y, t, *lora.bank[1:], *lora.batch, *_caps(lora.meta))


# ---------------------------------------------------------------------- fakes
def _check_bank(lora_a: Tensor | None, lora_bt: Tensor, slot_tensors: tuple[Tensor, ...]) -> None:
    torch._check(lora_bt.dim() == 2, lambda: f"lora_bt must be 2-D, got {tuple(lora_bt.shape)}")
    if lora_a is not None:
        torch._check(
            lora_a.dim() == 2 and lora_a.shape[0] == lora_bt.shape[0],
            lambda: (
                f"lora_a {tuple(lora_a.shape)} and lora_bt {tuple(lora_bt.shape)} must "
                "have the same number of rank rows"
            ),
        )
    for t in slot_tensors:
        torch._check(
            t.dim() == 1 and t.shape[0] == slot_tensors[0].shape[0],
            lambda: "slot_start, slot_rank and slot_scale must be 1-D of one length",
        )


def _check_batch(
    row_ptr: Tensor, entry_ptr: Tensor, entry_slot: Tensor, entry_weight: Tensor | None = None
) -> None:
    torch._check(
        row_ptr.dim() == 1 and entry_ptr.dim() == 1 and row_ptr.shape[0] == entry_ptr.shape[0],
        lambda: (
            f"row_ptr {tuple(row_ptr.shape)} and entry_ptr {tuple(entry_ptr.shape)} must "
            "both be [S+1]"
        ),
    )
    if entry_weight is not None:
        torch._check(
            entry_weight.shape == entry_slot.shape,
            lambda: (
                f"entry_weight {tuple(entry_weight.shape)} and entry_slot "
                f"{tuple(entry_slot.shape)} must both be [E_cap]"
            ),
        )


def _check_caps(max_rows: int, max_entries: int, max_rank: int) -> None:
    torch._check(min(max_rows, max_entries, max_rank) >= 0, lambda: "launch bounds must be >= 0")


def _check_slots_batch_caps(lora_a: Tensor | None, lora_bt: Tensor, rest: tuple) -> None:
    """``rest``: the 10 schema arguments after ``lora_bt`` (slot tensors, batch, bounds)."""
    _check_bank(lora_a, lora_bt, rest[:3])
    _check_batch(*rest[3:7])
    _check_caps(*rest[7:10])


@torch.library.register_fake("lorakernels::multi_lora_linear", lib=LIB)
def _linear_fake(x, weight, bias, lora_a, lora_bt, *rest):  # noqa: ANN001, ANN202
    torch._check(x.dim() == 2, lambda: f"x must be [M, K], got {tuple(x.shape)}")
    torch._check(
        weight.dim() == 2 and weight.shape[1] == x.shape[1],
        lambda: f"weight {tuple(weight.shape)} must be [N, K={x.shape[1]}]",
    )
    n = weight.shape[0]
    if bias is not None:
        torch._check(bias.shape == (n,), lambda: f"bias must be [{n}], got {tuple(bias.shape)}")
    torch._check(
        lora_a.shape[1] == x.shape[1] and lora_bt.shape[1] == n,
        lambda: (
            f"lora_a {tuple(lora_a.shape)} / lora_bt {tuple(lora_bt.shape)} must be "
            f"[R, K={x.shape[1]}] / [R, N={n}]"
        ),
    )
    _check_slots_batch_caps(lora_a, lora_bt, rest)
    return x.new_empty(x.shape[0], n)


@torch.library.register_fake("lorakernels::sgmv_shrink", lib=LIB)
def _shrink_fake(x, lora_a, slot_start, slot_rank, row_ptr, entry_ptr, entry_slot, *caps):  # noqa: ANN001, ANN202
    torch._check(
        x.dim() == 2 and lora_a.dim() == 2 and lora_a.shape[1] == x.shape[1],
        lambda: f"x {tuple(x.shape)} and lora_a {tuple(lora_a.shape)} must be [M, K], [R, K]",
    )
    _check_batch(row_ptr, entry_ptr, entry_slot)
    _check_caps(*caps)
    return x.new_empty((x.shape[0], caps[1] * caps[2]), dtype=torch.float32)


def _check_expand(y: Tensor, t: Tensor, lora_bt: Tensor, rest: tuple) -> None:
    torch._check(
        y.dim() == 2 and y.shape[1] == lora_bt.shape[1],
        lambda: f"y must be [M, N={lora_bt.shape[1]}], got {tuple(y.shape)}",
    )
    torch._check(
        t.dim() == 2 and t.shape[0] == y.shape[0] and t.shape[1] >= rest[8] * rest[9],
        lambda: (
            f"t has shape {tuple(t.shape)}; expected [{y.shape[0]}, >= "
            f"{rest[8] * rest[9]}] (max_entries * max_rank)"
        ),
    )
    _check_slots_batch_caps(None, lora_bt, rest)


@torch.library.register_fake("lorakernels::sgmv_expand", lib=LIB)
def _expand_fake(y, t, lora_bt, *rest):  # noqa: ANN001, ANN202
    _check_expand(y, t, lora_bt, rest)
    return y.new_empty(y.shape, dtype=lora_bt.dtype)


@torch.library.register_fake("lorakernels::sgmv_expand_", lib=LIB)
def _expand_inplace_fake(y, t, lora_bt, *rest):  # noqa: ANN001, ANN202
    _check_expand(y, t, lora_bt, rest)


# ---------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):  # noqa: ANN001, ANN202 - torch.library signature
    ctx.inputs = inputs


def _backward(ctx, grad):  # noqa: ANN001, ANN202 - torch.library signature
    """Gradients for x, weight and bias (the bank and batch are constants).

    The input gradient is the same op on the transposed problem:
    ``dx = dy @ W + Σ coef * (dy @ B) @ A`` is ``multi_lora_linear`` with ``W.T`` as the
    weight and the bank's ``A``/``B.T`` rows swapped.
    """
    x, weight, bias, *rest = ctx.inputs
    lora = _unflatten(tuple(rest[:12]))
    bank = lora.bank._replace(lora_a=lora.bank.lora_bt, lora_bt=lora.bank.lora_a)
    grad = grad.contiguous()
    dx = multi_lora_linear(grad, weight.T.contiguous(), None, lora._replace(bank=bank), rest[12])
    dw = grad.T @ x
    db = grad.sum(0) if bias is not None else None
    return (dx, dw, db) + (None,) * 13


torch.library.register_autograd(
    "lorakernels::multi_lora_linear", _backward, setup_context=_setup_context, lib=LIB
)
