"""Host side of the Triton backend: checks, grid sizes and launch plans.

A :class:`Launch` is everything one call launches, built from shapes, strides, dtypes and the
:class:`~lorakernels.kernels.LaunchMeta` capacities only. Building it reads no device value
(it even works on ``device="meta"`` tensors, which the tests use to prove it), so calling it
again after the batch tensors were changed in place is exactly what a CUDA-graph replay does.

Device: a launch runs on ``x``'s device, whatever torch's current device is (Triton launches
on the current device and its current stream, so :meth:`Launch.__call__` switches to ``x``'s
device first when they differ, as the cuda backend does).

Per-call host cost (issue 9, item 10): the dispatch decision is cached per (shapes,
capacities, dtype, GPU), the device check per device, so a call builds only the argument
tuples. fp32 follows torch's TF32 switch (``torch.backends.cuda.matmul.allow_tf32``) in the
shrink and expand exactly as the cuBLAS base GEMM of the pair does; fp32 never takes the fused
kernel (:func:`.dispatch.choose`).

Constraints checked here (``lorakernels.ops`` has already checked meaning and shapes): dtypes
fp16/bf16/fp32 with one dtype for ``x``/``weight``/``bias``/bank, ``int32`` index tensors,
``float32`` scales and strengths; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import LaunchMeta, LoRAArgs
from . import dispatch

_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
# Samples examined per step by the tile -> sample search (one vector load of row_ptr).
_BLOCK_S = 64


@dataclass
class Launch:
    """A fixed sequence of launches writing into ``out``; call it to run (or re-run) them."""

    out: Tensor
    steps: list[Callable[[], object]] = field(default_factory=list)
    # Host-side description of each step (kernel, grid, runtime arguments, compile-time
    # constants and launch options), for tests, the AOT compile check and debugging.
    records: list[dict] = field(default_factory=list)

    def __call__(self) -> Tensor:
        with device_guard(self.out.device):
            for step in self.steps:
                step()
        return self.out


def device_guard(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Make ``device`` torch's current CUDA device while Triton launches (no-op elsewhere or
    when it already is): Triton picks the device and stream from torch's current device."""
    if device.type != "cuda" or device.index is None:
        return contextlib.nullcontext()
    if torch.cuda.current_device() == device.index:
        return contextlib.nullcontext()
    return torch.cuda.device(device.index)


def interpreting() -> bool:
    """True when the kernels were built by Triton's interpreter (``TRITON_INTERPRET=1``)."""
    from triton.runtime.interpreter import InterpretedFunction

    from .fused import _fused_multi_lora_kernel

    return isinstance(_fused_multi_lora_kernel, InterpretedFunction)


def unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` tensors, or ``None`` if they can."""
    return _unavailable_reason(device.type, device.index)


@functools.cache
def _unavailable_reason(device_type: str, index: int | None) -> str | None:
    # Cached: every call checks its device, and nothing here changes within a process
    # (TRITON_INTERPRET must be set before the kernels are imported anyway).
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"the triton backend needs the triton package, which failed to import ({exc})"
    interpret_env = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "the triton backend got CUDA tensors but torch reports no usable CUDA device"
        major, _ = _cuda_properties(device.index if device.index is not None else 0)
        if major < 8:
            # bf16 tensor-core MMA and cp.async pipelining, which the config tables assume.
            return f"the triton backend needs compute capability 8.0 or newer, got {major}.x"
        return None
    if device.type == "cpu":
        if not interpret_env:
            return (
                "the triton backend runs on CUDA tensors; on CPU tensors only under Triton's "
                "interpreter (set TRITON_INTERPRET=1 before lorakernels' triton kernels are "
                "imported)"
            )
        if not interpreting():
            return (
                "TRITON_INTERPRET=1 was set after lorakernels' triton kernels were compiled "
                "for the GPU; set it before they are first imported"
            )
        return None
    return (
        f"the triton backend runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), not {device}"
    )


def _dtype_name(x: Tensor, argname: str = "x") -> str:
    try:
        return _DTYPE_NAMES[x.dtype]
    except KeyError:
        raise TypeError(
            f"{argname}: the triton backend supports float16, bfloat16 and float32, got {x.dtype}"
        ) from None


def _check(x: Tensor, named: dict[str, Tensor | None], dtypes: dict[str, torch.dtype]) -> None:
    for name, tensor in named.items():
        if tensor is None:
            continue
        want = dtypes.get(name, x.dtype)
        if tensor.dtype != want:
            raise TypeError(f"{name}: expected dtype {want}, got {tensor.dtype}")
    if x.device.type == "meta":
        return  # planning only (tests): nothing will be launched
    reason = unavailable_reason(x.device)
    if reason is not None:
        raise RuntimeError(reason)


_INDEX_DTYPES = {
    "slot_start": torch.int32,
    "slot_rank": torch.int32,
    "slot_scale": torch.float32,
    "row_ptr": torch.int32,
    "entry_ptr": torch.int32,
    "entry_slot": torch.int32,
    "entry_weight": torch.float32,
    "t": torch.float32,
}


def _check_meta(meta: LaunchMeta) -> None:
    for name in ("max_rows", "max_entries", "max_rank"):
        value = getattr(meta, name)
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"meta.{name} must be a non-negative int, got {value!r}")


def tf32_enabled() -> bool:
    """torch's switch for TF32 in fp32 matmuls on CUDA (what the pair's cuBLAS GEMM obeys)."""
    return bool(torch.backends.cuda.matmul.allow_tf32)


def _numerics(dtype: str, interpret: bool) -> dict:
    """Compile-time numerics switches shared by the three kernels."""
    return {
        # fp32 inputs: exact fp32 FMA unless torch allows TF32 for fp32 matmuls, so the
        # shrink/expand round like the cuBLAS base GEMM next to them; ignored for fp16/bf16.
        "INPUT_PRECISION": "tf32" if dtype != "float32" or tf32_enabled() else "ieee",
        "UPCAST": interpret and dtype == "bfloat16",
    }


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _t_buffer(m: int, width: int, device: torch.device) -> Tensor:
    """fp32 ``[m, width]`` whose row stride is ``width`` rounded up to 16 (a view of a padded
    buffer): the ``t`` row stride then always has the 16-divisibility class the pair kernels
    are compiled and checked for, whatever the capacities (e.g. ``1 x 37``)."""
    padded = _cdiv(width, 16) * 16
    return torch.empty((m, padded), dtype=torch.float32, device=device)[:, :width]


def _canonical_t(t: Tensor, copies: list[tuple[Tensor, Tensor]]) -> Tensor:
    if t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0:
        return t
    out = _t_buffer(t.shape[0], t.shape[1], t.device)
    copies.append((out, t))
    return out


def _is_canonical(t: Tensor) -> bool:
    """Contiguous and starting 16-byte aligned: the only layout the kernels are compiled for."""
    return t.is_contiguous() and t.data_ptr() % 16 == 0


def canonical(t: Tensor, copies: list[tuple[Tensor, Tensor]]) -> Tensor:
    """``t`` itself when :func:`_is_canonical`, else a contiguous, aligned buffer that the
    launch fills from ``t`` as its first steps (``copies`` collects ``(buffer, t)``; see
    :func:`_prepend_copies`), so re-running the launch after ``t`` changed in place -- a CUDA
    graph replay -- copies the new contents.

    Triton compiles a variant per divisibility class of every stride and alignment class of
    every pointer; a padded row stride or a misaligned start would each add one, and the
    variants without 16-element divisibility are the ones that spilled registers (issue 9,
    item 8: 48-3776 B/thread in 49 of 60 fused configs at K=N=328). Copying the rare
    non-canonical input keeps the compiled set to what ``tests/test_triton_aot.py`` checks.
    Every ``LoRABank`` tensor and every ``x`` a diffusers layer passes is already canonical.
    """
    if _is_canonical(t):
        return t
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    copies.append((out, t))
    return out


def _prepend_copies(launch: Launch, copies: list[tuple[Tensor, Tensor]]) -> Launch:
    launch.steps[:0] = [functools.partial(buf.copy_, src) for buf, src in copies]
    launch.records[:0] = [{"kernel": "copy_"} for _ in copies]
    return launch


def _row_tiles(m: int, s: int, block_m: int) -> int:
    """Row-tile capacity: sum_s cdiv(rows_s, BM) <= cdiv(M, BM) + S - 1 for any split of M."""
    return _cdiv(m, block_m) + s


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_properties(_index(device))[1]
    return dispatch.H100.sm_count


def _arch(device: torch.device) -> int:
    """The config table to use: 90 from Hopper on, 80 before (the interpreter uses 90)."""
    if device.type == "cuda":
        major = _cuda_properties(_index(device))[0]
        return 90 if major >= 9 else 80
    return 90


def _machine(device: torch.device) -> dispatch.Machine:
    """Roofline constants of ``device`` (A100/H100/H200 by name; H100 for the interpreter)."""
    if device.type == "cuda":
        return dispatch.machine_for(_cuda_properties(_index(device))[2])
    return dispatch.H100


@functools.cache
def _cuda_properties(index: int) -> tuple[int, int, str]:
    """``(major capability, SM count, name)``: host-side driver queries, no stream sync."""
    props = torch.cuda.get_device_properties(index)
    return props.major, props.multi_processor_count, props.name


def _add_kernel(launch: Launch, kernel, grid: int, args: tuple, consts: dict, opts: dict) -> None:
    if grid == 0:
        return
    launch.steps.append(functools.partial(kernel[(grid,)], *args, **consts, **opts))
    launch.records.append(
        {"kernel": kernel.__name__, "fn": kernel, "grid": grid, "args": args, **consts, **opts}
    )


def _capacities(lora: LoRAArgs, rows: Tensor) -> tuple[int, int, int, int]:
    """``(max_entries, max_rank, slots, bank rows)``: the bounds every kernel takes after its
    sizes (``rows`` is the bank tensor the kernel reads)."""
    return lora.meta.max_entries, lora.meta.max_rank, lora.bank.slot_rank.numel(), rows.shape[0]


def _tensors(lora: LoRAArgs, *, for_kernel: str = "linear") -> dict[str, Tensor]:
    """The bank and batch tensors a launch reads, by name, in the kernels' argument order
    (what :func:`_check` checks): all of them, or the shrink's or the expand's subset."""
    named = {**lora.bank._asdict(), **lora.batch._asdict()}
    if for_kernel == "shrink":
        drop = ("lora_bt", "slot_scale", "entry_weight")
    elif for_kernel == "expand":
        drop = ("lora_a",)
    else:
        drop = ()
    return {name: tensor for name, tensor in named.items() if name not in drop}


def _canonical_lora(lora: LoRAArgs, copies: list[tuple[Tensor, Tensor]], *names: str) -> LoRAArgs:
    """``lora`` with the named bank tensors made :func:`canonical`."""
    bank = lora.bank._replace(
        **{name: canonical(getattr(lora.bank, name), copies) for name in names}
    )
    return lora._replace(bank=bank)


def _check_fused_capacity(config: dispatch.FusedConfig, meta: LaunchMeta) -> None:
    r_cap = meta.max_entries * meta.max_rank
    if r_cap > config.block_r and not config.multi_block:
        raise ValueError(
            f"config: block_r={config.block_r} without multi_block cannot hold the summed rank "
            f"capacity {r_cap} (meta.max_entries * meta.max_rank)"
        )


def _consts(config, dtype: str, **flags: bool) -> dict:
    """A kernel's compile-time constants: the ``block_*`` sizes ``config`` has (``BLOCK_M``,
    ``BLOCK_N``, ``BLOCK_K``, ``BLOCK_R``), ``BLOCK_S``, ``flags`` and the numerics switches."""
    blocks = {
        f"BLOCK_{axis.upper()}": getattr(config, f"block_{axis}")
        for axis in "mnkr"
        if hasattr(config, f"block_{axis}")
    }
    return {**blocks, "BLOCK_S": _BLOCK_S, **flags, **_numerics(dtype, interpreting())}


def _opts(config) -> dict:
    return {"num_warps": config.num_warps, "num_stages": config.num_stages}


def plan_fused(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora: LoRAArgs,
    config: dispatch.FusedConfig,
    out: Tensor | None = None,
) -> Launch:
    """One launch of the fused kernel writing ``out`` (allocated ``[M, N]`` when ``None``)."""
    from .fused import _fused_multi_lora_kernel

    bank, batch, meta = lora
    dtype = _dtype_name(x)
    m, k = x.shape
    n = weight.shape[0]
    s = batch.row_ptr.numel() - 1
    y = torch.empty((m, n), dtype=x.dtype, device=x.device) if out is None else out
    launch = Launch(y)
    if m == 0 or n == 0:
        return launch
    _check_fused_capacity(config, meta)
    grid = _row_tiles(m, s, config.block_m) * _cdiv(n, config.block_n)
    # The kernel's runtime arguments: tensors, sizes and bounds, strides.
    args = (
        *(x, weight, bias, *bank, *batch, y),
        *(n, k, s, *_capacities(lora, bank.lora_a)),
        *(*x.stride(), *weight.stride(), *bank.lora_a.stride(), *bank.lora_bt.stride()),
        *y.stride(),
    )
    consts = _consts(config, dtype, MULTI_BLOCK=config.multi_block, SPLIT_T=dtype != "float32")
    _add_kernel(launch, _fused_multi_lora_kernel, grid, args, consts, _opts(config))
    return launch


def plan_shrink(x: Tensor, lora: LoRAArgs, config: dispatch.ShrinkConfig, split_k: int) -> Launch:
    """The shrink into a new fp32 ``t [M, max_entries * max_rank]`` (zeroed, then added to)."""
    from .sgmv import _lora_shrink_kernel

    if not isinstance(split_k, int) or split_k < 1:
        raise ValueError(f"split_k must be a positive int, got {split_k!r}")
    bank, batch, meta = lora
    dtype = _dtype_name(x)
    m, k = x.shape
    s = batch.row_ptr.numel() - 1
    width = meta.max_entries * meta.max_rank
    t = _t_buffer(m, width, x.device)
    launch = Launch(t)
    if m == 0 or width == 0:
        return launch
    launch.steps.append(t.zero_)
    launch.records.append({"kernel": "zero_"})
    n_rank_blocks = _cdiv(width, config.block_r)
    # Each split covers a whole number of K blocks so only the last one needs a K mask.
    k_blocks_per_split = max(1, _cdiv(_cdiv(k, config.block_k), split_k))
    grid = _row_tiles(m, s, config.block_m) * n_rank_blocks * split_k
    args = (
        *(x, bank.lora_a, bank.slot_start, bank.slot_rank, *batch[:3], t),
        *(k, s, *_capacities(lora, bank.lora_a), n_rank_blocks, split_k, k_blocks_per_split),
        *(*x.stride(), *bank.lora_a.stride(), *t.stride()),
    )
    consts = _consts(config, dtype)
    _add_kernel(launch, _lora_shrink_kernel, grid, args, consts, _opts(config))
    return launch


def plan_expand(y: Tensor, t: Tensor, lora: LoRAArgs, config: dispatch.ExpandConfig) -> Launch:
    """``y += LoRA(t)`` in place (``out`` is ``y``)."""
    from .sgmv import _lora_expand_kernel

    bank, batch, meta = lora
    dtype = _dtype_name(y, "y")
    m, n = y.shape
    s = batch.row_ptr.numel() - 1
    launch = Launch(y)
    width = meta.max_entries * meta.max_rank
    if t.shape != (m, width):
        raise ValueError(f"t: expected shape {(m, width)} from y and meta, got {tuple(t.shape)}")
    if m == 0 or n == 0 or width == 0:
        return launch
    grid = _row_tiles(m, s, config.block_m) * _cdiv(n, config.block_n)
    args = (
        *(y, t, *bank[1:], *batch),
        *(n, s, *_capacities(lora, bank.lora_bt)),
        *(*y.stride(), *t.stride(), *bank.lora_bt.stride()),
    )
    consts = _consts(config, dtype, SPLIT_T=dtype != "float32")
    _add_kernel(launch, _lora_expand_kernel, grid, args, consts, _opts(config))
    return launch


def choose_plan(
    x: Tensor, weight: Tensor, meta: LaunchMeta, *, arch: int | None = None
) -> dispatch.Plan:
    """:func:`dispatch.choose` for these tensors on their device (``arch`` overrides the GPU
    generation, for tests and the AOT sweep). Cached per (shapes, capacities, dtype, GPU):
    no cost model is evaluated per call."""
    m, k = x.shape
    n = weight.shape[0]
    return dispatch.choose(
        m,
        n,
        k,
        meta.max_rows,
        meta.max_entries,
        meta.max_rank,
        _dtype_name(x),
        arch=_arch(x.device) if arch is None else arch,
        sm_count=_sm_count(x.device),
        machine=_machine(x.device),
        aligned=k % 16 == 0 and n % 16 == 0 and _is_canonical(weight),
    )


def plan_multi_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora: LoRAArgs,
    plan: dispatch.Plan | None = None,
) -> Launch:
    """Everything one ``multi_lora_linear`` call launches, fused or pair per ``plan``.

    ``plan`` defaults to :func:`dispatch.choose` on the shapes and ``lora.meta``; tests pass
    one to force a path or a tile shape.
    """
    _check_meta(lora.meta)
    _check(x, {"weight": weight, "bias": bias, **_tensors(lora)}, _INDEX_DTYPES)
    _dtype_name(x)  # TypeError naming x for other dtypes
    copies: list[tuple[Tensor, Tensor]] = []
    x = canonical(x, copies)
    lora = _canonical_lora(lora, copies, "lora_a", "lora_bt")
    bias = None if bias is None else canonical(bias, copies)
    m, k = x.shape
    n = weight.shape[0]
    if plan is None:
        plan = choose_plan(x, weight, lora.meta)
    if plan.path == "fused":
        return _prepend_copies(plan_fused(x, weight, bias, lora, plan.fused), copies)
    if plan.path != "pair":
        raise ValueError(f"plan.path must be 'fused' or 'pair', got {plan.path!r}")
    # Pair: the base GEMM by torch (cuBLAS on CUDA), then the LoRA term added in place.
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    launch = Launch(y)
    if bias is None:
        launch.steps.append(functools.partial(torch.mm, x, weight.T, out=y))
    else:
        launch.steps.append(functools.partial(torch.addmm, bias, x, weight.T, out=y))
    launch.records.append({"kernel": "base_gemm"})
    shrink = plan_shrink(x, lora, plan.shrink, plan.split_k)
    expand = plan_expand(y, shrink.out, lora, plan.expand)
    for part in (shrink, expand):
        launch.steps += part.steps
        launch.records += part.records
    return _prepend_copies(launch, copies)


def plan_lora_shrink(
    x: Tensor,
    lora: LoRAArgs,
    config: dispatch.ShrinkConfig | None = None,
    split_k: int | None = None,
) -> Launch:
    """Checked :func:`plan_shrink` with the dispatch table's config unless one is given
    (reads ``lora_a``, ``slot_start``, ``slot_rank`` and the first three batch tensors)."""
    _check_meta(lora.meta)
    _check(x, _tensors(lora, for_kernel="shrink"), _INDEX_DTYPES)
    copies: list[tuple[Tensor, Tensor]] = []
    x = canonical(x, copies)
    lora = _canonical_lora(lora, copies, "lora_a")
    m, k = x.shape
    r_cap = lora.meta.max_entries * lora.meta.max_rank
    if split_k is None:
        split_k = dispatch.split_k_for(m, k, lora.meta.max_rows, r_cap, _sm_count(x.device))
    if config is None:
        config = dispatch.shrink_config(r_cap, _dtype_name(x), arch=_arch(x.device))
    return _prepend_copies(plan_shrink(x, lora, config, split_k), copies)


def plan_lora_expand(
    y: Tensor, t: Tensor, lora: LoRAArgs, config: dispatch.ExpandConfig | None = None
) -> Launch:
    """Checked :func:`plan_expand` with the dispatch table's config unless one is given
    (reads every bank and batch tensor but ``lora_a``)."""
    _check_meta(lora.meta)
    if not _is_canonical(y):
        raise ValueError(
            "y: the triton expand adds in place into contiguous rows starting 16-byte aligned; "
            f"got strides {tuple(y.stride())}"
        )
    _check(y, {"t": t, **_tensors(lora, for_kernel="expand")}, _INDEX_DTYPES)
    copies: list[tuple[Tensor, Tensor]] = []
    lora = _canonical_lora(lora, copies, "lora_bt")
    t = _canonical_t(t, copies)
    if config is None:
        config = dispatch.expand_config(y.shape[1], _dtype_name(y, "y"), arch=_arch(y.device))
    return _prepend_copies(plan_expand(y, t, lora, config), copies)


def plan_fused_segmented(
    x: Tensor,
    weight: Tensor,
    merged: Tensor,
    seg_weight: Tensor,
    seg_lora: Tensor,
    bias: Tensor | None,
    lora: LoRAArgs,
    config: dispatch.FusedConfig | None = None,
) -> Launch:
    """One launch of :mod:`.segmented`: per sample the base or a merged weight, with or
    without its LoRA terms (``merged [G, N, K]``, ``seg_weight``/``seg_lora`` ``int32 [S]``).

    fp16/bf16 only (fp32 has no fused path), K and N multiples of 16 and a canonical
    ``weight``/``merged`` (the class the kernel is compiled and checked for); otherwise
    ValueError naming the argument. ``config`` defaults to the dispatch table's fused tile.
    """
    from .segmented import _fused_segmented_kernel

    meta = lora.meta
    _check_meta(meta)
    segments = {"merged": merged, "seg_weight": seg_weight, "seg_lora": seg_lora}
    _check(
        x,
        {"weight": weight, **segments, "bias": bias, **_tensors(lora)},
        {**_INDEX_DTYPES, "seg_weight": torch.int32, "seg_lora": torch.int32},
    )
    dtype = _dtype_name(x)
    if dtype == "float32":
        raise TypeError(
            "x: the segmented fused kernel runs float16/bfloat16 (fp32 has no fused path)"
        )
    m, k = x.shape
    n = weight.shape[0]
    s = lora.batch.row_ptr.numel() - 1
    if k % 16 or n % 16:
        raise ValueError(f"weight: K={k} and N={n} must be multiples of 16 for the fused kernel")
    if merged.dim() != 3 or tuple(merged.shape[1:]) != (n, k):
        raise ValueError(f"merged: expected [G, {n}, {k}], got {tuple(merged.shape)}")
    if not (_is_canonical(weight) and _is_canonical(merged)):
        raise ValueError("weight, merged: must be contiguous and start 16-byte aligned")
    for name, seg in (("seg_weight", seg_weight), ("seg_lora", seg_lora)):
        if seg.shape != (s,) or not seg.is_contiguous():
            raise ValueError(
                f"{name}: expected a contiguous [S={s}] tensor, got {tuple(seg.shape)}"
            )
    copies: list[tuple[Tensor, Tensor]] = []
    x = canonical(x, copies)
    lora = _canonical_lora(lora, copies, "lora_a", "lora_bt")
    bias = None if bias is None else canonical(bias, copies)
    bank, batch = lora.bank, lora.batch
    if config is None:
        rows = max(1, min(meta.max_rows, m)) if m else 1
        arch = _arch(x.device)
        config = dispatch.fused_config(rows, n, meta.max_entries * meta.max_rank, dtype, arch=arch)
        config = dispatch.segmented_config(config, arch)
    _check_fused_capacity(config, meta)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    launch = Launch(y)
    if m == 0 or n == 0:
        return launch
    grid = _row_tiles(m, s, config.block_m) * _cdiv(n, config.block_n)
    args = (
        *(x, weight, merged, seg_weight, seg_lora, bias, *bank, *batch, y),
        *(n, k, s, merged.shape[0], *_capacities(lora, bank.lora_a)),
        *(*x.stride(), *weight.stride(), n * k, *bank.lora_a.stride(), *bank.lora_bt.stride()),
        *y.stride(),
    )
    consts = _consts(config, dtype, MULTI_BLOCK=config.multi_block, SPLIT_T=True)
    _add_kernel(launch, _fused_segmented_kernel, grid, args, consts, _opts(config))
    return _prepend_copies(launch, copies)
