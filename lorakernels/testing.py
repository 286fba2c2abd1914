"""Test helpers users can reuse: random multi-LoRA problems, a float64 oracle, tolerances.

* :func:`random_problem` draws ``x``, ``W``, ``b``, a bank of adapters with the requested
  ranks, and per-sample mixtures following a popularity distribution
  (``identical``, ``distinct``, ``uniform``, ``zipf``, ``skewed``), with a fraction of samples
  using no adapter.
* :func:`peft_style_oracle` is the float64 per-adapter loop PEFT runs for a mixed batch
  (``adapter_names``): for every adapter, the rows of the samples that use it get
  ``strength * scale * B(A(x))``. It shares no code with the reference backend, which loops per
  sample; a test checks that the two agree.
* :func:`tolerance` derives an absolute tolerance from what plain PyTorch achieves in the
  same dtype, so a test never hard-codes ``atol=1e-2`` for bf16.
* :func:`rounding_tolerance` is the tighter bound for fp16/bf16: what plain PyTorch achieves
  computing in float32 from the same half-precision inputs and rounding once (the numerics
  the kernels promise), so a lost LoRA term cannot hide inside bf16's coarse ulp.
* :func:`lora_moves` is the per-sample size of the LoRA term, for "the LoRA is visible above
  the tolerance" guards: a test whose tolerance exceeds a sample's LoRA term cannot notice
  that sample's LoRA vanishing.
* :func:`stable_seed` turns test parameters into a seed that is the same in every process
  (``hash()`` of a tuple with strings changes with ``PYTHONHASHSEED``, so a failure drawn from
  it could not be reproduced).
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .bank import LoRABank
from .batch import LoRABatch

POPULARITIES = ("identical", "distinct", "uniform", "zipf", "skewed")


@dataclass
class Problem:
    """One random multi-LoRA linear problem (fields in the input dtype unless noted)."""

    x: Tensor  # [M, K]
    weight: Tensor  # [N, K]
    bias: Tensor | None  # [N]
    bank: LoRABank
    batch: LoRABatch
    adapters: dict[int, tuple[Tensor, Tensor, float]]  # slot -> (A [r,K], B [N,r], scale), fp64
    mixtures: list[dict[int, float]]


def stable_seed(*parts: object, modulus: int = 2**31 - 1) -> int:
    """A seed derived from ``repr(parts)`` by CRC-32: identical across processes and runs."""
    return zlib.crc32(repr(parts).encode()) % modulus


def draw_assignment(
    num_samples: int, num_adapters: int, popularity: str, rng: random.Random
) -> list[int]:
    """The main adapter of each sample under a popularity distribution."""
    if popularity not in POPULARITIES:
        raise ValueError(f"popularity must be one of {POPULARITIES}, got {popularity!r}")
    ids = list(range(num_adapters))
    if popularity == "identical":
        return [ids[0]] * num_samples
    if popularity == "distinct":
        return [ids[s % num_adapters] for s in range(num_samples)]
    if popularity == "uniform":
        return [rng.choice(ids) for _ in range(num_samples)]
    if popularity == "zipf":
        w = [1.0 / (k + 1) ** 1.2 for k in ids]
        return rng.choices(ids, weights=w, k=num_samples)
    # skewed: one hot adapter takes ~90 % of the samples
    return [ids[0] if rng.random() < 0.9 else rng.choice(ids) for _ in range(num_samples)]


def random_problem(
    *,
    samples: int,
    rows: int | Sequence[int],
    K: int,
    N: int,
    ranks: Sequence[int],
    popularity: str = "uniform",
    mixture_size: int = 1,
    frac_empty: float = 0.25,
    dtype: torch.dtype = torch.float32,
    bias: bool = True,
    strengths: str = "mixed",
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Problem:
    """A random problem; ``ranks`` gives one adapter per entry (mixed ranks allowed).

    ``rows`` is the row count per sample (equal-length) or a list (packed). ``strengths``:
    ``"mixed"`` draws from [-1.5, 1.5] with some exact 0s and negatives; ``"one"`` uses 1.
    """
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    num_adapters = len(ranks)
    packed = not isinstance(rows, int)
    row_counts = list(rows) if packed else [rows] * samples  # type: ignore[arg-type]
    m = sum(row_counts)

    def randn(*shape: int, std: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(dtype).to(device)

    x = randn(m, K)
    weight = randn(N, K, std=1 / math.sqrt(K))
    b = randn(N) if bias else None
    bank = LoRABank(K, N, dtype=dtype, device=device)
    adapters = {}
    # slots are spread out (not 0..L-1) so that kernels cannot confuse slot ids with indices
    slot_ids = [3 * i + 1 for i in range(num_adapters)]
    for slot, r in zip(slot_ids, ranks, strict=True):
        a = randn(r, K, std=1 / math.sqrt(K))
        bmat = randn(N, r, std=1 / math.sqrt(r))
        alpha = rng.choice([None, float(r), r / 2, 1.0, 8.0])
        scale = 1.0 if alpha is None else alpha / r
        bank.add(slot, a, bmat, scale)
        adapters[slot] = (a.double().cpu(), bmat.double().cpu(), scale)
    main = draw_assignment(samples, num_adapters, popularity, rng) if num_adapters else []
    mixtures: list[dict[int, float]] = []
    for s in range(samples):
        if not num_adapters or rng.random() < frac_empty:
            mixtures.append({})
            continue
        chosen = [main[s]]
        others = [i for i in range(num_adapters) if i != main[s]]
        rng.shuffle(others)
        chosen += others[: max(0, mixture_size - 1)]
        mix = {}
        for i in chosen:
            if strengths == "one":
                w = 1.0
            else:
                w = rng.choice([rng.uniform(-1.5, 1.5), -0.7, 0.0, 1.0])
            mix[slot_ids[i]] = w
        mixtures.append(mix)
    batch = LoRABatch.from_mixtures(
        mixtures, device=device, rows_per_sample=row_counts if packed else None
    )
    return Problem(x, weight, b, bank, batch, adapters, mixtures)


def _f32(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32))


def peft_style_oracle(problem: Problem, x: Tensor | None = None) -> Tensor:
    """Float64 ``[M, N]``: base layer, then one pass per adapter over the rows that use it."""
    x64 = (problem.x if x is None else x).double().cpu()
    y = x64 @ problem.weight.double().cpu().T
    if problem.bias is not None:
        y = y + problem.bias.double().cpu()
    s_count = problem.batch.num_samples
    if problem.batch.rows_per_sample is None:
        per = x64.shape[0] // s_count
        bounds = [(s * per, (s + 1) * per) for s in range(s_count)]
    else:
        acc, bounds = 0, []
        for r in problem.batch.rows_per_sample:
            bounds.append((acc, acc + r))
            acc += r
    for slot, (a, b, scale) in problem.adapters.items():
        for s, mix in enumerate(problem.mixtures):
            w = mix.get(slot, 0.0)
            if w == 0.0:
                continue
            r0, r1 = bounds[s]
            coef = _f32(w) * _f32(scale)  # strengths and scales are stored as float32
            y[r0:r1] += coef * ((x64[r0:r1] @ a.double().T) @ b.double().T)
    return y


def plain_torch_error(problem: Problem, oracle: Tensor) -> float:
    """Max abs error of the same computation done naively with torch ops in the input dtype.

    This is what a user gets from PyTorch alone (e.g. PEFT in that dtype): ``x @ W.T`` and
    the rank intermediate both rounded to the dtype. Our tolerance is a multiple of it.
    """
    dt = problem.x.dtype
    x = problem.x
    y = x @ problem.weight.T
    if problem.bias is not None:
        y = y + problem.bias
    for s, mix in enumerate(problem.mixtures):
        per = x.shape[0] // problem.batch.num_samples
        if problem.batch.rows_per_sample is not None:
            r0 = sum(problem.batch.rows_per_sample[:s])
            r1 = r0 + problem.batch.rows_per_sample[s]
        else:
            r0, r1 = s * per, (s + 1) * per
        for slot, w in mix.items():
            a, b, scale = problem.adapters[slot]
            t = x[r0:r1] @ a.to(dt).T
            y[r0:r1] = y[r0:r1] + (w * scale) * (t @ b.to(dt).T)
    return float((y.double().cpu() - oracle).abs().max())


def tolerance(problem: Problem, oracle: Tensor, factor: float = 4.0) -> float:
    """``factor`` x plain PyTorch's error in the same dtype, floored at a few ulps of |y|."""
    eps = torch.finfo(problem.x.dtype).eps
    floor = 4 * eps * float(oracle.abs().max().clamp_min(1.0))
    return factor * max(plain_torch_error(problem, oracle), floor)


