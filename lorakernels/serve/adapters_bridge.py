"""Every call the server makes into the diffusers integration and the adapter library.

One small file so that the server's view of adapters is in one place: names and files come
from the :class:`~lorakernels.AdapterLibrary` (header-only scans, ``refresh``), residency from
the pool inside :class:`~lorakernels.integrations.diffusers.DiffusersLoRA` (budget, LRU,
``pin``, background ``prefetch``, ``stats``).

Residency rule: step-level batching keeps requests in flight for many UNet calls, and a call
holds only some of them, so the adapters of every admitted request are *pinned* (the pool
would otherwise evict an in-flight request's adapter between two of its steps and read it
again at the next). :func:`load` re-syncs the pinned set to the in-flight adapters at each
admission; where the budget cannot pin them all, the request's adapters are loaded unpinned
(correct, possibly reloaded later).

Threading: the active batch is per thread, and every call that runs a model
(:func:`encode`, :func:`unet_mixtures`, :func:`load`) is made from the server's one worker
thread; :func:`prefetch` returns at once (the pool reads files on its own thread).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..adapters import AdapterInfo, AdapterLibrary

__all__ = ["AdapterInfo"]


def patch(
    pipe: Any, lora_dirs: Sequence[str | Path], max_resident_adapters: int | None = None
) -> Any:
    """Patch ``pipe`` for per-row LoRAs over a library of every LoRA file in ``lora_dirs``.
    ``max_resident_adapters`` bounds the adapters held in the banks (LRU eviction)."""
    from ..integrations.diffusers import patch as _patch

    library = AdapterLibrary()
    for folder in lora_dirs:
        library.add_dir(folder)
    handle = _patch(pipe, library=library, max_resident_adapters=max_resident_adapters)
    handle._lk_serve_pinned = set()
    return handle


def spellings(handle: Any) -> dict[str, str]:
    """Every accepted spelling (stem, ``ss_output_name``) -> canonical adapter name."""
    return handle.library.spellings()


def names(handle: Any) -> list[str]:
    return handle.library.names()


def info(handle: Any, name: str) -> AdapterInfo:
    """Name, aliases, file and safetensors header metadata of ``name`` (no tensors read)."""
    return handle.library.info(name)


def refresh(handle: Any) -> list[str]:
    """Rescan the LoRA folders: new files become usable, changed ones are re-read at next
    use, removed ones are forgotten."""
    handle.library.refresh()
    return names(handle)


def resident(handle: Any, adapters: Collection[str]) -> bool:
    """Whether all of ``adapters`` are held in the banks now."""
    loaded = set(handle.loaded)
    return all(name in loaded for name in adapters)


def load(handle: Any, adapters: Sequence[str], *, keep: Collection[str] = ()) -> None:
    """Make ``adapters`` resident (worker thread only) and pin them with ``keep`` (the
    adapters of the requests in flight); unpin adapters no request in flight uses."""
    pinned: set[str] = handle._lk_serve_pinned
    wanted = set(keep) | set(adapters)
    for name in pinned - wanted:
        handle.unpin(name)
    pinned &= wanted
    try:
        for name in sorted(wanted - pinned):
            handle.pin(name)
            pinned.add(name)
    except ValueError:  # the budget cannot pin every in-flight adapter: load this one only
        handle.ensure_loaded(list(adapters))


def prefetch(handle: Any, adapters: Sequence[str]) -> None:
    """Start loading ``adapters`` in the background (never evicts an in-flight adapter)."""
    handle.prefetch(list(adapters))


def stats(handle: Any) -> dict[str, Any]:
    """resident (adapters), hits, misses, evictions, prefetched: sums over the components
    (an adapter with UNet and text-encoder weights counts once in each)."""
    st = handle.stats()
    return {
        "resident": len(st["resident"]),
        **{k: st[k] for k in ("hits", "misses", "evictions", "prefetched")},
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
    return handle.encode(list(texts), negatives, mixes, do_cfg)


@contextmanager
def unet_mixtures(handle: Any, mixtures: Sequence[Mapping[str, float]]) -> Iterator[None]:
    """Activate one UNet mixture per batch row of the next UNet call (worker thread only)."""
    with handle.use(unet=[dict(m) for m in mixtures]):
        yield
