"""A tiny random-weight Stable-Diffusion-like pipeline and LoRA files, built locally.

``lorakernels serve --demo`` serves this on a fresh machine with no download: a diffusers
``StableDiffusionPipeline`` made from small ``UNet2DConditionModel`` / ``AutoencoderKL`` /
``CLIPTextModel`` configs (SD1.5's module names, narrow widths), a ``CLIPTokenizer`` read from
a vocabulary and merges file written here, and kohya-format LoRA files (UNet transformer
layers + text encoder) whose factors are large enough to change every image visibly.

Everything is seeded, so the same folder is rebuilt bit for bit; it is written once into
``folder`` (default ``$LORAKERNELS_CACHE/demo-v1``, else ``~/.cache/lorakernels/demo-v1``) and
then loaded with ``from_pretrained(local_files_only=True)``, the path real models take.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

DEMO_VERSION = "demo-v1"
LORA_NAMES = ("ink", "cyber", "tarot", "pastel")
CROSS_DIM = 32
MAX_TOKENS = 32
_UNET_LAYERS = re.compile(
    r"attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\."
    r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))$"
)
_TE_LAYERS = re.compile(r"layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.fc[12])$")


def default_folder() -> Path:
    root = os.environ.get("LORAKERNELS_CACHE") or Path.home() / ".cache" / "lorakernels"
    return Path(root) / DEMO_VERSION


def lora_names(n: int) -> list[str]:
    """``n`` adapter names: the four named styles, then ``style05``, ``style06``, …"""
    return [*LORA_NAMES[:n], *(f"style{i:02d}" for i in range(len(LORA_NAMES) + 1, n + 1))]


def _write_tokenizer(folder: Path) -> Any:
    """A CLIP BPE tokenizer over letters, digits and a few merges, from files written here."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    for ch in chars:
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("t", "h"), ("th", "e</w>")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tok.model_max_length = MAX_TOKENS
    return tok


def build_pipeline(tmp: Path) -> Any:
    """The tiny random-weight pipeline (seeded)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    tok = _write_tokenizer(tmp / "tokenizer_src")
    te = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=CROSS_DIM,
            intermediate_size=2 * CROSS_DIM,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=len(tok.get_vocab()),
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    # SD1.5's noise schedule
    sched = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=te.eval(),
        tokenizer=tok,
        unet=unet.eval(),
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe


def write_lora(path: Path, pipe: Any, seed: int, strength: float = 1.0) -> None:
    """A kohya-format LoRA (rank 4, alpha 4) on the UNet transformer layers and the text
    encoder. ``up`` is scaled so the LoRA term is of the base output's size: the image changes
    visibly (the demo's test checks it numerically)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    rank = 4
    for prefix, module, pattern in (
        ("lora_unet", pipe.unet, _UNET_LAYERS),
        ("lora_te", pipe.text_encoder, _TE_LAYERS),
    ):
        for name, mod in module.named_modules():
            if not pattern.search(name) or not isinstance(mod, torch.nn.Linear | torch.nn.Conv2d):
                continue
            if isinstance(mod, torch.nn.Linear):
                k, n, down_tail, up_tail = mod.in_features, mod.out_features, (), ()
            else:
                k, n = mod.in_channels, mod.out_channels
                down_tail, up_tail = tuple(mod.kernel_size), (1, 1)
            # real files spell the text encoder with its ``text_model`` level
            body = name
            if prefix == "lora_te":
                body = "text_model." + name.removeprefix("text_model.")
            key = f"{prefix}_{body}"
            key = key.replace(".", "_")
            down = torch.randn((rank, k, *down_tail), generator=gen) / k**0.5
            up = torch.randn((n, rank, *up_tail), generator=gen) * strength
            sd[f"{key}.lora_down.weight"] = down.contiguous()
            sd[f"{key}.lora_up.weight"] = up.contiguous()
            sd[f"{key}.alpha"] = torch.tensor(float(rank))
    meta = {"ss_output_name": f"{path.stem}_v1", "ss_base_model_version": "sd_v1"}
    save_file(sd, str(path), metadata=meta)


def build(folder: str | Path | None = None, n_loras: int = 4) -> tuple[Path, Path]:
    """Write the demo model (``model/``) and ``n_loras`` LoRA files (``loras/``) into ``folder``
    unless already there; returns ``(model_dir, lora_dir)``."""
    folder = Path(folder) if folder is not None else default_folder()
    model_dir, lora_dir = folder / "model", folder / "loras"
    if not (model_dir / "model_index.json").is_file():
        pipe = build_pipeline(folder)
        pipe.save_pretrained(str(model_dir), safe_serialization=True)
    lora_dir.mkdir(parents=True, exist_ok=True)
    names = lora_names(n_loras)
    missing = [n for n in names if not (lora_dir / f"{n}.safetensors").is_file()]
    if missing:
        pipe = load_pipeline(model_dir)
        for i, name in enumerate(names):
            if name in missing:
                write_lora(lora_dir / f"{name}.safetensors", pipe, seed=1000 + i)
    return model_dir, lora_dir


def load_pipeline(model_dir: str | Path, dtype: torch.dtype | None = None) -> Any:
    """A diffusers SD pipeline folder, local files only (MODEL_DIR of ``lorakernels serve``)."""
    from diffusers import DiffusionPipeline

    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    index = json.loads((Path(model_dir) / "model_index.json").read_text())
    if "safety_checker" in index:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = DiffusionPipeline.from_pretrained(str(model_dir), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe
