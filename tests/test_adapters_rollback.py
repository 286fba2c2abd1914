"""Failures in the write phase leave everything bit-identical (issue 10, D2), a failed
auto-patching load leaves no patched layer behind, and the diffusers entry points load on first
use, raise for unknown names and drop an adapter only where it is known to have no weights
(issue 10, A3)."""

from __future__ import annotations

import pytest
import torch
from adapter_files import LAYERS, make_adapter, tiny_model

from lorakernels import LoRABank, MultiLoRA


def _state(model):
    """Every module's type and every bank tensor, cloned."""
    out = {}
    for name, mod in model.named_modules():
        out[name] = type(mod)
        bank = getattr(mod, "lora_bank", None)
        if bank is not None:
            out[name + "#bank"] = [t.clone() for t in bank.tensors()] + [
                bank.slots(),
                bank.used_rows,
                bank.max_rank,
                sorted(bank._h.registered),
            ]
    return out


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], list):
            for x, y in zip(a[k], b[k], strict=True):
                assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, k
        else:
            assert a[k] is b[k], k


def _failing_add(monkeypatch, fail_at=None, when=None):
    real = LoRABank.add
    calls = [0]

    def add(self, slot, A, B, scale, where="", **kw):
        calls[0] += 1
        if calls[0] == fail_at or (when is not None and when in where):
            raise RuntimeError(f"injected write failure at {where}")
        return real(self, slot, A, B, scale, where, **kw)

    monkeypatch.setattr(LoRABank, "add", add)
    return calls


@pytest.mark.parametrize("budget", [None, 8])
def test_manager_write_failure_in_third_layer_is_bit_identical(monkeypatch, budget):
    model = tiny_model()
    mgr = MultiLoRA(model, targets=["*attn.*"], max_resident_adapters=budget)
    mgr.load("one", make_adapter(1, LAYERS))
    mgr.load("two", make_adapter(2, LAYERS[:3]))
    mgr.unload("one")  # leave a hole, so the failing load writes into freed rows too
    before, slots, lib = _state(model), dict(mgr.slots), mgr.library.names()
    calls = _failing_add(monkeypatch, fail_at=3)
    with pytest.raises(RuntimeError, match="injected"):
        mgr.load("three", make_adapter(3, LAYERS))
    assert calls[0] == 3  # two layers were written before the failure
    _same(before, _state(model))
    assert mgr.slots == slots and mgr.library.names() == lib


def test_failed_auto_patching_load_leaves_no_patched_layer(monkeypatch):
    model = tiny_model()
    mgr = MultiLoRA(model)  # targets=None: layers are patched when an adapter touches them
    mgr.load("one", make_adapter(1, LAYERS[:2]))
    before = _state(model)
    _failing_add(monkeypatch, fail_at=4)
    with pytest.raises(RuntimeError, match="injected"):
        mgr.load("wide", make_adapter(4, LAYERS))
    _same(before, _state(model))
    assert sorted(mgr.layers) == sorted(LAYERS[:2])


def test_unpatch_restores_plain_conv_sharing_parameters():
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, stride=2)
    model = torch.nn.Sequential(conv)
    mgr = MultiLoRA(model, targets=["0"])
    a, b = torch.randn(2, 4, 3, 3), torch.randn(6, 2, 1, 1)
    mgr.load("c", {"0": (a, b, None)})
    mgr.unpatch()
    plain = model[0]
    assert type(plain) is torch.nn.Conv2d and plain.weight is conv.weight
    assert plain.bias is conv.bias and not hasattr(plain, "lora_bank")
    x = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(plain(x), conv(x), rtol=0, atol=0)


# ---------------------------------------------------------------------- diffusers
pytest.importorskip("diffusers")

from lora_files import (  # noqa: E402
    kohya_state_dict,
    lora_targets,
    make_layers,
    save,
    tiny_clip,
    tiny_sd15_unet,
)
from test_diffusers import _tiny_sd_pipeline, _unet_inputs  # noqa: E402

