"""Tiny diffusers pipelines with random weights (no download), for tests and README checks.

SD1.5: :func:`lora_files.tiny_sd15_unet` and a 2-layer CLIP; SDXL: a 2-block UNet with
text-time conditioning and two 16-wide CLIP encoders whose hidden states concatenate to the
UNet's 32. A letters-only CLIP tokenizer (16 tokens). VAEs are one-block and never used by
``output_type="latent"`` runs. Every call builds fresh modules, identical between calls.
"""

from __future__ import annotations

import copy

import torch
from lora_files import tiny_clip, tiny_sd15_unet


def tokenizer():
    from transformers import CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in letters:
        vocab[ch] = len(vocab)
    for ch in letters:
        vocab[ch + "</w>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    tok.model_max_length = 16
    return tok


def _vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8,),
        norm_num_groups=8,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
    ).eval()


def tiny_sd_pipeline():
    """A ``StableDiffusionPipeline`` (DDIM) on 8x8 latents."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=copy.deepcopy(tiny_clip()),
        tokenizer=tokenizer(),
        unet=copy.deepcopy(tiny_sd15_unet()),
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_unet_for_pipeline():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=4 * 6 + 16,
    ).eval()


def tiny_sdxl_pipeline():
    """A ``StableDiffusionXLPipeline`` (Euler) on 8x8 latents with both text encoders."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    te1, te2 = tiny_clip(hidden=16), tiny_clip(projection=True, hidden=16)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=copy.deepcopy(te1),
        text_encoder_2=copy.deepcopy(te2),
        tokenizer=tokenizer(),
        tokenizer_2=tokenizer(),
        unet=tiny_sdxl_unet_for_pipeline(),
        scheduler=EulerDiscreteScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
