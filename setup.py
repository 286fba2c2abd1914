"""Build script: the pure-Python package, plus the optional native CUDA library.

Metadata lives in pyproject.toml; this file only adds ``lorakernels/_lib/liblorakernels_cuda.so``
(the csrc SGMV kernels, a plain shared object with a C ABI, compiled by nvcc directly) when
all of these hold:

* ``LORAKERNELS_BUILD_EXT`` is ``auto`` (default) or ``1`` (``0`` never builds);
* ``nvcc`` is found (``$CUDA_HOME/bin`` or PATH);
* a CUDA build of torch is importable -- checked by reading ``torch/version.py``, never by
  importing torch, so an isolated build environment (which has no torch) simply skips;
* an arch list is given: ``LORAKERNELS_CUDA_ARCHS`` (``80,90``) or ``TORCH_CUDA_ARCH_LIST``
  (``8.0;9.0+PTX``), sm_80 or newer.

With ``auto`` a missing prerequisite or a failed compile prints the reason and installs the
package without the library; with ``1`` either is an error. The reason is stored next to the
library as ``_lib/build_status.txt`` and shown by ``python -m lorakernels``.

Typical GPU install:
``LORAKERNELS_BUILD_EXT=1 LORAKERNELS_CUDA_ARCHS=80,90 pip install --no-build-isolation .``
Without installing: ``python csrc/build.py --arch 80,90`` builds into ``lorakernels/_lib/``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent
MODES = ("auto", "0", "1")


@dataclass
class Plan:
    mode: str
    build: bool
    reason: str  # why not (or what will be built)
    archs: list[str] = field(default_factory=list)


def _csrc_build() -> ModuleType | None:
    """csrc/build.py loaded by path (stdlib only; the package itself is not imported)."""
    path = ROOT / "csrc" / "build.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("_lorakernels_csrc_build", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _torch_cuda() -> tuple[str | None, str]:
    """(torch.version.cuda, why not) without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None, (
            "torch is not importable in this build environment (pip's isolated builds have "
            "none: use --no-build-isolation)"
        )
    version_py = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        text = version_py.read_text()
    except OSError as exc:
        return None, f"cannot read {version_py}: {exc}"
    m = re.search(r"^cuda\s*(?::[^=\n]*)?=\s*['\"]([^'\"]+)['\"]", text, flags=re.MULTILINE)
    if not m:
        return None, f"the installed torch ({version_py.parent}) is a CPU-only build"
    return m.group(1), ""


@functools.cache
def plan() -> Plan:
    mode = os.environ.get("LORAKERNELS_BUILD_EXT", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise SystemExit(f"LORAKERNELS_BUILD_EXT={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "0":
        return Plan(mode, False, "LORAKERNELS_BUILD_EXT=0")
    csrc = _csrc_build()
    if csrc is None:
        return Plan(mode, False, "csrc/ is not part of this source tree")
    nvcc = csrc.find_nvcc()
    if nvcc is None:
        return Plan(mode, False, "nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    cuda, why = _torch_cuda()
    if cuda is None:
        return Plan(mode, False, why)
    spec = os.environ.get("LORAKERNELS_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not spec:
        return Plan(mode, False, "no arch list (set LORAKERNELS_CUDA_ARCHS, e.g. 80,90)")
    try:
        archs = csrc.parse_archs(spec)
    except ValueError as exc:
        return Plan(mode, False, str(exc))
    return Plan(mode, True, f"nvcc {nvcc}, torch CUDA {cuda}, archs {','.join(archs)}", archs)


class BuildPyWithNative(build_py):
    """build_py, then the native library into ``<build_lib>/lorakernels/_lib`` (or into the
    source tree for editable installs)."""

    def run(self) -> None:
        super().run()
        p = plan()
        if getattr(self, "editable_mode", False):
            out = ROOT / "lorakernels" / "_lib"
        else:
            out = Path(self.build_lib) / "lorakernels" / "_lib"
        out.mkdir(parents=True, exist_ok=True)
        if p.build:
            csrc = _csrc_build()
            try:
                res = csrc.build_library(p.archs, out)
                status = f"built ({p.reason})"
                print(f"lorakernels: native CUDA library {res.library} {status}")
            except (csrc.BuildError, ValueError, OSError) as exc:
                if p.mode == "1":
                    raise SystemExit(f"lorakernels: native CUDA build failed: {exc}") from exc
                status = f"skipped: the build failed ({str(exc).splitlines()[0]})"
                print(f"lorakernels: {status}; installing without it", file=sys.stderr)
        else:
            if p.mode == "1":
                raise SystemExit(f"lorakernels: LORAKERNELS_BUILD_EXT=1 but {p.reason}")
            status = f"skipped: {p.reason}"
            print(f"lorakernels: native CUDA library {status}")
        (out / "build_status.txt").write_text(status + "\n")


class NativeDistribution(Distribution):
    def has_ext_modules(self) -> bool:
        # a wheel that carries the .so must be platform-specific
        return plan().build


# ``lorakernels/_lib`` holds only build outputs (git ignores it). It must exist before setuptools
# discovers packages, so that it is found as the package ``lorakernels._lib`` that its files
# belong to; a fresh clone lacks it and setuptools then warns that the package is absent.
(ROOT / "lorakernels" / "_lib").mkdir(exist_ok=True)
setup(cmdclass={"build_py": BuildPyWithNative}, distclass=NativeDistribution)
