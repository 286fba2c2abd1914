"""Build and inspect the native CUDA library ``liblorakernels_cuda.so`` (standard library only).

Used by ``setup.py`` (optional build at install time), by ``tests/test_cuda_build.py``
(compile checks) and from the command line::

    python csrc/build.py --arch 80,90                 # -> lorakernels/_lib/
    python csrc/build.py --arch "8.0;9.0" --out DIR --verbose

The library is a plain shared object with a C ABI (``csrc/include/lorakernels.h``), not a
torch extension: nvcc compiles ``csrc/cuda/*.cu`` to position-independent objects, one
process per source so that each ``ptxas -v`` report stays in one piece, and links them with
the static CUDA runtime so that the result depends only on the driver (``libcuda.so.1``,
looked up at the first CUDA call, never at load time).

Toolkit: a statically linked runtime needs a driver at least as new as the toolkit's CUDA
version, so a library built by nvcc 13 refuses to run on a cu12 machine whose driver runs
torch fine. The build therefore uses the toolkit matching ``torch.version.cuda`` (read from
``torch/version.py`` without importing torch): among ``$CUDA_HOME``, ``$CUDA_PATH``, ``nvcc``
on PATH, ``/usr/local/cuda-X.Y`` and pip's ``nvidia-cuda-nvcc`` wheels it takes one with the
same major.minor, else the same major; with none, the build stops and says which it found
(``--any-toolkit`` overrides, e.g. for compile-only checks). Which toolkit built the library
is written next to it (``build_info.txt``) and shown by ``python -m lorakernels``.

This file must keep importing without torch, setuptools or a GPU: an isolated build
environment has none of them.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

CSRC = Path(__file__).resolve().parent
ROOT = CSRC.parent
LIB_NAME = "liblorakernels_cuda.so"
BUILD_INFO = "build_info.txt"  # which toolkit built the library (read by lorakernels._native)
DEFAULT_OUT = ROOT / "lorakernels" / "_lib"
SOURCES = ("cuda/launch.cu", "cuda/sgmv_shrink.cu", "cuda/sgmv_expand.cu")
# Tensor-core instructions used (mma.sync m16n8k16 bf16, tf32 m16n8k8) need sm_80 or newer.
MIN_ARCH = 80


class BuildError(RuntimeError):
    """The native build failed; the message says which step and why."""


def find_nvcc() -> str | None:
    """``$CUDA_HOME/bin/nvcc`` (or ``$CUDA_PATH``), else ``nvcc`` on PATH, else None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def nvcc_candidates() -> list[str]:
    """Every nvcc this machine has, in order of preference (duplicates removed)."""
    found: list[str] = []
    first = find_nvcc()
    if first:
        found.append(first)
    roots = sorted(Path("/usr/local").glob("cuda*"), reverse=True)
    for key in ("purelib", "platlib"):
        roots.append(Path(sysconfig.get_paths()[key]) / "nvidia" / "cuda_nvcc")
    for root in roots:
        nvcc = root / "bin" / "nvcc"
        if nvcc.is_file() and os.access(nvcc, os.X_OK):
            found.append(str(nvcc))
    unique: list[str] = []
    for path in found:
        if all(Path(path).resolve() != Path(u).resolve() for u in unique):
            unique.append(path)
    return unique


@functools.cache
def nvcc_version(nvcc: str) -> str | None:
    """``"12.4"`` from ``nvcc --version`` (None when it cannot be run or read)."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False)
    except OSError:
        return None
    m = re.search(r"release (\d+\.\d+)", out.stdout + out.stderr)
    return m.group(1) if m else None


def torch_cuda_version() -> str | None:
    """``torch.version.cuda`` of the importable torch, read from its ``version.py`` without
    importing torch (None: no torch, or a CPU build)."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        text = (Path(next(iter(spec.submodule_search_locations))) / "version.py").read_text()
    except OSError:
        return None
    m = re.search(r"^cuda\s*(?::[^=\n]*)?=\s*['\"]([^'\"]+)['\"]", text, flags=re.MULTILINE)
    return m.group(1) if m else None


