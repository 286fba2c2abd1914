"""Triton backend: a fused one-pass kernel and a shrink/expand pair (the default on CUDA).

Semantics, argument table and the ``t`` layout of the pair: :mod:`lorakernels.kernels`.

* :func:`multi_lora_linear` -> ``[M, N]`` in ``x.dtype``. Picks the fused kernel or
  base GEMM + pair by :func:`.dispatch.choose` (shapes and ``meta`` only; the cost reasoning is
  in :mod:`.dispatch`). Fused rounds once; base + pair rounds the base output, then once more.
  Where the planner (:mod:`lorakernels.plan`) merges groups -- ``plan="merged"``, or
  ``"auto"`` under the interpreter; fp16/bf16, K and N multiples of 16, not in a backward
  pass, not while tracing or capturing -- the call is one launch of the segmented kernel instead,
  merged and unmerged groups together (:mod:`.planned`).
* :func:`lora_shrink` -> fp32 ``t [M, meta.max_entries * meta.max_rank]``.
* :func:`lora_expand` adds the LoRA term onto ``y`` in place.

Runs on CUDA tensors, and on CPU tensors under Triton's interpreter when ``TRITON_INTERPRET=1``
was set before the kernels were first imported (:func:`unavailable_reason` says which).
Importing this package needs neither triton nor a GPU; the kernel modules are imported on the
first call. Every launch is CUDA-graph safe: grids and scratch sizes come from shapes and the
``LaunchMeta`` capacities, never from device values.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import LoRAArgs

__all__ = ["lora_expand", "lora_shrink", "multi_lora_linear", "unavailable_reason"]


def unavailable_reason(device: torch.device) -> str | None:
    """``None`` when the kernels can run on ``device`` tensors, else the reason."""
    try:
        from .launch import unavailable_reason as reason
    except ImportError as exc:  # triton missing or broken: report, do not fail the import
        return f"the triton backend needs the triton package, which failed to import ({exc})"
    return reason(torch.device(device))


def multi_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora: LoRAArgs) -> Tensor:
    """``y [M, N] = x @ weight.T + bias + sum of each sample's LoRA terms``, in ``x.dtype``.

    Merged groups of the planner, where it merges any (:mod:`.planned`), run in one
    segmented launch; otherwise the fused kernel or the base GEMM + pair."""
    from .launch import plan_multi_lora_linear
    from .planned import plan_merged_groups

    job = plan_merged_groups(x, weight, bias, lora)
    if job is None:
        job = plan_multi_lora_linear(x, weight, bias, lora)
    return job()


def lora_shrink(x: Tensor, lora: LoRAArgs) -> Tensor:
    """fp32 ``t [M, meta.max_entries * meta.max_rank]``: entry ``j`` of a row's sample in
    columns ``j * max_rank : j * max_rank + rank`` (other columns are unspecified)."""
    from .launch import plan_lora_shrink

    return plan_lora_shrink(x, lora)()


def lora_expand(y: Tensor, t: Tensor, lora: LoRAArgs) -> None:
    """``y += entry_weight * slot_scale * t_entry @ lora_bt_rows`` per sample, in place."""
    from .launch import plan_lora_expand

    plan_lora_expand(y, t, lora)()
