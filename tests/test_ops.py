"""Every CPU path of ``multi_lora_linear`` against the float64 oracle, over the STYLE.md grid."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

import lorakernels as lk
from lorakernels.testing import (
    POPULARITIES,
    lora_moves,
    peft_style_oracle,
    random_problem,
    rounding_tolerance,
    stable_seed,
    tolerance,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(320, 320), (768, 320), (33, 127), (127, 33), (640, 1280)]
RANKS = [[4], [16, 16, 16], [4, 16, 128], [1, 3, 7, 12, 5], [8] * 8]


HALF = (torch.float16, torch.bfloat16)


def _tolerance(problem, oracle):
    """fp16/bf16: 3x plain torch's error computing in fp32 and rounding once (~1 % of max |y|
    in bf16). fp32: 4x plain torch's error in fp32 (the LoRA term is 1e5x above it)."""
    if problem.x.dtype in HALF:
        return rounding_tolerance(problem, oracle)
    return tolerance(problem, oracle)


def assert_lora_visible(problem, oracle, tol, margin=2.0):
    """Every sample with a non-zero mixture moves its rows by more than ``margin`` x ``tol``:
    otherwise that sample's LoRA term could vanish and the comparison would still pass."""
    for s, moved in enumerate(lora_moves(problem, oracle)):
        if moved is not None:
            assert moved > margin * tol, (
                f"sample {s} ({problem.mixtures[s]}): its LoRA term moves the output by "
                f"{moved:.3g}, not above {margin} x tolerance {tol:.3g}: the test could not see "
                "it vanish"
            )


def _check(problem, backend, *, x=None):
    x = problem.x if x is None else x
    oracle = peft_style_oracle(problem, x)
    y = lk.multi_lora_linear(x, problem.weight, problem.bias, problem.bank, problem.batch, backend)
    assert y.dtype == x.dtype and y.shape == (x.shape[0], problem.weight.shape[0])
    assert torch.isfinite(y).all()
    tol = _tolerance(problem, oracle)
    err = (y.double() - oracle).abs().max().item()
    assert err <= tol, f"{backend}: max err {err:.3g} > tol {tol:.3g}"
    assert_lora_visible(problem, oracle, tol)


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
    seed = stable_seed(popularity, tuple(ranks), mixture_size)
    p = random_problem(
        samples=9,
        rows=7,
        K=160,
        N=130,
        ranks=ranks,
        popularity=popularity,
        mixture_size=mixture_size,
        seed=seed,
    )
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
        samples=7,
        rows=9,
        K=50,
        N=70,
        ranks=[3, 9, 27],
        mixture_size=3,
        dtype=torch.float64,
        popularity="zipf",
        seed=5,
    )
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


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_strength_zero_and_negative_cancel(backend):
    """Strength 0 is the base layer bit for bit; the same adapter held in two slots at +w and
    -w cancels to the base layer; and -w is the exact negation of +w's LoRA term."""
    p = random_problem(samples=4, rows=3, K=48, N=40, ranks=[8], seed=1, frac_empty=0.0)
    ((slot, (a, b, scale)),) = p.adapters.items()
    twin = slot + 5  # the same factors again, in another slot
    p.bank.add(twin, a.float(), b.float(), scale)
    adapters = {slot: (a, b, scale), twin: (a, b, scale)}
    mixes = [{slot: 0.0}, {slot: 0.8, twin: -0.8}, {slot: -1.0, twin: 1.0}, {slot: 1.3}]
    batch = lk.LoRABatch.from_mixtures(mixes)
    assert batch.mixtures[0] == () and len(batch.mixtures[1]) == 2  # the kernel sees both
    y = lk.multi_lora_linear(p.x, p.weight, p.bias, p.bank, batch, backend)
    empty = lk.LoRABatch.from_mixtures([{}] * 4)
    base = lk.multi_lora_linear(p.x, p.weight, p.bias, p.bank, empty, backend)
    torch.testing.assert_close(y[0:3], base[0:3], rtol=0, atol=0)  # strength 0: exact
    problem = replace(p, batch=batch, adapters=adapters, mixtures=mixes)
    oracle = peft_style_oracle(problem)
    tol = tolerance(problem, oracle)
    floor = p.x.double() @ p.weight.double().T + p.bias.double()
    for s in (1, 2):  # +w and -w of the same factors: the base output
        rows = slice(3 * s, 3 * s + 3)
        assert (oracle[rows] - floor[rows]).abs().max() < 1e-9  # the oracle agrees it cancels
        assert (y[rows].double() - floor[rows]).abs().max() <= tol
    # sample 3 shows the LoRA is large, so the cancellation above is not trivially true
    assert (y[9:12] - base[9:12]).abs().max() > 100 * tol
    neg = lk.LoRABatch.from_mixtures([{slot: -1.3}] * 4)
    pos = lk.LoRABatch.from_mixtures([{slot: 1.3}] * 4)
    y_neg = lk.multi_lora_linear(p.x, p.weight, p.bias, p.bank, neg, backend).double()
    y_pos = lk.multi_lora_linear(p.x, p.weight, p.bias, p.bank, pos, backend).double()
    torch.testing.assert_close(y_pos - base.double(), -(y_neg - base.double()), rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_equals_reference_closely(dtype):
    """cpu and reference share numerics (fp32 compute, one rounding): equal up to fp32
    summation order, so at most one ulp of the output dtype apart (plus fp32 noise)."""
    for popularity, ms in itertools.product(["uniform", "distinct"], [1, 2]):
        p = random_problem(
            samples=6,
            rows=5,
            K=64,
            N=80,
            ranks=[4, 16],
            dtype=dtype,
            popularity=popularity,
            mixture_size=ms,
            seed=9,
        )
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
