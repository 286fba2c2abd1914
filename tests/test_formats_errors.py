"""Refusals: broken files, foreign algorithms, malformed modules, keys that fit no module.

Strict mode raises naming the file and keys; ``strict=False`` warns and skips what it can, and
still raises for malformed files. These tests need only torch and safetensors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorakernels.formats import (
    LoRAFormatError,
    LoRAFormatWarning,
    UnsupportedLoRAAlgorithm,
    load_lora,
    read_lora_file,
    resolve_modules,
)

BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0"
Q, K = f"{BLOCK}.attn1.to_q", f"{BLOCK}.attn1.to_k"
MODULES = {"unet": ["", "down_blocks", Q, K, f"{BLOCK}.attn1.to_v", f"{BLOCK}.attn1.to_out.0"]}
KQ = "lora_unet_" + Q.replace(".", "_")
KK = "lora_unet_" + K.replace(".", "_")

gen = torch.Generator().manual_seed(1)


def rnd(*shape, dtype=torch.float32):
    return torch.randn(shape, generator=gen).to(dtype)


def kohya_pair(stem, r=4, k=8, n=8, alpha=1.0):
    out = {f"{stem}.lora_down.weight": rnd(r, k), f"{stem}.lora_up.weight": rnd(n, r)}
    if alpha is not None:
        out[f"{stem}.alpha"] = torch.tensor(alpha)
    return out


def write(tmp_path: Path, tensors, name="f.safetensors", metadata=None) -> Path:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


# -- unreadable files ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin", ".ckpt"])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    with pytest.raises(LoRAFormatError, match="empty") as info:
        read_lora_file(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".lora"])
def test_garbage_bytes(tmp_path, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(b"this is not a LoRA file at all, just some text\n" * 20)
    with pytest.raises(LoRAFormatError) as info:
        read_lora_file(path)
    assert str(path) in str(info.value)


def test_tiny_safetensors(tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(LoRAFormatError, match="only 2 bytes"):
        read_lora_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(LoRAFormatError, match="no such LoRA file"):
        read_lora_file(tmp_path / "nope.safetensors")


def test_header_not_json(tmp_path):
    path = tmp_path / "bad.safetensors"
    body = b"{not json" + b" " * 7
    path.write_bytes(len(body).to_bytes(8, "little") + body)
    with pytest.raises(LoRAFormatError, match="not JSON") as info:
        read_lora_file(path)
    assert str(path) in str(info.value)


def test_truncated_synthetic(tmp_path):
    path = write(tmp_path, kohya_pair(KQ, k=64, n=64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(LoRAFormatError, match="truncated") as info:
        read_lora_file(path)
    assert str(path) in str(info.value)


def test_header_shape_disagrees_with_byte_count(tmp_path):
    header = {"x.lora_down.weight": {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 64]}}
    raw = json.dumps(header).encode()
    path = tmp_path / "lying.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 64)
    with pytest.raises(LoRAFormatError, match="x.lora_down.weight"):
        read_lora_file(path)


@pytest.mark.parametrize(
    "content, what",
    [
        ([torch.zeros(2)], "list"),
        (torch.zeros(2), "Tensor"),
        ({f"{KQ}.lora_down.weight": torch.zeros(4, 8), "epoch": 3}, "'epoch' holding a int"),
        ({0: torch.zeros(2)}, "key 0"),
    ],
)
def test_non_tensor_pickle(tmp_path, content, what):
    path = tmp_path / "odd.pt"
    torch.save(content, path)
    with pytest.raises(LoRAFormatError, match="expected a dict") as info:
        read_lora_file(path)
    assert what in str(info.value) and str(path) in str(info.value)


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "code.ckpt"
    torch.save({"w": torch.zeros(1), "obj": Path("x")}, path)  # not allowed by weights_only
    with pytest.raises(LoRAFormatError, match="weights_only") as info:
        read_lora_file(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".ckpt", ".pth"])
@pytest.mark.parametrize("wrapped", [False, True])
def test_pickles_load_like_safetensors(tmp_path, suffix, wrapped):
    tensors = {**kohya_pair(KQ, alpha=2.0), **kohya_pair(KK, r=2, alpha=None)}
    reference = resolve_modules(read_lora_file(write(tmp_path, tensors)), MODULES)["unet"]
    path = tmp_path / f"same{suffix}"
    torch.save({"state_dict": tensors} if wrapped else tensors, path)
    lora, resolved = load_lora(path, MODULES)
    assert lora.metadata == {} and lora.format == "kohya"
    assert set(resolved["unet"]) == set(reference) == {Q, K}
    for name, w in resolved["unet"].items():
        assert torch.equal(w.down, reference[name].down) and w.scale == reference[name].scale
    assert resolved["unet"][Q].scale == 0.5 and resolved["unet"][K].scale == 1.0


def test_file_without_tensors(tmp_path):
    path = tmp_path / "none.pt"
    torch.save({}, path)
    with pytest.raises(LoRAFormatError, match="no tensors"):
        read_lora_file(path)


# -- foreign algorithms -------------------------------------------------------------------------

STEM = "lora_unet_" + f"{BLOCK}.attn1.to_v".replace(".", "_")
PEFT_V = f"unet.{BLOCK}.attn1.to_v"

ALGORITHMS = {
    "LoHa": {f"{STEM}.{s}": rnd(4, 8) for s in ("hada_w1_a", "hada_w1_b", "hada_w2_a")}
    | {f"{STEM}.hada_w2_b": rnd(4, 8), f"{STEM}.alpha": torch.tensor(1.0)},
    "LoKr": {f"{STEM}.lokr_w1": rnd(2, 2), f"{STEM}.lokr_w2": rnd(4, 4)},
    "full weight diff": {f"{STEM}.diff": rnd(8, 8), f"{STEM}.diff_b": rnd(8)},
    "DoRA": {**kohya_pair(STEM), f"{STEM}.dora_scale": rnd(1, 8)},
    "(IA)3": {f"{STEM}.weight": rnd(8), f"{STEM}.on_input": torch.tensor(False)},
    "GLoRA": {f"{STEM}.{s}.weight": rnd(2, 8) for s in ("a1", "a2", "b1", "b2")},
    "OFT": {f"{STEM}.oft_blocks": rnd(2, 4, 4), f"{STEM}.alpha": torch.tensor(1.0)},
    "norm-layer diff": {f"{STEM}.w_norm": rnd(8), f"{STEM}.b_norm": rnd(8)},
    "LoRA with a trained bias": {
        f"{PEFT_V}.lora_A.weight": rnd(4, 8),
        f"{PEFT_V}.lora_B.weight": rnd(8, 4),
        f"{PEFT_V}.lora_B.bias": rnd(8),
    },
    "DoRA (PEFT)": {
        f"{PEFT_V}.lora_A.weight": rnd(4, 8),
        f"{PEFT_V}.lora_B.weight": rnd(8, 4),
        f"{PEFT_V}.lora_magnitude_vector": rnd(8),
    },
    "bundled textual-inversion embedding": {"bundle_emb.mychar.string_to_param.*": rnd(2, 8)},
}


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_foreign_algorithm_strict_raises(tmp_path, name):
    path = write(tmp_path, {**kohya_pair(KQ), **ALGORITHMS[name]})
    with pytest.raises(UnsupportedLoRAAlgorithm) as info:
        read_lora_file(path)
    algorithm = name.removesuffix(" (PEFT)")
    message = str(info.value)
    assert algorithm in message and str(path) in message
    assert info.value.algorithms == (algorithm,)
    foreign = set(ALGORITHMS[name]) - set(kohya_pair(STEM)) - {f"{PEFT_V}.lora_A.weight"}
    foreign -= {f"{PEFT_V}.lora_B.weight", f"{STEM}.alpha"}
    assert foreign <= set(info.value.keys)
    assert any(k in message for k in foreign)


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_foreign_algorithm_non_strict_skips_the_whole_module(tmp_path, name):
    path = write(tmp_path, {**kohya_pair(KQ), **ALGORITHMS[name]})
    with pytest.warns(LoRAFormatWarning, match=re.escape(name.removesuffix(" (PEFT)"))):
        lora, resolved = load_lora(path, MODULES, strict=False)
    assert set(resolved["unet"]) == {Q}  # to_v's own lora_down/lora_up are skipped too
    assert set(lora.skipped) == set(ALGORITHMS[name])


def test_bare_weight_without_on_input_is_unknown_not_ia3(tmp_path):
    path = write(tmp_path, {**kohya_pair(KQ), f"{STEM}.weight": rnd(8)})
    with pytest.raises(LoRAFormatError) as info:
        read_lora_file(path)
    assert not isinstance(info.value, UnsupportedLoRAAlgorithm)
    assert f"{STEM}.weight" in str(info.value)


def test_peft_type_in_header_other_than_lora(tmp_path):
    meta = {"lora_adapter_metadata": json.dumps({"peft_type": "LOHA", "r": 4})}
    path = write(tmp_path, kohya_pair(KQ), metadata=meta)
    with pytest.raises(UnsupportedLoRAAlgorithm, match="LOHA"):
        read_lora_file(path)


# -- unknown keys -------------------------------------------------------------------------------


def test_unknown_keys(tmp_path):
    tensors = {**kohya_pair(KQ), "some.random.key": rnd(3), f"{KK}.lora_down.bias": rnd(4)}
    tensors |= kohya_pair(KK)
    path = write(tmp_path, tensors)
    with pytest.raises(LoRAFormatError, match="some.random.key") as info:
        read_lora_file(path)
    assert "(2 keys)" in str(info.value)
    with pytest.warns(LoRAFormatWarning, match="some.random.key"):
        lora = read_lora_file(path, strict=False)
    # the module with an unknown extra key is skipped whole, the other one kept
    assert [layer.name for layer in lora.layers] == [Q.replace(".", "_")]
    assert set(lora.skipped) == {"some.random.key", *(k for k in tensors if k.startswith(KK))}


def test_long_key_lists_are_summarised(tmp_path):
    tensors = kohya_pair(KQ) | {f"junk.{i}": rnd(1) for i in range(40)}
    with pytest.raises(LoRAFormatError, match=r"and 35 more \(40 keys\)"):
        read_lora_file(write(tmp_path, tensors))


# -- malformed modules (errors in either mode) ----------------------------------------------------

MALFORMED = {
    "missing up": ({f"{KQ}.lora_down.weight": rnd(4, 8)}, "up weight is missing"),
    "missing down": ({f"{KQ}.lora_up.weight": rnd(8, 4)}, "down weight is missing"),
    "alpha only": ({f"{KQ}.alpha": torch.tensor(1.0)}, "missing"),
    "rank mismatch": (
        {f"{KQ}.lora_down.weight": rnd(4, 8), f"{KQ}.lora_up.weight": rnd(8, 3)},
        "rank mismatch",
    ),
    "alpha not scalar": (kohya_pair(KQ, alpha=None) | {f"{KQ}.alpha": rnd(2)}, "scalar"),
    "alpha nan": (kohya_pair(KQ, alpha=float("nan")), "nan"),
    "int factor": (
        {
            f"{KQ}.lora_down.weight": torch.ones(4, 8, dtype=torch.int32),
            f"{KQ}.lora_up.weight": rnd(8, 4),
        },
        "int32",
    ),
    "3-D factor": (
        {f"{KQ}.lora_down.weight": rnd(4, 8, 2), f"{KQ}.lora_up.weight": rnd(8, 4)},
        "2-D",
    ),
    "linear down, conv up": (
        {f"{KQ}.lora_down.weight": rnd(4, 8), f"{KQ}.lora_up.weight": rnd(8, 4, 1, 1)},
        "same kind",
    ),
    "3x3 up": (
        {f"{KQ}.lora_down.weight": rnd(4, 8, 3, 3), f"{KQ}.lora_up.weight": rnd(8, 4, 3, 3)},
        r"\[C_out, r, 1, 1\]",
    ),
    "bad Tucker": (
        kohya_pair(KQ) | {f"{KQ}.lora_mid.weight": rnd(4, 4, 3, 3)},
        "lora_mid",
    ),
    "two spellings of one module": (
        {
            f"unet.{Q}.lora.down.weight": rnd(4, 8),
            f"unet.{Q}.lora.up.weight": rnd(8, 4),
            f"unet.{Q}.lora_A.weight": rnd(4, 8),
        },
        "two keys hold the down weight",
    ),
}


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_modules(tmp_path, case, strict):
    tensors, match = MALFORMED[case]
    path = write(tmp_path, tensors)
    with pytest.raises(LoRAFormatError, match=match) as info:
        read_lora_file(path, strict=strict)
    assert str(path) in str(info.value)


def test_peft_rank_disagreeing_with_header(tmp_path):
    meta = {"lora_adapter_metadata": json.dumps({"r": 8, "lora_alpha": 8})}
    tensors = {f"unet.{Q}.lora_A.weight": rnd(4, 8), f"unet.{Q}.lora_B.weight": rnd(8, 4)}
    with pytest.raises(LoRAFormatError, match="r=8"):
        read_lora_file(write(tmp_path, tensors, metadata=meta))


def test_peft_header_not_json(tmp_path):
    tensors = {f"unet.{Q}.lora_A.weight": rnd(4, 8), f"unet.{Q}.lora_B.weight": rnd(8, 4)}
    path = write(tmp_path, tensors, metadata={"lora_adapter_metadata": "{oops"})
    with pytest.raises(LoRAFormatError, match="lora_adapter_metadata"):
        read_lora_file(path)


def test_alpha_key_contradicting_header(tmp_path):
    meta = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8})}
    tensors = {f"unet.{Q}.lora_A.weight": rnd(4, 8), f"unet.{Q}.lora_B.weight": rnd(8, 4)}
    tensors[f"unet.{Q}.alpha"] = torch.tensor(2.0)
    with pytest.raises(LoRAFormatError, match="contradicts"):
        read_lora_file(write(tmp_path, tensors, metadata=meta))


# -- matching the model ---------------------------------------------------------------------------


def test_unmatched_modules(tmp_path):
    other = "lora_unet_down_blocks_9_attentions_0_proj_in"
    path = write(tmp_path, kohya_pair(KQ) | kohya_pair(other))
    with pytest.raises(LoRAFormatError, match=other) as info:
        load_lora(path, MODULES)
    assert str(path) in str(info.value)
    with pytest.warns(LoRAFormatWarning, match=other):
        _, resolved = load_lora(path, MODULES, strict=False)
    assert set(resolved["unet"]) == {Q}


def test_component_missing_from_model(tmp_path):
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    path = write(tmp_path, kohya_pair(KQ) | kohya_pair(te))
    with pytest.raises(
        LoRAFormatError, match=r"components \['text_encoder'\] are not in the model"
    ):
        load_lora(path, MODULES)
    with pytest.warns(LoRAFormatWarning):
        _, resolved = load_lora(path, MODULES, strict=False)
    assert list(resolved) == ["unet"]


def test_nothing_matches_is_an_error_even_non_strict(tmp_path):
    path = write(tmp_path, kohya_pair("lora_unet_nowhere_to_be_found"))
    with pytest.raises(LoRAFormatError, match="none of its 1 LoRA modules"):
        load_lora(path, MODULES, strict=False)


def test_two_spellings_resolving_to_one_module(tmp_path):
    tensors = kohya_pair(KQ, alpha=None) | {
        f"unet.{Q}.lora_A.weight": rnd(4, 8),
        f"unet.{Q}.lora_B.weight": rnd(8, 4),
    }
    with pytest.raises(LoRAFormatError, match="two LoRA modules target"):
        load_lora(write(tmp_path, tensors), MODULES)


def test_ambiguous_kohya_name(tmp_path):
    modules = {"unet": ["a_b.c", "a.b_c"]}
    path = write(tmp_path, kohya_pair("lora_unet_a_b_c"))
    with pytest.raises(LoRAFormatError, match="fits several modules"):
        load_lora(path, modules)


@pytest.mark.parametrize("bad", [["unet"], {"unet": "down_blocks.0"}, {"unet": 3}])
def test_modules_argument_is_checked(tmp_path, bad):
    lora = read_lora_file(write(tmp_path, kohya_pair(KQ)))
    with pytest.raises(TypeError, match="modules"):
        resolve_modules(lora, bad)
