"""Reading the LoRA files people download for Stable Diffusion 1.x/2.x and SDXL.

Supported spellings (detected from key names, per key): kohya/A1111 ``lora_unet_…``,
``lora_te_…``, ``lora_te1_…``, ``lora_te2_…`` (diffusers module names, or SDXL's original SGM
block names; LoCon convs, Tucker ``lora_mid`` folded), and diffusers' four: attn-procs with or
without ``unet.``, ``.lora.down``/``lora_linear_layer``, and PEFT ``lora_A``/``lora_B`` with an
optional ``lora_adapter_metadata`` config. Files: ``.safetensors`` (memory-mapped) and torch
pickles via ``torch.load(weights_only=True)``.

Usage::

    modules = {"unet": [n for n, _ in unet.named_modules()],
               "text_encoder": [n for n, _ in text_encoder.named_modules()]}
    lora, layers = load_lora("style.safetensors", modules)
    w = layers["unet"]["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    delta = w.scale * w.up.float() @ w.down.float()        # [N, K]; strength multiplies it

Numerics: factors keep the file's dtype; ``scale = alpha / r`` per module (``r`` the rows of
``down``), 1 when the file stores no alpha. Strict by default: foreign algorithms (LoHa, LoKr,
DoRA, (IA)³, full diffs, …), unknown keys and keys matching no module raise
:class:`LoRAFormatError`/:class:`UnsupportedLoRAAlgorithm` naming the file and keys;
``strict=False`` warns (:class:`LoRAFormatWarning`) and skips them. Malformed files always raise.
"""

from .errors import LoRAFormatError, LoRAFormatWarning, UnsupportedLoRAAlgorithm
from .reader import read_lora_file
from .records import LoRAFile, LoRALayer, LoRALayerWeights
from .resolve import load_lora, resolve_modules
from .tensor_io import read_header

__all__ = [
    "LoRAFile",
    "LoRAFormatError",
    "LoRAFormatWarning",
    "LoRALayer",
    "LoRALayerWeights",
    "UnsupportedLoRAAlgorithm",
    "load_lora",
    "read_header",
    "read_lora_file",
    "resolve_modules",
]
