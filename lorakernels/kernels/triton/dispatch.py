"""Launch configurations and the fused-vs-pair rule, from host-side integers only.

Everything here is pure Python (no torch, no triton): the inputs are shapes, the
:class:`~lorakernels.kernels.LaunchMeta` capacities and the GPU generation (``arch``: 80 for
A100-class ``mma.sync`` GPUs, 90 for H100-class ``wgmma``), never device values, so a
decision made while a CUDA graph is captured is the same decision at every replay.

Notation (DESIGN.md): ``M`` rows, ``K`` in-features, ``N`` out-features, ``S`` samples, ``R`` the
summed rank of one sample's mixture. ``R`` is only known on the device, so the host uses the
capacity ``R_cap = max_entries * max_rank`` (an upper bound) and the rows per sample use
``max_rows``. ``e`` is the element size of the input dtype.

Cost per output tile ``BLOCK_M x BLOCK_N`` of the fused kernel (``Rp`` = ``R`` rounded up to
``BLOCK_R``, the rank-block granularity):

* MMA FLOPs: base ``2*BM*BN*K``; shrink ``2*BM*Rp*K`` (recomputed by *every* N tile of the
  row tile, so the grid total is ``2*M*Rp*K * ceil(N/BN)``); expand ``2*BM*Rp*BN`` times 2 for
  fp16/bf16 (the fp32 intermediate is split in a high and a low half so it is never rounded
  to 16 bits; see common.py).
* Bytes: the x tile is already loaded for the base GEMM, so the LoRA adds only ``Rp*K*e``
  (gathered ``A`` rows, L2-resident across tiles) and ``Rp*BN*e`` (``B`` rows).

Relative to the base GEMM the fused kernel adds ``Rp/BN + 2*Rp/K`` (16-bit) of the FLOPs and
almost no DRAM bytes. At the SD widths (N, K = 320..1280, thousands of rows per sample) the
base GEMM is memory bound (arithmetic intensity ``~ 2*M*N*K / (e*(M*K + M*N))`` is about 160
FLOP/B at d=320 against the H100 ridge of ~295), so the extra MMA work hides under the memory
time while it stays below the ridge: that is why fused is the default. Where the layer is
compute bound (SDXL d=1280, GEGLU) the recompute ``Rp/BN`` is the fused kernel's tax
(12.5 % for rank 16 at BLOCK_N 128; ``benchmarks/roofline.py`` prints the table).

The shrink/expand pair computes the shrink once (``2*M*Rp*K``) and the expand once, but pays
in bytes: ``t`` is written and read in fp32 (``8*M*Rp``), ``x`` is read again (``M*K*e``) and
``y`` is read and written again (``2*M*N*e``), plus two more launches. It wins when ``Rp/BN``
is large (big summed ranks, many N tiles) *and* the layer is compute bound (large K, N).

The rule (:func:`choose`) evaluates both with the same roofline (``max(FLOPs/peak,
bytes/bandwidth)`` plus a fixed cost per launch) and picks the smaller. The machine numbers
are data-sheet values per GPU (:data:`MACHINES`: A100 SXM, H100 SXM/PCIe, H200; unknown GPUs
use H100 SXM); the decision depends mostly on their ratio -- the H200's 4.8 TB/s moves the
ridge from ~295 to ~206 FLOP/B, so more layers are compute bound and the pair wins at more
shapes (``benchmarks/roofline.py --gpu H200``). Tile shapes
were chosen from the AOT register report (``tests/test_triton_aot.py``: every config in every
argument specialization it can meet); none has been timed on a GPU yet (README "What has run
where"). The decision is cached per (shapes, capacities, dtype, GPU): it costs ~12 us to
evaluate, which a UNet step would otherwise pay in every one of its ~700 layer calls.

fp32 never takes the fused kernel: its base GEMM would run on CUDA-core FMAs (or Triton's
TF32) next to cuBLAS doing better in the pair, and the two paths would round differently when
torch's TF32 switch is on. fp32 goes to cuBLAS + shrink/expand, which follow the switch.

Known gaps on Hopper (sm_90), left for ``make gpu-check``'s measurements to rank: no TMA
loads, no persistent scheduling or warp specialization; the 64x64 four-warp tiles picked for
N <= 384 issue one small ``wgmma`` per K step; the shrink is recomputed by every N tile of a
row tile (the ``Rp/BN`` tax above); the csrc kernels have no ``cp.async`` pipelining.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

__all__ = [
    "A100",
    "ARCHS",
    "H100",
    "H200",
    "MACHINES",
    "Cost",
    "ExpandConfig",
    "FusedConfig",
    "Machine",
    "Plan",
    "ShrinkConfig",
    "all_configs",
    "base_costs",
    "choose",
    "expand_config",
    "fused_config",
    "fused_costs",
    "machine_for",
    "pair_costs",
    "rank_block",
    "seconds",
    "segmented_config",
    "shrink_config",
    "split_k_for",
]

# Compute capabilities x 10 with a table of their own: sm_80 (A100-class, mma.sync; also
# used for sm_86/89) and sm_90 (H100-class, wgmma).
ARCHS = (80, 90)


@dataclass(frozen=True)
class Machine:
    """Roofline constants of one GPU (data sheet values, not measurements)."""

    name: str
    mma_flops_16bit: float  # dense fp16/bf16 tensor-core FLOP/s
    fma_flops_fp32: float  # fp32 FLOP/s without tensor cores (exact fp32)
    bandwidth: float  # DRAM bytes/s
    launch_s: float  # fixed cost per kernel launch inside a CUDA graph (assumed)
    sm_count: int
    mma_flops_tf32: float = 0.0  # dense TF32 tensor-core FLOP/s (fp32 with TF32 allowed)


# NVIDIA data sheets (dense, no sparsity). The H200 is an H100 SXM with HBM3e: same SMs and
# clocks, 4.8 TB/s instead of 3.35.
A100 = Machine("A100 SXM", 312e12, 19.5e12, 2.039e12, 2e-6, 108, 156e12)
H100 = Machine("H100 SXM", 990e12, 67e12, 3.35e12, 2e-6, 132, 495e12)
H100_PCIE = Machine("H100 PCIe", 756e12, 51e12, 2.0e12, 2e-6, 114, 378e12)
H200 = Machine("H200 SXM", 990e12, 67e12, 4.8e12, 2e-6, 132, 495e12)
MACHINES = (A100, H100, H100_PCIE, H200)


def machine_for(device_name: str) -> Machine:
    """Constants for a GPU by its ``torch.cuda.get_device_name()``; H100 SXM when unknown."""
    name = device_name.upper()
    if "A100" in name or "A800" in name:
        return A100
    if "H200" in name or "GH200" in name:
        return H200
    if "H100" in name or "H800" in name:
        return H100_PCIE if "PCIE" in name else H100
    return H100


@dataclass(frozen=True)
class FusedConfig:
    block_m: int
    block_n: int
    block_k: int
    block_r: int
    num_warps: int
    num_stages: int
    multi_block: bool = False  # loop over further rank blocks (summed rank > block_r)


@dataclass(frozen=True)
class ShrinkConfig:
    block_m: int
    block_k: int
    block_r: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class ExpandConfig:
    block_m: int
    block_n: int
    block_r: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class Plan:
    """What one ``multi_lora_linear`` call launches."""

    path: str  # "fused" or "pair"
    fused: FusedConfig | None
    shrink: ShrinkConfig | None
    split_k: int
    expand: ExpandConfig | None


_DTYPES = ("float16", "bfloat16", "float32")


def _check_dtype(dtype: str) -> None:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")


def rank_block(r_cap: int) -> int:
    """Rank-block granularity: the smallest of 16/32/64 that holds ``r_cap``, else 64.

    16 is the smallest MMA K/N width; above 64 the fused kernel loops over rank blocks (each
    extra block re-walks K), and the register budget of ``t`` (``BLOCK_M x BLOCK_R`` fp32)
    next to the ``BLOCK_M x BLOCK_N`` accumulator stops fitting without spills.
    """
    for block in (16, 32):
        if r_cap <= block:
            return block
    return 64


def fused_config(rows: int, n: int, r_cap: int, dtype: str, *, arch: int = 90) -> FusedConfig:
    """Tile shape for the fused kernel by shape class and GPU generation.

    * rows per sample >= 128 (image tokens): BLOCK_M 128, so W and the gathered A rows are
      reused over 128 rows; fewer rows (77-token text, small tests): 64, the smallest M of a
      Hopper warpgroup MMA, which wastes at most 51 of 128 rows for 77-row samples.
    * N <= 384 (the 320-wide SD layers): BLOCK_N 64, 5 exact tiles for N=320 where 128 would
      compute 384 columns (20 % waste); wider layers use 128, halving the shrink recompute
      ``Rp/BN``.
    * Summed-rank capacity <= 64: one rank block of 16/32/64 (:func:`rank_block`); above,
      the ``multi_block`` variant loops over rank blocks with BLOCK_N 64.
    * Warps: 4 for single-block 64x64 tiles, else 8. Chosen from the AOT register report
      (ptxas, no GPU): on sm_80, where ``mma.sync`` keeps operands in registers, 128-row tiles
      with 4 warps spill (e.g. 128x64 R32: 255 regs + 56 B spills) while 8 warps fit (148
      regs); single-block 64x64 with 8 warps is capped at 128 regs by ptxas and spills, 4
      warps fit (152-200); the multi-block loop needs 8 (180 regs, 255 with 4). sm_80 cannot
      hold 128x128 with a 64-wide rank block (324 B spills), so that tile drops to 128x64
      there, and its multi-block rank block is 32. sm_90 (``wgmma``, operands in shared
      memory) fits every tile here.
    * fp32 runs on exact FMA (no TF32, so it agrees with torch's fp32 matmul): 64x64 tiles,
      BLOCK_K 16 and 8 warps keep the FMA operands in registers (126-128 regs, no spills on
      either arch; BLOCK_K 32 or 4 warps spill); above a summed rank of 32 it loops over rank
      blocks of 16 (the 32-wide multi-block variant spills on both).
    """
    _check_dtype(dtype)
    if dtype == "float32":
        multi = r_cap > 32
        return FusedConfig(64, 64, 16, 16 if multi else rank_block(r_cap), 8, 2, multi)
    multi = r_cap > 64
    block_m = 128 if rows >= 128 else 64
    block_n = 64 if n <= 384 or multi else 128
    if multi:
        block_r = 64 if arch >= 90 else 32
    else:
        block_r = rank_block(r_cap)
        if arch < 90 and block_m == block_n == 128 and block_r == 64:
            block_n = 64
        if arch < 90 and block_m == 128 and block_n == 64 and block_r == 32:
            # sm_80 128x64 R32 spills in some argument specializations (8 warps: ptxas holds
            # 128 regs and spills 16 B with bias absent, 8 B with BLOCK_K 32 and bias
            # present); 64x64 R32 with 4 warps fits every one (AOT table, GPU.md).
            block_m = 64
    # The multi-block loop adds live registers: 64x64 needs 8 warps there too (sm_80: 255
    # regs with 4 warps, at the limit; 180 with 8).
    num_warps = 4 if block_m == block_n == 64 and not multi else 8
    return FusedConfig(block_m, block_n, 64, block_r, num_warps, 3, multi)


def segmented_config(fused: FusedConfig, arch: int = 90) -> FusedConfig:
    """The fused tile adapted to the segmented kernel (per-sample weight, issue 13 item 4).

    Its weight select costs a few registers: on sm_80 the 64x64 rank-16 tile with 3 stages
    then holds 128 registers and spills 24 B/thread; 2 stages fit (139-145 regs, AOT table).
    """
    if arch < 90 and (fused.block_m, fused.block_n, fused.block_r) == (64, 64, 16):
        if not fused.multi_block and fused.num_stages > 2:
            return FusedConfig(
                fused.block_m, fused.block_n, fused.block_k, fused.block_r, fused.num_warps, 2
            )
    return fused


def shrink_config(r_cap: int, dtype: str, *, arch: int = 90) -> ShrinkConfig:
    """Shrink tile: ``BLOCK_M x BLOCK_R`` output, K walked in ``BLOCK_K`` steps.

    The output is narrow (``BLOCK_R`` <= 64), so BLOCK_M 64 keeps enough programs in flight;
    a 3-stage pipeline hides the latency of the gathered A rows. 8 warps: with 4, the 64-wide
    rank block spills on sm_80 (255 regs + 104 B). fp32 (FMA): 4 warps on sm_80 (8 spill at
    rank block 32), 8 on sm_90 (4 spill at 64).
    """
    _check_dtype(dtype)
    block_r = rank_block(r_cap)
    if dtype == "float32":
        return ShrinkConfig(64, 32, block_r, 8 if arch >= 90 else 4, 2)
    return ShrinkConfig(64, 64, block_r, 8, 3)


def expand_config(n: int, dtype: str, *, arch: int = 90) -> ExpandConfig:
    """Expand tile: ``BLOCK_M x BLOCK_N`` of y, the packed rank walked in blocks of 64.

    The pair is chosen for large summed ranks, so the rank block is the largest (64; 32 for
    fp32 FMA). 8 warps: 64x64 with 4 spills on sm_80 (32 B), with 8 it takes 184 regs.
    """
    _check_dtype(dtype)
    if dtype == "float32":
        # sm_80: the 32-wide rank block spills at N not a multiple of 16 (48 B FMA, 16 B TF32);
        # 16 fits (123 regs).
        return ExpandConfig(64, 64, 32 if arch >= 90 else 16, 8, 2)
    return ExpandConfig(64, 64 if n <= 384 else 128, 64, 8, 2)


def split_k_for(m: int, k: int, rows: int, r_cap: int, sm_count: int) -> int:
    """Split K in the shrink when too few programs exist to fill the GPU.

    Programs without split: row tiles x rank blocks. Short inputs with long K (77 text rows,
    K = 2048) give a handful of programs; splitting K over up to 8 programs each keeps every
    split at least 256 deep so the atomics stay a small part of the work.
    """
    if m == 0 or r_cap == 0:
        return 1
    programs = _row_tiles(m, rows, 64) * _cdiv(r_cap, rank_block(r_cap))
    if programs >= sm_count:
        return 1
    return max(1, min(8, _cdiv(sm_count, programs), k // 256))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _peak(dtype: str, machine: Machine) -> float:
    return machine.fma_flops_fp32 if dtype == "float32" else machine.mma_flops_16bit


def _elem(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def _row_tiles(m: int, rows: int, block_m: int) -> int:
    """Row tiles of a batch of equal samples of ``rows`` rows (tiles never straddle samples)."""
    rows = max(1, min(rows, m))
    return _cdiv(m, rows) * _cdiv(rows, block_m)


@dataclass(frozen=True)
class Cost:
    """Work of one launch: FLOPs executed (padding included) and minimum DRAM bytes."""

    flops: float
    nbytes: float


def seconds(costs: list[Cost], dtype: str, machine: Machine = H100) -> float:
    """Roofline time of a sequence of launches: each ``max(FLOPs/peak, bytes/BW)`` + launch."""
    peak = _peak(dtype, machine)
    return sum(max(c.flops / peak, c.nbytes / machine.bandwidth) + machine.launch_s for c in costs)


def base_costs(m: int, n: int, k: int, dtype: str) -> list[Cost]:
    """The base GEMM ``x @ W.T`` alone (what a model without LoRA runs)."""
    return [Cost(2.0 * m * n * k, _elem(dtype) * (m * k + n * k + m * n))]


def fused_costs(
    m: int, n: int, k: int, rows: int, r: int, dtype: str, arch: int = 90
) -> list[Cost]:
    """The fused kernel with summed rank ``r`` per sample (distinct adapters per sample)."""
    cfg = fused_config(rows, n, r, dtype, arch=arch)
    e = _elem(dtype)
    mp = _row_tiles(m, rows, cfg.block_m) * cfg.block_m
    n_tiles = _cdiv(n, cfg.block_n)
    np_ = n_tiles * cfg.block_n
    rp = _cdiv(r, cfg.block_r) * cfg.block_r
    halves = 1 if dtype == "float32" else 2  # hi/lo split of the fp32 intermediate
    flops = 2.0 * mp * np_ * k + 2.0 * mp * rp * k * n_tiles + 2.0 * halves * mp * rp * np_
    samples = _cdiv(m, max(1, min(rows, m)))
    nbytes = e * (m * k + n * k + m * n + samples * r * (k + n))
    return [Cost(flops, nbytes)]


def pair_costs(m: int, n: int, k: int, rows: int, r: int, dtype: str, arch: int = 90) -> list[Cost]:
    """Base GEMM (cuBLAS) + shrink + expand: three launches."""
    e = _elem(dtype)
    samples = _cdiv(m, max(1, min(rows, m)))
    shrink = shrink_config(r, dtype, arch=arch)
    expand = expand_config(n, dtype, arch=arch)
    rp = _cdiv(r, shrink.block_r) * shrink.block_r
    halves = 1 if dtype == "float32" else 2
    np_ = _cdiv(n, expand.block_n) * expand.block_n
    return base_costs(m, n, k, dtype) + [
        Cost(
            2.0 * _row_tiles(m, rows, shrink.block_m) * shrink.block_m * rp * k,
            e * m * k + 4 * m * rp + e * samples * r * k,
        ),
        Cost(
            2.0 * halves * _row_tiles(m, rows, expand.block_m) * expand.block_m * rp * np_,
            4 * m * rp + 2 * e * m * n + e * samples * r * n,
        ),
    ]


@functools.lru_cache(maxsize=4096)
def choose(
    m: int,
    n: int,
    k: int,
    max_rows: int,
    max_entries: int,
    max_rank: int,
    dtype: str,
    arch: int = 90,
    sm_count: int = H100.sm_count,
    machine: Machine = H100,
    aligned: bool = True,
) -> Plan:
    """The fused-vs-pair decision and the configs, from shapes and capacities only.

    ``arch`` is the compute capability x 10 (80 for A100-class, 90 for H100); the CPU
    interpreter uses the sm_90 table. fp32 always takes the pair (module docstring), and so
    does a layer that is not ``aligned`` (K or N not a multiple of 16, or a weight that is
    not contiguous and 16-byte aligned): the fused kernel is compiled and checked only for
    that class (``tests/test_triton_aot.py``); every SD/SDXL layer is in it, and the pair
    (cuBLAS + shrink/expand) is correct for any shape. Cached: all arguments are host
    integers, strings and a frozen :class:`Machine`.
    """
    _check_dtype(dtype)
    r_cap = max(0, max_entries) * max(0, max_rank)
    rows = max(1, min(max_rows, m)) if m else 1

    def pair() -> Plan:
        split = split_k_for(m, k, rows, r_cap, sm_count)
        return Plan(
            "pair",
            None,
            shrink_config(r_cap, dtype, arch=arch),
            split,
            expand_config(n, dtype, arch=arch),
        )

    if dtype == "float32" or not aligned:
        return pair()
    fused = Plan("fused", fused_config(rows, n, r_cap, dtype, arch=arch), None, 1, None)
    if r_cap == 0 or m == 0:
        return fused  # no LoRA can be present: the fused kernel is a plain GEMM
    t_fused = seconds(fused_costs(m, n, k, rows, r_cap, dtype, arch), dtype, machine)
    t_pair = seconds(pair_costs(m, n, k, rows, r_cap, dtype, arch), dtype, machine)
    if t_pair < t_fused:
        return pair()
    return fused


def all_configs() -> dict[str, list[tuple[int, str, object]]]:
    """Every ``(arch, dtype, config)`` the selection functions above can return, per kernel.

    The AOT test compiles each for its architecture. Kept in step with the functions by
    walking their (finite) decision branches rather than by a second hand-written list.
    """
    found: dict[str, set] = {"fused": set(), "shrink": set(), "expand": set()}
    r_caps = (1, 16, 17, 32, 33, 64, 65, 384)
    widths = (33, 320, 385, 1280)
    for arch, dtype in itertools.product(ARCHS, _DTYPES):
        for r_cap, rows, n in itertools.product(r_caps, (1, 77, 128, 4096), widths):
            if dtype == "float32":
                break  # fp32 is never fused (choose)
            found["fused"].add((arch, dtype, fused_config(rows, n, r_cap, dtype, arch=arch)))
        for r_cap in r_caps:
            found["shrink"].add((arch, dtype, shrink_config(r_cap, dtype, arch=arch)))
        for n in widths:
            found["expand"].add((arch, dtype, expand_config(n, dtype, arch=arch)))

    def key(item: tuple) -> tuple:
        return (item[0], item[1], tuple(vars(item[2]).values()))

    return {kind: sorted(items, key=key) for kind, items in found.items()}
