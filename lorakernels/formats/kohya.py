"""kohya / A1111 key names: ``lora_unet_<body>.lora_down.weight`` and friends.

A kohya key is a prefix naming the component, the module path with every ``.`` turned into
``_`` (the *body*), then a suffix after the first ``.``. Module names contain underscores
themselves (``to_out_0``, ``ff_net_0_proj``, ``transformer_blocks``), so a body cannot be
turned back into a path by rule; it is looked up in an index of the target model's module
paths spelled the same way. SDXL bodies in SGM block names are first translated by
:mod:`lorakernels.formats.sgm`.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from .sgm import sgm_to_diffusers_body

#: kohya prefix → component. ``lora_te_`` is the SD1/SD2 text encoder, ``lora_te1_`` and
#: ``lora_te2_`` SDXL's two.
KOHYA_PREFIXES: tuple[tuple[str, str], ...] = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te_", "text_encoder"),
)

#: kohya suffix → LoRA part.
KOHYA_PARTS: dict[str, str] = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_mid.weight": "mid",
    "alpha": "alpha",
}

_RESNETS = re.compile(r"^down_blocks\.\d+\.resnets\.(\d+)$")
_UP_ATTENTION = re.compile(r"^up_blocks\.(\d+)\.attentions\.\d+$")


def split_kohya_key(key: str) -> tuple[str, str, str, str] | None:
    """``(prefix, component, body, suffix)`` of a kohya key, or None if it has no kohya prefix."""
    for prefix, component in KOHYA_PREFIXES:
        if key.startswith(prefix):
            body, _, suffix = key[len(prefix) :].partition(".")
            return prefix, component, body, suffix
    return None


class KohyaIndex:
    """The module paths of one component, indexed by their kohya (underscore) spelling.

    Args:
        modules: module paths as ``named_modules()`` gives them.
    """

    def __init__(self, modules: Collection[str]) -> None:
        index: dict[str, list[str]] = {}
        resnets = -1
        up_attention: set[int] = set()
        for path in modules:
            if not path:
                continue
            index.setdefault(path.replace(".", "_"), []).append(path)
            if (m := _RESNETS.match(path)) is not None:
                resnets = max(resnets, int(m.group(1)))
            if (m := _UP_ATTENTION.match(path)) is not None:
                up_attention.add(int(m.group(1)))
        self._index = {k: tuple(sorted(v)) for k, v in index.items()}
        # SGM numbering needs the UNet's layers per block; a component without down-block
        # resnets (a text encoder) has no SGM names.
        self._layers_per_block = resnets + 1 if resnets >= 0 else None
        self._up_attention = frozenset(up_attention)

    def candidates(self, body: str) -> tuple[str, ...]:
        """Module paths whose kohya spelling is ``body`` (more than one means ambiguous).

        Tries the body as written, then with the ``text_model_`` level added or removed
        (transformers 5 flattens ``CLIPTextModel``; files still say ``text_model``), then as an
        SGM block name.
        """
        for form in text_model_forms(body, "text_model_"):
            found = self._index.get(form)
            if found:
                return found
        if self._layers_per_block is not None:
            translated = sgm_to_diffusers_body(
                body, self._layers_per_block, self._up_attention.__contains__
            )
            if translated is not None:
                return self._index.get(translated, ())
        return ()


def text_model_forms(name: str, level: str) -> tuple[str, ...]:
    """``name`` as written, then with the ``text_model`` level (``level``) removed or added."""
    if name.startswith(level):
        return name, name[len(level) :]
    return name, level + name
