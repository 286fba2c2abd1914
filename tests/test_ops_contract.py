"""The kernel contract: bundles, the one file of op schemas, and the k x k conv backends.

* every ``torch.library`` definition lives in ``lorakernels/_ops.py`` and exists after a bare
  ``import lorakernels`` (no backend imported);
* the fakes check shapes (a mismatched bank is refused at trace time, not in a kernel);
* ``opcheck`` on ``multi_lora_linear`` through both eager-direct backends;
* the conv backends (reference, cpu) against a float64 per-sample oracle written with merged
  weights, over strides, paddings, dilations, ranks incl. an adapter absent from the layer,
  mixtures, negative strengths, empty samples and several images per sample; the cpu conv
  builds its device tensors once per batch content.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lorakernels as lk
from lorakernels import _ops, ops
from lorakernels.kernels import (
    BankTensors,
    BatchTensors,
    ConvMeta,
    LaunchMeta,
    LoRAArgs,
    cpu,
    reference,
)
from lorakernels.testing import random_problem

ROOT = Path(__file__).resolve().parents[1]


def test_every_library_definition_is_in_ops_file():
    pattern = re.compile(r"torch\.library\.(custom_op|define|Library)\b|\.define\(|register_fake")
    offenders = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in (ROOT / "lorakernels").rglob("*.py")
        if p.name != "_ops.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_ops_exist_after_bare_import():
    code = (
        "import sys, torch, lorakernels\n"
        "assert 'lorakernels.kernels.cuda' not in sys.modules\n"
        "for op in ('multi_lora_linear', 'sgmv_shrink', 'sgmv_expand', 'sgmv_expand_'):\n"
        "    getattr(torch.ops.lorakernels, op).default\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def _lora(bank, batch, rows: int) -> LoRAArgs:
    batch_t, per = batch.tensors(rows)
    return LoRAArgs(
        ops.bank_tensors(bank), batch_t, LaunchMeta(per, batch.max_entries, bank.max_rank)
    )


def _flat_args(p, backend: str) -> tuple:
    lora = _lora(p.bank, p.batch, p.x.shape[0])
    return (p.x, p.weight, p.bias, *lora.bank, *lora.batch, *_ops._caps(lora.meta), backend)


def test_bundles_round_trip_through_the_schema():
    p = random_problem(samples=2, rows=3, K=8, N=6, ranks=[2], seed=1)
    args = _flat_args(p, "cpu")
    assert _ops._unflatten(args[3:15]) == _lora(p.bank, p.batch, 6)
    assert BankTensors._fields == ("lora_a", "lora_bt", "slot_start", "slot_rank", "slot_scale")
    assert BatchTensors._fields == ("row_ptr", "entry_ptr", "entry_slot", "entry_weight")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck_linear(backend):
    p = random_problem(samples=3, rows=4, K=16, N=12, ranks=[4, 2], seed=4)
    torch.library.opcheck(torch.ops.lorakernels.multi_lora_linear.default, _flat_args(p, backend))


def test_fakes_check_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    p = random_problem(samples=2, rows=3, K=8, N=6, ranks=[2], seed=2)
    args = list(_flat_args(p, "cpu"))
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = torch.ops.lorakernels.multi_lora_linear(*args)
        assert y.shape == (6, 6)
        bad = list(args)
        bad[3] = torch.empty(p.bank.lora_a.shape[0], 9)  # lora_a for K=9
        with pytest.raises(RuntimeError, match="lora_a"):
            torch.ops.lorakernels.multi_lora_linear(*bad)
        bad = list(args)
        bad[11] = torch.empty(p.batch.entry_slot.numel() + 1)  # entry_weight longer
        with pytest.raises(RuntimeError, match="entry_weight"):
            torch.ops.lorakernels.multi_lora_linear(*bad)
        x, a = torch.empty(5, 8), torch.empty(4, 7)
        i = torch.zeros(3, dtype=torch.int32)
        with pytest.raises(RuntimeError, match="lora_a"):
            torch.ops.lorakernels.sgmv_shrink(x, a, i, i, i, i, i, 5, 1, 4)
        t, bt, y = torch.empty(5, 3), torch.empty(4, 6), torch.empty(5, 6)
        with pytest.raises(RuntimeError, match="max_entries"):
            torch.ops.lorakernels.sgmv_expand(
                y, t, bt, i, i, i.float(), i, i, i, i.float(), 5, 1, 4
            )


def test_backward_through_the_op_swaps_the_bank():
    """dx from the op's autograd equals autograd through the (differentiable) reference."""
    p = random_problem(samples=2, rows=3, K=8, N=6, ranks=[3, 2], dtype=torch.float64, seed=5)
    x = p.x.clone().requires_grad_()
    args = list(_flat_args(p, "reference"))
    args[0] = x
    torch.ops.lorakernels.multi_lora_linear(*args).square().sum().backward()
    x2 = p.x.clone().requires_grad_()
    lk.multi_lora_linear(
        x2, p.weight, p.bias, p.bank, p.batch, "reference"
    ).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


