"""The planner's merged groups on the Triton backend: merged and unmerged groups in one launch.

Semantics: as every backend (:mod:`lorakernels.kernels`); which groups of samples run on a
merged weight is :mod:`lorakernels.plan`'s decision, taken through :mod:`..hostplan` exactly
as the cpu backend takes it (same groups, same cache, same ski-rental credit). The call then
runs :func:`.launch.plan_fused_segmented`, one launch of :mod:`.segmented`::

    merged = stack of W_g for the merged groups, in group order     # [G, N, K], x.dtype
    seg_weight[s] = index of s's group in merged, or -1             # int32 [S]
    seg_lora[s]   = 1 if s's group has adapters and is not merged   # int32 [S]

Where it runs (else :func:`plan_merged_groups` returns ``None`` and the caller runs the
fused kernel or the base GEMM + shrink/expand pair, unchanged):

* the plan in force (:func:`lorakernels.plan.resolve_plan`) is ``"merged"``, or ``"auto"``
  on CPU tensors under Triton's interpreter. ``"auto"`` on CUDA runs unmerged: the cost
  model's unmerged term (separate thin GEMMs, extra passes over ``x`` and ``y``) describes the
  cpu backend, not the fused kernel where the LoRA term rides in the base GEMM's launch, and
  the segmented kernel has not been timed on a GPU to fit a model to. Under the interpreter
  the CPU calibration prices the decision (it only has to be deterministic there);
* ``x`` is float16/bfloat16 (fp32 has no fused path), K and N are multiples of 16 and
  ``weight`` is contiguous and 16-byte aligned (the class the kernel is compiled for);
* not inside a backward pass (:func:`..hostplan.in_backward`: the op's input gradient is the
  op on a fresh ``W.T`` copy, which runs unmerged). A forward that autograd records may merge:
  the op's gradients come from its registered backward formula, never from how the forward
  computed its output, and inside the op the caller's grad mode is not visible (a
  ``requires_grad`` test would also refuse the usual inference under ``torch.no_grad()`` with
  parameters that require grad, as diffusers pipelines run);
* not while tracing (``torch.compiler.is_compiling()``) nor during CUDA-graph capture (the
  host plan reads the batch and may build weights). A compiled graph runs the op's kernel
  at run time, where the plan is taken as in eager mode: nothing recompiles when it changes.

Caching, so a steady batch pays no host work beyond a few dictionary lookups: the host plan
per batch and bank version (:func:`..hostplan.host`); the merged weights in
:data:`lorakernels.plan.CACHE`; the stacked ``merged`` tensor per layer, the last one only,
keyed by its groups' cache keys and reused while every weight in it is the cache's current
entry (it is dropped with them: ``plan._Layer.derived``); ``seg_weight``/``seg_lora`` per host
plan and merged flags, on ``x``'s device. The stack holds a second copy of the merged weights
of the layer's last call (one merged group: a view, no copy).

Numerics: merged weights are built in float32 and stored in ``x.dtype`` (rounded once, as
:mod:`lorakernels.plan` says for native half GEMMs): a merged row carries that rounding of
``W_g`` in addition to the kernel's fp32 accumulation and single output rounding. Unmerged
rows are the fused kernel's (fp32 rank intermediate, one rounding).

:func:`lorakernels.plan.last_summary` counts every call that reached the planner here (plan
not ``"unmerged"``, conditions above met), with precision ``"fp16"``/``"bf16"``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ... import plan as _planner
from .. import LoRAArgs, compute_dtype, hostplan
from . import launch

__all__ = ["plan_merged_groups", "planner_mode"]

_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}
_STACK = "triton-stack"


def planner_mode(x: Tensor, weight: Tensor) -> str:
    """The plan this call takes: ``"unmerged"`` wherever merged groups cannot or must not run
    (see the module docstring), else the plan in force."""
    if x.dtype not in _NAMES:
        return "unmerged"
    mode = _planner.resolve_plan()
    if mode == "unmerged":
        return mode
    if hostplan.in_backward():
        return "unmerged"
    if torch.compiler.is_compiling():
        return "unmerged"
    if x.device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return "unmerged"
        if mode == "auto":
            return "unmerged"  # no GPU cost model (module docstring)
    if x.shape[1] % 16 or weight.shape[0] % 16 or not launch._is_canonical(weight):
        return "unmerged"
    return mode


def plan_merged_groups(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora: LoRAArgs
) -> launch.Launch | None:
    """The segmented launch of this call when at least one group runs merged, else ``None``
    (the caller's usual fused or pair path). Records the plan summary when the planner ran."""
    mode = planner_mode(x, weight)
    if mode == "unmerged":
        return None
    lora_a, lora_bt = lora.bank.lora_a, lora.bank.lora_bt
    tensors = (*lora.batch, *lora.bank[2:])
    h = hostplan.host(tensors, compute_dtype(x.dtype), lora_a, lora_bt)
    k, n = x.shape[1], weight.shape[0]
    name = _NAMES[x.dtype]
    if not any(g.rank for g in h.groups):
        _planner.record(k, n, name, 0, 0, 0, 0)
        return None
    cal = _planner.calibration() if mode == "auto" else None
    # the CPU calibration (interpreter only) prices the half GEMM where it measured one
    cost_prec = name if cal is not None and name in cal.gemm_flops else "fp32"
    st = hostplan.layer_state(h, weight, lora_a, lora_bt, tensors)
    gp = hostplan.plan_groups(
        h,
        weight,
        lora_a,
        lora_bt,
        st,
        mode=mode,
        cal=cal,
        tag=name,
        cost_prec=cost_prec,
        half=False,  # the fused kernel reads x in its dtype: unmerged rows pay no upcast
        store=x.dtype,
    )
    _planner.record(k, n, name, gp.n_merged, gp.n_unmerged, gp.built, gp.hits)
    if not gp.n_merged:
        return None
    merged = _stacked(st, gp)
    seg_weight, seg_lora = _segments(h, gp.merged, x.device)
    return launch.plan_fused_segmented(x, weight, merged, seg_weight, seg_lora, bias, lora)


def _stacked(st, gp: hostplan.GroupPlan) -> Tensor:
    """``[G, N, K]``: the merged groups' weights in group order (cached per layer)."""
    idx = [gi for gi, mg in enumerate(gp.merged) if mg]
    keys = tuple(gp.keys[gi] for gi in idx)
    parts = tuple(gp.weights[gi] for gi in idx)
    cache = _planner.CACHE
    with cache.lock:
        hit = st.derived.get(_STACK)
        if (
            hit is not None
            and hit[0] == keys
            and all(a is b for a, b in zip(hit[1], parts, strict=True))
        ):
            return hit[2]
    stacked = parts[0].unsqueeze(0) if len(parts) == 1 else torch.stack(parts)
    with cache.lock:
        # kept only when every weight is a cache entry: removing any of them empties
        # st.derived, so the stack never outlives (or is staler than) its parts
        if all(cache.peek(kk) is p for kk, p in zip(keys, parts, strict=True)):
            st.derived[_STACK] = (keys, parts, stacked)
    return stacked


def _segments(h: hostplan.Host, merged: list[bool], device: torch.device) -> tuple[Tensor, Tensor]:
    """``(seg_weight, seg_lora)``, ``int32 [S]`` on ``device`` (cached on the host plan)."""
    flags = tuple(merged)
    dkey = ("triton-seg", flags, device)
    hit = h.derived.get(dkey)
    if hit is None:
        s_count = len(h.rows) - 1
        seg_weight, seg_lora = [-1] * s_count, [0] * s_count
        pos = 0
        for gi, (g, mg) in enumerate(zip(h.groups, flags, strict=True)):
            for s in h.group_samples[gi]:
                seg_weight[s] = pos if mg else -1
                seg_lora[s] = int(g.rank > 0 and not mg)
            pos += mg
        hit = (
            torch.tensor(seg_weight, dtype=torch.int32, device=device),
            torch.tensor(seg_lora, dtype=torch.int32, device=device),
        )
        h.derived[dkey] = hit
    return hit
