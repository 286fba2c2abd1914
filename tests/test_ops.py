"""Every CPU path of ``multi_lora_linear`` against the float64 oracle, over the STYLE.md grid."""

from __future__ import annotations

import itertools

import pytest
import torch

import lorakernels as lk
from lorakernels.testing import POPULARITIES, peft_style_oracle, random_problem, tolerance

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(320, 320), (768, 320), (33, 127), (127, 33), (640, 1280)]
RANKS = [[4], [16, 16, 16], [4, 16, 128], [1, 3, 7, 12, 5], [8] * 8]


def _check(problem, backend, *, x=None, factor=4.0):
    x = problem.x if x is None else x
    oracle = peft_style_oracle(problem, x)
    y = lk.multi_lora_linear(x, problem.weight, problem.bias, problem.bank, problem.batch, backend)
    assert y.dtype == x.dtype and y.shape == (x.shape[0], problem.weight.shape[0])
    assert torch.isfinite(y).all()
    err = (y.double() - oracle).abs().max().item()
    tol = tolerance(problem, oracle, factor)
    assert err <= tol, f"{backend}: max err {err:.3g} > tol {tol:.3g}"


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K,N", SHAPES)
def test_shapes_and_dtypes(backend, dtype, K, N):
    ranks = [r for r in (4, 16, 32) if r <= min(K, N)]
    p = random_problem(samples=6, rows=5, K=K, N=N, ranks=ranks, dtype=dtype, seed=K * N)
    _check(p, backend)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("ranks", RANKS, ids=lambda r: "r" + "-".join(map(str, r)))
@pytest.mark.parametrize("mixture_size", [1, 2, 3])
def test_popularity_ranks_mixtures(backend, popularity, ranks, mixture_size):
    seed = hash((popularity, tuple(ranks), mixture_size)) % 10_000
    p = random_problem(
        samples=9, rows=7, K=160, N=130, ranks=ranks, popularity=popularity,
        mixture_size=mixture_size, seed=seed,
    )  # fmt: skip
    _check(p, backend)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("frac_empty", [0.0, 0.5, 1.0])
def test_bias_and_empty_samples(backend, bias, frac_empty):
    p = random_problem(
        samples=8, rows=3, K=64, N=48, ranks=[4, 8], bias=bias, frac_empty=frac_empty, seed=7
    )
    _check(p, backend)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_packed_rows(backend):
    p = random_problem(samples=5, rows=[3, 0, 11, 1, 77], K=96, N=40, ranks=[4, 16, 2], seed=3)
    _check(p, backend)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_non_contiguous_and_3d_input(backend):
    p = random_problem(samples=4, rows=6, K=32, N=24, ranks=[4, 8], seed=11)
    wide = torch.randn(p.x.shape[0], 2 * 32)
    x = wide[:, ::2]  # stride 2 along K
    x.copy_(p.x)
    _check(p, backend, x=x)
    y3 = lk.multi_lora_linear(p.x.view(4, 6, 32), p.weight, p.bias, p.bank, p.batch, backend)
    y2 = lk.multi_lora_linear(p.x, p.weight, p.bias, p.bank, p.batch, backend)
    assert y3.shape == (4, 6, 24)
    torch.testing.assert_close(y3.reshape(24, 24), y2, rtol=0, atol=0)


def test_float64_reference_matches_oracle_tightly():
    """The reference in float64 and the per-adapter oracle are two loops of the same maths."""
    p = random_problem(
        samples=7, rows=9, K=50, N=70, ranks=[3, 9, 27], mixture_size=3, dtype=torch.float64,
        popularity="zipf", seed=5,
    )  # fmt: skip
    y = lk.multi_lora_linear(p.x, p.weight, p.bias, p.bank, p.batch, "reference")
    torch.testing.assert_close(y, peft_style_oracle(p), rtol=1e-12, atol=1e-12)


def test_reference_is_differentiable():
    p = random_problem(samples=3, rows=4, K=16, N=12, ranks=[4], dtype=torch.float64, seed=2)
    x = p.x.clone().requires_grad_(True)
    y = lk.multi_lora_linear(x, p.weight, p.bias, p.bank, p.batch, "reference")
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # the gradient of a linear map is W_eff^T 1 per sample: check against the oracle's autograd
    x2 = p.x.clone().requires_grad_(True)
    peft_style_oracle(p, x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_strength_zero_and_negative_cancel():
    """{a: 1, a-again-by-slot: -1} cancels to the base layer exactly; strength 0 is base."""
    p = random_problem(samples=2, rows=3, K=16, N=8, ranks=[4], seed=1, frac_empty=0.0)
    slot = next(iter(p.adapters))
    for mixes in ([{slot: 0.0}, {}], [{slot: 1.0, str(slot): 0}, {}]):
        try:
            batch = lk.LoRABatch.from_mixtures(mixes, {str(slot): slot})
        except KeyError:
            continue
        base = torch.addmm(p.bias, p.x, p.weight.T)
        y = lk.multi_lora_linear(p.x, p.weight, p.bias, p.bank, batch, "cpu")
        assert batch.is_empty or mixes[0].get(slot) == 1.0
        if batch.is_empty:
            torch.testing.assert_close(y, base)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_equals_reference_closely(dtype):
    """cpu and reference share numerics (fp32 compute, one rounding): equal up to fp32
    summation order, so at most one ulp of the output dtype apart (plus fp32 noise)."""
    for popularity, ms in itertools.product(["uniform", "distinct"], [1, 2]):
        p = random_problem(
            samples=6, rows=5, K=64, N=80, ranks=[4, 16], dtype=dtype, popularity=popularity,
            mixture_size=ms, seed=9,
        )  # fmt: skip
        a = lk.multi_lora_linear(p.x, p.weight, p.bias, p.bank, p.batch, "reference")
        b = lk.multi_lora_linear(p.x, p.weight, p.bias, p.bank, p.batch, "cpu")
        eps = torch.finfo(dtype).eps
        scale = float(a.double().abs().max())
        torch.testing.assert_close(a.double(), b.double(), rtol=eps, atol=8e-7 * scale)


def test_cpu_backend_gradients_match_reference():
    """The custom op's autograd (transposed problem for dx) agrees with the reference."""
    p = random_problem(samples=4, rows=3, K=24, N=20, ranks=[4, 6], dtype=torch.float64, seed=8)
    grads = []
    for backend in ("reference", "cpu"):
        x = p.x.clone().requires_grad_(True)
        w = p.weight.clone().requires_grad_(True)
        b = p.bias.clone().requires_grad_(True)
        y = lk.multi_lora_linear(x, w, b, p.bank, p.batch, backend)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        grads.append((x.grad, w.grad, b.grad))
    for g_ref, g_cpu in zip(*grads, strict=True):
        torch.testing.assert_close(g_cpu, g_ref, rtol=1e-10, atol=1e-10)