def select_nvcc(cuda_version: str | None) -> tuple[str, str]:
    """``(nvcc, note)``: the toolkit to build with for a torch built with ``cuda_version``.

    Same major.minor first, then the same major (the driver API is stable within a major);
    ``cuda_version=None`` (CPU torch, compile-only checks) takes the first nvcc found. Raises
    BuildError naming what was found when nothing matches.
    """
    candidates = nvcc_candidates()
    if not candidates:
        raise BuildError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    versions = [(c, nvcc_version(c)) for c in candidates]
    if cuda_version is None:
        nvcc, ver = versions[0]
        return nvcc, f"nvcc {ver} ({nvcc}); torch has no CUDA runtime to match"
    want_major = cuda_version.split(".")[0]
    for exact in (True, False):
        for nvcc, ver in versions:
            if ver is None:
                continue
            if ver == cuda_version or (not exact and ver.split(".")[0] == want_major):
                return nvcc, f"nvcc {ver} ({nvcc}) for torch CUDA {cuda_version}"
    seen = ", ".join(f"{c} (CUDA {v})" for c, v in versions)
    raise BuildError(
        f"no CUDA {want_major}.x toolkit found for torch built with CUDA {cuda_version} "
        f"(found: {seen}); a library statically linked by a newer toolkit needs a newer driver "
        "than torch does. Install the matching toolkit (or pip install "
        f"nvidia-cuda-nvcc-cu{want_major}), set CUDA_HOME, or pass --any-toolkit"
    )


