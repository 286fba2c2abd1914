"""The cpu backend's GEMM choice (lorakernels/kernels/cpu_gemm.py): torch's or oneDNN's with a
prepacked weight. Both are checked against the float64 oracle on fresh random inputs, through
every path that runs a GEMM (merged groups, unmerged rows, rows without adapters, a mixed
split, native half precision); the packed weight never goes stale."""

from __future__ import annotations

import pytest
import torch
from test_plan import SPLITS, fake_calibration, split_decide

import lorakernels as lk
from lorakernels import plan
from lorakernels.kernels import cpu_gemm
from lorakernels.testing import peft_style_oracle, random_problem, rounding_tolerance, tolerance

needs_onednn = pytest.mark.skipif(
    not cpu_gemm.available(), reason="this torch build has no oneDNN prepacked linear"
)
IMPLS = ["torch", pytest.param("onednn", marks=needs_onednn)]


@pytest.fixture(autouse=True)
def fresh_planner(monkeypatch):
    monkeypatch.delenv("LORAKERNELS_PLAN", raising=False)
    monkeypatch.delenv("LORAKERNELS_CPU_GEMM", raising=False)
    plan.set_calibration(fake_calibration())
    plan.CACHE.clear()
    cpu_gemm.PACKED.clear()
    plan.reset_summary()
    yield
    plan.set_calibration(None)
    plan.CACHE.clear()
    cpu_gemm.PACKED.clear()


def run(p, mode=None):
    return lk.multi_lora_linear(p.x, p.weight, p.bias, p.bank, p.batch, "cpu", plan=mode)


def problem(dtype=torch.float32, seed=0, bias=True, frac_empty=0.25):
    return random_problem(
        samples=8,
        rows=[13, 5, 21, 8, 13, 1, 30, 9],
        K=72,
        N=40,
        ranks=[4, 8, 16],
        dtype=dtype,
        popularity="zipf",
        mixture_size=2,
        frac_empty=frac_empty,
        bias=bias,
        seed=seed,
    )


def gemms() -> set[str]:
    return {v["gemm"] for v in plan.last_summary().values()}


# ---------------------------------------------------------------------- the choice
def test_choice_by_measurement_and_environment(monkeypatch):
    assert cpu_gemm.choice({"fp32": 2.3}, "fp32") == "onednn"
    assert cpu_gemm.choice({"fp32": 1.05}, "fp32") == "torch"  # below MIN_SPEEDUP
    assert cpu_gemm.choice({}, "bf16") == "torch"  # not measured
    assert cpu_gemm.choice({"fp32": 9.0}, "fp64") == "torch"  # the oracle's dtype
    monkeypatch.setenv("LORAKERNELS_CPU_GEMM", "torch")
    assert cpu_gemm.choice({"fp32": 2.3}, "fp32") == "torch"
    monkeypatch.setenv("LORAKERNELS_CPU_GEMM", "blas")
    with pytest.raises(ValueError, match="LORAKERNELS_CPU_GEMM.*'blas'"):
        cpu_gemm.choice({}, "fp32")


def test_merged_weights_take_onednn_at_any_measured_gain():
    """A merged weight is packed when built (no extra copy), so it has the lower bar."""
    assert cpu_gemm.choice({"bf16": 1.1}, "bf16") == "torch"  # W: below MIN_SPEEDUP
    assert cpu_gemm.choice({"bf16": 1.1}, "bf16", merged=True) == "onednn"
    assert cpu_gemm.choice({"bf16": 0.97}, "bf16", merged=True) == "torch"  # slower
    assert cpu_gemm.choice({"bf16": 0.0}, "bf16", merged=True) == "torch"  # unavailable
    assert cpu_gemm.choice({}, "fp32", merged=True) == "torch"  # not measured
    assert cpu_gemm.MIN_SPEEDUP_MERGED <= cpu_gemm.MIN_SPEEDUP


def test_merged_runs_are_priced_at_the_merged_gemm_rate():
    cal = fake_calibration(onednn_speedup={"fp32": 1.1})
    # W runs torch's GEMM (1.1 < 1.25), merged weights oneDNN's: 1.1x the fitted rate
    assert plan.merged_flops(cal, "fp32") == pytest.approx(1.1 * cal.gemm_flops["fp32"])
    assert plan.merged_flops(fake_calibration(onednn_speedup={"fp32": 2.0}), "fp32") == 1e11


