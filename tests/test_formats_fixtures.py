"""Real LoRA files from public repositories (``../shared/fixtures``; skipped when absent).

The module names come from a narrow UNet with SD1.5's block structure: names depend on the
blocks, not on the channel widths.
"""

from __future__ import annotations

import re
from pathlib import Path

import lora_files as lf
import pytest
import torch

from lorakernels.formats import (
    LoRAFormatError,
    LoRAFormatWarning,
    load_lora,
    read_lora_file,
)

# name -> (format, dtype, parameters, base model read from the cross-attention width)
GOOD = {
    "sd15_attnprocs_pokemon": ("diffusers_attnprocs", torch.float32, 797_184, "sd1"),
    "sd15_unet_lora_timo": ("diffusers_lora", torch.float32, 797_184, "sd1"),
    # this one's attn2.to_k factors take 1024 inputs: trained on SD2.x (same module names)
    "sd15_unet_lora_bf16": ("diffusers_lora", torch.bfloat16, 829_952, "sd2"),
}


@pytest.fixture(scope="module")
def fixtures(fixtures_dir) -> Path:
    return fixtures_dir


@pytest.fixture(scope="module")
def sd15_modules():
    return {"unet": lf.module_names(lf.tiny_sd15_unet())}


def expected_sd15_attention_modules(modules):
    pattern = re.compile(r"transformer_blocks\.0\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
    return {m for m in modules if pattern.search(m)}


@pytest.mark.parametrize("name", list(GOOD))
def test_real_sd15_files_load(name, fixtures, sd15_modules):
    fmt, dtype, params, base = GOOD[name]
    lora, resolved = load_lora(fixtures / f"{name}.safetensors", sd15_modules)
    assert lora.format == fmt
    assert lora.name == name and lora.aliases == (name,)
    assert lora.base_model == base
    assert lora.num_params == params
    assert list(resolved) == ["unet"]
    unet = resolved["unet"]
    assert len(unet) == 128
    assert set(unet) == expected_sd15_attention_modules(sd15_modules["unet"])
    for w in unet.values():
        assert w.rank == 4 and w.alpha is None and w.scale == 1.0
        assert w.down.dtype == dtype and w.up.dtype == dtype
        assert w.down.dim() == 2 and w.up.shape[1] == 4
        assert torch.isfinite(w.down.float()).all() and w.up.abs().sum() > 0


def test_real_files_agree_with_diffusers_converter(fixtures, sd15_modules):
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    from safetensors.torch import load_file

    for name in GOOD:
        path = fixtures / f"{name}.safetensors"
        sd = {k.removeprefix("unet."): v for k, v in load_file(path).items()}
        theirs = {
            k.split(".lora_A.")[0] for k in convert_unet_state_dict_to_peft(sd) if "lora_A" in k
        }
        _, resolved = load_lora(path, sd15_modules)
        assert set(resolved["unet"]) == theirs, name


def test_real_malformed_file_is_refused_naming_keys(fixtures, sd15_modules):
    path = fixtures / "malformed_double_prefix.safetensors"
    with pytest.raises(LoRAFormatError) as info:
        load_lora(path, sd15_modules)
    message = str(info.value)
    assert str(path) in message
    assert "lora_unet_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k" in message
    assert "256 keys" in message
    # non-strict skips every key with a warning, which leaves nothing: still an error
    with pytest.warns(LoRAFormatWarning), pytest.raises(LoRAFormatError, match="no LoRA module"):
        read_lora_file(path, strict=False)


@pytest.mark.parametrize("strict", [True, False])
def test_real_truncated_file_is_refused(fixtures, strict):
    path = fixtures / "sdxl_attnprocs_truncated.safetensors"
    with pytest.raises(LoRAFormatError, match="truncated") as info:
        read_lora_file(path, strict=strict)
    assert str(path) in str(info.value)
    assert "1310720" in str(info.value)
