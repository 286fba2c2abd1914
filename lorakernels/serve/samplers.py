"""A1111 sampler names -> diffusers schedulers, one fresh scheduler instance per image.

The mapping follows diffusers' own table of A1111/k-diffusion equivalents. Each image gets its
own instance built from the pipeline's scheduler config (``cls.from_config(config, **extra)``),
so its step index, multistep history and ancestral noise never mix with another image's.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sampler:
    """``name`` as A1111 spells it; ``scheduler`` a diffusers class name; ``extra`` config."""

    name: str
    scheduler: str
    extra: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    needs: str | None = None  # an optional package the scheduler imports

    @property
    def ancestral(self) -> bool:
        """Draws fresh noise every step (``eta`` must stay at A1111's default, 1)."""
        return "Ancestral" in self.scheduler or "sde" in str(self.extra.get("algorithm_type", ""))


_KARRAS = {"use_karras_sigmas": True}
_SDE = {"algorithm_type": "sde-dpmsolver++"}
SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in [
        Sampler("Euler a", "EulerAncestralDiscreteScheduler", aliases=("k_euler_a",)),
        Sampler("Euler", "EulerDiscreteScheduler", aliases=("k_euler",)),
        Sampler("LMS", "LMSDiscreteScheduler", aliases=("k_lms",), needs="scipy"),
        Sampler("LMS Karras", "LMSDiscreteScheduler", _KARRAS, ("k_lms_ka",), needs="scipy"),
        Sampler("Heun", "HeunDiscreteScheduler", aliases=("k_heun",)),
        Sampler("DPM2", "KDPM2DiscreteScheduler", aliases=("k_dpm_2",)),
        Sampler("DPM2 Karras", "KDPM2DiscreteScheduler", _KARRAS, ("k_dpm_2_ka",)),
        Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler", aliases=("k_dpm_2_a",)),
        Sampler("DPM2 a Karras", "KDPM2AncestralDiscreteScheduler", _KARRAS, ("k_dpm_2_a_ka",)),
        Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", aliases=("k_dpmpp_2m",)),
        Sampler("DPM++ 2M Karras", "DPMSolverMultistepScheduler", _KARRAS, ("k_dpmpp_2m_ka",)),
        Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler", _SDE, ("k_dpmpp_2m_sde",)),
        Sampler(
            "DPM++ 2M SDE Karras",
            "DPMSolverMultistepScheduler",
            {**_SDE, **_KARRAS},
            ("k_dpmpp_2m_sde_ka",),
        ),
        Sampler("DPM++ SDE", "DPMSolverSDEScheduler", aliases=("k_dpmpp_sde",), needs="torchsde"),
        Sampler(
            "DPM++ SDE Karras",
            "DPMSolverSDEScheduler",
            _KARRAS,
            ("k_dpmpp_sde_ka",),
            needs="torchsde",
        ),
        Sampler("UniPC", "UniPCMultistepScheduler"),
        Sampler("DDIM", "DDIMScheduler"),
        Sampler("PLMS", "PNDMScheduler", aliases=("PNDM",)),
    ]
}
_BY_SPELLING = {k.lower(): s for s in SAMPLERS.values() for k in (s.name, *s.aliases)}
DEFAULT_SAMPLER = "Euler a"


def resolve(name: str | None, scheduler: str | None = None) -> Sampler:
    """The sampler for an A1111 ``sampler_name`` (case-insensitive, ``k_*`` aliases accepted).

    ``scheduler`` is A1111 1.9's separate schedule field: ``None``/``"Automatic"`` keep the
    sampler's own schedule, ``"Karras"`` selects the sampler's Karras variant.
    Raises ``ValueError`` naming the sampler (and the known ones) or the missing package.
    """
    key = (name or DEFAULT_SAMPLER).strip().lower()
    sampler = _BY_SPELLING.get(key)
    if sampler is None:
        known = ", ".join(repr(n) for n in SAMPLERS)
        raise ValueError(f"sampler_name: unknown sampler {name!r}; known: {known}")
    if scheduler not in (None, "", "Automatic", "automatic"):
        if scheduler.lower() != "karras":
            raise ValueError(f"scheduler: {scheduler!r} is not supported ('Automatic', 'Karras')")
        if sampler.extra.get("use_karras_sigmas"):
            pass  # already the Karras variant
        elif f"{sampler.name} Karras" in SAMPLERS:
            sampler = SAMPLERS[f"{sampler.name} Karras"]
        else:
            raise ValueError(f"scheduler: sampler {sampler.name!r} has no Karras schedule")
    if sampler.needs and importlib.util.find_spec(sampler.needs) is None:
        raise ValueError(
            f"sampler_name: {sampler.name!r} needs the {sampler.needs!r} package, which is not "
            "installed on this server"
        )
    return sampler


def make_scheduler(sampler: Sampler, config: Any) -> Any:
    """A fresh diffusers scheduler for ``sampler`` from a pipeline's scheduler ``config``."""
    import diffusers

    cls = getattr(diffusers, sampler.scheduler)
    return cls.from_config(config, **sampler.extra)


def a1111_list() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/samplers``: ``[{"name", "aliases", "options"}]``, A1111's shape."""
    out = []
    for s in SAMPLERS.values():
        if s.needs and importlib.util.find_spec(s.needs) is None:
            continue
        out.append({"name": s.name, "aliases": list(s.aliases), "options": {}})
    return out
