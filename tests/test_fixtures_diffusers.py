"""The real LoRA files of ``../shared/fixtures`` at the real SD1.5 / SD2 layer shapes, with
diffusers' own loading as the oracle (skipped when the folder is absent).

A full SD1.5 UNet costs ~30 s to build on our CPU, so the default test builds it on the meta
device and materialises only the layers the files touch; every one of those layers is compared
with diffusers + PEFT on a mixed batch. The whole-UNet comparison is marked slow.
"""

from __future__ import annotations

import copy

import diffusers  # noqa: F401  ([dev] installs it: a broken install fails, not skips)
import peft  # noqa: F401  ([dev] installs it: a broken install fails, not skips)
import pytest
import torch
from torch import nn

from lorakernels import MultiLoRA
from lorakernels.formats import LoRAFormatError, load_lora
from lorakernels.integrations.diffusers import DiffusersLoRA

SD15 = dict(
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    sample_size=64,
)
SD2 = dict(SD15, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20))
SD2["use_linear_projection"] = True
FILES = {  # file -> the UNet config it was trained for (the "bf16" file is an SD2 LoRA)
    "sd15_attnprocs_pokemon.safetensors": SD15,
    "sd15_unet_lora_timo.safetensors": SD15,
    "sd15_unet_lora_bf16.safetensors": SD2,
}


def _meta_unet(config: dict) -> nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config).eval()


def _materialize(unet: nn.Module, names, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name in names:
        layer = unet.get_submodule(name)
        layer.to_empty(device="cpu")
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _diffusers_load(unet: nn.Module, path, name: str) -> None:
    from diffusers import StableDiffusionPipeline

    sd, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    if any(k.startswith("unet.") for k in sd):
        StableDiffusionPipeline.load_lora_into_unet(sd, alphas, unet, adapter_name=name)
    else:
        unet.load_lora_adapter(sd, prefix=None, network_alphas=alphas, adapter_name=name)


@pytest.mark.parametrize("config", [SD15, SD2], ids=["sd15", "sd2"])
def test_fixture_files_match_diffusers_layer_by_layer(fixtures_dir, config):
    files = {f: fixtures_dir / f for f, c in FILES.items() if c is config}
    unet = _meta_unet(config)
    names = [n for n, _ in unet.named_modules() if n]
    layers_by_file = {f: load_lora(p, {"unet": names})[1]["unet"] for f, p in files.items()}
    touched = sorted({k for layers in layers_by_file.values() for k in layers})
    assert len(touched) == 128
    _materialize(unet, touched, seed=0)
    theirs = copy.deepcopy(unet)
    ours_model = unet
    adapters = {f.split(".")[0]: p for f, p in files.items()}
    for name, path in adapters.items():
        _diffusers_load(theirs, path, name)
    mlora = MultiLoRA(ours_model)
    for name, layers in zip(adapters, layers_by_file.values(), strict=True):
        assert {w.rank for w in layers.values()} == {4}
        mlora.load(name, layers)
    names_ = list(adapters)
    # a single file (sd2) gets a negative strength in the third sample instead of a mix
    mixtures = [{names_[0]: 1.0}, {}, {names_[0]: 0.7, names_[-1]: -0.5}]
    g = torch.Generator().manual_seed(1)
    with mlora.use(mixtures), torch.no_grad():
        for path in touched:
            ours, ref = ours_model.get_submodule(path), theirs.get_submodule(path)
            x = torch.randn(len(mixtures), 5, ours.in_features, generator=g)
            got = ours(x)
            for s, mix in enumerate(mixtures):
                if mix:
                    theirs.enable_adapters()
                    theirs.set_adapters(list(mix), weights=list(mix.values()))
                else:
                    theirs.disable_adapters()
                want = ref(x[s : s + 1])
                torch.testing.assert_close(got[s : s + 1], want, rtol=1e-4, atol=1e-5)


def test_malformed_and_truncated_fixtures_refused_nothing_loaded(fixtures_dir):
    unet = _meta_unet(SD15)  # refusal happens before any weight is touched
    lora = DiffusersLoRA(unet)
    with pytest.raises(LoRAFormatError, match="malformed_double_prefix") as err:
        lora.load(fixtures_dir / "malformed_double_prefix.safetensors")
    assert "lora_unet_unet" in str(err.value)
    with pytest.raises(LoRAFormatError, match="truncated"):
        lora.load(fixtures_dir / "sdxl_attnprocs_truncated.safetensors")
    assert lora.loaded == [] and all(not m.slots for m in lora.managers.values())
    assert all(not m.layers for m in lora.managers.values())


@pytest.mark.slow
def test_fixture_full_sd15_unet_matches_diffusers(fixtures_dir):
    """The whole real-size SD1.5 UNet (random weights), mixed batch vs diffusers per sample."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15).eval()
    theirs = copy.deepcopy(unet)
    paths = {
        "pokemon": fixtures_dir / "sd15_attnprocs_pokemon.safetensors",
        "timo": fixtures_dir / "sd15_unet_lora_timo.safetensors",
    }
    lora = DiffusersLoRA(unet)
    for name, path in paths.items():
        lora.load(path, name)
        _diffusers_load(theirs, path, name)
    mixtures = [{"pokemon": 1.0}, {"timo": 0.8, "pokemon": -0.3}, {}]
    x = torch.randn(3, 4, 8, 8)
    ctx = torch.randn(3, 77, 768)
    with lora.use(unet=mixtures), torch.no_grad():
        got = unet(x, 10, ctx).sample
    for s, mix in enumerate(mixtures):
        if mix:
            theirs.enable_adapters()
            theirs.set_adapters(list(mix), weights=list(mix.values()))
        else:
            theirs.disable_adapters()
        with torch.no_grad():
            want = theirs(x[s : s + 1], 10, ctx[s : s + 1]).sample
        torch.testing.assert_close(got[s : s + 1], want, rtol=1e-3, atol=1e-4)
