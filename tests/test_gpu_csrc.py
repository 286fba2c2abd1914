"""The csrc CUDA kernels built with nvcc for this GPU and run against the float64 reference
(``pytest -m gpu``; issue 9). Skips only when no CUDA device or no nvcc exists; a toolkit
that does not match torch's CUDA fails with the build's message (that is a defect to fix).

Also: the Triton and cuda backends agree on invalid entries (slot past the bank's slot
count, rank above the launch capacity): both skip the entry (issue 9, item 6).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from gpu_common import NO_CUDA

from lorakernels import ops, testing
from lorakernels.kernels import LaunchMeta

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("_lk_csrc_build_gpu", ROOT / "csrc" / "build.py")
build = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = build
_spec.loader.exec_module(build)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA),
    pytest.mark.skipif(
        build.find_nvcc() is None and not build.nvcc_candidates(),
        reason="nvcc not found: the csrc kernels cannot be built here",
    ),
]


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """The library for this GPU's architecture, from the toolkit matching torch's CUDA."""
    from lorakernels import _native

    major, minor = torch.cuda.get_device_capability()
    out = tmp_path_factory.mktemp("csrc")
    result = build.build_library(f"{major}{minor}", out, cuda_version=torch.version.cuda)
    saved = os.environ.get(_native.ENV_LIB)
    os.environ[_native.ENV_LIB] = str(result.library)
    _native._load.cache_clear()
    from lorakernels.kernels import cuda

    cuda._device_reason.cache_clear()
    try:
        yield result
    finally:
        if saved is None:
            os.environ.pop(_native.ENV_LIB, None)
        else:
            os.environ[_native.ENV_LIB] = saved


def test_library_is_available_and_reports_its_toolkit(library):
    from lorakernels import _native

    assert ops.unavailable_reason("cuda", torch.device("cuda")) is None
    present, why = _native.status()
    assert present and "built by nvcc" in why and "WARNING" not in why, why


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["float16", "bfloat16", "float32"]
)
@pytest.mark.parametrize("shape", [(256, 320, 320), (77, 768, 640), (33, 127, 33)])
def test_cuda_backend_matches_reference(library, dtype, shape):
    rows, k, n = shape
    problem = testing.random_problem(
        samples=5,
        rows=[rows, 0, rows, 7, rows],
        K=k,
        N=n,
        ranks=[r for r in (1, 8, 16, 37, 128) if r <= min(k, n)],
        popularity="zipf",
        mixture_size=3,
        frac_empty=0.2,
        dtype=dtype,
        seed=k + n,
        device="cuda",
    )
    y = ops.multi_lora_linear(
        problem.x, problem.weight, problem.bias, problem.bank, problem.batch, backend="cuda"
    )
    oracle = testing.peft_style_oracle(problem)
    tol = testing.tolerance(problem, oracle, factor=2.0)
    assert bool(torch.isfinite(y).all())
    assert (y.double().cpu() - oracle).abs().max().item() <= tol


@pytest.mark.parametrize("broken", ["slot_past_L", "rank_over_cap"])
def test_triton_and_cuda_skip_invalid_entries_alike(library, broken):
    from lorakernels.kernels import cuda as cuda_backend
    from lorakernels.kernels import triton as triton_backend

    problem = testing.random_problem(
        samples=3,
        rows=40,
        K=64,
        N=48,
        ranks=[4, 16, 8],
        dtype=torch.float16,
        seed=11,
        device="cuda",
    )
    bank, batch = problem.bank, problem.batch
    entry_slot = batch.entry_slot.clone()
    meta = LaunchMeta(40, batch.max_entries, bank.max_rank)
    if broken == "slot_past_L":
        entry_slot[0] = bank.slot_rank.numel()
    else:
        meta = LaunchMeta(40, batch.max_entries, 8)  # the rank-16 adapter is over capacity
    row_ptr, _ = batch.rows_for(problem.x.shape[0])
    args = (
        problem.x,
        problem.weight,
        problem.bias,
        bank.lora_a,
        bank.lora_bt,
        bank.slot_start,
        bank.slot_rank,
        bank.slot_scale,
        row_ptr,
        batch.entry_ptr,
        entry_slot,
        batch.entry_weight,
        meta,
    )
    y_triton = triton_backend.multi_lora_linear(*args)
    y_cuda = cuda_backend.multi_lora_linear(*args)
    torch.cuda.synchronize()
    tol = 4 * torch.finfo(torch.float16).eps * y_cuda.abs().max().item()
    assert (y_triton.double() - y_cuda.double()).abs().max().item() <= tol
