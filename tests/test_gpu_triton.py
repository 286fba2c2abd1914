"""Triton kernels on a GPU against the float64 reference (``pytest -m gpu``; issue 9).

* every configuration the dispatcher can pick on this GPU (its generation's table): fused,
  shrink and expand, in its dtype, forced, on a batch built for it (mixed ranks up to the
  config's rank block, mixtures of up to 3, negative and zero strengths, samples without rows
  or adapters, image-like and 77-token samples), output poisoned with NaN first;
* the dispatcher's own choice through ``lorakernels.ops`` at SD1.5 / SDXL / odd shapes, fp16,
  bf16 and fp32, mixed ranks 1-128, non-contiguous and misaligned ``x``;
* fp32 with TF32 on (tolerance from torch's own TF32 GEMM) and off;
* a launch while another GPU is current (needs two GPUs).

Tolerances: ``tests/test_triton_interpret.py`` (2x what plain torch achieves in the dtype,
LoRA term required to be visible above it).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from gpu_common import DEVICE, ON_GPU, gpu_marks, to_device
from test_triton_interpret import Case, assert_close, bundled, make_case

from lorakernels import ops, testing
from lorakernels.kernels.triton import dispatch, launch

pytestmark = gpu_marks()


def _arch() -> int:
    if ON_GPU and torch.cuda.is_available():
        return launch._arch(DEVICE)
    return 90


def _configs(kind: str) -> list:
    return [(dt, cfg) for arch, dt, cfg in dispatch.all_configs()[kind] if arch == _arch()]


def _id(item) -> str:
    dt, cfg = item
    return f"{dt}-" + "-".join(f"{k}{int(v)}" for k, v in vars(cfg).items())


_DT = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _case_for(dtype: torch.dtype, block_r: int, multi: bool, k: int, n: int, seed: int) -> Case:
    """A batch whose summed-rank capacity fits one rank block (or needs several: ``multi``)."""
    if multi:
        ranks, max_entries = [1, 37, 128, 16, 5], 3
        mixtures = [[(2, 1.0), (1, -0.6), (4, 0.3)], [], [(3, 0.0)], [(0, 2.0), (2, -1.0)]]
    elif block_r <= 16:
        ranks, max_entries = [1, 5, 16, 3], 1
        mixtures = [[(2, 1.0)], [(1, -0.8)], [], [(0, 1.5)]]
    else:
        half = block_r // 2
        ranks, max_entries = [half, 3, half - 1, 1], 2
        mixtures = [[(0, 1.0), (2, -0.5)], [(1, 0.7)], [(3, 0.0), (0, 1.0)], []]
    rows = [150, 0, 77, 5] if ON_GPU else [40, 0, 21, 5]
    return make_case(
        dtype,
        rows,
        k,
        n,
        ranks,
        mixtures,
        seed=seed,
        max_entries=max_entries,
        max_rank=max(ranks),
    )


@contextlib.contextmanager
def _tf32(on: bool):
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _run(case: Case, plan: dispatch.Plan) -> torch.Tensor:
    job = launch.plan_multi_lora_linear(*bundled(to_device(case.args), case.meta), plan=plan)
    job.out.fill_(float("nan"))
    out = job()
    if ON_GPU:
        torch.cuda.synchronize()
    return out.cpu()


@pytest.mark.parametrize("item", _configs("fused"), ids=_id)
def test_fused_config_matches_reference(item):
    dt, cfg = item
    k, n = (320, 2 * cfg.block_n + 64) if ON_GPU else (64, cfg.block_n + 16)
    case = _case_for(_DT[dt], cfg.block_r, cfg.multi_block, k, n, seed=cfg.block_r)
    with _tf32(False):
        out = _run(case, dispatch.Plan("fused", cfg, None, 1, None))
    assert_close(out, case)


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("item", _configs("shrink"), ids=_id)
def test_shrink_config_matches_reference(item, split_k):
    dt, cfg = item
    k, n = (1024, 320) if ON_GPU else (96, 48)
    case = _case_for(_DT[dt], cfg.block_r, cfg.block_r >= 64, k, n, seed=split_k)
    plan = dispatch.Plan("pair", None, cfg, split_k, dispatch.expand_config(n, dt, arch=_arch()))
    with _tf32(False):
        out = _run(case, plan)
    assert_close(out, case)


@pytest.mark.parametrize("item", _configs("expand"), ids=_id)
def test_expand_config_matches_reference(item):
    dt, cfg = item
    k, n = (320, 3 * cfg.block_n + 17) if ON_GPU else (48, cfg.block_n + 9)
    case = _case_for(_DT[dt], 64, True, k, n, seed=7)
    r_cap = case.meta.max_entries * case.meta.max_rank
    plan = dispatch.Plan("pair", None, dispatch.shrink_config(r_cap, dt, arch=_arch()), 1, cfg)
    with _tf32(False):
        out = _run(case, plan)
    assert_close(out, case)


SHAPES = {
    # name: (rows per sample, K, N)
    "sd15_to_q_64": (256, 320, 320),
    "sd15_text_to_k": (77, 768, 640),
    "sdxl_text_to_v": (77, 2048, 1280),
    "sd15_ff": (64, 1280, 5120),
    "odd": (33, 127, 33),
}
SMALL = {
    "sd15_to_q_64": (40, 64, 64),
    "sd15_text_to_k": (77, 96, 48),
    "sdxl_text_to_v": (7, 128, 80),
    "sd15_ff": (9, 64, 128),
    "odd": (13, 33, 127),
}


def _problem(shape: str, dtype: torch.dtype, seed: int):
    rows, k, n = (SHAPES if ON_GPU else SMALL)[shape]
    return testing.random_problem(
        samples=6,
        rows=[rows, 0, rows // 2 + 1, rows, 3, rows],
        K=k,
        N=n,
        ranks=[r for r in (1, 8, 16, 37, 128) if r <= min(k, n)],
        popularity="zipf",
        mixture_size=3,
        frac_empty=0.2,
        dtype=dtype,
        seed=seed,
        device=DEVICE,
    )


def _check_ops(problem, x=None) -> None:
    x = problem.x if x is None else x
    y = ops.multi_lora_linear(
        x, problem.weight, problem.bias, problem.bank, problem.batch, backend="triton"
    )
    oracle = testing.peft_style_oracle(problem)
    assert y.dtype == problem.x.dtype and bool(torch.isfinite(y).all())
    tol = testing.tolerance(problem, oracle, factor=2.0)
    err = (y.double().cpu() - oracle).abs().max().item()
    assert err <= tol, f"max error {err:.3g} > tolerance {tol:.3g}"
    base = problem.x.double().cpu() @ problem.weight.double().cpu().T
    if problem.bias is not None:
        base = base + problem.bias.double().cpu()
    assert (oracle - base).abs().max().item() > 2 * tol  # the LoRA term is visible


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["float16", "bfloat16", "float32"]
)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_dispatcher_choice_through_ops(shape, dtype):
    with _tf32(False):
        _check_ops(_problem(shape, dtype, seed=list(SHAPES).index(shape)))


@pytest.mark.parametrize("layout", ["padded", "misaligned"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_non_contiguous_and_misaligned_x(layout, dtype):
    problem = _problem("sd15_to_q_64", dtype, seed=3)
    m, k = problem.x.shape
    if layout == "padded":
        wide = torch.full((m, k + 8), float("nan"), dtype=dtype, device=DEVICE)
        wide[:, :k] = problem.x
        x = wide[:, :k]
    else:
        flat = torch.full((m * k + 1,), float("nan"), dtype=dtype, device=DEVICE)
        x = flat[1:].view(m, k)
        x.copy_(problem.x)
    assert not (x.is_contiguous() and x.data_ptr() % 16 == 0)
    with _tf32(False):
        _check_ops(problem, x)


def test_fp32_follows_tf32_switch():
    """TF32 on: the pair's shrink/expand use TF32 like cuBLAS does for the base GEMM; the
    error stays within 2x of torch's own TF32 computation of the op."""
    problem = _problem("sd15_text_to_k", torch.float32, seed=5)
    oracle = testing.peft_style_oracle(problem)
    with _tf32(True):
        y = ops.multi_lora_linear(
            problem.x, problem.weight, problem.bias, problem.bank, problem.batch, backend="triton"
        )
        tol = testing.tolerance(problem, oracle, factor=2.0)  # plain torch with TF32 on
    err = (y.double().cpu() - oracle).abs().max().item()
    assert err <= tol, (err, tol)