@functools.cache
def _nvcc_env(nvcc: str) -> dict[str, str]:
    """nvcc's own settings (``TOP``, ``INCLUDES``, ...) from ``nvcc -dryrun``: the real CUDA
    directory even when ``nvcc`` on PATH is a wrapper script elsewhere."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cu"
        src.write_text("int main() { return 0; }\n")
        proc = subprocess.run(
            [nvcc, "-dryrun", "-c", str(src), "-o", str(Path(tmp) / "probe.o")],
            capture_output=True,
            text=True,
            check=False,
        )
    env: dict[str, str] = {}
    for line in (proc.stdout + proc.stderr).splitlines():
        if m := re.match(r"#\$ (\w+)=(.*)$", line.strip()):
            env.setdefault(m.group(1), m.group(2).strip())
    return env


def cuda_include_dirs(nvcc: str) -> list[str]:
    """The include directories nvcc passes to the host compiler (cuda_fp16.h lives there)."""
    env = _nvcc_env(nvcc)
    flags = shlex.split(env.get("INCLUDES", "")) + shlex.split(env.get("SYSTEM_INCLUDES", ""))
    dirs = [f.removeprefix("-I") for f in flags if f not in ("-isystem",)]
    return [d for d in dirs if d and Path(d).is_dir()]


def _cuda_bin_dirs(nvcc: str | None) -> list[Path]:
    """Directories that may hold CUDA binary tools: next to nvcc (a wrapper script on PATH may
    point elsewhere, so the CUDA_HOME of ``nvcc --version``'s install is tried too) and the
    ``nvidia/*/bin`` folders of pip's CUDA wheels (``nvidia-cuda-cuobjdump`` and friends)."""
    dirs: list[Path] = []
    if nvcc:
        dirs.append(Path(nvcc).resolve().parent)
        top = _nvcc_env(nvcc).get("TOP")
        if top:
            dirs.append(Path(top) / "bin")
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]) / "bin")
    dirs.append(Path("/usr/local/cuda/bin"))
    for key in ("purelib", "platlib"):
        nv = Path(sysconfig.get_paths()[key]) / "nvidia"
        if nv.is_dir():
            dirs.extend(sorted(nv.glob("*/bin")))
    return dirs


def find_tool(name: str, nvcc: str | None = None) -> str | None:
    """A CUDA binary tool (``cuobjdump``, ``nvdisasm``, ``ptxas``) on PATH or in a CUDA bin dir."""
    found = shutil.which(name)
    if found:
        return found
    for d in _cuda_bin_dirs(nvcc if nvcc is not None else find_nvcc()):
        if (d / name).is_file() and os.access(d / name, os.X_OK):
            return str(d / name)
    return None


def parse_archs(spec: str) -> list[str]:
    """``"8.0;9.0+PTX"``, ``"80,90"``, ``"8.6 9.0a"`` -> ``["80", "90+PTX"]`` etc.

    Accepts TORCH_CUDA_ARCH_LIST's spelling (dotted, ``;`` or spaces, ``+PTX``) and the
    compact one (``80,90``). Raises ValueError for anything else or for archs below sm_80.
    """
    archs: list[str] = []
    for tok in re.split(r"[;,\s]+", spec.strip()):
        if not tok:
            continue
        m = re.fullmatch(r"(\d+)(?:\.(\d))?([af]?)(\+PTX)?", tok, flags=re.IGNORECASE)
        if not m:
            raise ValueError(f"cannot read CUDA arch {tok!r} in {spec!r} (e.g. 80,90 or 8.0;9.0)")
        major, minor, suffix, ptx = m.groups()
        num = int(major + minor) if minor is not None else int(major)
        if num < MIN_ARCH:
            raise ValueError(
                f"CUDA arch {tok!r}: the kernels use sm_80 tensor-core instructions "
                f"(mma.sync bf16/tf32); the minimum is {MIN_ARCH}"
            )
        arch = f"{num}{suffix.lower()}" + ("+PTX" if ptx else "")
        if arch not in archs:
            archs.append(arch)
    if not archs:
        raise ValueError(f"empty CUDA arch list {spec!r}")
    return archs


def gencode_flags(archs: list[str]) -> list[str]:
    """``-gencode`` flags: SASS for each arch, plus PTX for those marked ``+PTX``."""
    flags: list[str] = []
    for arch in archs:
        num = arch.removesuffix("+PTX")
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
        if arch.endswith("+PTX"):
            flags += ["-gencode", f"arch=compute_{num},code=compute_{num}"]
    return flags


def _common_flags(archs: list[str]) -> list[str]:
    arch_list = ",".join(a.removesuffix("+PTX") for a in archs)
    return [
        "-std=c++17",
        "-O3",
        "-Xcompiler",
        "-fPIC,-fvisibility=hidden",
        "-I",
        str(CSRC / "include"),
        "-I",
        str(CSRC / "cuda"),
        f'-DLK_BUILD_ARCHS="{arch_list}"',
        "-Xptxas",
        "-v",
        *gencode_flags(archs),
    ]


@dataclass
class BuildResult:
    library: Path
    ptxas_log: str  # concatenated ``ptxas -v`` reports of all sources
    commands: list[list[str]]


def _run(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise BuildError(f"{what} failed (exit {proc.returncode}):\n{' '.join(cmd)}\n{out}")
    return out


def build_library(
    archs: list[str] | str,
    out_dir: str | os.PathLike[str] = DEFAULT_OUT,
    nvcc: str | None = None,
    jobs: int | None = None,
    verbose: bool = False,
    cuda_version: str | None = "torch",
) -> BuildResult:
    """Compile and link the library into ``out_dir``; returns its path and the ptxas report.

    ``nvcc`` given: used as is. Else the toolkit matching ``cuda_version`` (default
    ``"torch"``: ``torch.version.cuda``; ``None``: any; :func:`select_nvcc`). setup.py relies
    on the default. ``build_info.txt`` beside the library says which toolkit built it.
    """
    if isinstance(archs, str):
        archs = parse_archs(archs)
    if cuda_version == "torch":
        cuda_version = torch_cuda_version()
    if nvcc is None:
        nvcc, note = select_nvcc(cuda_version)
    else:
        note = f"nvcc {nvcc_version(nvcc)} ({nvcc})"
        if cuda_version:
            note += f" for torch CUDA {cuda_version}"
    out = Path(out_dir)
    obj_dir = out / "obj"
    obj_dir.mkdir(parents=True, exist_ok=True)
    common = _common_flags(archs)
    compiles = [
        [nvcc, *common, "-c", str(CSRC / src), "-o", str(obj_dir / (Path(src).stem + ".o"))]
        for src in SOURCES
    ]
    with ThreadPoolExecutor(max_workers=jobs or min(len(SOURCES), os.cpu_count() or 1)) as ex:
        logs = list(ex.map(lambda c: _run(c, f"nvcc {c[-3]}"), compiles))
    lib = out / LIB_NAME
    link = [
        nvcc,
        "-shared",
        "-cudart",
        "static",
        # keep the static runtime's symbols private: a process that also loaded torch's
        # libcudart must never bind our calls to it (or its calls to us)
        "-Xlinker",
        "--exclude-libs,ALL",
        "-Xlinker",
        "-Bsymbolic",
        *gencode_flags(archs),
        *[c[-1] for c in compiles],
        "-o",
        str(lib),
    ]
    _run(link, "linking " + LIB_NAME)
    shutil.rmtree(obj_dir, ignore_errors=True)
    (out / BUILD_INFO).write_text(f"{note}; archs {','.join(archs)}\n")
    log = "\n".join(logs)
    if verbose:
        print(log)
    return BuildResult(lib, log, [*compiles, link])


EMULATED_LIB_NAME = "liblorakernels_emulated.so"


def _host_compile(out: Path, nvcc: str | None, sources: list[str], flags: list[str]) -> Path:
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise BuildError("nvcc not found: the emulation needs the CUDA headers it ships")
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise BuildError("no host C++ compiler (g++/c++) found")
    out.parent.mkdir(parents=True, exist_ok=True)
    incs = [f"-I{d}" for d in (CSRC / "include", CSRC / "cuda", *cuda_include_dirs(nvcc))]
    cmd = [cxx, "-std=c++17", *flags, *incs, *(str(CSRC / s) for s in sources), "-o", str(out)]
    _run(cmd, f"compiling {out.name} with {cxx}")
    return out


def build_emulator(out_dir: str | os.PathLike[str], nvcc: str | None = None) -> Path:
    """The kernel bodies as host code, file-driven, under AddressSanitizer + UBSan
    (``csrc/emulate/emulate_main.cpp``); returns the executable."""
    return _host_compile(
        Path(out_dir) / "lk_emulate",
        nvcc,
        ["emulate/emulate_main.cpp", "emulate/emulate_lib.cpp"],
        [
            "-O1",
            "-g",
            "-fno-omit-frame-pointer",
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=undefined",
        ],
    )


def build_emulated_library(out_dir: str | os.PathLike[str], nvcc: str | None = None) -> Path:
    """The C ABI over the host emulation (``csrc/emulate/emulate_lib.cpp``) as a shared
    object that ``LORAKERNELS_CUDA_LIB`` can point at, so the Python side runs on CPU tensors."""
    return _host_compile(
        Path(out_dir) / EMULATED_LIB_NAME,
        nvcc,
        ["emulate/emulate_lib.cpp"],
        ["-O1", "-shared", "-fPIC", "-fvisibility=hidden"],
    )


# --------------------------------------------------------------------------- resource reports
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


@dataclass
class KernelResources:
    kernel: str
    arch: str
    registers: int
    stack: int
    spill_stores: int
    spill_loads: int
    smem: int


def parse_ptxas(log: str) -> list[KernelResources]:
    """Per-(kernel, arch) resources from ``ptxas -v`` output (one source's report at a time)."""
    rows: list[KernelResources] = []
    cur: dict[str, object] | None = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            cur = {"kernel": m.group(1), "arch": m.group(2)}
        elif cur is not None and (m := _FRAME.search(line)):
            cur.update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif cur is not None and (m := _USED.search(line)):
            cur.update(registers=int(m[1]), smem=int(m[2] or 0))
            rows.append(KernelResources(**cur))  # type: ignore[arg-type]
            cur = None
    return rows


def format_table(rows: list[KernelResources]) -> str:
    head = (
        f"{'kernel':22s} {'arch':6s} {'regs':>4s} {'stack':>5s} {'spill st/ld':>11s} {'smem':>6s}"
    )
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r.kernel, r.arch)):
        lines.append(
            f"{r.kernel:22s} {r.arch:6s} {r.registers:4d} {r.stack:5d} "
            f"{f'{r.spill_stores}/{r.spill_loads}':>11s} {r.smem:6d}"
        )
    return "\n".join(lines)


