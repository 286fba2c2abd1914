"""Key mapping and scales checked against diffusers, the reference loader for these files.

Two oracles, both from the installed diffusers:

1. its key converters (``_maybe_map_sgm_blocks_to_diffusers``,
   ``_convert_non_diffusers_lora_to_diffusers``, ``convert_unet_state_dict_to_peft``,
   ``convert_state_dict_to_diffusers``/``convert_state_dict_to_peft`` for text encoders): the
   set of (component, module) a file maps to must equal ours;
2. a real load into tiny models (``load_lora_into_unet``/``load_lora_into_text_encoder``,
   PEFT injection): the adapted modules, PEFT's ``scaling`` and the factors must equal ours.

Every case also checks against the synthetic ground truth the file was written from.
"""

from __future__ import annotations

import copy
import json
import math
import re

import diffusers  # noqa: F401  ([dev] installs it: a broken install fails, not skips)
import lora_files as lf
import peft  # noqa: F401  ([dev] installs it: a broken install fails, not skips)
import pytest
import torch
from diffusers.loaders import (
    StableDiffusionLoraLoaderMixin,
    StableDiffusionXLLoraLoaderMixin,
)
from diffusers.loaders.lora_conversion_utils import (
    _convert_non_diffusers_lora_to_diffusers,
    _maybe_map_sgm_blocks_to_diffusers,
)
from diffusers.utils.state_dict_utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)

from lorakernels.formats import load_lora

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def sd15():
    unet, te = lf.tiny_sd15_unet(), lf.tiny_clip()
    return {"unet": unet, "text_encoder": te}


@pytest.fixture(scope="module")
def sdxl():
    return {
        "unet": lf.tiny_sdxl_unet(),
        "text_encoder": lf.tiny_clip(),
        "text_encoder_2": lf.tiny_clip(projection=True),
    }


def names(models):
    return {c: lf.module_names(m) for c, m in models.items()}


def converter_modules(state_dict, models, unet_config=None):
    """(component, module) pairs diffusers' converters give for a state dict."""
    sd = dict(state_dict)
    kohya = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
    if all(k.startswith(kohya) for k in sd):
        if unet_config is not None:
            sd = _maybe_map_sgm_blocks_to_diffusers(sd, unet_config)
        sd, _ = _convert_non_diffusers_lora_to_diffusers(sd)
    elif not any(k.startswith(tuple(f"{c}." for c in COMPONENTS)) for k in sd):
        sd = {f"unet.{k}": v for k, v in sd.items()}  # attn-procs files without a prefix
    out = set()
    for comp in COMPONENTS:
        part = {k[len(comp) + 1 :]: v for k, v in sd.items() if k.startswith(comp + ".")}
        if not part:
            continue
        if comp == "unet":
            part = convert_unet_state_dict_to_peft(part)
        else:
            part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
            if not hasattr(models[comp], "text_model"):  # transformers 5 flattens CLIPTextModel
                part = {k.removeprefix("text_model."): v for k, v in part.items()}
        out |= {(comp, k.split(".lora_A.")[0]) for k in part if ".lora_A." in k}
    return out


def ours(resolved):
    return {(c, p) for c, mods in resolved.items() for p in mods}


def check_ground_truth(resolved, layers):
    """Every synthesized module resolved to its own factors, alpha and scale."""
    assert ours(resolved) == {(c, p) for c, mods in layers.items() for p in mods}
    for comp, mods in layers.items():
        for path, f in mods.items():
            w = resolved[comp][path]
            assert torch.equal(w.down, f.down) and torch.equal(w.up, f.up), (comp, path)
            assert w.alpha == f.alpha
            expected = 1.0 if f.alpha is None else f.alpha / f.down.shape[0]
            assert w.scale == pytest.approx(expected, rel=1e-12)


def peft_loaded(model, adapter):
    """module path -> (scaling, A, B) of every PEFT LoRA layer of ``adapter``."""
    return {
        name: (m.scaling[adapter], m.lora_A[adapter].weight, m.lora_B[adapter].weight)
        for name, m in model.named_modules()
        if hasattr(m, "lora_A") and adapter in m.lora_A
    }


def check_against_peft(resolved, models, adapter="x"):
    for comp, model in models.items():
        ref = peft_loaded(model, adapter)
        got = resolved.get(comp, {})
        assert set(ref) == set(got), comp
        for path, (scaling, a, b) in ref.items():
            w = got[path]
            assert w.scale == pytest.approx(scaling, rel=1e-6), (comp, path)
            assert torch.equal(a.detach(), w.down) and torch.equal(b.detach(), w.up), (comp, path)


def varied_rank(path):
    return 2 + len(path) % 3  # 2, 3 or 4, depending on the module