from lorakernels.diffusers import patch  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("diffusers_files")
    unet, te = tiny_sd15_unet(), tiny_clip()
    specs = {
        "both": {"unet": lora_targets(unet, "attn"), "text_encoder": lora_targets(te, "text")},
        "unetonly": {"unet": lora_targets(unet, "attn")},
        "teonly": {"text_encoder": lora_targets(te, "text")},
        "unet2": {"unet": lora_targets(unet, "attn")},
    }
    for i, (name, targets) in enumerate(specs.items()):
        layers = make_layers(targets, rank=4, alpha=4.0, seed=300 + i)
        save(folder / f"{name}.safetensors", kohya_state_dict(layers))
    return folder


def _unet_out(pipe, lora, mixtures):
    x, ctx, kw = _unet_inputs(pipe.unet, len(mixtures), seed=3)
    with lora.use(unet=mixtures):
        return pipe.unet(x, 10, ctx, **kw).sample


def test_use_loads_lazily_registered_names_and_raises_for_unknown(files):
    pipe = _tiny_sd_pipeline()
    lora = patch(pipe, max_resident_adapters=2)
    lora.load_dir(files)
    assert lora.loaded == []
    base = _unet_out(pipe, lora, [{}, {}])
    got = _unet_out(pipe, lora, [{"both": 1.0}, {}])
    assert lora.loaded == ["both"]  # loaded on first use, not dropped
    assert (got[0] - base[0]).abs().max() > 1e-3
    torch.testing.assert_close(got[1], base[1], rtol=0, atol=0)
    with pytest.raises(KeyError, match="unknown adapter 'bothh'.*'both'"):
        _unet_out(pipe, lora, [{"bothh": 1.0}, {}])
    # a text-encoder-only adapter is dropped for the UNet only once known to have no weights
    te_only = _unet_out(pipe, lora, [{"teonly": 1.0}, {}])
    torch.testing.assert_close(te_only, base, rtol=0, atol=0)
    assert "teonly" in lora.managers["unet"]._empty
    with lora.use(text_encoder=[{"teonly": 1.0}, {"unetonly": 0.5}]):
        assert "teonly" in lora.managers["text_encoder"].slots
    assert "unetonly" not in lora.managers["text_encoder"].slots
    st = lora.stats()
    assert st["misses"] >= 2 and set(st["resident"]) <= {"both", "teonly", "unetonly"}


def test_load_failing_in_second_component_is_bit_identical(monkeypatch, files):
    pipe = _tiny_sd_pipeline()
    lora = patch(pipe)
    lora.load(files / "unetonly.safetensors")
    before = {c: _state(m) for c, m in lora.components.items()}
    names = lora.library.names()
    _failing_add(monkeypatch, when="self_attn")  # the text encoder's first write fails
    with pytest.raises(RuntimeError, match="injected"):
        lora.load(files / "both.safetensors")
    for c, m in lora.components.items():
        _same(before[c], _state(m))
    assert lora.library.names() == names and lora.loaded == ["unetonly"]


def test_generate_through_a_bound_of_two_equals_unbounded(files):
    from test_diffusers import _run

    prompts = ["<lora:both:0.8> a cat", "<lora:unetonly:-0.5> a dog", "a fox"]
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    outs = []
    for bound in (None, 2):
        pipe = _tiny_sd_pipeline()
        lora = patch(pipe, max_resident_adapters=bound)
        lora.load_dir(files)
        outs.append(_run(pipe, prompts, latents))
        if bound is not None:
            assert len(lora.stats()["components"]["unet"]["resident"]) <= 2
            with pytest.raises(ValueError, match=r"max_resident_adapters=2"):
                _run(pipe, ["<lora:both:1> <lora:unetonly:1> <lora:unet2:1> a"], latents[:1])
            # the failed batch left the pipeline usable
            torch.testing.assert_close(_run(pipe, prompts, latents), outs[0], rtol=0, atol=0)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
