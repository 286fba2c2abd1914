"""Serving: a continuous-batching diffusion server with an A1111-compatible HTTP API.

``DiffusionServer`` (``server.py``) batches the denoising steps of many requests, each with its
own LoRAs, into shared UNet calls (``scheduler.py``); ``http.py`` puts A1111's API in front of
it (FastAPI, optional extra ``[serve]``); ``ray.py`` scales it out on Ray Serve (extra
``[ray]``); ``demo.py`` builds a tiny local pipeline for ``lorakernels serve --demo``.
Everything past this package's own modules is imported lazily.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "DiffusionServer",
    "GenerationRequest",
    "GenerationResult",
    "QueueFull",
    "RequestError",
    "ShuttingDown",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module 'lorakernels.serve' has no attribute {name!r}")
