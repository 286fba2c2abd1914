"""Command line: ``lorakernels`` / ``python -m lorakernels``.

* ``lorakernels`` or ``lorakernels info``: environment and backend report.
* ``lorakernels bench [...]``: the benchmark suite (see ``lorakernels bench --help``).
* ``lorakernels serve [...]``: the A1111-compatible server (see ``lorakernels serve --help``).
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
    for dev in devices:
        from .ops import resolve_backend

        lines.append(f"backends on {dev.type}: auto -> {resolve_backend(dev)}")
        for name in BACKENDS:
            reason = unavailable_reason(name, dev)
            lines.append(f"  {name:10s} {'ok' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("info", "--info"):
        print(info())
        return 0
    if argv[0] == "bench":
        from .bench.cli import main as bench_main

        return int(bench_main(argv[1:]) or 0)
    if argv[0] == "serve":
        from .serve.cli import main as serve_main

        return int(serve_main(argv[1:]) or 0)
    if argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    print(f"unknown command {argv[0]!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
