"""Roofline model of the Triton backend at the SD1.5 and SDXL layer shapes: a PREDICTION.

Nothing here was measured. For every linear layer of the UNet's transformer blocks it prints
the FLOPs and the minimum DRAM bytes of the base GEMM alone and of our kernels (the path the
dispatch picks: the fused kernel, or base GEMM + shrink/expand), the roofline floor of each on
an H100 SXM (990 TFLOP/s dense bf16, 3.35 TB/s; ``max(FLOPs/peak, bytes/bandwidth)``, no launch
cost) and the predicted LoRA overhead ``ours / base - 1``. The cost formulas are the ones the
dispatch decides with (:mod:`lorakernels.kernels.triton.dispatch`): executed MMA FLOPs include
tile padding and the per-N-tile recompute of the shrink; bytes assume every re-read (x per N
tile, W per row tile, the bank rows) hits L2. Real kernels reach a fraction of these floors.

Workload: ``--images`` images at native resolution with classifier-free guidance (2 samples
each), every sample with its own mixture of ``--entries`` adapters of rank ``--rank``.
Cross-attention ``to_k``/``to_v`` see the 77-token prompt (their output can be cached per
request; they are listed anyway). SD1.5 ``proj_in``/``proj_out`` are 1x1 convolutions, the
same GEMM.

Usage: ``python benchmarks/roofline.py [--gpu H100|H200|A100] [--rank 16] [--entries 1]
[--images 1] [--dtype bfloat16]``. ``--gpu`` picks the data-sheet constants
(:data:`~lorakernels.kernels.triton.dispatch.MACHINES`) and, with them, the dispatch decision
the launcher makes on that GPU (it looks the constants up by device name); A100 uses the sm_80
table.

Known gaps on Hopper (H100/H200; not modelled here, which is why ``make gpu-check``'s measured
ratios, not these floors, decide what to build next):

* no TMA loads and no warp specialization: operands go through ``cp.async``-style pipelined
  loads issued by the compute warps (Triton 3.9 without ``tl.make_tensor_descriptor``);
* no persistent scheduling: one program per output tile, so at 77-row text layers (a handful
  of tiles) most of the 132 SMs idle -- split-K exists only in the shrink;
* the 64x64 four-warp tiles picked for N <= 384 (SD1.5's 320-wide layers) issue one small
  ``wgmma`` (m64n64) per K step, below the 128x128 tiles Hopper needs near its peak;
* the fused kernel recomputes the shrink for every N tile of a row tile (``Rp/BN`` of the base
  FLOPs: 12.5 % at rank 16 and BLOCK_N 128);
* the csrc kernels (cuda backend) have no ``cp.async`` pipelining at all.

The H200 changes only the bandwidth (4.8 vs 3.35 TB/s): its ridge point drops from ~295 to
~206 FLOP/B, so more layers are compute bound and the extra MMA work of the LoRA (the
recompute above) hides under memory time at fewer shapes: predicted overhead of all SD1.5
transformer linears, rank 16, bf16, one image with guidance: 9.8 % on H100, 14.7 % on H200
(SDXL 14.6 -> 15.0 %); A100 (sm_80 table) 19.9 %.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorakernels.kernels.triton import dispatch  # noqa: E402


@dataclass(frozen=True)
class Layer:
    model: str
    name: str
    rows: int  # rows per sample
    k: int
    n: int
    count: int  # how many such layers one UNet evaluation runs


def transformer_layers(model: str, d: int, rows: int, ctx: int, blocks: int, models: int):
    """The linear layers of ``blocks`` transformer blocks of width ``d`` (``models`` wrappers)."""
    return [
        Layer(model, f"d{d} attn q/k/v/out, attn2 q/out", rows, d, d, 6 * blocks),
        Layer(model, f"d{d} proj_in/proj_out", rows, d, d, 2 * models),
        Layer(model, f"d{d} attn2 k/v (text)", 77, ctx, d, 2 * blocks),
        Layer(model, f"d{d} ff.net.0.proj (GEGLU)", rows, d, 8 * d, blocks),
        Layer(model, f"d{d} ff.net.2", rows, 4 * d, d, blocks),
    ]


def unet_layers() -> list[Layer]:
    # SD1.5 at 512x512: one block per transformer; 5 transformers at 320 (4096 rows), 640
    # (1024), 1280 (256), and the mid block at 1280 (64 rows).
    sd15 = (
        transformer_layers("SD1.5", 320, 4096, 768, 5, 5)
        + transformer_layers("SD1.5", 640, 1024, 768, 5, 5)
        + transformer_layers("SD1.5", 1280, 256, 768, 5, 5)
        + transformer_layers("SD1.5", 1280, 64, 768, 1, 1)
    )
    # SDXL at 1024x1024: 640 wide at 4096 rows (5 transformers of depth 2), 1280 wide at
    # 1024 rows (down 2x10, mid 10, up 3x10 blocks in 6 transformers).
    sdxl = transformer_layers("SDXL", 640, 4096, 2048, 10, 5) + transformer_layers(
        "SDXL", 1280, 1024, 2048, 60, 6
    )
    return sd15 + sdxl


GPUS = {"A100": dispatch.A100, "H100": dispatch.H100, "H200": dispatch.H200}


def floor(costs: list[dispatch.Cost], dtype: str, machine: dispatch.Machine) -> float:
    """Roofline seconds without launch overhead."""
    no_launch = dispatch.Machine(
        f"{machine.name}, no launch cost",
        machine.mma_flops_16bit,
        machine.fma_flops_fp32,
        machine.bandwidth,
        0.0,
        machine.sm_count,
        machine.mma_flops_tf32,
    )
    return dispatch.seconds(costs, dtype, no_launch)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--entries", type=int, default=1, help="adapters mixed per sample")
    parser.add_argument("--images", type=int, default=1, help="images (x2 samples for CFG)")
    parser.add_argument("--dtype", default="bfloat16", choices=("float16", "bfloat16"))
    parser.add_argument("--gpu", default="H100", choices=sorted(GPUS))
    args = parser.parse_args(argv)
    samples, r = 2 * args.images, args.rank * args.entries
    machine = GPUS[args.gpu]
    args.arch = 80 if machine is dispatch.A100 else 90

    print(
        f"PREDICTION (roofline, not measured): {machine.name} "
        f"{machine.mma_flops_16bit / 1e12:.0f} TFLOP/s, {machine.bandwidth / 1e12:.2f} TB/s; "
        f"{args.dtype}; {samples} samples "
        f"({args.images} image(s) x CFG), summed rank {r} per sample ({args.entries} x "
        f"rank {args.rank}), table sm_{args.arch}"
    )
    head = (
        f"{'model':<6} {'layer':<30} {'x':>3} {'M':>6} {'K':>5} {'N':>6} | {'GFLOP':>7} "
        f"{'MB':>6} {'us':>6} | {'path':<5} {'GFLOP':>7} {'MB':>6} {'us':>6} | {'ovh %':>6}"
    )
    print(f"{'':<54}| {'base GEMM alone':^21} | {'ours (LoRA included)':^28} |")
    print(head)
    print("-" * len(head))
    totals: dict[str, list[float]] = {}
    for layer in unet_layers():
        m = samples * layer.rows
        plan = dispatch.choose(
            m,
            layer.n,
            layer.k,
            layer.rows,
            args.entries,
            args.rank,
            args.dtype,
            arch=args.arch,
            sm_count=machine.sm_count,
            machine=machine,
        )
        base = dispatch.base_costs(m, layer.n, layer.k, args.dtype)
        if plan.path == "fused":
            ours = dispatch.fused_costs(m, layer.n, layer.k, layer.rows, r, args.dtype, args.arch)
        else:
            ours = dispatch.pair_costs(m, layer.n, layer.k, layer.rows, r, args.dtype, args.arch)
        t_base, t_ours = floor(base, args.dtype, machine), floor(ours, args.dtype, machine)
        total = totals.setdefault(layer.model, [0.0, 0.0])
        total[0] += layer.count * t_base
        total[1] += layer.count * t_ours
        print(
            f"{layer.model:<6} {layer.name:<30} {layer.count:>3} {m:>6} {layer.k:>5} {layer.n:>6}"
            f" | {sum(c.flops for c in base) / 1e9:>7.2f} {sum(c.nbytes for c in base) / 1e6:>6.2f}"
            f" {t_base * 1e6:>6.2f} | {plan.path:<5} {sum(c.flops for c in ours) / 1e9:>7.2f}"
            f" {sum(c.nbytes for c in ours) / 1e6:>6.2f} {t_ours * 1e6:>6.2f}"
            f" | {100 * (t_ours / t_base - 1):>6.1f}"
        )
    print()
    for model, (t_base, t_ours) in totals.items():
        overhead = 100 * (t_ours / t_base - 1)
        print(
            f"{model}: all transformer linears of one UNet evaluation: base {t_base * 1e6:.0f} "
            f"us, ours {t_ours * 1e6:.0f} us, predicted LoRA overhead {overhead:.1f} %"
        )


if __name__ == "__main__":
    main()
