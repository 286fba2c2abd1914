"""Command line: ``lorakernels`` / ``python -m lorakernels``.

:data:`COMMANDS` maps each subcommand to ``(module, function, one-line help)``; the function
takes the remaining arguments and returns the exit status. ``--help`` prints :data:`USAGE`
(plain text, built from that table), ``--version`` the package version.
"""

from __future__ import annotations

import importlib
import platform
import sys


def info() -> str:
    """A plain-text report: versions, devices, and which backend can run where and why not."""
    import torch

    from . import __version__
    from .ops import BACKENDS, unavailable_reason

    lines = [
        f"lorakernels {__version__}",
        f"python {platform.python_version()}  torch {torch.__version__}  "
        f"threads {torch.get_num_threads()}  cpu {platform.processor() or platform.machine()}",
        f"cpu capability: {torch.backends.cpu.get_cpu_capability()}",
    ]
    for mod in ("triton", "diffusers", "transformers", "peft", "safetensors", "numpy"):
        try:
            ver = getattr(importlib.import_module(mod), "__version__", "?")
        except ImportError:
            ver = "not installed"
        lines.append(f"  {mod:13s} {ver}")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
        lines.append(f"cuda device: {torch.cuda.get_device_name()}")
    else:
        lines.append("cuda device: none (torch.cuda.is_available() is False)")
    try:
        from ._native import status

        present, why = status()
        lines.append(f"native CUDA library: {'present' if present else 'absent'} ({why})")
    except ImportError:
        lines.append("native CUDA library: not part of this build")
    lines.append(_cpu_gemm_line())
    for dev in devices:
        from .ops import resolve_backend

        lines.append(f"backends on {dev.type}: auto -> {resolve_backend(dev)}")
        for name in BACKENDS:
            reason = unavailable_reason(name, dev)
            lines.append(f"  {name:10s} {'ok' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)


def _cpu_gemm_line() -> str:
    """Which GEMM the cpu backend runs per precision (kernels/cpu_gemm.py), from the cached
    calibration when there is one (this report measures nothing)."""
    import json

    from . import plan
    from .kernels import cpu_gemm

    head = f"cpu GEMM: LORAKERNELS_CPU_GEMM={cpu_gemm.requested()}, oneDNN prepacked " + (
        "available" if cpu_gemm.available() else "unavailable"
    )
    try:
        stored = json.loads((plan.cache_dir() / "plan-calibration.json").read_text())
        speedups = stored[plan.calibration_key()]["onednn_speedup"]
    except (OSError, ValueError, KeyError, TypeError):
        return head + "; not calibrated yet on this machine (the first layer call measures)"
    picks = ", ".join(
        f"{p} {cpu_gemm.choice(speedups, p)} for W, {cpu_gemm.choice(speedups, p, True)} for "
        f"merged weights (oneDNN {v:.2f}x torch)"
        for p, v in speedups.items()
    )
    return f"{head}; measured: {picks}"


def _info_main(argv: list[str]) -> int:
    if argv:
        print(f"lorakernels info: unexpected arguments {argv}", file=sys.stderr)
        return 2
    print(info())
    return 0


# subcommand: (module relative to this package, function, one-line help). Add one line per
# subcommand; the function gets the remaining arguments and returns the exit status.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "info": ("__main__", "_info_main", "versions, devices, and which backends can run here"),
    "bench": ("bench.cli", "main", "the benchmark suite (lorakernels bench --help)"),
    "serve": ("serve.cli", "main", "the A1111-compatible server (lorakernels serve --help)"),
    "gpu-check": ("gpu_check", "main", "every GPU path and the GPU benchmark (make gpu-check)"),
}


def usage() -> str:
    """The plain-text top-level help."""
    width = max(map(len, COMMANDS))
    lines = [
        "usage: lorakernels [--version] [-h] [COMMAND [ARGS...]]",
        "",
        "Many LoRA adapters in one pass, per sample, without merging weights.",
        "",
        "commands:",
        *(f"  {name:{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()),
        "",
        "Without a command: the same as `lorakernels info`.",
        "`lorakernels COMMAND --help` describes a command's options.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["info"]
    cmd, rest = argv[0], argv[1:]
    if cmd in ("-h", "--help", "help"):
        print(usage())
        return 0
    if cmd in ("-V", "--version"):
        from . import __version__

        print(f"lorakernels {__version__}")
        return 0
    if cmd == "--info":  # kept for scripts written against 0.1
        cmd = "info"
    if cmd not in COMMANDS:
        print(f"lorakernels: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[cmd]
    fn = getattr(importlib.import_module(f".{module}", __package__ or "lorakernels"), func)
    return int(fn(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