@needs_onednn
@pytest.mark.parametrize("frac_empty", [0.0, 0.25])
def test_merged_weights_on_onednn_while_w_stays_torch(frac_empty, monkeypatch):
    """Speed-up between the two bars: merged groups run packed merged weights, ``W`` (rows
    without adapters) is never packed; both checked against the float64 oracle."""
    monkeypatch.setattr(cpu_gemm, "PACKED", cpu_gemm.PackedWeights(budget_bytes=2**30))
    plan.set_calibration(fake_calibration(onednn_speedup={"fp32": 1.1}))
    p = problem(seed=41, frac_empty=frac_empty)
    oracle = peft_style_oracle(p)
    for _ in range(2):
        y = run(p, "merged")
        assert float((y.double() - oracle).abs().max()) <= tolerance(p, oracle)
    assert gemms() == {"onednn"}
    assert cpu_gemm.PACKED.packs == 0 and len(cpu_gemm.PACKED) == 0
    y = run(p, "unmerged")  # the unmerged rows' base GEMM is W's: torch
    assert float((y.double() - oracle).abs().max()) <= tolerance(p, oracle)
    assert gemms() == {"torch"} and cpu_gemm.PACKED.packs == 0


@needs_onednn
def test_explicit_choice_is_part_of_the_calibration_key(monkeypatch):
    auto = plan.calibration_key()
    monkeypatch.setenv("LORAKERNELS_CPU_GEMM", "onednn")
    assert cpu_gemm.choice({}, "fp32") == "onednn"
    assert plan.calibration_key() == f"{auto}|gemm onednn"


def test_explicit_onednn_without_onednn_raises(monkeypatch):
    monkeypatch.setattr(cpu_gemm, "available", lambda: False)
    monkeypatch.setenv("LORAKERNELS_CPU_GEMM", "onednn")
    with pytest.raises(RuntimeError, match="LORAKERNELS_CPU_GEMM=onednn"):
        cpu_gemm.choice({"fp32": 2.0}, "fp32")


@needs_onednn
def test_measured_speedup_is_positive():
    assert cpu_gemm.speedup(torch.float32, lambda fn, reps: plan._best_time(fn, reps=1)) > 0


# ---------------------------------------------------------------------- numerics
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["merged", "unmerged", "auto"])
@pytest.mark.parametrize("bias", [True, False])
def test_float32_paths_match_oracle(impl, mode, bias, monkeypatch):
    monkeypatch.setenv("LORAKERNELS_CPU_GEMM", impl)
    p = problem(seed=hash((impl, mode, bias)) % 1000, bias=bias)
    oracle = peft_style_oracle(p)
    tol = tolerance(p, oracle)
    for _ in range(3):  # builds, then cached (merged weights, the packed W)
        y = run(p, mode)
        assert float((y.double() - oracle).abs().max()) <= tol
    assert gemms() == {impl}
    base = p.x.double() @ p.weight.double().T + (0 if p.bias is None else p.bias.double())
    assert float((oracle - base).abs().max()) > 5 * tol  # the LoRA term is visible


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pattern", SPLITS)
def test_mixed_splits_match_oracle(impl, pattern, monkeypatch):
    """Merged runs (copied out of oneDNN's output) next to unmerged rows gathered and scattered."""
    monkeypatch.setenv("LORAKERNELS_CPU_GEMM", impl)
    monkeypatch.setattr(plan, "decide", split_decide(pattern))
    p = problem(seed=pattern)
    oracle = peft_style_oracle(p)
    y = run(p, "auto")
    assert float((y.double() - oracle).abs().max()) <= tolerance(p, oracle)


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_without_adapters_are_the_base_layer(impl, monkeypatch):
    monkeypatch.setenv("LORAKERNELS_CPU_GEMM", impl)
    p = problem(seed=5, frac_empty=1.0)
    oracle = peft_style_oracle(p)
    y = run(p)
    assert float((y.double() - oracle).abs().max()) <= tolerance(p, oracle)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["merged", "unmerged"])
