"""LoRABatch (CSR, expansion, in-place refill) and LoRABank (packed storage, load/unload)."""

from __future__ import annotations

import math

import pytest
import torch

from lorakernels import LoRABank, LoRABatch


def test_csr_layout_and_host_mirror():
    b = LoRABatch.from_mixtures([{"a": 1.0}, {}, {"b": 0.5, "a": -2.0}], {"a": 3, "b": 7})
    assert b.num_samples == 3
    assert b.entry_ptr.tolist() == [0, 1, 1, 3]
    assert b.entry_slot[:3].tolist() == [3, 7, 3]
    assert b.entry_weight[:3].tolist() == [1.0, 0.5, -2.0]
    assert b.mixtures == (((3, 1.0),), (), ((7, 0.5), (3, -2.0)))
    assert b.max_entries == 2 and not b.is_empty


def test_zero_strength_dropped_and_same_adapter_adds():
    b = LoRABatch.from_mixtures([{"a": 0.0}, {"a": 0.25, 3: 0.5}], {"a": 3})
    assert b.mixtures == ((), ((3, 0.75),))


def test_expand_guidance_and_images_per_prompt():
    b = LoRABatch.from_mixtures([{0: 1.0}, {1: 0.5}])
    e = b.expand(images_per_prompt=2, guidance=True)
    m = (((0, 1.0),), ((0, 1.0),), ((1, 0.5),), ((1, 0.5),))
    assert e.mixtures == m + m
    e2 = b.expand(guidance=True, uncond_mixtures="empty")
    assert e2.mixtures == ((), ()) + (((0, 1.0),), ((1, 0.5),))
    with pytest.raises(ValueError, match="images_per_prompt"):
        b.expand(images_per_prompt=0)


def test_rows_for_equal_and_packed():
    b = LoRABatch.from_mixtures([{}, {}])
    ptr, per = b.rows_for(10)
    assert ptr.tolist() == [0, 5, 10] and per == 5
    with pytest.raises(ValueError, match="do not divide"):
        b.rows_for(7)
    p = LoRABatch.from_mixtures([{}, {}], rows_per_sample=[3, 4])
    assert p.rows_for(7)[0].tolist() == [0, 3, 7]
    with pytest.raises(ValueError, match="sum to 7"):
        p.rows_for(8)


def test_fill_in_place_keeps_tensor_identity():
    b = LoRABatch.from_mixtures([{0: 1.0}, {}], entry_capacity=8)
    ids = (id(b.entry_ptr), id(b.entry_slot), id(b.entry_weight))
    b.fill_([{1: 0.5, 2: 0.25}, {0: 2.0}])
    assert (id(b.entry_ptr), id(b.entry_slot), id(b.entry_weight)) == ids
    assert b.entry_ptr.tolist() == [0, 2, 3]
    with pytest.raises(ValueError, match="samples"):
        b.fill_([{}])
    with pytest.raises(ValueError, match="at most"):
        b.fill_([{k: 1.0 for k in range(6)}, {k: 1.0 for k in range(6)}])


@pytest.mark.parametrize(
    "mixtures,slots,exc,match",
    [
        (
            [{"nope": 1.0}],
            {"a": 0, "b": 1},
            KeyError,
            "unknown adapter 'nope'; known adapters: a, b",
        ),
        ([{"a": float("nan")}], {"a": 0}, ValueError, "finite"),
        ([{"a": math.inf}], {"a": 0}, ValueError, "finite"),
        ([{"a": "x"}], {"a": 0}, TypeError, "number"),
        ([{"a": 1.0}], None, TypeError, "no name -> slot table"),
        ([{-1: 1.0}], None, ValueError, ">= 0"),
        ({"a": 1.0}, {"a": 0}, TypeError, "sequence"),
        ([], None, ValueError, "at least one sample"),
        ([[("a", 1.0)]], {"a": 0}, TypeError, r"mixtures\[0\]"),
    ],
)
def test_bad_mixtures(mixtures, slots, exc, match):
    with pytest.raises(exc, match=match):
        LoRABatch.from_mixtures(mixtures, slots)


def test_bank_packs_real_ranks_and_compacts():
    bank = LoRABank(64, 32)
    mats = {}
    for slot, r in [(0, 4), (5, 16), (2, 128 // 4)]:
        a, b = torch.randn(r, 64), torch.randn(32, r)
        bank.add(slot, a, b, 0.5)
        mats[slot] = (a, b)
    assert bank.used_rows == 4 + 16 + 32 and bank.max_rank == 32
    assert bank.lora_a.shape[0] < 3 * 32 + 16  # storage follows the sum of ranks, not L*max
    bank.remove(5)
    assert bank.used_rows == 36 and bank.slot_rank[5] == 0
    for slot, (a, b) in mats.items():
        if slot == 5:
            continue
        ga, gb, scale = bank.get(slot)
        assert torch.equal(ga, a) and torch.equal(gb, b) and scale == 0.5
    assert 5 not in bank and 0 in bank


def test_bank_errors_change_nothing():
    bank = LoRABank(16, 8)
    bank.add(0, torch.randn(4, 16), torch.randn(8, 4), 1.0)
    before = (bank.lora_a.clone(), bank.slot_rank.clone(), bank.used_rows)
    cases = [
        ((1, torch.randn(4, 15), torch.randn(8, 4), 1.0), ValueError, "do not fit"),
        ((1, torch.randn(4, 16), torch.randn(8, 5), 1.0), ValueError, "do not fit"),
        ((1, torch.randn(9, 16), torch.randn(8, 9), 1.0), ValueError, "exceeds min"),
        ((0, torch.randn(4, 16), torch.randn(8, 4), 1.0), ValueError, "already resident"),
        ((1, torch.randn(4, 16), torch.randn(8, 4), math.nan), ValueError, "finite"),
        ((1, torch.ones(4, 16, dtype=torch.int64), torch.randn(8, 4), 1.0), TypeError, "floating"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            bank.add(*args)
    assert torch.equal(bank.lora_a, before[0]) and torch.equal(bank.slot_rank, before[1])
    assert bank.used_rows == before[2]


def test_bank_half_keeps_fp32_scales():
    bank = LoRABank(16, 8)
    bank.add(1, torch.randn(3, 16), torch.randn(8, 3), 1 / 3)
    bank.half()
    assert bank.lora_a.dtype == torch.float16
    assert bank.slot_scale.dtype == torch.float32 and bank.slot_scale[1].item() == pytest.approx(
        1 / 3, rel=1e-7
    )
    assert bank.slot_rank.dtype == torch.int32
