"""Sorting a file's keys: which component, module, LoRA part, spelling or foreign algorithm.

The format is decided from key names alone (metadata is often missing or wrong). Each key is
classified independently, so files that mix spellings (an attn-procs UNet with a
``lora_linear_layer`` text encoder) are read as they are; :func:`format_name` reports the mix.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from .algorithms import algorithm_of_suffix, split_algorithm_key
from .diffusers_keys import parse_dotted_key, split_component
from .kohya import KOHYA_PARTS, split_kohya_key
from .records import Naming
from .sgm import is_sgm_body

#: A module's identity while reading: (component, naming, module in the file's naming).
Group = tuple[str, Naming, str]


@dataclass(frozen=True)
class KeyInfo:
    """What one key is.

    Attributes:
        key: the key as stored.
        component: the component it belongs to.
        naming: how ``module`` is spelled.
        module: the module in the file's naming; None when the key could not be tied to one.
        part: ``"down"``, ``"up"``, ``"mid"``, ``"alpha"``, or None when not a LoRA part.
        algorithm: the non-LoRA algorithm the key belongs to, if any.
        spelling: ``"kohya"``, ``"kohya_sgm"``, ``"diffusers_attnprocs"``, ``"diffusers_lora"``,
            ``"peft"``, or None (alpha keys, unknown keys).
    """

    key: str
    component: str
    naming: Naming
    module: str | None
    part: str | None
    algorithm: str | None = None
    spelling: str | None = None

    @property
    def group(self) -> Group | None:
        """The module this key belongs with, or None when unknown."""
        return None if self.module is None else (self.component, self.naming, self.module)


def classify_keys(keys: Collection[str]) -> list[KeyInfo]:
    """Classify every key of a file (the whole key set is needed for (IA)³'s bare ``weight``)."""
    key_set: set[str] | None = None
    out = []
    for key in keys:
        info = _classify_alone(key)
        if info.naming == "kohya" and info.part is None and key.endswith(".weight"):
            # the one case that depends on the other keys: a bare kohya `weight`
            key_set = set(keys) if key_set is None else key_set
            info = _classify(key, key_set)
        out.append(info)
    return out


@functools.lru_cache(maxsize=1 << 16)
def _classify_alone(key: str) -> KeyInfo:
    # files of one model repeat the same few hundred keys: a folder of thousands of files
    # classifies each key once (measured: 8 ms of a 50 ms cold SD1.5 load)
    return _classify(key, frozenset())


def _classify(key: str, key_set: Collection[str]) -> KeyInfo:
    kohya = split_kohya_key(key)
    if kohya is not None:
        prefix, component, body, suffix = kohya
        part = KOHYA_PARTS.get(suffix)
        algorithm = None if part is not None else algorithm_of_suffix(suffix)
        # LyCORIS (IA)³ stores a bare `weight` next to an `on_input` flag; without the flag a
        # bare `weight` is just an unknown key.
        if part is None and suffix == "weight" and f"{prefix}{body}.on_input" in key_set:
            algorithm = "(IA)3"
        spelling = None
        if part in ("down", "up"):
            sgm = component == "unet" and is_sgm_body(body)
            spelling = "kohya_sgm" if sgm else "kohya"
        module = body if body else None
        return KeyInfo(key, component, "kohya", module, part, algorithm, spelling)
    component, rest = split_component(key)
    parsed = parse_dotted_key(rest, component)
    if parsed is not None:
        module, part, spelling = parsed
        return KeyInfo(key, component, "dotted", module, part, None, spelling)
    found = split_algorithm_key(rest)
    if found is not None:
        algorithm, stem = found
        if component == "unet" and stem.endswith(".to_out"):
            # diffusers writes DoRA magnitudes of `to_out.0` as `to_out.lora_magnitude_vector`;
            # tie them to the same module as its LoRA factors.
            stem += ".0"
        return KeyInfo(key, component, "dotted", stem or None, None, algorithm)
    return KeyInfo(key, component, "dotted", None, None)


def format_name(infos: Iterable[KeyInfo]) -> str:
    """The spellings of a file's LoRA keys, sorted and joined by ``+`` (``"unknown"`` if none)."""
    spellings = {i.spelling for i in infos if i.spelling is not None}
    if "kohya_sgm" in spellings:
        # SDXL kohya files name the UNet in SGM blocks and the text encoders in plain kohya;
        # that is one format, not a mix.
        spellings.discard("kohya")
    return "+".join(sorted(spellings)) if spellings else "unknown"
