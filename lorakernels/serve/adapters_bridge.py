"""Every call the server makes into the diffusers integration and the adapter registry.

One small file on purpose: the adapter registry is being rebuilt (``AdapterLibrary``, a
residency pool with ``prefetch``/``stats`` and a public ``encode``). This module uses today's
``DiffusersLoRA`` (``load_dir``, ``spellings``, ``registry``, ``loaded``, ``ensure_loaded``,
``_encode``, ``use``); switching to the new API at merge touches only these functions.

Threading: the patched layers read one active batch, so every call that runs a model
(:func:`encode`, :func:`unet_mixtures`, :func:`load`) is made from the server's single worker
thread. Registry reads from other threads go through the server's lock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class AdapterInfo:
    """What ``GET /sdapi/v1/loras`` lists for one adapter."""

    name: str
    aliases: tuple[str, ...]
    path: str
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass
class PoolCounters:
    """Residency counters (today's integration keeps none, so the bridge counts)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    prefetched: int = 0


def patch(
    pipe: Any, lora_dirs: Sequence[str | Path], max_resident_adapters: int | None = None
) -> Any:
    """Patch ``pipe`` for per-row LoRAs and register every LoRA file of ``lora_dirs``.
    ``max_resident_adapters`` bounds the adapters held in the banks (LRU eviction)."""
    from ..integrations.diffusers import patch as _patch

    handle = _patch(pipe)
    for folder in lora_dirs:
        handle.load_dir(folder, lazy=True)
    handle._lk_serve_dirs = [Path(d) for d in lora_dirs]
    handle._lk_serve_pool = PoolCounters()
    handle._lk_serve_lru = OrderedDict()
    handle._lk_serve_budget = max_resident_adapters
    return handle


def spellings(handle: Any) -> dict[str, str]:
    """Every accepted spelling (stem, ``ss_output_name``) -> canonical adapter name."""
    return dict(handle.spellings)


def names(handle: Any) -> list[str]:
    return sorted(handle.registry)


def info(handle: Any, name: str) -> AdapterInfo:
    """Name, aliases, file and safetensors header metadata of adapter ``name`` (no tensors read)."""
    path = Path(handle.registry[name])
    aliases = tuple(s for s, c in handle.spellings.items() if c == name and s != name)
    metadata: dict[str, str] = {}
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    return AdapterInfo(name, aliases, str(path), metadata)


def refresh(handle: Any) -> list[str]:
    """Rescan the LoRA folders; new files become usable, known ones stay as they are."""
    for folder in handle._lk_serve_dirs:
        handle.load_dir(folder, lazy=True)
    return names(handle)


def resident(handle: Any, adapters: Collection[str]) -> bool:
    """Whether all of ``adapters`` are held in the banks now."""
    return all(name in handle.loaded for name in adapters)


def load(
    handle: Any, adapters: Sequence[str], *, keep: Collection[str] = (), prefetch: bool = False
) -> None:
    """Make ``adapters`` resident (worker thread only), evicting the least recently used ones
    outside ``keep`` (the adapters of requests in flight) past the budget. Counts hits and
    misses. A prefetch never evicts: it only fills free room."""
    pool: PoolCounters = handle._lk_serve_pool
    lru: OrderedDict = handle._lk_serve_lru
    budget = handle._lk_serve_budget
    for name in adapters:
        if name in handle.loaded:
            if not prefetch:
                pool.hits += 1
            lru[name] = None
            lru.move_to_end(name)
            continue
        if prefetch and budget is not None and len(handle.loaded) >= budget:
            continue
        handle.ensure_loaded([name])
        lru[name] = None
        if prefetch:
            pool.prefetched += 1
        else:
            pool.misses += 1
    if budget is None:
        return
    protected = set(keep) | set(adapters)
    for name in list(lru):
        if len(handle.loaded) <= budget:
            break
        if name not in protected and name in handle.loaded:
            handle.unload(name)
            del lru[name]
            pool.evictions += 1


def stats(handle: Any) -> dict[str, int]:
    """resident, hits, misses, evictions, prefetched."""
    pool: PoolCounters = handle._lk_serve_pool
    return {
        "resident": len(handle.loaded),
        "hits": pool.hits,
        "misses": pool.misses,
        "evictions": pool.evictions,
        "prefetched": pool.prefetched,
    }


def encode(
    handle: Any,
    texts: Sequence[str],
    negative_prompts: Sequence[str] | None,
    te_mixtures: Sequence[Mapping[str, float]],
    do_cfg: bool,
) -> dict[str, Any]:
    """Prompt embeddings, one row per text, each with its own text-encoder mixture (worker
    thread only): ``prompt_embeds`` and, with ``do_cfg``, ``negative_prompt_embeds`` (plus the
    pooled embeddings for SDXL). ``negative_prompts=None``: the pipeline's empty negative."""
    mixes = [dict(m) for m in te_mixtures]
    negatives = None if negative_prompts is None else list(negative_prompts)
    return handle._encode(list(texts), negatives, mixes, do_cfg)


@contextmanager
def unet_mixtures(handle: Any, mixtures: Sequence[Mapping[str, float]]) -> Iterator[None]:
    """Activate one UNet mixture per batch row of the next UNet call (worker thread only)."""
    with handle.use(unet=[dict(m) for m in mixtures]):
        yield
