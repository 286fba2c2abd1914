"""Synthetic LoRA files for the formats tests.

Tiny diffusers UNets and CLIP text encoders are built from configs with random weights (no
download). Their module names are the real ones: names depend on the block structure, not on
the channel widths, so a 16-channel UNet with SD1.5's blocks has SD1.5's names. LoRA factors are
drawn for chosen modules and written out in each spelling people download:

- :func:`kohya_state_dict` (``lora_unet_…``/``lora_te…`` with ``.alpha``; SDXL SGM names when
  asked, through :func:`diffusers_to_sgm`, the inverse of the package's own mapping, written
  independently so that a shared mistake would have to be made twice),
- :func:`attnprocs_state_dict`, :func:`diffusers_lora_state_dict`, :func:`peft_state_dict`.

All model builders are cached; tests that modify a model must deepcopy it first.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

# -- tiny models ------------------------------------------------------------------------------

CROSS_DIM = 32


@functools.cache
def tiny_sd15_unet() -> nn.Module:
    """SD1.5's block structure (4 blocks, 2 layers, conv proj_in/out), 16–32 channels."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=2,
        norm_num_groups=8,
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=4,
    ).eval()


@functools.cache
def tiny_sdxl_unet() -> nn.Module:
    """SDXL's block structure (no attention in the outer block, several transformer layers,
    linear proj_in/out, text-time added conditioning), 16–32 channels."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        norm_num_groups=8,
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=4 * 6 + CROSS_DIM,
    ).eval()


@functools.cache
def tiny_clip(projection: bool = False, hidden: int = CROSS_DIM) -> nn.Module:
    """A 2-layer CLIP text encoder (``CLIPTextModelWithProjection`` for SDXL's second)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=64,
        max_position_embeddings=16,
        projection_dim=hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules()]


# -- which modules get a LoRA -----------------------------------------------------------------

_UNET_ATTN = re.compile(
    r"attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\."
    r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))$"
)
_UNET_CONV = re.compile(
    r"(resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|(down|up)samplers\.0\.conv"
    r"|^conv_in|^conv_out|^time_embedding\.linear_[12]|^add_embedding\.linear_[12])$"
)
_TEXT = re.compile(r"layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$")