# ---------------------------------------------------------------------- k x k convolutions
def _conv_problem(dtype, seed, per=2, stride=1, padding=1, dilation=1, k=3):
    gen = torch.Generator().manual_seed(seed)
    c_in, c_out, ranks = 5, 7, {1: 3, 4: 2, 6: 5}
    bank = lk.LoRABank(c_in * k * k, c_out, dtype=dtype)
    bank.reserve(0, 10)  # slot ids up to 9, as the manager reserves them in every layer
    adapters = {}
    for slot, r in ranks.items():
        a = torch.randn(r, c_in * k * k, generator=gen) / (c_in * k * k) ** 0.5
        b = torch.randn(c_out, r, generator=gen) / r**0.5
        bank.add(slot, a.to(dtype), b.to(dtype), 0.5 + slot / 8)
        adapters[slot] = (a.to(dtype).double(), b.to(dtype).double(), 0.5 + slot / 8)
    # slot 9 is in the table but has no weights in this layer: rank 0 here, legal
    mixes = [{1: 1.0}, {}, {4: -0.7, 6: 1.25}, {1: 0.5, 9: 1.0}, {6: 2.0}, {6: 2.0}]
    batch = lk.LoRABatch.from_mixtures(mixes, {"a": 1, "b": 4, "c": 6, "d": 9})
    x = torch.randn(len(mixes) * per, c_in, 9, 8, generator=gen).to(dtype)
    weight = (torch.randn(c_out, c_in, k, k, generator=gen) / (c_in * k * k) ** 0.5).to(dtype)
    geom = {"stride": (stride, stride), "padding": (padding, padding), "dilation": (dilation,) * 2}
    base = F.conv2d(x, weight, None, **geom)
    # oracle: each sample's merged weight, in float64
    want = []
    for s, mix in enumerate(mixes):
        w = weight.double().clone()
        for slot, strength in mix.items():
            if slot in adapters:
                a, b, scale = adapters[slot]
                coef = float(torch.tensor(strength, dtype=torch.float32)) * float(
                    torch.tensor(scale, dtype=torch.float32)
                )
                w += coef * (b @ a).view_as(w)
        want.append(F.conv2d(x[s * per : (s + 1) * per].double(), w, None, **geom))
    return x, base, weight, bank, batch, geom, torch.cat(want)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (2, 0, 1)])
def test_conv_backends_match_merged_oracle(backend, dtype, stride, padding, dilation):
    x, base, weight, bank, batch, geom, want = _conv_problem(
        dtype, seed=stride * 10 + padding, stride=stride, padding=padding, dilation=dilation
    )
    # elementwise: the base conv's own rounding in the dtype, two roundings of the sum, and
    # fp32 accumulation over the C_in*kh*kw reduction of the LoRA term
    base64 = _base64(x, weight, geom)
    eps, eps32 = torch.finfo(dtype).eps, torch.finfo(torch.float32).eps
    accum = 8 * eps32 * (5 * 3 * 3) ** 0.5 * float((want - base64).abs().max())
    bound = (base.double() - base64).abs() + 2 * eps * want.abs() + accum
    # base.clone(): a backend may add into an fp32 base in place
    y = lk.multi_lora_conv2d(x, base.clone(), bank, batch, weight.shape, backend=backend, **geom)
    assert y.dtype == dtype and y.shape == want.shape and torch.isfinite(y).all()
    assert ((y.double() - want).abs() <= bound).all()
    per = x.shape[0] // batch.num_samples
    for s, mix in enumerate(batch.mixtures):  # dropping any sample's LoRA term would fail
        rows = slice(s * per, (s + 1) * per)
        dropped = ((base[rows].double() - want[rows]).abs() <= bound[rows]).all()
        assert dropped == all(slot == 9 for slot, _ in mix), s


def _base64(x, weight, geom):
    return F.conv2d(x.double(), weight.double(), None, **geom)


def test_cpu_conv_builds_device_tensors_once(monkeypatch):
    x, base, weight, bank, batch, geom, _ = _conv_problem(torch.float32, seed=3)
    lora, conv = _lora(bank, batch, x.shape[0]), ConvMeta(5, 3, 3, **geom)
    first = cpu.multi_lora_conv2d(x, base.clone(), lora, conv)
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    again = cpu.multi_lora_conv2d(x, base.clone(), lora, conv)
    assert made == [] and torch.equal(first, again)
    ref = reference.multi_lora_conv2d(x, base, lora, conv)
    torch.testing.assert_close(again, ref)
