"""SDXL's original (SGM/LDM) UNet block names, as kohya writes them, mapped to diffusers names.

kohya trains SDXL on the original UNet, so its keys say ``input_blocks_4_1_…`` where diffusers
says ``down_blocks_1_attentions_0_…``. The translation works on kohya underscore bodies and
returns a diffusers-named underscore body, which :mod:`lorakernels.formats.kohya` then looks up
in the model's module list. Block layout (``L`` = layers per block, read from the module list):

- ``input_blocks_0_0`` → ``conv_in``; ``input_blocks_{i}_{j}`` (i ≥ 1) →
  ``down_blocks[(i-1)//(L+1)]`` at position ``(i-1)%(L+1)``: ``j = 0`` resnet, ``j = 1``
  attention, ``…_op`` the downsampler.
- ``middle_block_0``/``_1``/``_2`` → ``mid_block`` resnet 0 / attention 0 / resnet 1.
- ``output_blocks_{i}_{j}`` → ``up_blocks[i//(L+1)]`` at position ``i%(L+1)``: ``j = 0`` resnet;
  ``j = 1`` attention when that up block has attentions, else the upsampler (SD1's last-but-one
  layout); ``j = 2`` upsampler.
- resnet parts: ``in_layers_2`` → ``conv1``, ``out_layers_3`` → ``conv2``, ``emb_layers_1`` →
  ``time_emb_proj``, ``skip_connection`` → ``conv_shortcut``; attention parts keep their names.
- ``time_embed_0``/``_2`` → ``time_embedding_linear_1``/``_2``; ``label_emb_0_0``/``_0_2`` →
  ``add_embedding_linear_1``/``_2``; ``out_2`` → ``conv_out``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_SGM_BODY = re.compile(
    r"^(?:(?:input_blocks|output_blocks)_\d+_\d+|middle_block_\d+|time_embed_\d|label_emb_\d|out_\d)(?:_|$)"
)
_BLOCK = re.compile(r"^(input_blocks|output_blocks)_(\d+)_(\d+)(?:_(.+))?$")
_MIDDLE = re.compile(r"^middle_block_(\d+)(?:_(.+))?$")

_RESNET_PARTS = {
    "in_layers_2": "conv1",
    "out_layers_3": "conv2",
    "emb_layers_1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_WHOLE = {
    "input_blocks_0_0": "conv_in",
    "time_embed_0": "time_embedding_linear_1",
    "time_embed_2": "time_embedding_linear_2",
    "label_emb_0_0": "add_embedding_linear_1",
    "label_emb_0_2": "add_embedding_linear_2",
    "out_2": "conv_out",
}


def is_sgm_body(body: str) -> bool:
    """True when a kohya UNet body uses SGM block names (``input_blocks_…`` etc.)."""
    return _SGM_BODY.match(body) is not None


def sgm_to_diffusers_body(
    body: str, layers_per_block: int, up_block_has_attentions: Callable[[int], bool]
) -> str | None:
    """Translate an SGM kohya body to the diffusers underscore body, or None if it is not one.

    Args:
        body: e.g. ``"input_blocks_4_1_transformer_blocks_0_attn1_to_q"``.
        layers_per_block: ``L`` of the target UNet (resnets per down block).
        up_block_has_attentions: whether diffusers ``up_blocks[b]`` has attention modules.
    """
    if body in _WHOLE:
        return _WHOLE[body]
    per = layers_per_block + 1
    m = _BLOCK.match(body)
    if m is not None:
        kind, i, j, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4) or ""
        if kind == "input_blocks":
            if i == 0:
                return None
            block, pos = (i - 1) // per, (i - 1) % per
            if rest == "op":
                return f"down_blocks_{block}_downsamplers_0_conv"
            inner = {0: "resnets", 1: "attentions"}.get(j)
            prefix = f"down_blocks_{block}"
        else:
            block, pos = i // per, i % per
            inner = {0: "resnets", 1: "attentions", 2: "upsamplers"}.get(j)
            if inner == "attentions" and not up_block_has_attentions(block):
                inner = "upsamplers"
            prefix = f"up_blocks_{block}"
        if inner is None:
            return None
        if inner == "upsamplers":
            return f"{prefix}_upsamplers_0_{rest}" if rest else None
        return _join(f"{prefix}_{inner}_{pos}", inner, rest)
    m = _MIDDLE.match(body)
    if m is not None:
        target = {0: ("resnets", 0), 1: ("attentions", 0), 2: ("resnets", 1)}.get(int(m.group(1)))
        if target is None:
            return None
        inner, pos = target
        return _join(f"mid_block_{inner}_{pos}", inner, m.group(2) or "")
    return None


def _join(prefix: str, inner: str, rest: str) -> str | None:
    if not rest:
        return None
    if inner == "resnets":
        part = _RESNET_PARTS.get(rest)
        return None if part is None else f"{prefix}_{part}"
    return f"{prefix}_{rest}"