def varied_alpha(path):
    return float(len(path) % 5 + 1)


# -- kohya --------------------------------------------------------------------------------------


def test_kohya_sd15_locon_matches_converter(sd15, tmp_path):
    targets = {
        "unet": lf.lora_targets(sd15["unet"], "locon"),
        "text_encoder": lf.lora_targets(sd15["text_encoder"], "text"),
    }
    layers = lf.make_layers(targets, rank=varied_rank, alpha=varied_alpha)
    sd = lf.kohya_state_dict(layers)
    lora, resolved = load_lora(lf.save(tmp_path / "k.safetensors", sd), names(sd15))
    assert lora.format == "kohya"
    # conv layers (3x3 resnet convs, samplers, conv_in/out, 1x1 proj_in) are part of the check
    assert any(w.down.shape[2:] == (3, 3) for w in resolved["unet"].values())
    assert ours(resolved) == converter_modules(sd, sd15)
    check_ground_truth(resolved, layers)


def test_kohya_sdxl_sgm_matches_converter(sdxl, tmp_path):
    targets = {
        "unet": lf.lora_targets(sdxl["unet"], "locon"),
        "text_encoder": lf.lora_targets(sdxl["text_encoder"], "text"),
        "text_encoder_2": lf.lora_targets(sdxl["text_encoder_2"], "text"),
    }
    layers = lf.make_layers(targets, rank=varied_rank, alpha=varied_alpha)
    sd = lf.kohya_state_dict(layers, lf.SDXL_KOHYA_PREFIX, sgm_unet=sdxl["unet"])
    assert any(k.startswith("lora_unet_output_blocks_") for k in sd)
    assert any(k.startswith("lora_unet_middle_block_1_") for k in sd)
    lora, resolved = load_lora(lf.save(tmp_path / "x.safetensors", sd), names(sdxl))
    assert lora.format == "kohya_sgm"
    assert lora.base_model == "sdxl"
    assert ours(resolved) == converter_modules(sd, sdxl, sdxl["unet"].config)
    check_ground_truth(resolved, layers)


def test_kohya_sdxl_diffusers_named_variant(sdxl, tmp_path):
    targets = {
        "unet": lf.lora_targets(sdxl["unet"], "kohya"),
        "text_encoder_2": lf.lora_targets(sdxl["text_encoder_2"], "text"),
    }
    layers = lf.make_layers(targets, alpha=1.0)
    sd = lf.kohya_state_dict(layers, lf.SDXL_KOHYA_PREFIX)
    lora, resolved = load_lora(lf.save(tmp_path / "x.safetensors", sd), names(sdxl))
    assert lora.format == "kohya"
    assert ours(resolved) == converter_modules(sd, sdxl)
    check_ground_truth(resolved, layers)


# -- diffusers spellings ------------------------------------------------------------------------

SPELLINGS = {
    "attnprocs_unprefixed": (lambda ls: lf.attnprocs_state_dict(ls, prefix=False), "unet only"),
    "attnprocs": (lf.attnprocs_state_dict, "diffusers_attnprocs"),
    "diffusers_lora": (lf.diffusers_lora_state_dict, "diffusers_lora"),
    "peft": (lf.peft_state_dict, "peft"),
}


@pytest.mark.parametrize("spelling", list(SPELLINGS))
@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_diffusers_spellings_match_converter(spelling, model, request, tmp_path):
    models = request.getfixturevalue(model)
    write, fmt = SPELLINGS[spelling]
    targets = {"unet": lf.lora_targets(models["unet"], "attn")}
    if fmt != "unet only":
        for comp in ("text_encoder", "text_encoder_2"):
            if comp in models:
                targets[comp] = lf.lora_targets(models[comp], "text")
    layers = lf.make_layers(targets, rank=varied_rank)
    sd = write(layers)
    lora, resolved = load_lora(lf.save(tmp_path / "d.safetensors", sd), names(models))
    if fmt == "diffusers_attnprocs":
        # attn-procs files spell text-encoder MLPs with lora_linear_layer
        assert lora.format == "diffusers_attnprocs+diffusers_lora"
    elif fmt != "unet only":
        assert lora.format == fmt
    assert ours(resolved) == converter_modules(sd, models)
    check_ground_truth(resolved, layers)


# -- real loads through diffusers + PEFT ----------------------------------------------------------