def test_native_bfloat16_paths_match_oracle(impl, mode, monkeypatch):
    """Native bf16 GEMMs (as a CPU with avx512_bf16 measures them) through either GEMM: merged
    weights rounded once, unmerged rows with two roundings (tests/test_plan.py's bars)."""
    monkeypatch.setenv("LORAKERNELS_CPU_GEMM", impl)
    plan.set_calibration(fake_calibration(gemm_flops={"fp32": 1e11, "bf16": 1e14}))
    p = problem(torch.bfloat16, seed=17, frac_empty=0.0)
    oracle = peft_style_oracle(p)
    if mode == "merged":
        tol = tolerance(p, oracle)
    else:
        tol = rounding_tolerance(p, oracle)
    for _ in range(2):
        y = run(p, mode)
        assert y.dtype == torch.bfloat16
        assert float((y.double() - oracle).abs().max()) <= tol
    assert gemms() == {impl}
    assert {v["precision"] for v in plan.last_summary().values()} == {"bf16"}


# ---------------------------------------------------------------------- never stale
@needs_onednn
@pytest.mark.parametrize("mode", ["merged", "unmerged"])
def test_packed_weight_follows_in_place_edits(mode, monkeypatch):
    monkeypatch.setenv("LORAKERNELS_CPU_GEMM", "onednn")
    p = problem(seed=23)
    run(p, mode)
    run(p, mode)
    with torch.no_grad():
        p.weight.mul_(-0.5)  # same tensor, new version: the packed copy must go
    oracle = peft_style_oracle(p)
    y = run(p, mode)
    assert float((y.double() - oracle).abs().max()) <= tolerance(p, oracle)


@needs_onednn
@pytest.mark.parametrize("mode", ["merged", "unmerged"])
def test_a_packed_weight_that_does_not_fit_runs_torch_gemm(mode, monkeypatch):
    """Over the budget a layer's W is never packed per call: torch's GEMM runs for it."""
    monkeypatch.setenv("LORAKERNELS_CPU_GEMM", "onednn")
    p = problem(seed=29)
    small = cpu_gemm.PackedWeights(budget_bytes=p.weight.numel() * 4 - 1)  # W does not fit
    monkeypatch.setattr(cpu_gemm, "PACKED", small)
    oracle = peft_style_oracle(p)
    for _ in range(3):
        y = run(p, mode)
        assert float((y.double() - oracle).abs().max()) <= tolerance(p, oracle)
    assert small.bytes == 0 and len(small) == 0 and small.refused >= 3 and small.packs == 0


@needs_onednn
def test_packed_weight_is_built_once_and_dropped_with_its_layer(monkeypatch):
    monkeypatch.setenv("LORAKERNELS_CPU_GEMM", "onednn")
    store = cpu_gemm.PackedWeights(budget_bytes=2**30)
    monkeypatch.setattr(cpu_gemm, "PACKED", store)
    p = problem(seed=37)
    for _ in range(3):
        run(p, "unmerged")
    assert store.packs == 1 and store.bytes == p.weight.numel() * 4
    with torch.no_grad():
        p.weight.add_(1.0)
    run(p, "unmerged")
    assert store.packs == 2 and len(store) == 1  # rebuilt in place of the stale one
    del p
    import gc

    gc.collect()
    assert len(store) == 0 and store.bytes == 0


def test_packed_budget_from_environment(monkeypatch):
    monkeypatch.setenv("LORAKERNELS_PACKED_MB", "lots")
    with pytest.raises(ValueError, match="LORAKERNELS_PACKED_MB"):
        cpu_gemm._packed_budget()
    monkeypatch.setenv("LORAKERNELS_PACKED_MB", "1.5")
    assert cpu_gemm._packed_budget() == int(1.5 * 2**20)


@needs_onednn
def test_autograd_runs_torch_gemms(monkeypatch):
    """oneDNN's op has no autograd formula: with a gradient recorded the torch GEMMs run."""
    monkeypatch.setenv("LORAKERNELS_CPU_GEMM", "onednn")
    p = problem(seed=31)
    x = p.x.clone().requires_grad_(True)
    y = lk.multi_lora_linear(x, p.weight, p.bias, p.bank, p.batch, "cpu")
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert gemms() <= {"torch"}
