"""Reading a file into ``{key: tensor}`` plus its header metadata, with clear errors.

``.safetensors`` files are opened with ``safetensors.safe_open`` (memory-mapped; every tensor is
copied out once). Before that, the 8-byte length and the JSON header are checked here, because
the library's own errors name neither the file nor what is wrong with it ("header too large" for
a text file, "not fully covered" for a truncated download). ``.pt``/``.pth``/``.bin``/``.ckpt``
files go through ``torch.load(weights_only=True)`` (no code execution) and must hold a flat
``{str: Tensor}`` dict, optionally wrapped in ``{"state_dict": …}``.

Tensors keep the file's dtype; nothing is converted here.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from .errors import LoRAFormatError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

# safetensors caps its JSON header at 100 MB; anything larger is garbage, not a header.
_MAX_HEADER_BYTES = 100_000_000

_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def read_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read every tensor of a LoRA file.

    Args:
        path: a ``.safetensors`` file, or a torch pickle (``.pt``, ``.pth``, ``.bin``, ``.ckpt``).
            Other suffixes are sniffed: a safetensors header is recognised, anything else is
            tried as a torch pickle.

    Returns:
        ``(tensors, metadata)``: ``metadata`` is the safetensors ``__metadata__`` (empty for
        pickles).

    Raises:
        LoRAFormatError: missing, empty, truncated or garbage file, or non-tensor content; the
            message names the file.
    """
    p, size, safetensors = _existing(path)
    if safetensors:
        return _read_safetensors(p, size)
    return _read_pickle(p), {}


def read_header(
    path: str | os.PathLike[str],
) -> tuple[dict[str, str], dict[str, tuple[str, tuple[int, ...]]]] | None:
    """Read only a safetensors file's header: ``(metadata, {key: (dtype, shape)})``.

    Reads the 8-byte length and the JSON header, never the tensor data (a folder of
    thousands of files scans in milliseconds per file). Returns ``None`` for torch pickles,
    whose keys cannot be known without unpickling the whole file.

    Raises:
        LoRAFormatError: missing, empty, garbage or truncated file (the header's sizes are
            checked against the file size), naming the file.
    """
    p, size, safetensors = _existing(path)
    if not safetensors:
        return None
    header = _read_header(p, size)
    raw_meta = header.get("__metadata__") or {}
    metadata = {str(k): str(v) for k, v in raw_meta.items()} if isinstance(raw_meta, dict) else {}
    entries = {
        k: (str(v["dtype"]), tuple(int(d) for d in v["shape"]))  # type: ignore[index]
        for k, v in header.items()
        if k != "__metadata__"
    }
    return metadata, entries


def _existing(path: str | os.PathLike[str]) -> tuple[Path, int, bool]:
    """``(path, size in bytes, read as safetensors?)`` of an existing, non-empty file (by its
    suffix; an unknown suffix by its first bytes); LoRAFormatError naming the file otherwise."""
    p = Path(path)
    if not p.is_file():
        raise LoRAFormatError(f"{p}: no such LoRA file")
    size = p.stat().st_size
    if size == 0:
        raise LoRAFormatError(f"{p}: the file is empty (0 bytes)")
    suffix = p.suffix.lower()
    safetensors = suffix in SAFETENSORS_SUFFIXES or (
        suffix not in PICKLE_SUFFIXES and _looks_safetensors(p)
    )
    return p, size, safetensors


def _looks_safetensors(p: Path) -> bool:
    with p.open("rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _read_header(p: Path, size: int) -> dict[str, object]:
    """Parse and check the safetensors header without touching the tensor data."""
    if size < 8:
        raise LoRAFormatError(f"{p}: not a safetensors file (only {size} bytes)")
    with p.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > _MAX_HEADER_BYTES or n > size - 8:
            raise LoRAFormatError(
                f"{p}: not a safetensors file (its first 8 bytes announce a {n}-byte header, "
                f"the file has {size} bytes): garbage or another format"
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoRAFormatError(f"{p}: not a safetensors file (header is not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise LoRAFormatError(f"{p}: not a safetensors file (header is not a JSON object)")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            shape, dtype = info["shape"], info["dtype"]
        except (TypeError, KeyError, ValueError) as exc:
            raise LoRAFormatError(
                f"{p}: malformed safetensors header entry for key {key!r}"
            ) from exc
        expected = _DTYPE_BYTES.get(dtype)
        if expected is not None:
            numel = 1
            for d in shape:
                numel *= int(d)
            if stop - start != numel * expected:
                raise LoRAFormatError(
                    f"{p}: key {key!r} declares shape {shape} {dtype} but {stop - start} bytes"
                )
        end = max(end, int(stop))
    if 8 + n + end > size:
        raise LoRAFormatError(
            f"{p}: the file is truncated: its header declares {8 + n + end} bytes of data, "
            f"the file has only {size} bytes (an interrupted download?)"
        )
    return header


def _read_safetensors(p: Path, size: int) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    _read_header(p, size)
    try:
        with safe_open(str(p), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 (not a dict)
    except SafetensorError as exc:
        raise LoRAFormatError(f"{p}: unreadable safetensors file: {exc}") from exc
    return tensors, metadata


def _read_pickle(p: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (torch.load raises many types; all mean "unreadable")
        raise LoRAFormatError(
            f"{p}: not a readable torch checkpoint with weights_only=True "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    if (
        isinstance(obj, Mapping)
        and set(obj) == {"state_dict"}
        and isinstance(obj["state_dict"], Mapping)
    ):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise LoRAFormatError(
            f"{p}: expected a dict of tensors, the checkpoint holds a {type(obj).__name__}"
        )
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            n_bad = sum(
                1 for k2, v2 in obj.items() if not (isinstance(k2, str) and isinstance(v2, Tensor))
            )
            raise LoRAFormatError(
                f"{p}: expected a dict of str -> tensor; {n_bad} entries are not, "
                f"e.g. key {k!r} holding a {type(v).__name__}"
            )
    return dict(obj)