def _row_bounds(problem: Problem, m: int) -> list[tuple[int, int]]:
    if problem.batch.rows_per_sample is None:
        per = m // problem.batch.num_samples
        return [(s * per, (s + 1) * per) for s in range(problem.batch.num_samples)]
    acc, out = 0, []
    for r in problem.batch.rows_per_sample:
        out.append((acc, acc + r))
        acc += r
    return out


def single_rounding_error(problem: Problem, oracle: Tensor) -> float:
    """Max abs error of plain PyTorch computing in float32 from the dtype's inputs, then
    rounding once to the dtype: the best a kernel with fp32 accumulation, an fp32 rank
    intermediate and one final rounding can do (the semantics of DESIGN.md section 1)."""
    dt = problem.x.dtype
    x = problem.x.float().cpu()
    y = x @ problem.weight.float().cpu().T
    if problem.bias is not None:
        y = y + problem.bias.float().cpu()
    for (r0, r1), mix in zip(_row_bounds(problem, x.shape[0]), problem.mixtures, strict=True):
        for slot, w in mix.items():
            a, b, scale = problem.adapters[slot]
            a32, b32 = a.to(dt).float(), b.to(dt).float()  # the bank holds them in the dtype
            y[r0:r1] += (_f32(w) * _f32(scale)) * ((x[r0:r1] @ a32.T) @ b32.T)
    return float((y.to(dt).double() - oracle).abs().max())


