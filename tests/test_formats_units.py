"""Pieces of the formats package: Tucker folding, SGM names, PEFT configs, names and hints."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lorakernels.formats import LoRALayerWeights, load_lora, read_lora_file
from lorakernels.formats.assemble import fold_tucker
from lorakernels.formats.errors import LoRAFormatError
from lorakernels.formats.peft_config import PeftLoraConfig
from lorakernels.formats.sgm import sgm_to_diffusers_body

gen = torch.Generator().manual_seed(7)


def rnd(*shape, dtype=torch.float32):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def write(tmp_path, tensors, name="f.safetensors", metadata=None):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


# -- Tucker (lora_mid) ----------------------------------------------------------------------------

CONV = "down_blocks.0.resnets.0.conv1"
CONV_KEY = "lora_unet_down_blocks_0_resnets_0_conv1"


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 3e-2)]
)
@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 1)])
def test_tucker_fold_equals_three_convs(tmp_path, dtype, tol, stride, padding):
    r, c_in, c_out = 3, 5, 7
    down, mid, up = rnd(r, c_in, 1, 1), rnd(r, r, 3, 3), rnd(c_out, r, 1, 1)
    tensors = {
        f"{CONV_KEY}.lora_down.weight": down.to(dtype),
        f"{CONV_KEY}.lora_mid.weight": mid.to(dtype),
        f"{CONV_KEY}.lora_up.weight": up.to(dtype),
        f"{CONV_KEY}.alpha": torch.tensor(1.5),
    }
    _, resolved = load_lora(write(tmp_path, tensors), {"unet": [CONV]})
    w = resolved["unet"][CONV]
    assert w.down.shape == (r, c_in, 3, 3) and w.down.dtype == dtype
    assert w.up.dtype == dtype and w.scale == pytest.approx(0.5)

    x = rnd(2, c_in, 9, 9, dtype=torch.float64)
    # oracle: the three convs as LyCORIS runs them, in float64 from the stored values
    d64, m64, u64 = (t.to(dtype).double() for t in (down, mid, up))
    ref = F.conv2d(F.conv2d(F.conv2d(x, d64), m64, stride=stride, padding=padding), u64)
    out = F.conv2d(F.conv2d(x, w.down.double(), stride=stride, padding=padding), w.up.double())
    err = (out - ref).abs().max().item()
    assert err <= tol * ref.abs().max().item()


def test_fold_tucker_rejects_bad_shapes():
    with pytest.raises(LoRAFormatError, match="lora_mid"):
        fold_tucker(rnd(3, 5, 3, 3), rnd(3, 3, 3, 3))
    with pytest.raises(LoRAFormatError, match="lora_mid"):
        fold_tucker(rnd(3, 5, 1, 1), rnd(4, 3, 3, 3))


# -- SGM block names ------------------------------------------------------------------------------

SDXL_LAYOUT = (2, {0, 1}.__contains__)  # SDXL: up blocks 0 and 1 have attentions
SD1_LAYOUT = (2, {1, 2, 3}.__contains__)  # SD1: the innermost up block has none


@pytest.mark.parametrize(
    "body, layout, expected",
    [
        ("input_blocks_0_0", SDXL_LAYOUT, "conv_in"),
        ("input_blocks_1_0_in_layers_2", SDXL_LAYOUT, "down_blocks_0_resnets_0_conv1"),
        ("input_blocks_2_0_out_layers_3", SDXL_LAYOUT, "down_blocks_0_resnets_1_conv2"),
        ("input_blocks_3_0_op", SDXL_LAYOUT, "down_blocks_0_downsamplers_0_conv"),
        ("input_blocks_4_0_skip_connection", SDXL_LAYOUT, "down_blocks_1_resnets_0_conv_shortcut"),
        (
            "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            SDXL_LAYOUT,
            "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
        ),
        ("input_blocks_8_1_proj_in", SDXL_LAYOUT, "down_blocks_2_attentions_1_proj_in"),
        ("middle_block_0_emb_layers_1", SDXL_LAYOUT, "mid_block_resnets_0_time_emb_proj"),
        ("middle_block_1_proj_out", SDXL_LAYOUT, "mid_block_attentions_0_proj_out"),
        ("middle_block_2_in_layers_2", SDXL_LAYOUT, "mid_block_resnets_1_conv1"),
        (
            "output_blocks_0_1_transformer_blocks_9_ff_net_2",
            SDXL_LAYOUT,
            "up_blocks_0_attentions_0_transformer_blocks_9_ff_net_2",
        ),
        ("output_blocks_2_2_conv", SDXL_LAYOUT, "up_blocks_0_upsamplers_0_conv"),
        ("output_blocks_5_1_proj_in", SDXL_LAYOUT, "up_blocks_1_attentions_2_proj_in"),
        ("output_blocks_8_0_skip_connection", SDXL_LAYOUT, "up_blocks_2_resnets_2_conv_shortcut"),
        ("time_embed_2", SDXL_LAYOUT, "time_embedding_linear_2"),
        ("label_emb_0_0", SDXL_LAYOUT, "add_embedding_linear_1"),
        ("out_2", SDXL_LAYOUT, "conv_out"),
        # SD1 layout: output block 2 is [resnet, upsampler], so its index 1 is the upsampler
        ("output_blocks_2_1_conv", SD1_LAYOUT, "up_blocks_0_upsamplers_0_conv"),
        ("output_blocks_5_2_conv", SD1_LAYOUT, "up_blocks_1_upsamplers_0_conv"),
        ("output_blocks_4_1_proj_in", SD1_LAYOUT, "up_blocks_1_attentions_1_proj_in"),
        # not SGM, or not a LoRA target
        ("down_blocks_0_resnets_0_conv1", SDXL_LAYOUT, None),
        ("input_blocks_1_0_in_layers_0", SDXL_LAYOUT, None),
        ("middle_block_3_proj_in", SDXL_LAYOUT, None),
    ],
)
def test_sgm_names(body, layout, expected):
    assert sgm_to_diffusers_body(body, *layout) == expected


def test_sgm_kohya_for_sd1_layout_matches_ground_truth(tmp_path):
    import lora_files as lf

    unet = lf.tiny_sd15_unet()
    layers = lf.make_layers({"unet": lf.lora_targets(unet, "locon")}, rank=2, alpha=1.0)
    sd = lf.kohya_state_dict(layers, sgm_unet=unet)
    assert "lora_unet_output_blocks_2_1_conv.lora_down.weight" in sd  # the SD1 upsampler
    lora, resolved = load_lora(write(tmp_path, sd), {"unet": lf.module_names(unet)})
    assert lora.format == "kohya_sgm"
    assert set(resolved["unet"]) == set(layers["unet"])
    for path, f in layers["unet"].items():
        assert torch.equal(resolved["unet"][path].down, f.down)


# -- PEFT configs ---------------------------------------------------------------------------------


def test_peft_config_patterns_first_match_wins():
    cfg = PeftLoraConfig(
        r=4,
        lora_alpha=8,
        rank_pattern=(("to_k", 2),),
        alpha_pattern=((r"mid_block\..*to_v", 1.0), ("to_v", 2.0)),
    )
    assert cfg.alpha_for("mid_block.attentions.0.transformer_blocks.0.attn1.to_v") == 1.0
    assert cfg.alpha_for("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v") == 2.0
    assert cfg.alpha_for("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q") == 8.0
    # patterns match whole dotted segments only: "to_k" does not match "add_to_k"
    assert cfg.rank_for("x.to_k") == 2 and cfg.rank_for("x.add_to_k") == 4
    rs = PeftLoraConfig(r=16, lora_alpha=8, use_rslora=True)
    assert rs.alpha_for("x") / 16 == pytest.approx(8 / math.sqrt(16))


def test_flat_peft_config_and_wrapper_prefix(tmp_path):
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    tensors = {
        f"base_model.model.{q}.lora_A.weight": rnd(2, 8),
        f"base_model.model.{q}.lora_B.weight": rnd(8, 2),
    }
    meta = {"lora_adapter_metadata": json.dumps({"r": 2, "lora_alpha": 1})}
    _, resolved = load_lora(write(tmp_path, tensors, metadata=meta), {"unet": [q]})
    assert resolved["unet"][q].scale == 0.5


def test_peft_without_config_has_scale_one_unless_alpha_keys(tmp_path):
    q, k = "blocks.0.to_q", "blocks.0.to_k"
    tensors = {
        f"unet.{q}.lora_A.weight": rnd(4, 8),
        f"unet.{q}.lora_B.weight": rnd(8, 4),
        f"unet.{k}.lora_A.weight": rnd(4, 8),
        f"unet.{k}.lora_B.weight": rnd(8, 4),
        f"unet.{k}.alpha": torch.tensor(2.0),
    }
    _, resolved = load_lora(write(tmp_path, tensors), {"unet": [q, k]})
    assert resolved["unet"][q].alpha is None and resolved["unet"][q].scale == 1.0
    assert resolved["unet"][k].scale == 0.5


# -- text_model level (transformers 5 flattens CLIPTextModel) ------------------------------------

FLAT = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.0.mlp.fc1"]
NESTED = ["text_model." + n for n in FLAT]


@pytest.mark.parametrize("model_names", [FLAT, NESTED])
@pytest.mark.parametrize(
    "keys",
    [
        ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",),
        ("lora_te2_encoder_layers_0_self_attn_q_proj.lora_down.weight",),
        ("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",),
        ("text_encoder_2.encoder.layers.0.self_attn.q_proj.lora_A.weight",),
    ],
)
def test_text_model_level_is_optional(tmp_path, model_names, keys):
    (down_key,) = keys
    up_key = down_key.replace("lora_down", "lora_up").replace("lora_A", "lora_B")
    path = write(tmp_path, {down_key: rnd(2, 8), up_key: rnd(8, 2)})
    _, resolved = load_lora(path, {"text_encoder_2": model_names})
    assert list(resolved["text_encoder_2"]) == [model_names[0]]


# -- names, hints, formats ------------------------------------------------------------------------

KQ = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def pair(stem=KQ, k=8):
    return {f"{stem}.lora_down.weight": rnd(4, k), f"{stem}.lora_up.weight": rnd(8, 4)}


@pytest.mark.parametrize(
    "metadata, expected",
    [
        ({"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
        ({"ss_base_model_version": "sd_v1"}, "sd1"),
        ({"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, "sd2"),
        ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl"),
        ({"modelspec.architecture": "flux-1-dev/lora"}, "flux-1-dev/lora"),
        ({"ss_v2": "True"}, "sd2"),
        ({}, None),
    ],
)
def test_base_model_from_metadata(tmp_path, metadata, expected):
    lora = read_lora_file(write(tmp_path, pair(), metadata=metadata))
    assert lora.base_model == expected


def test_base_model_keys_beat_metadata(tmp_path):
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    meta = {"ss_base_model_version": "sdxl_base_v1-0"}
    lora = read_lora_file(write(tmp_path, pair(stem, k=768), metadata=meta))
    assert lora.base_model == "sd1"


def test_aliases_and_metadata(tmp_path):
    meta = {"ss_output_name": "cute_style", "ss_network_dim": "4"}
    lora = read_lora_file(write(tmp_path, pair(), name="cute_style_v2.safetensors", metadata=meta))
    assert lora.name == "cute_style_v2"
    assert lora.aliases == ("cute_style_v2", "cute_style")
    assert lora.metadata["ss_network_dim"] == "4"
    same = read_lora_file(
        write(tmp_path, pair(), name="x.safetensors", metadata={"ss_output_name": "x"})
    )
    assert same.aliases == ("x",)


def test_mixed_spellings_are_reported(tmp_path):
    a = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    tensors = {
        f"{a}.processor.to_q_lora.down.weight": rnd(2, 8),
        f"{a}.processor.to_q_lora.up.weight": rnd(8, 2),
        f"unet.{a}.to_k.lora_A.weight": rnd(2, 8),
        f"unet.{a}.to_k.lora_B.weight": rnd(8, 2),
    }
    lora, resolved = load_lora(write(tmp_path, tensors), {"unet": [f"{a}.to_q", f"{a}.to_k"]})
    assert lora.format == "diffusers_attnprocs+peft"
    assert set(resolved["unet"]) == {f"{a}.to_q", f"{a}.to_k"}


def test_bf16_factors_stay_bf16_and_alpha_is_float(tmp_path):
    tensors = {k: v.to(torch.bfloat16) for k, v in pair().items()}
    tensors[f"{KQ}.alpha"] = torch.tensor(1.0, dtype=torch.bfloat16)
    (layer,) = read_lora_file(write(tmp_path, tensors)).layers
    assert layer.weights.down.dtype == torch.bfloat16 and layer.weights.up.dtype == torch.bfloat16
    assert isinstance(layer.weights.alpha, float) and layer.weights.scale == 0.25
    assert layer.weights.key == KQ


def test_layer_weights_properties():
    lin = LoRALayerWeights(down=rnd(4, 8), up=rnd(6, 4), alpha=None)
    assert lin.rank == 4 and lin.scale == 1.0 and not lin.is_conv
    assert lin.linear_factors() == (lin.down, lin.up)
    one = LoRALayerWeights(down=rnd(4, 8, 1, 1), up=rnd(6, 4, 1, 1), alpha=2.0)
    a, b = one.linear_factors()
    assert one.is_conv and one.scale == 0.5 and a.shape == (4, 8) and b.shape == (6, 4)
    assert torch.equal(a, one.down[:, :, 0, 0])
    three = LoRALayerWeights(down=rnd(4, 8, 3, 3), up=rnd(6, 4, 1, 1), alpha=1.0, key="k")
    with pytest.raises(ValueError, match="1x1"):
        three.linear_factors()
