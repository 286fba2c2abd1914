"""lorakernels bench: run the benchmark suite, print tables, write JSON + PNG plots.

Modes (suites run by default; --suite overrides):

  --quick    (< 2 minutes on 2 CPU cores) the SD1.5 layer table with image rows per sample
             divided by 4, fp32 and bf16; the UNet step on sd15-small (SD1.5 topology, 5x
             narrower) at 16x16 latents. Numbers are indicative; the table says what shrank.
  (none)     the SD1.5 layer table at full size; the real SD1.5 UNet at 16x16 latents.
  --full     the layer table, the shapes suite (SD1.5 feed-forward, SD2, SDXL), the sweeps
             (samples, adapters, popularity, ranks, mixtures, rows without adapter), every
             explicit backend, and the SD1.5 UNet at 16/32 (both adapter configurations) and
             64 (attention-only).
  --smoke    tiny workloads that exercise every path in seconds (CI, tests).

The terminal table shows the main columns and a legend; --wide shows every column (the JSON
and --markdown always hold all of them). Before timing, the run waits a few seconds for other
processes to leave the CPUs and, if they stay, uses fewer torch threads (--threads overrides).

--compare old.json new.json prints new / old per workload and provider.
Exit status: 0, or 1 when a provider failed its correctness check (it is then not timed).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from . import report
from .providers import PROVIDER_NAMES, layer_providers
from .runner import run_layer
from .timing import TimingConfig, settle_load
from .unet import default_unet_workloads, run_unet
from .workloads import DTYPES, layer_suite, shapes_suite, smoke_suite, sweep_suite

# seconds a run waits for other processes to leave the CPUs before it starts timing
SETTLE_S = {"smoke": 0.0, "quick": 10.0, "default": 20.0, "full": 30.0}
MODES = {
    # mode: (suites, layer row divisor, timing, all explicit backends)
    "smoke": (("layer", "unet"), 1, TimingConfig(repeats=1, warmup=1, min_sample_s=0.0), False),
    "quick": (("layer", "unet"), 4, TimingConfig(repeats=5, warmup=1, min_sample_s=0.02), False),
    "default": (("layer", "unet"), 1, TimingConfig(repeats=7, warmup=1, min_sample_s=0.05), False),
    "full": (
        ("layer", "shapes", "sweep", "unet"),
        1,
        TimingConfig(repeats=7, warmup=1, min_sample_s=0.1),
        True,
    ),
}
SUITES = ("layer", "shapes", "sweep", "unet")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorakernels bench",
        description=__doc__.split("\n\n", 1)[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        action="store_const",
        const="quick",
        dest="mode",
        help="shrunk sizes, < 2 minutes on 2 CPU cores",
    )
    mode.add_argument(
        "--full",
        action="store_const",
        const="full",
        dest="mode",
        help="every suite, backend and latent size (long)",
    )
    mode.add_argument(
        "--smoke",
        action="store_const",
        const="smoke",
        dest="mode",
        help="tiny workloads, every code path in seconds",
    )
    p.add_argument("--suite", type=_csv, help=f"comma list of {', '.join(SUITES)}")
    p.add_argument(
        "--dtype",
        type=_csv,
        help="comma list of fp32, bf16, fp16 (default: fp32,bf16 on CPU, fp16,bf16 on CUDA)",
    )
    p.add_argument(
        "--device", type=_csv, help="comma list of cpu, cuda (default: cuda if available, else cpu)"
    )
    p.add_argument(
        "--providers",
        type=_csv,
        help=f"layer providers to run besides base: {', '.join(PROVIDER_NAMES)}, ours:<backend>",
    )
    p.add_argument(
        "--latent",
        type=lambda v: [int(x) for x in _csv(v)],
        help="UNet latent sizes, e.g. 16,32,64",
    )
    p.add_argument("--repeats", type=int, help="timed repeats per provider (median reported)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads before running")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results"),
        help="folder for results.json and plots (default: bench-results)",
    )
    p.add_argument("--json", type=Path, help="results file (default: OUT/results.json)")
    p.add_argument(
        "--markdown",
        type=Path,
        help="write/refresh a RESULTS.md (its plots and JSON go to a results/ folder beside it)",
    )
    p.add_argument("--wide", action="store_true", help="every column in the terminal tables")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    p.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("OLD", "NEW"),
        help="print new/old per workload and provider of two results files",
    )
    return p


class Progress:
    """tqdm when installed (to stderr), else one plain line per finished task."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="workload", file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            self.bar = None

    def start(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_description(label[:72])

    def step(self, label: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        else:
            el = time.perf_counter() - self.t0
            print(f"[{self.done}/{self.total}] {label}  ({el:.0f} s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _devices(names: list[str] | None) -> list[torch.device]:
    if not names:
        return [torch.device("cuda" if torch.cuda.is_available() else "cpu")]
    out = []
    for n in names:
        if n not in ("cpu", "cuda"):
            raise ValueError(f"--device: expected cpu or cuda, got {n!r}")
        if n == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: torch.cuda.is_available() is False on this machine")
        out.append(torch.device(n))
    return out


def plan(args: argparse.Namespace, device: torch.device) -> tuple[list, list, list[str]]:
    """``(layer workloads, unet workloads, notes)`` for one device."""
    mode = args.mode or "default"
    suites, row_factor, _, _ = MODES[mode]
    suites = args.suite or list(suites)
    bad = [s for s in suites if s not in SUITES]
    if bad:
        raise ValueError(f"--suite: unknown {bad}; choose from {', '.join(SUITES)}")
    default_dt = ["fp32", "bf16"] if device.type == "cpu" else ["fp16", "bf16"]
    dtypes = args.dtype or default_dt
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise ValueError(f"--dtype: unknown {bad}; choose from {', '.join(DTYPES)}")
    layer, notes = [], []
    if mode == "smoke":
        if "layer" in suites:
            layer += smoke_suite(dtypes)
        notes.append("smoke mode: tiny shapes that exercise every path; not representative")
    else:
        if "layer" in suites:
            layer += layer_suite(dtypes, row_factor)
        if "shapes" in suites:
            layer += shapes_suite(dtypes, row_factor)
        if "sweep" in suites:
            layer += sweep_suite(dtypes, row_factor)
    if row_factor > 1 and layer:
        notes.append(
            f"{mode} mode: image rows per sample divided by {row_factor} "
            "(text rows kept at 77); run without --quick for the real SD sizes"
        )
    unet = []
    missing = [m for m in ("diffusers", "peft") if importlib.util.find_spec(m) is None]
    if "unet" in suites and missing:
        notes.append(
            f"UNet suite skipped: {' and '.join(missing)} not installed "
            "(pip install 'lorakernels[bench,diffusers]')"
        )
    elif "unet" in suites:
        unet = default_unet_workloads(mode, args.latent)
        if mode == "quick":
            notes.append(
                "quick mode: the UNet is sd15-small (the SD1.5 topology with every block 5x "
                "narrower) at 16x16 latents, not the real SD1.5 UNet"
            )
        if args.repeats:
            unet = [replace(w, repeats=args.repeats) for w in unet]
        if device.type == "cuda":  # half precision is how a GPU runs a UNet
            unet = [replace(w, dtype="fp16") for w in unet]
    if "unet" in suites and device.type == "cpu":
        notes.append("UNet steps run in float32 on CPU")
    return layer, unet, notes


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.compare:
        try:
            old, new = (report.load_json(p) for p in args.compare)
        except ValueError as exc:
            print(f"lorakernels bench: {exc}", file=sys.stderr)
            return 2
        table, warnings = report.compare(old, new)
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        print(table)
        return 0
    try:
        devices = _devices(args.device)
        plans = [(d, *plan(args, d)) for d in devices]
    except ValueError as exc:
        print(f"lorakernels bench: {exc}", file=sys.stderr)
        return 2
    mode = args.mode or "default"
    if args.list:
        for d, layer, unet, _ in plans:
            for w in layer:
                print(f"{d}  {w.key}")
            for w in unet:
                print(f"{d}  {w.key}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    load = settle_load(SETTLE_S[mode], threads=args.threads)
    if load.threads is not None:
        torch.set_num_threads(load.threads)
    _, _, timing, all_backends = MODES[mode]
    if args.repeats:
        timing = replace(timing, repeats=args.repeats)
    dtypes = sorted({w.dtype for _, layer, _, _ in plans for w in layer} or {"fp32"})
    doc: dict = {
        "schema": report.SCHEMA,
        "provenance": report.provenance(devices[0], dtypes, argv or sys.argv[1:]),
        "mode": mode,
        "notes": sorted({n for *_, notes in plans for n in notes}),
        "layer": [],
        "model": [],
    }
    doc["provenance"]["load"] = load.as_dict()
    if load.note:
        print(f"warning: {load.note}", file=sys.stderr)
        doc["notes"].append(load.note)
    total = sum(len(layer) + len(unet) for _, layer, unet, _ in plans)
    progress = Progress(total)
    t0 = time.perf_counter()
    try:
        for device, layer, unet, _ in plans:
            providers = layer_providers(device, all_backends=all_backends, names=args.providers)
            for w in layer:
                label = f"{w.label} {w.key.split('|')[3]} {w.dtype}"
                progress.start(label)
                doc["layer"].append(run_layer(w, device, timing, providers=providers))
                progress.step(label)
            for w in unet:
                progress.start(w.label)
                doc["model"].append(run_unet(w, device))
                progress.step(w.label)
    except ValueError as exc:
        progress.close()
        print(f"lorakernels bench: {exc}", file=sys.stderr)
        return 2
    progress.close()
    report.finish_provenance(doc)
    doc["provenance"]["wall_s"] = round(time.perf_counter() - t0, 1)
    print(report.text_report(doc, wide=args.wide))

    out_dir = args.out
    json_path = args.json or out_dir / "results.json"
    plot_dir = out_dir
    if args.markdown:
        plot_dir = args.markdown.parent / "results"
        report.write_json(doc, plot_dir / "results.json")
    report.write_json(doc, json_path)
    plots = [] if args.no_plots else report.plot(doc, plot_dir)
    if not args.no_plots and not plots and importlib.util.find_spec("matplotlib") is None:
        print("note: no plots: matplotlib is not installed", file=sys.stderr)
    if args.markdown:
        block = report.markdown_report(doc, plots, args.markdown.parent)
        report.write_markdown(args.markdown, block, doc["provenance"]["command"])
    print(f"\nwrote {json_path}" + (f", {len(plots)} plots in {plot_dir}" if plots else ""))
    if args.markdown:
        print(f"wrote {args.markdown}")
    print(f"total {doc['provenance']['wall_s']:.0f} s")
    return 1 if report.problems(doc) else 0
