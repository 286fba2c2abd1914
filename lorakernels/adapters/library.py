"""``AdapterLibrary``: every adapter a process knows, by name, and a bounded host cache.

Sources: LoRA files (``.safetensors``, ``.pt``, ``.pth``, ``.bin``, ``.ckpt``), folders of them,
and in-memory factor dicts ``{component: {module_path: (A, B, alpha)}}``. The library knows no
model: managers resolve an adapter's layers against their own module paths.

- Scans read headers only: a ``.safetensors`` file costs its 8-byte length and JSON header
  (names: the file stem and kohya's ``ss_output_name``); a torch pickle is registered by stem
  and read on first use. A file whose header is broken is still registered (with a warning),
  so that the error names it when a prompt first uses it, and the rest of the folder works.
- Staleness: every :meth:`get` compares the file's ``(mtime_ns, size)`` with what was read; a
  changed file is re-read, a vanished one raises naming it. :meth:`refresh` rescans the
  folders: new files are added, changed ones re-read (headers), removed ones forgotten.
- Host cache: parsed files (:class:`~lorakernels.formats.LoRAFile`, factors in the file's
  dtype, Tucker folded, NaN/inf refused) are kept in an LRU bounded by ``cache_bytes`` (bytes
  of tensor data); on CUDA machines the tensors are copied to pinned memory so host→device
  copies run asynchronously.

Thread safety: every public method may be called from any thread (one lock guards the tables
and the cache; file reads run outside it, so a slow read does not block cache hits).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..formats import LoRAFile, LoRAFormatError, LoRAFormatWarning, read_header, read_lora_file
from ..formats.file_info import aliases as file_aliases

LORA_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")

#: In-memory source: component -> module path -> (A, B, alpha) (or an object with .down/.up/.alpha).
FactorDict = Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class AdapterInfo:
    """What the library knows about one adapter without reading its tensors.

    Attributes:
        name: the canonical name.
        aliases: other accepted spellings (e.g. ``ss_output_name``).
        path: the file, or ``None`` for an in-memory source.
        metadata: the safetensors header metadata (empty for pickles and dicts).
        header_error: why the header could not be read at scan time (the adapter then fails
            at first use, naming the file), or ``None``.
        max_rank: the largest rank among its down factors, from the header's shapes (``None``
            for pickles, which are read only on first use).
    """

    name: str
    aliases: tuple[str, ...]
    path: str | None
    metadata: Mapping[str, str] = field(default_factory=dict)
    header_error: str | None = None
    max_rank: int | None = None


def _header_rank(entries: Mapping[str, tuple[str, tuple[int, ...]]]) -> int | None:
    ranks = [
        shape[0]
        for key, (_, shape) in entries.items()
        if shape and (".lora_down." in key or ".lora_A." in key or key.endswith("down.weight"))
    ]
    return max(ranks) if ranks else None


@dataclass
class _Entry:
    info: AdapterInfo
    source: Path | FactorDict
    strict: bool
    folder: Path | None  # the scanned folder it came from (refresh forgets it with the file)
    stamp: tuple[int, int] | int  # (mtime_ns, size) of the file; a counter for dicts


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def _nbytes(value: LoRAFile | FactorDict) -> int:
    if isinstance(value, LoRAFile):
        return sum(
            lay.weights.down.numel() * lay.weights.down.element_size()
            + lay.weights.up.numel() * lay.weights.up.element_size()
            for lay in value.layers
        )
    total = 0
    for layers in value.values():
        for v in layers.values():
            for t in _factors(v):
                total += t.numel() * t.element_size()
    return total


def _factors(value: Any) -> tuple[Tensor, ...]:
    if isinstance(value, tuple | list):
        return tuple(t for t in value[:2] if isinstance(t, Tensor))
    return tuple(
        t for t in (getattr(value, "down", None), getattr(value, "up", None)) if t is not None
    )


def _check_dict(name: str, source: Any) -> None:
    """Shape of an in-memory source, and no NaN/inf in its factors."""
    if not isinstance(source, Mapping) or not source:
        raise TypeError(
            f"adapter {name!r}: source must be a file path or a non-empty "
            "{component: {module_path: (A, B, alpha)}} dict"
        )
    for comp, layers in source.items():
        if not isinstance(comp, str) or not isinstance(layers, Mapping):
            raise TypeError(
                f"adapter {name!r}: source[{comp!r}] must map module paths to (A, B, alpha)"
            )
        for path, value in layers.items():
            factors = _factors(value)
            if len(factors) != 2:
                raise TypeError(
                    f"adapter {name!r} layer {comp}:{path}: expected (A, B, alpha) tensors, "
                    f"got {type(value).__name__}"
                )
            bad = sum(int(t.numel() - torch.isfinite(t).sum()) for t in factors)
            if bad:
                raise ValueError(f"adapter {name!r} layer {comp}:{path} holds {bad} NaN/inf values")


def _pinned(lora: LoRAFile) -> LoRAFile:
    layers = tuple(
        dataclasses.replace(
            lay,
            weights=dataclasses.replace(
                lay.weights, down=lay.weights.down.pin_memory(), up=lay.weights.up.pin_memory()
            ),
        )
        for lay in lora.layers
    )
    return dataclasses.replace(lora, layers=layers)


class AdapterLibrary:
    """Names → adapter sources, with a host cache of parsed factors bounded in bytes.

    Args:
        cache_bytes: bound on the tensor bytes of parsed adapters kept in host memory (LRU).
            An adapter larger than the bound is read on every use and never cached.
        pin_memory: keep cached factors in pinned memory (default: when CUDA is available).
    """

    def __init__(self, *, cache_bytes: int = 2 << 30, pin_memory: bool | None = None) -> None:
        if not isinstance(cache_bytes, int) or cache_bytes < 0:
            raise ValueError(f"cache_bytes must be an int >= 0, got {cache_bytes!r}")
        self.cache_bytes = cache_bytes
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self._spellings: dict[str, str] = {}
        self._folders: list[Path] = []
        # name -> (stamp, parsed source, bytes, {key: what a consumer derived from it})
        self._cache: OrderedDict[str, tuple[Any, LoRAFile | FactorDict, int, dict]]
        self._cache = OrderedDict()
        self._derived_mem: dict[str, tuple[Any, dict]] = {}  # the same for in-memory sources
        self._cached_bytes = 0
        self._counter = 0
        self.hits = 0
        self.misses = 0
        self.reads = 0

    # ------------------------------------------------------------------ registration
    def add(
        self,
        name: str,
        source: str | os.PathLike[str] | FactorDict,
        aliases: Sequence[str] = (),
        *,
        strict: bool = True,
    ) -> str:
        """Register ``name`` for a file (header read now, tensors on first use) or an
        in-memory ``{component: {module_path: (A, B, alpha)}}`` dict; returns ``name``.

        ``strict`` is passed to :func:`~lorakernels.formats.read_lora_file` when the file is
        read. A file's stem and ``ss_output_name`` also become aliases where no other adapter
        spells them. Raises ``ValueError`` if ``name`` or a given alias is taken by another
        adapter, ``FileNotFoundError`` for a missing file, ``LoRAFormatError`` for a broken
        header.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty string, got {name!r}")
        aliases = tuple(a for a in aliases if a != name)
        if isinstance(source, str | os.PathLike):
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"adapter {name!r}: no such file {path}")
            head = read_header(path)
            meta, rank = (head[0], _header_rank(head[1])) if head is not None else ({}, None)
            info = AdapterInfo(name, aliases, str(path), meta, None, rank)
            entry = _Entry(info, path, strict, None, _stamp(path))
            implied = [a for a in file_aliases(path.stem, meta) if a != name and a not in aliases]
            with self._lock:
                free = tuple(a for a in implied if a not in self._spellings)
                entry.info = dataclasses.replace(info, aliases=aliases + free)
                self._insert(entry)
            return name
        else:
            _check_dict(name, source)
            with self._lock:
                self._counter += 1
                stamp = self._counter
            rank = max(_factors(v)[0].shape[0] for ly in source.values() for v in ly.values())
            info = AdapterInfo(name, aliases, None, {}, None, int(rank))
            entry = _Entry(info, source, strict, None, stamp)
        with self._lock:
            self._insert(entry)
        return name

    def _insert(self, entry: _Entry) -> None:
        name = entry.info.name
        for spelling in (name, *entry.info.aliases):
            owner = self._spellings.get(spelling)
            if owner is not None and owner != name:
                raise ValueError(
                    f"adapter name {spelling!r} is taken by {owner!r} "
                    f"({self._entries[owner].info.path or 'in memory'})"
                )
        if name in self._entries:
            raise ValueError(f"adapter {name!r} is already registered; remove() it first")
        self._entries[name] = entry
        for spelling in (name, *entry.info.aliases):
            self._spellings[spelling] = name

    def remove(self, name: str) -> None:
        """Forget adapter ``name`` (any spelling) and drop it from the host cache."""
        with self._lock:
            canon = self.resolve(name)
            entry = self._entries.pop(canon)
            for spelling in (canon, *entry.info.aliases):
                if self._spellings.get(spelling) == canon:
                    del self._spellings[spelling]
            self._uncache(canon)

    def add_dir(self, folder: str | os.PathLike[str]) -> list[str]:
        """Register every LoRA file in ``folder`` by stem and ``ss_output_name`` alias,
        reading headers only; returns the names added (files already registered are kept).

        A file whose header cannot be read is registered anyway and warned about; it fails,
        naming the file, when first used. Stems taken by another adapter are skipped with a
        warning. :meth:`refresh` rescans the folder later.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise NotADirectoryError(f"add_dir: {folder} is not a directory")
        with self._lock:
            if folder not in self._folders:
                self._folders.append(folder)
        return self._scan(folder)[0]

    def _scan(self, folder: Path) -> tuple[list[str], list[str]]:
        """Add new files of ``folder``; returns (added, changed)."""
        added, changed = [], []
        known = {e.source: e for e in list(self._entries.values()) if isinstance(e.source, Path)}
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in LORA_SUFFIXES or not path.is_file():
                continue
            old = known.get(path)
            try:
                stamp = _stamp(path)
            except FileNotFoundError:
                continue  # vanished while scanning
            if old is not None:
                if old.stamp != stamp:
                    self._reheader(old, path, stamp)
                    changed.append(old.info.name)
                continue
            entry = self._scanned_entry(path, folder, stamp)
            with self._lock:
                # an alias (ss_output_name) another adapter already spells is left out, not
                # the file: copies of a file share their ss_output_name, their stems differ
                free = tuple(a for a in entry.info.aliases if a not in self._spellings)
                if free != entry.info.aliases and path.stem not in self._spellings:
                    taken = sorted(set(entry.info.aliases) - set(free))
                    warnings.warn(
                        f"{path}: registered as {path.stem!r} without the alias(es) {taken}, "
                        "which other adapters spell",
                        LoRAFormatWarning,
                        stacklevel=3,
                    )
                    entry.info = dataclasses.replace(entry.info, aliases=free)
                try:
                    self._insert(entry)
                except ValueError as exc:
                    warnings.warn(f"{path}: not registered: {exc}", LoRAFormatWarning, stacklevel=3)
                    continue
            added.append(entry.info.name)
        return added, changed

    def _scanned_entry(self, path: Path, folder: Path | None, stamp: tuple[int, int]) -> _Entry:
        meta: dict[str, str] = {}
        error = None
        rank = None
        try:
            head = read_header(path)
            if head is not None:
                meta, rank = head[0], _header_rank(head[1])
        except LoRAFormatError as exc:
            error = str(exc)
            warnings.warn(
                f"{exc} (registered as {path.stem!r}; using it will raise)",
                LoRAFormatWarning,
                stacklevel=4,
            )
        aliases = file_aliases(path.stem, meta)[1:]  # the stem is the name itself
        info = AdapterInfo(path.stem, aliases, str(path), meta, error, rank)
        return _Entry(info, path, True, folder, stamp)

    def _reheader(self, entry: _Entry, path: Path, stamp: tuple[int, int]) -> None:
        fresh = self._scanned_entry(path, entry.folder, stamp)
        with self._lock:
            entry.info = dataclasses.replace(fresh.info, aliases=entry.info.aliases)
            entry.stamp = stamp
            self._uncache(entry.info.name)

    def refresh(self) -> dict[str, list[str]]:
        """Rescan: add new files of the scanned folders, re-read the headers of changed files
        (their cached factors are dropped), forget adapters whose file is gone.

        Returns ``{"added": [...], "changed": [...], "removed": [...]}``.
        """
        removed = []
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            if isinstance(entry.source, Path) and not entry.source.is_file():
                self.remove(entry.info.name)
                removed.append(entry.info.name)
        added, changed = [], []
        for folder in list(self._folders):
            if folder.is_dir():
                a, c = self._scan(folder)
                added += a
                changed += c
        for entry in entries:
            if (
                entry.folder is None
                and isinstance(entry.source, Path)
                and entry.info.name not in removed
            ):
                stamp = _stamp(entry.source)
                if stamp != entry.stamp:
                    self._reheader(entry, entry.source, stamp)
                    changed.append(entry.info.name)
        return {"added": added, "changed": sorted(set(changed)), "removed": removed}

    # ------------------------------------------------------------------ lookup
    def resolve(self, spelling: str) -> str:
        """The canonical name for ``spelling`` (a name or alias); ``KeyError`` naming the
        unknown adapter and the closest known names otherwise."""
        with self._lock:
            canon = self._spellings.get(spelling)
            if canon is not None:
                return canon
            known = sorted(self._spellings)
        close = difflib.get_close_matches(str(spelling), known, n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(
            f"unknown adapter {spelling!r}{hint} ({len(self._entries)} adapters known"
            f"{': ' + ', '.join(known[:20]) if len(known) <= 20 else ''})"
        )

    def __contains__(self, spelling: object) -> bool:
        with self._lock:
            return spelling in self._spellings

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """Canonical names, sorted."""
        with self._lock:
            return sorted(self._entries)

    def spellings(self) -> dict[str, str]:
        """Every accepted spelling → canonical name (a copy)."""
        with self._lock:
            return dict(self._spellings)

    def info(self, name: str) -> AdapterInfo:
        """:class:`AdapterInfo` of ``name`` (any spelling)."""
        with self._lock:
            return self._entries[self.resolve(name)].info

    def stamp(self, name: str) -> tuple[int, int] | int:
        """The version of ``name``'s source last registered or read (changes when the file
        does): managers key what they derive from an adapter on ``(name, stamp)``."""
        with self._lock:
            return self._entries[self.resolve(name)].stamp

    def current_stamp(self, name: str) -> Any:
        """The stamp ``name``'s source has now: ``(mtime_ns, size)`` of its file as on disk
        (one ``stat``), the counter for in-memory sources. ``FileNotFoundError`` naming the
        file when it vanished."""
        with self._lock:
            entry = self._entries[self.resolve(name)]
        if not isinstance(entry.source, Path):
            return entry.stamp
        try:
            return _stamp(entry.source)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"adapter {entry.info.name!r}: its file {entry.source} no longer exists"
            ) from None

    # ------------------------------------------------------------------ reading
    def get(self, name: str) -> tuple[LoRAFile | FactorDict, tuple[int, int] | int]:
        """``(parsed source, stamp)`` of ``name``: a :class:`LoRAFile` for files, the dict for
        in-memory sources. Served from the host cache unless the file changed on disk.

        Raises:
            KeyError: unknown name.
            FileNotFoundError: the file vanished (named).
            LoRAFormatError: the file is corrupt, truncated, or holds NaN/inf (named).
        """
        with self._lock:
            canon = self.resolve(name)
            entry = self._entries[canon]
            source = entry.source
            if not isinstance(source, Path):
                return source, entry.stamp
        try:
            stamp = _stamp(source)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"adapter {canon!r}: its file {source} no longer exists"
            ) from None
        with self._lock:
            hit = self._cache.get(canon)
            if hit is not None and hit[0] == stamp:
                self._cache.move_to_end(canon)
                self.hits += 1
                return hit[1], stamp
            self.misses += 1
        lora = read_lora_file(source, strict=entry.strict)
        if _stamp(source) != stamp:  # rewritten while we read it: read the new version
            return self.get(name)
        if self.pin_memory:
            lora = _pinned(lora)
        with self._lock:
            self.reads += 1
            if self._entries.get(canon) is entry:
                entry.stamp = stamp
                self._uncache(canon)
                nbytes = _nbytes(lora)
                if nbytes <= self.cache_bytes:
                    self._cache[canon] = (stamp, lora, nbytes, {})
                    self._cached_bytes += nbytes
                    while self._cached_bytes > self.cache_bytes:
                        old, (_, _, n, _) = self._cache.popitem(last=False)
                        self._cached_bytes -= n
        return lora, stamp

    def derived(self, name: str, stamp: Any, key: Any, build: Any) -> Any:
        """``build()``, memoised with ``name``'s host-cache entry under ``key`` while the entry
        holds ``stamp`` (so it is dropped with the entry and never outlives a file change).

        Managers keep their checked, reshaped per-layer plans here: views of the cached
        factors, no extra memory. Uncached adapters just get ``build()``.
        """
        with self._lock:
            canon = self.resolve(name)
            entry = self._entries[canon]
            if not isinstance(entry.source, Path):
                memo = self._derived_mem.get(canon)
                if memo is None or memo[0] != entry.stamp:
                    memo = self._derived_mem[canon] = (entry.stamp, {})
                store: dict | None = memo[1] if memo[0] == stamp else None
            else:
                hit = self._cache.get(canon)
                store = hit[3] if hit is not None and hit[0] == stamp else None
            if store is not None and key in store:
                return store[key]
        value = build()
        if store is not None:
            with self._lock:
                store[key] = value
        return value

    def _uncache(self, canon: str) -> None:
        self._derived_mem.pop(canon, None)
        old = self._cache.pop(canon, None)
        if old is not None:
            self._cached_bytes -= old[2]

    @property
    def cached_bytes(self) -> int:
        """Tensor bytes held by the host cache (``<= cache_bytes``)."""
        return self._cached_bytes

    def cached(self) -> list[str]:
        """Names in the host cache, least recently used first."""
        with self._lock:
            return list(self._cache)

    def stats(self) -> dict[str, int]:
        """``adapters``, ``cached``, ``cached_bytes``, ``hits``, ``misses``, ``reads``."""
        with self._lock:
            return {
                "adapters": len(self._entries),
                "cached": len(self._cache),
                "cached_bytes": self._cached_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "reads": self.reads,
            }

    def __repr__(self) -> str:
        return (
            f"AdapterLibrary(adapters={len(self._entries)}, cached={len(self._cache)}, "
            f"cached_bytes={self._cached_bytes}/{self.cache_bytes})"
        )
