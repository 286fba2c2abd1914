"""Names and base-model hints of a LoRA file, from its stem, header metadata and shapes.

- aliases: the file stem, then kohya's ``ss_output_name`` (the name the trainer gave the run)
  when it differs; A1111 matches ``<lora:NAME>`` against both.
- base model: key evidence first, because headers are often missing or copied: a
  ``text_encoder_2`` component means SDXL; otherwise the cross-attention input width of a UNet
  ``attn2.to_k`` layer (768 SD1, 1024 SD2, 2048 SDXL) or the text encoder width (768 SD1,
  1024 SD2). Then the header: ``ss_base_model_version`` (``sd_v1``, ``sd_v2``,
  ``sdxl_base_v1-0``…), ``modelspec.architecture`` (``stable-diffusion-xl-v1-base/lora``…),
  ``ss_v2``. Known families are reported as ``"sd1"``, ``"sd2"``, ``"sdxl"``, others verbatim.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .records import LoRALayer

_CROSS_ATTN_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_TEXT_WIDTH = {768: "sd1", 1024: "sd2"}


def aliases(stem: str, metadata: Mapping[str, str]) -> tuple[str, ...]:
    names = [stem]
    output_name = metadata.get("ss_output_name", "").strip()
    if output_name and output_name not in names:
        names.append(output_name)
    return tuple(names)


def base_model(layers: Sequence[LoRALayer], metadata: Mapping[str, str]) -> str | None:
    if any(layer.component == "text_encoder_2" for layer in layers):
        return "sdxl"
    for layer in layers:
        name = layer.name.replace(".", "_")
        if layer.component == "unet" and name.endswith("attn2_to_k"):
            found = _CROSS_ATTN_WIDTH.get(int(layer.weights.down.shape[1]))
            if found:
                return found
        if layer.component == "text_encoder" and name.endswith("self_attn_q_proj"):
            found = _TEXT_WIDTH.get(int(layer.weights.down.shape[1]))
            if found:
                return found
    return _from_metadata(metadata)


def _from_metadata(metadata: Mapping[str, str]) -> str | None:
    for raw in (metadata.get("ss_base_model_version"), metadata.get("modelspec.architecture")):
        if raw:
            family = _family(raw.strip().lower())
            return family if family is not None else raw.strip()
    if metadata.get("ss_v2", "").strip().lower() == "true":
        return "sd2"
    return None


def _family(text: str) -> str | None:
    if "sdxl" in text or "stable-diffusion-xl" in text:
        return "sdxl"
    for marker, family in (("v1", "sd1"), ("v2", "sd2")):
        if marker in text and ("sd" in text or "stable-diffusion" in text):
            return family
    return None
