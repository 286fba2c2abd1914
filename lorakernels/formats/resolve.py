"""Matching a file's layers to the module paths of a target model.

``modules`` maps each component (``"unet"``, ``"text_encoder"``, ``"text_encoder_2"``) to the
module paths its ``named_modules()`` gives (diffusers naming). Dotted names are looked up as
they are, then with the ``text_model.`` level added or removed (transformers 5 flattens
``CLIPTextModel``; files written before still say ``text_model.``). kohya names go through
:class:`lorakernels.formats.kohya.KohyaIndex` (underscore spelling, then SGM block names).

Strict (default): a layer matching no module, or of a component missing from ``modules``,
raises :class:`LoRAFormatError` listing the keys; ``strict=False`` warns and leaves them out.
Either way, two layers for one module, a kohya name that fits two modules, or a file of which
nothing matches raise.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Collection, Mapping

from .errors import LoRAFormatError, LoRAFormatWarning, summarize_keys
from .kohya import KohyaIndex, text_model_forms
from .reader import read_lora_file
from .records import LoRAFile, LoRALayer, LoRALayerWeights

Resolved = dict[str, dict[str, LoRALayerWeights]]


class _ComponentIndex:
    def __init__(self, modules: Collection[str]) -> None:
        self.paths = frozenset(modules)
        self._kohya: KohyaIndex | None = None

    def candidates(self, layer: LoRALayer) -> tuple[str, ...]:
        if layer.naming == "kohya":
            if self._kohya is None:
                self._kohya = KohyaIndex(self.paths)
            return self._kohya.candidates(layer.name)
        forms = text_model_forms(layer.name, "text_model.")
        for form in forms:
            if form in self.paths:
                return (form,)
        return ()


def resolve_modules(
    lora: LoRAFile, modules: Mapping[str, Collection[str]], *, strict: bool = True
) -> Resolved:
    """Map every layer of ``lora`` to a module path of the target model.

    Args:
        lora: a file from :func:`read_lora_file`.
        modules: component → module paths (``[n for n, _ in model.named_modules()]``).
        strict: raise on layers that match no module (default); False warns and skips them.

    Returns:
        component → module path → factors; only components with at least one match appear.

    Raises:
        TypeError: ``modules`` is not a mapping of component → collection of paths.
        LoRAFormatError: unmatched layers (strict), ambiguous or duplicate matches, or no match.
    """
    if not isinstance(modules, Mapping):
        raise TypeError(f"modules must map component -> module paths, got {type(modules).__name__}")
    indexes: dict[str, _ComponentIndex] = {}
    for component, paths in modules.items():
        if isinstance(paths, (str, bytes)) or not isinstance(paths, Collection):
            raise TypeError(
                f"modules[{component!r}] must be a collection of module paths, "
                f"got {type(paths).__name__}"
            )
        indexes[component] = _ComponentIndex(paths)

    resolved: Resolved = {}
    unmatched: list[str] = []
    absent: set[str] = set()
    for layer in lora.layers:
        index = indexes.get(layer.component)
        found = () if index is None else index.candidates(layer)
        if index is None:
            absent.add(layer.component)
        if len(found) > 1:
            raise LoRAFormatError(
                f"{lora.path}: LoRA module {layer.weights.key!r} fits several modules of "
                f"{layer.component}: {', '.join(found)}"
            )
        if not found:
            unmatched.append(layer.weights.key)
            continue
        target = resolved.setdefault(layer.component, {})
        if found[0] in target:
            raise LoRAFormatError(
                f"{lora.path}: two LoRA modules target {layer.component} module {found[0]!r}: "
                f"{target[found[0]].key!r} and {layer.weights.key!r}"
            )
        target[found[0]] = layer.weights

    if unmatched:
        message = (
            f"{lora.path}: LoRA modules that match no module of the target model: "
            f"{summarize_keys(unmatched)}"
        )
        if absent:
            message += (
                f"; components {sorted(absent)} are not in the model (given: {sorted(modules)})"
            )
        if strict:
            raise LoRAFormatError(message + " (strict=False skips them with a warning)")
        if resolved:
            warnings.warn(message + "; skipped", LoRAFormatWarning, stacklevel=2)
    if not resolved:
        raise LoRAFormatError(
            f"{lora.path}: none of its {len(lora.layers)} LoRA modules matches the target model "
            f"(format {lora.format}, e.g. {lora.layers[0].weights.key!r})"
        )
    return resolved


def load_lora(
    path: str | os.PathLike[str], modules: Mapping[str, Collection[str]], *, strict: bool = True
) -> tuple[LoRAFile, Resolved]:
    """:func:`read_lora_file` then :func:`resolve_modules` with the same ``strict``."""
    lora = read_lora_file(path, strict=strict)
    return lora, resolve_modules(lora, modules, strict=strict)