def sass_by_kernel(library: Path, cuobjdump: str) -> dict[tuple[str, str], str]:
    """``{(kernel, "sm_XX"): sass text}`` from ``cuobjdump -sass`` (needs nvdisasm nearby)."""
    env = dict(os.environ)
    nvdisasm = find_tool("nvdisasm")
    if nvdisasm:
        env["PATH"] = str(Path(nvdisasm).parent) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run(
        [cuobjdump, "-sass", str(library)], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        raise BuildError(f"cuobjdump -sass failed: {proc.stdout}{proc.stderr}")
    out: dict[tuple[str, str], str] = {}
    arch, func, buf = "", "", []
    for line in [*proc.stdout.splitlines(), "arch = end"]:
        arch_m = re.match(r"\s*arch = (\w+)", line)
        func_m = re.match(r"\s*Function : (\S+)", line)
        if (arch_m or func_m) and func:  # a function's listing ends at the next header
            out[(func, arch)] = "\n".join(buf)
            func, buf = "", []
        if arch_m:
            arch = arch_m.group(1)
        elif func_m:
            func = func_m.group(1)
        elif func:
            buf.append(line)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--arch",
        default=os.environ.get("LORAKERNELS_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST"),
        help="e.g. 80,90 or '8.0;9.0+PTX' (default: $LORAKERNELS_CUDA_ARCHS, "
        "$TORCH_CUDA_ARCH_LIST)",
    )
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output directory")
    ap.add_argument("--verbose", action="store_true", help="print the ptxas report")
    ap.add_argument(
        "--cuda-version",
        default=torch_cuda_version(),
        help="CUDA version the toolkit must match (default: torch.version.cuda)",
    )
    ap.add_argument(
        "--any-toolkit",
        action="store_true",
        help="build with the first nvcc found even if it does not match torch's CUDA",
    )
    args = ap.parse_args(argv)
    if not args.arch:
        ap.error("no arch list: pass --arch or set LORAKERNELS_CUDA_ARCHS")
    try:
        cuda = None if args.any_toolkit else args.cuda_version
        res = build_library(args.arch, args.out, verbose=args.verbose, cuda_version=cuda)
    except (BuildError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_table(parse_ptxas(res.ptxas_log)))
    print(f"built {res.library}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
