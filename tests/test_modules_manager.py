"""Drop-in modules and the MultiLoRA manager on small torch models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakernels as lk
from lorakernels import MultiLoRA, MultiLoRAConv2d, MultiLoRALinear


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj_in = nn.Conv2d(8, 16, 1)
        self.attn = nn.ModuleDict(
            {"to_q": nn.Linear(16, 16), "to_k": nn.Linear(16, 16, bias=False)}
        )
        self.conv = nn.Conv2d(16, 12, 3, padding=1, stride=2)
        self.out = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)  # [B, 16, H, W]
        b, c, hh, ww = h.shape
        t = h.permute(0, 2, 3, 1).reshape(b, hh * ww, c)
        t = self.attn["to_q"](t) + self.attn["to_k"](t)
        h = t.reshape(b, hh, ww, c).permute(0, 3, 1, 2)
        h = self.conv(h)  # [B, 12, H/2, W/2]
        return self.out(h.mean(dim=(2, 3)))


def _adapter(model: nn.Module, rank: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out[name] = (
                torch.randn(rank, m.in_features, generator=g),
                torch.randn(m.out_features, rank, generator=g),
                float(rank) * 2,
            )
        elif isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            out[name] = (
                torch.randn(rank, m.in_channels, kh, kw, generator=g) * 0.3,
                torch.randn(m.out_channels, rank, 1, 1, generator=g),
                None,
            )
    return out


def _merged_copy(model: nn.Module, mix: dict[str, float], adapters: dict[str, dict]) -> nn.Module:
    """The naive merge: W + Σ w * scale * B @ A, the ground truth for one sample."""
    import copy

    m2 = copy.deepcopy(model).double()
    for name, strength in mix.items():
        for path, (a, b, alpha) in adapters[name].items():
            layer = m2.get_submodule(path)
            r = a.shape[0]
            scale = 1.0 if alpha is None else alpha / r
            delta = (
                strength * scale * (b.reshape(b.shape[0], r).double() @ a.reshape(r, -1).double())
            )
            layer.weight.data += delta.reshape(layer.weight.shape)
    return m2


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = Tiny()
    adapters = {
        "ink": _adapter(model, 4, 1),
        "cyber": _adapter(model, 2, 2),
        "big": _adapter(model, 8, 3),
    }
    return model, adapters


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_mixed_batch_equals_per_sample_merged_models(setup, backend):
    model, adapters = setup
    ref_model = __import__("copy").deepcopy(model)
    mlora = MultiLoRA(model, backend=backend)  # targets=None: patch what adapters touch
    for name, w in adapters.items():
        mlora.load(name, w)
    mixes = [{"ink": 1.0}, {}, {"cyber": 0.6, "big": -0.4}, {"ink": 0.3, "cyber": 1.0, "big": 0.5}]
    x = torch.randn(4, 8, 6, 6)
    with mlora.use(mixes):
        y = model(x)
    for s, mix in enumerate(mixes):
        expect = _merged_copy(ref_model, mix, adapters)(x[s : s + 1].double())
        torch.testing.assert_close(y[s : s + 1].double(), expect, rtol=1e-4, atol=1e-4)


def test_no_adapter_is_bit_identical_and_state_dict_unchanged(setup):
    model, adapters = setup
    x = torch.randn(2, 8, 4, 4)
    before = model(x)
    keys = set(model.state_dict())
    mlora = MultiLoRA(model, targets=["attn.*", "proj_in", "conv"])
    assert isinstance(model.attn["to_q"], MultiLoRALinear)
    assert isinstance(model.proj_in, MultiLoRAConv2d) and model.proj_in.is_pointwise
    assert set(model.state_dict()) == keys
    assert torch.equal(model(x), before)
    mlora.load("ink", {k: v for k, v in adapters["ink"].items() if k != "out"})
    with mlora.use([{}, {}]):
        assert torch.equal(model(x), before)
    with mlora.use([{"ink": 1.0}, {}]):
        y = model(x)
    assert torch.equal(y[1], before[1]) or torch.allclose(y[1], before[1], atol=1e-6)
    assert not torch.allclose(y[0], before[0])
    mlora.unpatch()
    assert type(model.attn["to_q"]) is nn.Linear and type(model.conv) is nn.Conv2d
    assert torch.equal(model(x), before)


def test_unload_restores_and_slot_reuse(setup):
    model, adapters = setup
    mlora = MultiLoRA(model)
    mlora.load("ink", adapters["ink"])
    mlora.load("cyber", adapters["cyber"])
    x = torch.randn(1, 8, 4, 4)
    with mlora.use([{"cyber": 1.0}]):
        y_cyber = model(x)
    mlora.unload("ink")
    assert mlora.adapters == ["cyber"]
    with mlora.use([{"cyber": 1.0}]):
        torch.testing.assert_close(model(x), y_cyber, rtol=1e-6, atol=1e-6)
    mlora.load("big", adapters["big"])  # reuses ink's slot id
    assert mlora.slots["big"] == 0
    with pytest.raises(KeyError, match="unknown adapter 'ink'"):
        with mlora.use([{"ink": 1.0}]):
            pass


def _bank_state(model):
    return {
        n: (m.lora_bank.lora_a.clone(), m.lora_bank.slot_rank.clone(), m.lora_bank.used_rows)
        for n, m in model.named_modules()
        if hasattr(m, "lora_bank")
    }


def _same_state(a, b):
    return a.keys() == b.keys() and all(
        torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) and a[k][2] == b[k][2]
        for k in a
    )


def test_failed_loads_change_nothing(setup):
    model, adapters = setup
    mlora = MultiLoRA(model, targets=["attn.*", "out"])
    mlora.load("ink", {k: v for k, v in adapters["ink"].items() if k.startswith(("attn", "out"))})
    state, slots = _bank_state(model), dict(mlora.slots)
    good = {k: v for k, v in adapters["cyber"].items() if k.startswith("attn")}
    bad_shape = dict(good, **{"attn.to_q": (torch.randn(2, 15), torch.randn(16, 2), None)})
    too_wide = dict(good, **{"out": (torch.randn(11, 12), torch.randn(10, 11), None)})
    unknown = dict(good, **{"attn.to_v": good["attn.to_q"]})
    for weights, exc, match in [
        (bad_shape, ValueError, "attn.to_q"),
        (too_wide, ValueError, "exceeds min"),
        (unknown, KeyError, "attn.to_v"),
        ({}, ValueError, "non-empty"),
    ]:
        with pytest.raises(exc, match=match):
            mlora.load("cyber", weights)
        assert _same_state(_bank_state(model), state) and mlora.slots == slots
    with pytest.raises(ValueError, match="already loaded"):
        mlora.load("ink", good)
    with pytest.warns(UserWarning, match="attn.to_v"):
        mlora.load("cyber", unknown, strict=False)


def test_unload_in_use_refused(setup):
    model, adapters = setup
    mlora = MultiLoRA(model)
    mlora.load("ink", adapters["ink"])
    with mlora.use([{"ink": 1.0}]):
        with pytest.raises(ValueError, match="used by the active batch"):
            mlora.unload("ink")
    mlora.unload("ink")
    with pytest.raises(KeyError, match="unknown adapter 'ink'"):
        mlora.unload("ink")


def test_sample_count_must_divide_batch(setup):
    model, adapters = setup
    mlora = MultiLoRA(model)
    mlora.load("ink", adapters["ink"])
    with mlora.use([{"ink": 1.0}] * 3):
        with pytest.raises(ValueError, match="do not divide"):
            model(torch.randn(4, 8, 4, 4))


def test_op_argument_errors():
    bank = lk.LoRABank(8, 4)
    batch = lk.LoRABatch.from_mixtures([{}])
    x, w, b = torch.randn(3, 8), torch.randn(4, 8), torch.randn(4)
    f = lk.multi_lora_linear
    cases = [
        (lambda: f(torch.randn(3, 7), w, b, bank, batch), ValueError, "K=8"),
        (lambda: f(x.double(), w, b, bank, batch), TypeError, "weight dtype"),
        (lambda: f(x, w, torch.randn(5), bank, batch), ValueError, "bias"),
        (lambda: f(x, w, b, lk.LoRABank(8, 5), batch), ValueError, "bank is for"),
        (
            lambda: f(x, w, b, lk.LoRABank(8, 4, dtype=torch.float16), batch),
            TypeError,
            "bank dtype",
        ),
        (lambda: f(x, w, b, "bank", batch), TypeError, "bank must be"),
        (lambda: f(x, w, b, bank, [{}]), TypeError, "batch must be"),
        (lambda: f(x.int(), w.int(), None, bank, batch), TypeError, "x must be float"),
        (lambda: f(x, w, b, bank, batch, backend="magic"), ValueError, "unknown backend"),
        (
            lambda: f(x, w, b, bank, lk.LoRABatch.from_mixtures([{}, {}])),
            ValueError,
            "do not divide",
        ),
        (lambda: f(x, w, b, bank, lk.LoRABatch.from_mixtures([{3: 1.0}])), ValueError, "slot"),
        # device mismatches, with the meta device standing in for a second device
        (lambda: f(x, w.to("meta"), b, bank, batch), ValueError, "weight is on meta"),
        (lambda: f(x, w, b.to("meta"), bank, batch), ValueError, "bias is on meta"),
        (lambda: f(x, w, b, lk.LoRABank(8, 4, device="meta"), batch), ValueError, "bank is on"),
        (lambda: f(x, w, b, bank, batch.to("meta")), ValueError, "batch is on meta"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()


def test_explicit_backend_never_falls_back(monkeypatch):
    bank = lk.LoRABank(8, 4)
    batch = lk.LoRABatch.from_mixtures([{}])
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        lk.multi_lora_linear(x, w, None, bank, batch, backend="cuda")
    monkeypatch.setenv("LORAKERNELS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="LORAKERNELS_BACKEND"):
        lk.multi_lora_linear(x, w, None, bank, batch)
    with lk.use_backend("reference"):  # the context beats the environment
        assert lk.resolve_backend(x.device) == "reference"
    monkeypatch.delenv("LORAKERNELS_BACKEND")
    assert lk.resolve_backend(x.device) == "cpu"


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_torch_compile_fullgraph_no_recompile_on_new_mixtures(setup, compiler):
    model, adapters = setup
    mlora = MultiLoRA(model, targets=["attn.*", "proj_in", "out"])
    for name in ("ink", "cyber"):
        mlora.load(name, {k: v for k, v in adapters[name].items() if k != "conv"})
    x = torch.randn(3, 8, 4, 4)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    mixes = [
        [{"ink": 1.0}, {}, {"cyber": 0.5}],
        [{"cyber": -1.0}, {"ink": 0.2, "cyber": 0.7}, {}],
        [{}, {}, {"ink": 2.0}],
    ]
    from torch._dynamo.utils import counters

    counters.clear()
    outs = []
    for mix in mixes:
        with mlora.use(mix):
            outs.append((compiled(x), model(x)))
    for got, eager in outs:
        # the compiled graph runs the 1x1 proj_in as a GEMM over pixel rows, eager mode in
        # NCHW: the same float32 sums in another order, a few ulps of the largest output apart
        tol = 8 * torch.finfo(torch.float32).eps * float(eager.abs().max())
        assert float((got - eager).abs().max()) <= tol
    frames = counters["stats"]["unique_graphs"]
    assert frames == 1, f"expected one graph, got {frames} (recompiled on new mixtures)"


def test_custom_op_opcheck():
    """torch.library.opcheck: schema, fake tensor and autograd registration are consistent."""
    from lorakernels.testing import random_problem

    p = random_problem(samples=3, rows=4, K=16, N=12, ranks=[4, 2], seed=4)
    ptr, per = p.batch.rows_for(p.x.shape[0])
    args = (
        p.x,
        p.weight,
        p.bias,
        p.bank.lora_a,
        p.bank.lora_bt,
        p.bank.slot_start,
        p.bank.slot_rank,
        p.bank.slot_scale,
        ptr,
        p.batch.entry_ptr,
        p.batch.entry_slot,
        p.batch.entry_weight,
        per,
        p.batch.max_entries,
        p.bank.max_rank,
        "cpu",
    )
    torch.library.opcheck(torch.ops.lorakernels.multi_lora_linear.default, args)