@pytest.mark.skipif(
    not (ON_GPU and torch.cuda.is_available() and torch.cuda.device_count() >= 2),
    reason="needs two CUDA devices (Triton launches on the current device otherwise)",
)
def test_launch_runs_on_the_tensors_device_not_the_current_one():
    problem = testing.random_problem(
        samples=3, rows=40, K=64, N=48, ranks=[4, 16], dtype=torch.float16, seed=9, device="cuda:1"
    )
    with torch.cuda.device(0):
        y = ops.multi_lora_linear(
            problem.x, problem.weight, problem.bias, problem.bank, problem.batch, backend="triton"
        )
    torch.cuda.synchronize(1)
    oracle = testing.peft_style_oracle(problem)
    assert (y.double().cpu() - oracle).abs().max().item() <= testing.tolerance(problem, oracle)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_segmented_kernel_merged_and_unmerged_in_one_launch(dtype):
    """Issue 13, item 4 on the GPU: samples on the base weight with LoRA, on a merged weight
    without, and on the base weight without LoRA, in one launch."""
    k, n = (320, 640) if ON_GPU else (48, 64)
    ranks = [4, 16, 8]
    mixtures = [[(0, 1.0), (1, -0.5)], [(2, 1.5)], [], [(1, 0.75)]]
    rows = [150, 77, 5, 64] if ON_GPU else [18, 9, 5, 7]
    case = make_case(dtype, rows, k, n, ranks, mixtures, seed=61, max_entries=2)
    a = case.args
    w64 = a["weight"].double()
    lo, hi = a["slot_start"][2].item(), a["slot_start"][2].item() + ranks[2]
    coef = 1.5 * a["slot_scale"][2].item()
    delta = coef * a["lora_bt"][lo:hi].double().T @ a["lora_a"][lo:hi].double()
    merged = (w64 + delta).to(dtype)[None]
    seg_weight = torch.tensor([-1, 0, -1, -1], dtype=torch.int32)
    seg_lora = torch.tensor([1, 0, 0, 1], dtype=torch.int32)
    g = to_device(a)
    with _tf32(False):
        job = launch.plan_fused_segmented(
            g["x"],
            g["weight"],
            merged.to(DEVICE),
            seg_weight.to(DEVICE),
            seg_lora.to(DEVICE),
            g["bias"],
            bundled(g, case.meta)[3],
        )
        job.out.fill_(float("nan"))
        out = job().cpu()
    from test_triton_interpret import reference64

    ref = reference64(case)
    x64, b64 = a["x"].double(), a["bias"].double()
    ptr = a["row_ptr"].tolist()
    ref[ptr[1] : ptr[2]] = x64[ptr[1] : ptr[2]] @ merged[0].double().T + b64
    tol = 4 * torch.finfo(dtype).eps * ref.abs().max().item()
    assert bool(torch.isfinite(out).all())
    assert (out.double() - ref).abs().max().item() <= tol


