"""Inputs that used to give silently wrong results now raise, naming the numbers or slots;
devices compare after normalisation; capacities, launch bounds and caches behave as documented.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakernels as lk
from lorakernels import batch as batch_mod
from lorakernels import ops
from lorakernels.batch import BatchCapacityError, normalize_device
from lorakernels.kernels import LaunchMeta
from lorakernels.testing import peft_style_oracle, random_problem, tolerance


# ---------------------------------------------------------------------- sample count (A1)
def test_sample_dimension_must_match_the_batch():
    p = random_problem(samples=3, rows=4, K=8, N=6, ranks=[2, 3], frac_empty=0.0, seed=1)
    x = p.x.view(2, 6, 8)  # 12 rows still divide by 3 samples: rows would be re-split
    with pytest.raises(ValueError, match="the batch has 3 samples, x has 2"):
        lk.multi_lora_linear(x, p.weight, p.bias, p.bank, p.batch)
    # [S*G, T, K]: each sample owns G whole items, legal and correct
    y = lk.multi_lora_linear(p.x.view(6, 2, 8), p.weight, p.bias, p.bank, p.batch)
    oracle = peft_style_oracle(p)
    assert (y.reshape(12, 6).double() - oracle).abs().max() <= tolerance(p, oracle)


def test_sample_dimension_checked_through_modules_and_manager():
    model = nn.Sequential(nn.Linear(8, 8), nn.Conv2d(8, 4, 1))
    mlora = lk.MultiLoRA(model, targets=["0"])
    g = torch.Generator().manual_seed(0)
    mlora.load("a", {"0": (torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), 2.0)})
    with mlora.use([{"a": 1.0}] * 3), pytest.raises(ValueError, match="3 samples, x has 2"):
        model[0](torch.randn(2, 6, 8))
    conv = lk.MultiLoRA(nn.Sequential(nn.Conv2d(8, 4, 1)), targets=["0"])
    conv.load("a", {"0": (torch.randn(2, 8, 1, 1), torch.randn(4, 2, 1, 1), None)})
    with conv.use([{"a": 1.0}] * 3), pytest.raises(ValueError, match="3 samples, x has 2"):
        conv.model(torch.randn(2, 8, 3, 2))  # 2*3*2 = 12 pixel rows divide by 3


# ---------------------------------------------------------------------- unknown slots (A2)
def test_slot_without_adapter_raises_naming_it():
    p = random_problem(samples=2, rows=3, K=8, N=6, ranks=[2], seed=2)  # slot 1 resident
    p.bank.reserve(0, 8)
    bare = lk.LoRABatch.from_mixtures([{1: 1.0}, {5: 0.5}])
    with pytest.raises(ValueError, match="slot 5, which holds no adapter"):
        lk.multi_lora_linear(p.x, p.weight, p.bias, p.bank, bare)
    with pytest.raises(KeyError, match="slot 5 holds no adapter"):
        lk.LoRABatch.from_mixtures([{5: 1.0}], {"a": 1})
    # a slot of the name -> slot table with no weights in this layer: rank 0 here, legal
    known = lk.LoRABatch.from_mixtures([{"a": 1.0}, {"b": 0.5}], {"a": 1, "b": 5})
    y = lk.multi_lora_linear(p.x, p.weight, p.bias, p.bank, known)
    only_a = lk.LoRABatch.from_mixtures([{1: 1.0}, {}])
    torch.testing.assert_close(y, lk.multi_lora_linear(p.x, p.weight, p.bias, p.bank, only_a))


def test_manager_adapter_without_weights_in_a_layer_is_rank_zero_there():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    mlora = lk.MultiLoRA(model, targets=["0", "1"])
    mlora.load("a", {"0": (torch.randn(2, 4), torch.randn(4, 2), None)})
    mlora.load("b", {"1": (torch.randn(2, 4), torch.randn(4, 2), None)})
    x = torch.randn(2, 3, 4)
    with mlora.use([{"a": 1.0}, {mlora.slots["b"]: 1.0}]):
        model(x)  # each adapter is absent from one layer: no error
    with pytest.raises(KeyError, match="slot 7"), mlora.use([{7: 1.0}, {}]):
        pass
    # a batch of bare slot ids: legal in every layer, because the manager registers its slot
    # ids with every bank (rank 0 where the adapter has no weights), also straight to the op
    bare = lk.LoRABatch.from_mixtures([{mlora.slots["a"]: 1.0}, {}])
    layer1 = model[1]
    lk.multi_lora_linear(x, layer1.weight, layer1.bias, layer1.lora_bank, bare)
    with mlora.use(bare):
        model(x)
    # an id no manager registered, straight to the op: refused
    stray = lk.LoRABatch.from_mixtures([{5: 1.0}, {}])
    with pytest.raises(ValueError, match="slot 5, which holds no adapter"):
        lk.multi_lora_linear(x, layer1.weight, layer1.bias, layer1.lora_bank, stray)
    with mlora.use(bare.bind_slots(mlora.slots.values())):
        model(x)
    with pytest.raises(KeyError, match=r"\[7\]"):
        lk.LoRABatch.from_mixtures([{7: 1.0}]).bind_slots(mlora.slots.values())


# ---------------------------------------------------------------------- devices (issue 9.1)
def test_devices_compare_normalised(monkeypatch):
    p = random_problem(samples=2, rows=3, K=8, N=6, ranks=[2], seed=3)
    b = lk.LoRABatch.from_mixtures(p.mixtures, device=torch.device("cpu", 0))
    assert b.device == torch.device("cpu") and b.to("cpu:0") is b
    lk.multi_lora_linear(p.x, p.weight, p.bias, p.bank, b)  # used to be refused
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert normalize_device("cuda") == torch.device("cuda:0") == normalize_device("cuda:0")
    with pytest.raises(ValueError, match="batch is on meta but x is on cpu"):
        lk.multi_lora_linear(p.x, p.weight, p.bias, p.bank, p.batch.to("meta"))


# ---------------------------------------------------------------------- capacities (9.5-9.7)
def test_row_ptr_not_cached_during_graph_capture(monkeypatch):
    b = lk.LoRABatch.from_mixtures([{}, {}])
    monkeypatch.setattr(batch_mod, "_capturing", lambda device: True)
    first, second = b.tensors(8)[0].row_ptr, b.tensors(8)[0].row_ptr
    assert first is not second and b._row_cache == {}
    monkeypatch.setattr(batch_mod, "_capturing", lambda device: False)
    assert b.tensors(8)[0].row_ptr is b.tensors(8)[0].row_ptr
    assert b.tensors(8)[0].row_ptr.tolist() == [0, 4, 8]


def test_frozen_batch_refuses_to_grow():
    b = lk.LoRABatch.from_mixtures([{0: 1.0}, {}], entry_capacity=8, max_entries=1)
    b.fill_([{0: 1.0, 1: 1.0}, {}])  # not frozen: the bound grows
    assert b.max_entries == 2
    b.freeze()
    b.fill_([{1: 1.0}, {0: 0.5, 1: 0.5}])  # fits
    with pytest.raises(BatchCapacityError, match="at most 2 per sample"):
        b.fill_([{0: 1.0, 1: 1.0, 2: 1.0}, {}])
    assert b.mixtures == (((1, 1.0),), ((0, 0.5), (1, 0.5)))  # unchanged by the refusal
    with pytest.raises(BatchCapacityError, match="holds at most 8"):
        b.fill_([{k: 1.0 for k in range(5)}, {k: 1.0 for k in range(5, 10)}])
    assert issubclass(BatchCapacityError, ValueError)


def test_launch_meta_real_maxima_in_eager_capacities_when_frozen(monkeypatch):
    p = random_problem(samples=2, rows=3, K=8, N=6, ranks=[2, 5], frac_empty=0.0, seed=4)
    batch = lk.LoRABatch.from_mixtures(p.mixtures, entry_capacity=16, max_entries=4)
    seen: list[LaunchMeta] = []
    real = ops.backend_module("cpu").multi_lora_linear

    def spy(x, weight, bias, lora):
        seen.append(lora.meta)
        return real(x, weight, bias, lora)

    monkeypatch.setattr(ops.backend_module("cpu"), "multi_lora_linear", spy)
    lk.multi_lora_linear(p.x, p.weight, p.bias, p.bank, batch, "cpu")
    batch.freeze()
    lk.multi_lora_linear(p.x, p.weight, p.bias, p.bank, batch, "cpu")
    assert seen == [LaunchMeta(3, 1, 5), LaunchMeta(3, 4, 5)]


# ---------------------------------------------------------------------- backend resolution
def test_use_backend_is_per_thread():
    got = []
    with lk.use_backend("reference"):
        t = threading.Thread(target=lambda: got.append(lk.resolve_backend(torch.device("cpu"))))
        t.start()
        t.join()
        assert lk.resolve_backend(torch.device("cpu")) == "reference"
    assert got == ["cpu"]


def test_explicit_gpu_backend_without_float64_is_refused_once(monkeypatch):
    monkeypatch.setattr(ops, "unavailable_reason", lambda name, device: None)
    monkeypatch.setattr(ops, "_resolved", {})
    with pytest.raises(TypeError, match="no float64 kernels"):
        ops.resolve_backend(torch.device("cpu"), "triton", torch.float64)
    assert ops.resolve_backend(torch.device("cpu"), "triton", torch.float32) == "triton"


# ---------------------------------------------------------------------- modules
def test_conv_padding_modes_match_merged_weights():
    """The LoRA term pads like the layer (it used to zero-pad under reflect/replicate/circular)."""
    torch.manual_seed(5)
    for mode in ("reflect", "replicate", "circular"):
        conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode)
        orig = copy.deepcopy(conv).double()
        a, b = torch.randn(2, 3, 3, 3) * 0.3, torch.randn(4, 2, 1, 1)
        merged = copy.deepcopy(orig)
        merged.weight.data += 0.7 * (b.view(4, 2) @ a.view(2, -1)).double().view(4, 3, 3, 3)
        model = nn.Sequential(conv)
        mlora = lk.MultiLoRA(model, targets=["0"])
        mlora.load("a", {"0": (a, b, None)})
        x = torch.randn(2, 3, 5, 6)
        with mlora.use([{"a": 0.7}, {}]):
            y = model(x)
        want = torch.cat([merged(x[:1].double()), orig(x[1:].double())])
        assert (y.double() - want).abs().max() < 1e-4, mode


def test_output_cache_sees_bank_and_weight_changes():
    lin = nn.Linear(6, 5)
    ctx = lk.modules.LoRAContext()
    layer = lk.MultiLoRALinear.from_linear(lin, ctx)
    layer.enable_output_cache()
    g = torch.Generator().manual_seed(6)
    layer.lora_bank.add(0, torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g), 1.0)
    ctx.batch = lk.LoRABatch.from_mixtures([{0: 1.0}])
    x = torch.randn(3, 6)
    y1 = layer(x)
    assert layer(x) is y1  # cached
    layer.lora_bank.remove(0)
    a2, b2 = torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g)
    layer.lora_bank.add(0, a2, b2, 1.0)  # same slot, same rank, other weights
    y2 = layer(x)
    torch.testing.assert_close(y2, lin(x) + (x @ a2.T) @ b2.T)
    with torch.no_grad():
        layer.weight.mul_(2)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias) + (x @ a2.T) @ b2.T)


def test_ready_batch_through_the_manager_allows_layers_without_the_adapter():
    """A bare-slot-id batch given to ``MultiLoRA.use``: adapter ``b`` has no weights in layer
    0 (rank 0 there, legal), ``a`` none in layer 1; an unknown slot id still raises."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    mlora = lk.MultiLoRA(model, targets=["0", "1"])
    mlora.load("a", {"0": (torch.randn(2, 8), torch.randn(8, 2), 2.0)})
    mlora.load("b", {"1": (torch.randn(2, 8), torch.randn(8, 2), 2.0)})
    x = torch.randn(2, 3, 8)
    mixes = [{"a": 1.0}, {"b": 0.5}]
    with mlora.use(mixes):
        want = model(x)
    batch = lk.LoRABatch.from_mixtures([{mlora.slots[n]: w for n, w in m.items()} for m in mixes])
    with mlora.use(batch):
        got = model(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    bad = lk.LoRABatch.from_mixtures([{7: 1.0}, {}])
    with pytest.raises(KeyError, match=r"slot ids \[7\]"):
        with mlora.use(bad):
            pass
