"""Per-module alpha from a PEFT ``LoraConfig`` stored in the ``lora_adapter_metadata`` header.

diffusers writes the config as JSON, either flat (``{"r": 4, "lora_alpha": 8, …}``, from
``save_lora_adapter``) or with component prefixes (``{"unet.r": 4, "text_encoder.r": 8, …}``,
from a pipeline's ``save_lora_weights``). PEFT's semantics, mirrored here:

- rank ``r`` and ``lora_alpha`` apply to every module unless a ``rank_pattern`` /
  ``alpha_pattern`` entry matches it; a pattern ``p`` matches module path ``m`` when
  ``re.match(rf"(.*\\.)?({p})$", m)`` succeeds, and the first matching entry wins;
- missing ``r`` / ``lora_alpha`` take PEFT's defaults (8 and 8);
- ``scale = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``. The latter is
  returned as the equivalent alpha ``lora_alpha * sqrt(r)`` so that ``alpha / r`` stays the scale.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .errors import LoRAFormatError, UnsupportedLoRAAlgorithm

METADATA_KEY = "lora_adapter_metadata"
_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_PEFT_DEFAULT_R = 8
_PEFT_DEFAULT_ALPHA = 8


@dataclass(frozen=True)
class PeftLoraConfig:
    """The fields of a ``LoraConfig`` that decide a module's scale."""

    r: int = _PEFT_DEFAULT_R
    lora_alpha: float = _PEFT_DEFAULT_ALPHA
    rank_pattern: tuple[tuple[str, float], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    use_rslora: bool = False

    def rank_for(self, module: str) -> int:
        return int(_first_match(self.rank_pattern, module, self.r))

    def alpha_for(self, module: str) -> float:
        """The alpha that makes ``alpha / r`` equal PEFT's scale for ``module``."""
        alpha = float(_first_match(self.alpha_pattern, module, self.lora_alpha))
        if self.use_rslora:
            return alpha * math.sqrt(self.rank_for(module))
        return alpha


def _first_match(patterns: tuple[tuple[str, float], ...], module: str, default: float) -> float:
    for pattern, value in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def peft_configs(metadata: Mapping[str, str], path: str) -> dict[str | None, PeftLoraConfig]:
    """Parse ``lora_adapter_metadata``: component → config (key None: applies to all).

    Raises:
        LoRAFormatError: the entry is not valid JSON or has ill-typed fields.
        UnsupportedLoRAAlgorithm: the config is not a LoRA config (``peft_type`` other than LORA).
    """
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LoRAFormatError(f"{path}: header entry {METADATA_KEY!r} is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise LoRAFormatError(f"{path}: header entry {METADATA_KEY!r} is not a JSON object")
    split: dict[str | None, dict[str, object]] = {}
    for key, value in data.items():
        head, dot, field = key.partition(".")
        if dot and head in _COMPONENTS:
            split.setdefault(head, {})[field] = value
        else:
            split.setdefault(None, {})[key] = value
    return {comp: _config(fields, path) for comp, fields in split.items()}


def _config(fields: Mapping[str, object], path: str) -> PeftLoraConfig:
    peft_type = fields.get("peft_type")
    if peft_type is not None and str(peft_type).upper() != "LORA":
        raise UnsupportedLoRAAlgorithm(
            f"{path}: header {METADATA_KEY!r} describes a {peft_type} adapter, not LoRA",
            algorithms=(str(peft_type),),
            keys=(),
        )
    try:
        r = _rank(fields.get("r", _PEFT_DEFAULT_R))
        alpha = _number(fields.get("lora_alpha", _PEFT_DEFAULT_ALPHA))
        ranks = _pattern(fields.get("rank_pattern"), _rank)
        alphas = _pattern(fields.get("alpha_pattern"), _number)
        for pattern, _ in ranks + alphas:
            re.compile(pattern)
    except (TypeError, ValueError, re.error) as exc:
        raise LoRAFormatError(f"{path}: ill-formed LoRA config in {METADATA_KEY!r}: {exc}") from exc
    return PeftLoraConfig(r, alpha, ranks, alphas, bool(fields.get("use_rslora", False)))


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _rank(value: object) -> int:
    number = _number(value)
    if number != int(number) or number < 1:
        raise ValueError(f"a rank must be a positive integer, got {value!r}")
    return int(number)


def _pattern(value: object, cast: Callable[[object], float]) -> tuple[tuple[str, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise TypeError(f"pattern must be a JSON object, got {type(value).__name__}")
    return tuple((str(k), cast(v)) for k, v in value.items())