def lora_targets(model: nn.Module, kind: str) -> dict[str, nn.Module]:
    """Modules a trainer would adapt.

    ``kind``: ``"attn"`` (attn1/attn2 q/k/v/out only, like the diffusers training scripts),
    ``"kohya"`` (kohya's default: transformer-block linears and 1×1 convs), ``"locon"`` (kohya
    plus resnet, sampler, conv_in/out and embedding layers), ``"text"`` (CLIP attention + MLP).
    """
    patterns = {
        "attn": [re.compile(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$")],
        "kohya": [_UNET_ATTN],
        "locon": [_UNET_ATTN, _UNET_CONV],
        "text": [_TEXT],
    }[kind]
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and any(p.search(name) for p in patterns)
    }


# -- LoRA factors -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Factors:
    down: Tensor
    up: Tensor
    alpha: float | None


Layers = dict[str, dict[str, Factors]]  # component -> module path -> factors


def make_factors(
    module: nn.Module, rank: int, alpha: float | None, dtype: torch.dtype, gen: torch.Generator
) -> Factors:
    """Random factors shaped for ``module`` (``Linear`` or ``Conv2d``), nonzero everywhere."""
    if isinstance(module, nn.Linear):
        down_shape: tuple[int, ...] = (rank, module.in_features)
        up_shape: tuple[int, ...] = (module.out_features, rank)
    else:
        down_shape = (rank, module.in_channels, *module.kernel_size)
        up_shape = (module.out_channels, rank, 1, 1)
    down = torch.randn(down_shape, generator=gen).to(dtype)
    up = torch.randn(up_shape, generator=gen).to(dtype)
    return Factors(down, up, alpha)


def make_layers(
    targets: Mapping[str, Mapping[str, nn.Module]],
    rank: Callable[[str], int] | int = 4,
    alpha: Callable[[str], float | None] | float | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Layers:
    """Factors for ``component -> {path: module}``; ``rank``/``alpha`` may vary per path."""
    gen = torch.Generator().manual_seed(seed)
    out: Layers = {}
    for component, mods in targets.items():
        out[component] = {}
        for path, module in mods.items():
            r = rank(path) if callable(rank) else rank
            a = alpha(path) if callable(alpha) else alpha
            out[component][path] = make_factors(module, r, a, dtype, gen)
    return out


# -- spellings --------------------------------------------------------------------------------

KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
SDXL_KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}

_SGM_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3"}
_SGM_RESNET |= {"time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
_SGM_WHOLE = {
    "conv_in": "input_blocks_0_0",
    "conv_out": "out_2",
    "time_embedding.linear_1": "time_embed_0",
    "time_embedding.linear_2": "time_embed_2",
    "add_embedding.linear_1": "label_emb_0_0",
    "add_embedding.linear_2": "label_emb_0_2",
}


def diffusers_to_sgm(path: str, layers_per_block: int, up_has_attention: set[int]) -> str:
    """A diffusers UNet module path in SGM kohya spelling (``input_blocks_4_1_…``)."""
    if path in _SGM_WHOLE:
        return _SGM_WHOLE[path]
    per = layers_per_block + 1
    parts = path.split(".")
    kind = parts[0]
    if kind == "mid_block":
        inner, pos, rest = parts[1], int(parts[2]), parts[3:]
        index = {"resnets": 2 * pos, "attentions": 1}[inner]
        head = f"middle_block_{index}"
    else:
        block, inner, pos, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "down_blocks":
            if inner == "downsamplers":
                return f"input_blocks_{(block + 1) * per}_0_op"
            head = f"input_blocks_{1 + block * per + pos}_{0 if inner == 'resnets' else 1}"
        else:
            if inner == "upsamplers":
                j = 2 if block in up_has_attention else 1
                return f"output_blocks_{block * per + layers_per_block}_{j}_conv"
            head = f"output_blocks_{block * per + pos}_{0 if inner == 'resnets' else 1}"
    tail = _SGM_RESNET[rest[0]] if inner == "resnets" else "_".join(rest)
    return f"{head}_{tail}"


def unet_layout(unet: nn.Module) -> tuple[int, set[int]]:
    """``(layers_per_block, {up blocks with attentions})`` from the config."""
    types = unet.config.up_block_types
    return unet.config.layers_per_block, {i for i, t in enumerate(types) if "CrossAttn" in t}


def kohya_state_dict(
    layers: Layers,
    prefixes: Mapping[str, str] = KOHYA_PREFIX,
    sgm_unet: nn.Module | None = None,
) -> dict[str, Tensor]:
    """kohya keys; with ``sgm_unet`` the UNet modules get SGM names for that UNet's layout."""
    out: dict[str, Tensor] = {}
    for component, mods in layers.items():
        for path, f in mods.items():
            if component == "unet" and sgm_unet is not None:
                body = diffusers_to_sgm(path, *unet_layout(sgm_unet))
            else:
                body = path.replace(".", "_")
            stem = f"{prefixes[component]}_{body}"
            out[f"{stem}.lora_down.weight"] = f.down
            out[f"{stem}.lora_up.weight"] = f.up
            if f.alpha is not None:
                out[f"{stem}.alpha"] = torch.tensor(f.alpha, dtype=f.down.dtype)
    return out


_TEXT_ATTNPROC = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}


def attnprocs_state_dict(layers: Layers, prefix: bool = True) -> dict[str, Tensor]:
    """diffusers attn-procs: ``….attn1.processor.to_out_lora.down.weight`` (UNet attention
    only); text encoders ``….self_attn.to_q_lora.down.weight``, MLP ``lora_linear_layer``."""
    out: dict[str, Tensor] = {}
    for component, mods in layers.items():
        head = f"{component}." if prefix else ""
        for path, f in mods.items():
            if component == "unet":
                m = re.fullmatch(r"(.+)\.(to_q|to_k|to_v|to_out)(\.0)?", path)
                if m is None:
                    raise ValueError(f"attn-procs files hold only attention layers, not {path}")
                stem = f"{head}{m.group(1)}.processor.{m.group(2)}_lora"
            else:
                owner, _, leaf = path.rpartition(".")
                if leaf in _TEXT_ATTNPROC:
                    stem = f"{head}{owner}.{_TEXT_ATTNPROC[leaf]}_lora"
                else:
                    stem = f"{head}{path}.lora_linear_layer"
            out[f"{stem}.down.weight"] = f.down
            out[f"{stem}.up.weight"] = f.up
    return out


def diffusers_lora_state_dict(layers: Layers) -> dict[str, Tensor]:
    """diffusers ``unet.….to_k.lora.down.weight``; text encoders ``….lora_linear_layer.…``."""
    out: dict[str, Tensor] = {}
    for component, mods in layers.items():
        inner = "lora" if component == "unet" else "lora_linear_layer"
        for path, f in mods.items():
            out[f"{component}.{path}.{inner}.down.weight"] = f.down
            out[f"{component}.{path}.{inner}.up.weight"] = f.up
    return out


def peft_state_dict(layers: Layers, prefix: bool = True) -> dict[str, Tensor]:
    """PEFT ``unet.….to_k.lora_A.weight`` / ``lora_B.weight``."""
    out: dict[str, Tensor] = {}
    for component, mods in layers.items():
        head = f"{component}." if prefix else ""
        for path, f in mods.items():
            out[f"{head}{path}.lora_A.weight"] = f.down
            out[f"{head}{path}.lora_B.weight"] = f.up
    return out


def save(
    path: Path, state_dict: Mapping[str, Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Write a ``.safetensors`` (with metadata) or, for other suffixes, a torch pickle."""
    tensors = {k: v.contiguous() for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        save_file(tensors, str(path), metadata=metadata)
    else:
        torch.save(tensors, path)
    return path