def rounding_tolerance(problem: Problem, oracle: Tensor, factor: float = 3.0) -> float:
    """``factor`` x :func:`single_rounding_error`, floored at half an ulp of ``max |y|``.

    For bf16 at SD widths this is ~1 % of ``max |y|`` where :func:`tolerance` (which lets
    plain torch round the rank intermediate, and floors at 4 ulps) allows ~12 %: enough for a
    whole sample's LoRA term to vanish unnoticed at 320x320 and 768x320."""
    eps = torch.finfo(problem.x.dtype).eps
    floor = 0.5 * eps * float(oracle.abs().max())
    return factor * max(single_rounding_error(problem, oracle), floor)


def lora_moves(problem: Problem, oracle: Tensor) -> list[float | None]:
    """Per sample: max ``|oracle - (x W^T + b)|`` over its rows, or ``None`` for a sample
    with no rows or no non-zero mixture entry (nothing a kernel could drop)."""
    x64 = problem.x.double().cpu()
    base = x64 @ problem.weight.double().cpu().T
    if problem.bias is not None:
        base = base + problem.bias.double().cpu()
    out: list[float | None] = []
    for (r0, r1), mix in zip(_row_bounds(problem, x64.shape[0]), problem.mixtures, strict=True):
        live = r1 > r0 and any(w != 0 for w in mix.values())
        out.append(float((oracle[r0:r1] - base[r0:r1]).abs().max()) if live else None)
    return out


def poisoned_like(t: Tensor) -> Tensor:
    """A tensor of NaNs shaped like ``t`` (outputs are poisoned before kernels write them)."""
    return torch.full_like(t, float("nan"))