def _merged_error(problem, oracle: torch.Tensor) -> float:
    """Plain torch merging in the dtype (``W_g`` in float32, rounded once, ``F.linear`` in the
    dtype, as ``fuse_lora`` does) against the oracle: what a merged group may carry."""
    dt = problem.x.dtype
    rows = problem.batch.rows_per_sample
    y, r0 = [], 0
    for r, mix in zip(rows, problem.mixtures, strict=True):
        w = problem.weight.float()
        for slot, strength in mix.items():
            a, b, scale = problem.adapters[slot]
            coef = float(torch.tensor(strength, dtype=torch.float32)) * scale
            w = w + coef * (b.float() @ a.float()).to(DEVICE)
        y.append(torch.nn.functional.linear(problem.x[r0 : r0 + r], w.to(dt), problem.bias))
        r0 += r
    return (torch.cat(y).double().cpu() - oracle).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_planner_merged_groups_through_ops(dtype):
    """Issue 13, item 4: ``plan="merged"`` through the triton backend runs the planner's
    merged groups (and rows without adapters) in one segmented launch, twice (weights built,
    then from the cache), against the float64 oracle with the tolerance of merging in the
    dtype; ``plan="auto"`` on CUDA stays unmerged (no GPU cost model: kernels/triton/planned)."""
    from lorakernels import plan as planner

    problem = _problem("sd15_to_q_64", dtype, seed=13)
    k, n = problem.weight.shape[1], problem.weight.shape[0]
    oracle = testing.peft_style_oracle(problem)
    tol = 2 * max(
        _merged_error(problem, oracle),
        testing.plain_torch_error(problem, oracle),
        torch.finfo(dtype).eps * oracle.abs().max().item(),
    )
    args = (problem.x, problem.weight, problem.bias, problem.bank, problem.batch)
    planner.CACHE.clear()
    planner.reset_summary()
    try:
        with _tf32(False):
            for _ in range(2):
                y = ops.multi_lora_linear(*args, backend="triton", plan="merged")
                assert y.dtype == dtype and bool(torch.isfinite(y).all())
                err = (y.double().cpu() - oracle).abs().max().item()
                assert err <= tol, f"max error {err:.3g} > tolerance {tol:.3g}"
            summary = planner.last_summary()[f"{k}x{n}"]
            assert summary["merged_groups"] > 0 and summary["unmerged_groups"] == 0
            assert summary["hits"] > 0
            if ON_GPU:
                planner.reset_summary()
                ops.multi_lora_linear(*args, backend="triton", plan="auto")
                assert planner.last_summary() == {}
    finally:
        planner.CACHE.clear()
    base = problem.x.double().cpu() @ problem.weight.double().cpu().T
    base = base + problem.bias.double().cpu()
    assert (oracle - base).abs().max().item() > 2 * tol  # the LoRA term is visible