def test_kohya_sd15_scales_match_peft_load(sd15, tmp_path):
    models = {c: copy.deepcopy(m) for c, m in sd15.items()}
    targets = {
        "unet": lf.lora_targets(models["unet"], "locon"),
        "text_encoder": lf.lora_targets(models["text_encoder"], "text"),
    }
    # kohya's default alpha 1 with per-module ranks: scale 1/r differs per module. (diffusers
    # drops per-module alphas of attention layers when they differ, see the report, so the
    # alphas stay uniform here; varied alphas are checked against the ground truth above.)
    layers = lf.make_layers(targets, rank=varied_rank, alpha=1.0)
    path = lf.save(tmp_path / "k.safetensors", lf.kohya_state_dict(layers))
    _, resolved = load_lora(path, names(models))

    mixin = StableDiffusionLoraLoaderMixin
    sd, alphas = mixin.lora_state_dict(str(path), unet_config=models["unet"].config)
    mixin.load_lora_into_unet(sd, alphas, models["unet"], adapter_name="x")
    mixin.load_lora_into_text_encoder(
        sd, alphas, models["text_encoder"], prefix="text_encoder", adapter_name="x"
    )
    check_against_peft(resolved, models)


def test_kohya_sdxl_sgm_scales_match_peft_load(sdxl, tmp_path):
    models = {c: copy.deepcopy(m) for c, m in sdxl.items()}
    targets = {
        "unet": lf.lora_targets(models["unet"], "kohya"),
        "text_encoder": lf.lora_targets(models["text_encoder"], "text"),
        "text_encoder_2": lf.lora_targets(models["text_encoder_2"], "text"),
    }
    layers = lf.make_layers(targets, rank=varied_rank, alpha=2.0)
    sd = lf.kohya_state_dict(layers, lf.SDXL_KOHYA_PREFIX, sgm_unet=models["unet"])
    path = lf.save(tmp_path / "x.safetensors", sd)
    _, resolved = load_lora(path, names(models))

    mixin = StableDiffusionXLLoraLoaderMixin
    sd, alphas = mixin.lora_state_dict(str(path), unet_config=models["unet"].config)
    mixin.load_lora_into_unet(sd, alphas, models["unet"], adapter_name="x")
    for comp in ("text_encoder", "text_encoder_2"):
        mixin.load_lora_into_text_encoder(sd, alphas, models[comp], prefix=comp, adapter_name="x")
    check_against_peft(resolved, models)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_metadata_matches_peft_load(sd15, tmp_path, rslora):
    unet = copy.deepcopy(sd15["unet"])
    targets = {"unet": lf.lora_targets(unet, "kohya")}
    rank_of = {p: (8 if "attn2.to_k" in p else 4) for p in targets["unet"]}
    layers = lf.make_layers(targets, rank=rank_of.__getitem__)
    config = {
        "r": 4,
        "lora_alpha": 8,
        "rank_pattern": {"attn2.to_k": 8},
        # first match wins: mid_block's to_v gets 3, every other to_v 2
        "alpha_pattern": {r"mid_block\..*\.to_v": 3, "to_v": 2, "proj_in": 16},
        "target_modules": sorted(targets["unet"]),
        "use_rslora": rslora,
    }
    metadata = {"lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in config.items()})}
    path = lf.save(tmp_path / "p.safetensors", lf.peft_state_dict(layers), metadata)
    _, resolved = load_lora(path, {"unet": lf.module_names(unet)})

    mixin = StableDiffusionLoraLoaderMixin
    sd, alphas, meta = mixin.lora_state_dict(str(path), return_lora_metadata=True)
    mixin.load_lora_into_unet(sd, alphas, unet, adapter_name="x", metadata=meta)
    check_against_peft(resolved, {"unet": unet})

    # and against the config itself, so that a shared misreading would still be caught
    for path_, w in resolved["unet"].items():
        if re.search(r"mid_block\..*\.to_v$", path_):
            alpha = 3
        elif path_.endswith("to_v"):
            alpha = 2
        elif path_.endswith("proj_in"):
            alpha = 16
        else:
            alpha = 8
        r = rank_of[path_]
        assert w.rank == r
        assert w.scale == pytest.approx(alpha / (math.sqrt(r) if rslora else r))


def test_diffusers_lora_spelling_matches_peft_load(sd15, tmp_path):
    models = {c: copy.deepcopy(m) for c, m in sd15.items()}
    targets = {
        "unet": lf.lora_targets(models["unet"], "attn"),
        "text_encoder": lf.lora_targets(models["text_encoder"], "text"),
    }
    layers = lf.make_layers(targets, rank=varied_rank)
    path = lf.save(tmp_path / "d.safetensors", lf.diffusers_lora_state_dict(layers))
    _, resolved = load_lora(path, names(models))

    mixin = StableDiffusionLoraLoaderMixin
    sd, alphas = mixin.lora_state_dict(str(path))
    mixin.load_lora_into_unet(sd, alphas, models["unet"], adapter_name="x")
    mixin.load_lora_into_text_encoder(
        sd, alphas, models["text_encoder"], prefix="text_encoder", adapter_name="x"
    )
    check_against_peft(resolved, models)
