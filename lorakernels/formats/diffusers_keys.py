"""The four diffusers spellings of LoRA keys, mapped to dotted module paths.

=========================== ======================================================================
spelling                    example key (component prefix ``unet.`` optional, see below)
=========================== ======================================================================
``diffusers_attnprocs``     ``down_blocks.0.….attn1.processor.to_out_lora.down.weight``
                            (``to_out_lora`` is ``to_out.0`` in the UNet; in text encoders
                            ``to_q/k/v/out_lora`` are ``q/k/v/out_proj``)
``diffusers_lora``          ``unet.….attn1.to_out.0.lora.down.weight``;
                            text encoder ``….self_attn.q_proj.lora_linear_layer.down.weight``
``peft``                    ``unet.….attn2.to_k.lora_A.weight`` / ``lora_B.weight``
(any)                       ``<module>.alpha``: that module's alpha
=========================== ======================================================================

Component prefixes: ``unet.``, ``text_encoder.``, ``text_encoder_2.``. A PEFT ``base_model.model.``
wrapper prefix is dropped. Keys with no component prefix belong to the UNet (the diffusers
convention for attn-procs files), except paths starting with ``text_model.``, which are a text
encoder's.
"""

from __future__ import annotations

import re

_COMPONENT_PREFIXES: tuple[tuple[str, str], ...] = (
    ("unet.", "unet"),
    ("text_encoder_2.", "text_encoder_2"),
    ("text_encoder.", "text_encoder"),
)
_WRAPPER_PREFIX = "base_model.model."

_ATTNPROCS = re.compile(
    r"^(?P<module>.+?)(?:\.processor)?\.(?P<proj>[A-Za-z0-9_]+?)_lora\.(?P<part>down|up)\.weight$"
)
_LORA_LAYER = re.compile(r"^(?P<module>.+)\.(?:lora|lora_linear_layer)\.(?P<part>down|up)\.weight$")
_PEFT = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)\.weight$")
_ALPHA = re.compile(r"^(?P<module>.+)\.alpha$")

_PART = {"down": "down", "up": "up", "A": "down", "B": "up"}
_TEXT_ATTNPROC_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def split_component(key: str) -> tuple[str, str]:
    """``(component, rest)`` of a dotted key (see the module docstring for the rules)."""
    key = key.removeprefix(_WRAPPER_PREFIX)
    for prefix, component in _COMPONENT_PREFIXES:
        if key.startswith(prefix):
            return component, key[len(prefix) :]
    return ("text_encoder" if key.startswith("text_model.") else "unet"), key


def parse_dotted_key(rest: str, component: str) -> tuple[str, str, str | None] | None:
    """``(module path, part, spelling)`` of a component-relative dotted key, or None.

    ``part`` is ``"down"``, ``"up"`` or ``"alpha"``; ``spelling`` is None for alpha keys, which
    every spelling shares.
    """
    m = _PEFT.match(rest)
    if m is not None:
        return m["module"], _PART[m["part"]], "peft"
    m = _LORA_LAYER.match(rest)
    if m is not None:
        return m["module"], m["part"], "diffusers_lora"
    m = _ATTNPROCS.match(rest)
    if m is not None:
        proj = m["proj"]
        if component == "unet":
            proj = "to_out.0" if proj == "to_out" else proj
        else:
            proj = _TEXT_ATTNPROC_PROJ.get(proj, proj)
        return f"{m['module']}.{proj}", m["part"], "diffusers_attnprocs"
    m = _ALPHA.match(rest)
    if m is not None:
        return m["module"], "alpha", None
    return None
