"""Locate and load the optional native CUDA library, and say why it is absent.

The library (``lorakernels/_lib/liblorakernels_cuda.so``, C ABI in
``csrc/include/lorakernels.h``) is built only where nvcc, a CUDA build of torch and an arch
list are all present (see ``setup.py``). This module imports neither torch nor the library
at import time; :func:`load` dlopens it on first use and :func:`status` reports on it.
``LORAKERNELS_CUDA_LIB`` points at another copy (tests, out-of-tree builds).
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
from pathlib import Path

LIB_NAME = "liblorakernels_cuda.so"
ABI_VERSION = 1  # LK_ABI_VERSION in csrc/include/lorakernels.h
ENV_LIB = "LORAKERNELS_CUDA_LIB"
_LIB_DIR = Path(__file__).resolve().parent / "_lib"
# Written by setup.py next to the library: why the build was skipped, when it was.
_STATUS_FILE = "build_status.txt"
# Written by csrc/build.py next to the library: the toolkit that built it ("nvcc 12.4 (...)").
_BUILD_INFO = "build_info.txt"

# lk_dtype values
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}

_c_ptr, _i64, _i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "lk_abi_version": (_i32, []),
    "lk_build_archs": (ctypes.c_char_p, []),
    "lk_last_error": (ctypes.c_char_p, []),
    "lk_device_count": (_i32, [ctypes.POINTER(ctypes.c_int)]),
    "lk_check_device": (_i32, [_i32]),
    "lk_sgmv_shrink": (
        _i32,
        # dtype, x, ldx, lora_a, lda, t, ldt, slot_start, slot_rank, row_ptr, entry_ptr,
        # entry_slot, num_samples, num_slots, bank_rows, K, max_rows, max_entries, max_rank,
        # stream
        [_i32, _c_ptr, _i64, _c_ptr, _i64, _c_ptr, _i64, *[_c_ptr] * 5, *[_i64] * 7, _c_ptr],
    ),
    "lk_sgmv_expand": (
        _i32,
        # dtype, y_in_dtype, y_in, ldyi, y_out, ldyo, t, ldt, lora_bt, ldb, slot_start,
        # slot_rank, slot_scale, row_ptr, entry_ptr, entry_slot, entry_weight, num_samples,
        # num_slots, bank_rows, N, max_rows, max_entries, max_rank, stream
        [
            _i32,
            _i32,
            _c_ptr,
            _i64,
            _c_ptr,
            _i64,
            _c_ptr,
            _i64,
            _c_ptr,
            _i64,
            *[_c_ptr] * 7,
            *[_i64] * 7,
            _c_ptr,
        ],
    ),
}


def library_path() -> Path:
    """Where the library is looked for: ``$LORAKERNELS_CUDA_LIB`` or the package's ``_lib/``."""
    env = os.environ.get(ENV_LIB)
    return Path(env) if env else _LIB_DIR / LIB_NAME


def _build_note() -> str:
    note = _LIB_DIR / _STATUS_FILE
    try:
        text = note.read_text().strip()
    except OSError:
        return ""
    return f"; install-time build: {text}" if text else ""


@functools.cache
def _load(path: str) -> tuple[ctypes.CDLL | None, str]:
    p = Path(path)
    if not p.is_file():
        return None, (
            f"lorakernels native CUDA library not built ({p} does not exist{_build_note()}; "
            "build it on a machine with nvcc: `python csrc/build.py --arch 80,90`, or install "
            "with LORAKERNELS_BUILD_EXT=1 LORAKERNELS_CUDA_ARCHS=80,90 and a CUDA torch)"
        )
    try:
        lib = ctypes.CDLL(str(p))
    except OSError as exc:
        return None, f"lorakernels native CUDA library {p} failed to load: {exc}"
    try:
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = argtypes
    except AttributeError as exc:
        return None, f"lorakernels native CUDA library {p} lacks an entry point: {exc}"
    abi = lib.lk_abi_version()
    if abi != ABI_VERSION:
        return None, (
            f"lorakernels native CUDA library {p} has ABI {abi}, this package expects "
            f"{ABI_VERSION}: rebuild it"
        )
    archs = lib.lk_build_archs().decode()
    return lib, f"{p} (ABI {abi}, compiled for compute capabilities {archs}{_toolkit_note(p)})"


def _toolkit_note(lib_path: Path) -> str:
    """``; built by nvcc X.Y ...`` from ``build_info.txt``, with a warning when its CUDA major
    differs from torch's (a statically linked newer runtime needs a newer driver)."""
    try:
        info = (lib_path.parent / _BUILD_INFO).read_text().strip()
    except OSError:
        return "; toolkit unknown (no build_info.txt)"
    note = f"; built by {info}"
    built = re.match(r"nvcc (\d+)\.", info)
    try:
        import torch

        torch_cuda = torch.version.cuda
    except ImportError:
        torch_cuda = None
    if built and torch_cuda and built.group(1) != torch_cuda.split(".")[0]:
        note += (
            f"; WARNING: torch uses CUDA {torch_cuda}, so a driver older than CUDA "
            f"{built.group(1)}'s makes this library fail (rebuild with `python csrc/build.py`)"
        )
    return note


def load() -> ctypes.CDLL:
    """The loaded library; raises RuntimeError with the reason when it is absent or broken."""
    lib, why = _load(str(library_path()))
    if lib is None:
        raise RuntimeError(why)
    return lib


def status() -> tuple[bool, str]:
    """``(present, sentence)``: whether the native library loads, and where from or why not."""
    lib, why = _load(str(library_path()))
    return lib is not None, why


def last_error(lib: ctypes.CDLL) -> str:
    return (lib.lk_last_error() or b"").decode(errors="replace")


def check(lib: ctypes.CDLL, code: int, what: str) -> None:
    """Raise RuntimeError carrying the library's message when ``code`` is not LK_OK."""
    if code != 0:
        kind = {1: "invalid argument", 2: "CUDA error"}.get(code, f"status {code}")
        raise RuntimeError(f"{what} failed ({kind}): {last_error(lib)}")


def device_problem(lib: ctypes.CDLL, device_index: int | None = None) -> str | None:
    """None when the library can launch on the device (current device when None), else why."""
    count = ctypes.c_int(0)
    if lib.lk_device_count(ctypes.byref(count)) != 0:
        return last_error(lib)
    if count.value == 0:
        return "no CUDA device is visible to the native library"
    if device_index is not None and lib.lk_check_device(device_index) != 0:
        return last_error(lib)
    return None
