"""The convolution op (``lk.multi_lora_conv2d``) on the cpu and reference backends.

Every path is compared with a float64 per-sample oracle written with merged weights
(``conv2d(x, W + Σ w·s·B @ A) + b``) on fresh random inputs: k x k and pointwise (1x1)
geometries, strides, paddings, dilations, ranks incl. an adapter absent from the layer,
mixtures, negative strengths, samples without adapters and several images per sample; plans
unmerged, merged and every split of groups between the two; NCHW and channels-last inputs.
Tolerances come from plain torch in the dtype: its base conv's rounding, plus for merged
groups its error merging in the dtype (``fuse_lora``: the weight rounded once), plus two
roundings of the sum and float32 accumulation of the LoRA term.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_plan import SPLITS, fake_calibration, split_decide

import lorakernels as lk
from lorakernels import plan
from lorakernels.kernels import BankTensors, ConvMeta, LaunchMeta, LoRAArgs, cpu, hostplan

C_IN, C_OUT = 5, 7
RANKS = {1: 3, 4: 2, 6: 5}
MIXES = [{1: 1.0}, {}, {4: -0.7, 6: 1.25}, {1: 0.5, 9: 1.0}, {6: 2.0}, {6: 2.0}]
# summed ranks 3, 0, 7, 3, 5, 5: padding every image to 7 would be > 1.5x the real work
# (84 vs 46 rank columns), so pointwise layers run per run of images; EVEN pads (30 vs 21)
EVEN = [{1: 1.0}, {6: 2.0}, {4: -0.7, 1: 0.5}, {6: 0.5}, {}, {1: 0.5, 9: 1.0}]
NAMES = {"a": 1, "b": 4, "c": 6, "d": 9}


@pytest.fixture(autouse=True)
def fresh_planner(monkeypatch):
    monkeypatch.delenv("LORAKERNELS_PLAN", raising=False)
    plan.set_calibration(fake_calibration())
    plan.CACHE.clear()
    plan.reset_summary()
    yield
    plan.set_calibration(None)
    plan.CACHE.clear()


class ConvProblem:
    """A conv layer, its bank (slots 1, 4, 6; slot 9 named but weightless here), a batch of
    ``MIXES`` with ``per`` images each, the float64 oracle and plain torch's errors."""

    def __init__(
        self, dtype, seed, per=2, k=3, stride=1, padding=1, dilation=1, bias=True, mixes=MIXES
    ):
        gen = torch.Generator().manual_seed(seed)
        kk = C_IN * k * k
        self.bank = lk.LoRABank(kk, C_OUT, dtype=dtype)
        self.bank.reserve(0, 10)  # slot ids up to 9, as the manager reserves them
        adapters = {}
        for slot, r in RANKS.items():
            a = (torch.randn(r, kk, generator=gen) / kk**0.5).to(dtype)
            b = (torch.randn(C_OUT, r, generator=gen) / r**0.5).to(dtype)
            self.bank.add(slot, a, b, 0.5 + slot / 8)
            adapters[slot] = (a.double(), b.double(), 0.5 + slot / 8)
        self.adapters = adapters
        self.mixes = mixes
        self.batch = lk.LoRABatch.from_mixtures(mixes, NAMES)
        self.x = torch.randn(len(mixes) * per, C_IN, 9, 8, generator=gen).to(dtype)
        self.weight = (torch.randn(C_OUT, C_IN, k, k, generator=gen) / kk**0.5).to(dtype)
        self.bias = torch.randn(C_OUT, generator=gen).to(dtype) if bias else None
        self.geom = {"stride": stride, "padding": padding, "dilation": dilation}
        self.per = per
        self.oracle()

    def oracle(self) -> None:
        """``want`` (float64) and the elementwise ``bound`` from the current ``adapters``."""
        dtype, per, kk = self.x.dtype, self.per, self.weight[0].numel()
        want, plain_merged = [], []
        b64 = None if self.bias is None else self.bias.double()
        for s, mix in enumerate(self.mixes):
            w64, w32 = self.weight.double().clone(), self.weight.float().clone()
            for slot, strength in mix.items():
                if slot in self.adapters:
                    a, b, scale = self.adapters[slot]
                    coef = float(torch.tensor(strength * scale, dtype=torch.float32))
                    w64 += coef * (b @ a).view_as(w64)
                    w32 += coef * (b.float() @ a.float()).view_as(w32)
            xs = self.x[s * per : (s + 1) * per]
            want.append(F.conv2d(xs.double(), w64, b64, **self.geom))
            plain_merged.append(F.conv2d(xs, w32.to(dtype), self.bias, **self.geom))
        self.want = torch.cat(want)
        base = F.conv2d(self.x, self.weight, self.bias, **self.geom).double()
        self.base64 = F.conv2d(self.x.double(), self.weight.double(), b64, **self.geom)
        eps, eps32 = torch.finfo(dtype).eps, torch.finfo(torch.float32).eps
        lora = (self.want - self.base64).abs()
        accum = 8 * eps32 * kk**0.5 * float(lora.max())
        # elementwise: plain torch's base conv and merged conv errors in the dtype, two
        # roundings of the sum, float32 accumulation over the C_in*kh*kw reduction
        self.bound = (
            (base - self.base64).abs()
            + (torch.cat(plain_merged).double() - self.want).abs()
            + 2 * eps * self.want.abs()
            + accum
        )

    def run(self, backend="cpu", mode=None, x=None):
        x = self.x if x is None else x
        return lk.multi_lora_conv2d(
            x,
            self.weight,
            self.bias,
            self.bank,
            self.batch,
            **self.geom,
            backend=backend,
            plan=mode,
        )

    def check(self, y) -> None:
        assert y.dtype == self.x.dtype and y.shape == self.want.shape and torch.isfinite(y).all()
        assert ((y.double() - self.want).abs() <= self.bound).all()
        for s, mix in enumerate(self.mixes):  # dropping any sample's LoRA term would fail
            rows = slice(s * self.per, (s + 1) * self.per)
            dropped = ((self.base64[rows] - self.want[rows]).abs() <= self.bound[rows]).all()
            assert bool(dropped) == all(slot == 9 for slot in mix), s


GEOMETRIES = [
    {"k": 3, "stride": 1, "padding": 1, "dilation": 1},
    {"k": 3, "stride": 2, "padding": 1, "dilation": 1},
    {"k": 3, "stride": 1, "padding": 2, "dilation": 2},
    {"k": 3, "stride": 2, "padding": 0, "dilation": 1},
    {"k": 1, "stride": 1, "padding": 0, "dilation": 1},  # pointwise: the NCHW GEMM path
    {"k": 1, "stride": 2, "padding": 0, "dilation": 1},  # 1x1 but strided: conv pairs
]
IDS = ["k3", "k3s2", "k3d2", "k3s2p0", "pointwise", "k1s2"]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("geom", GEOMETRIES, ids=IDS)
@pytest.mark.parametrize("mode", ["reference", "unmerged", "merged"])
@pytest.mark.parametrize("mixes", [MIXES, EVEN], ids=["uneven", "even"])
def test_conv_matches_merged_oracle(dtype, geom, mode, mixes):
    seed = geom["stride"] * 10 + geom["padding"] + geom["k"]
    p = ConvProblem(dtype, seed=seed, mixes=mixes, **geom)
    if mode == "reference":
        p.check(p.run("reference"))
        return
    for _ in range(2):  # merged: build, then from the cache
        p.check(p.run("cpu", mode))
    s = plan.last_summary()[f"{C_IN * geom['k'] ** 2}x{C_OUT}"]
    if mode == "merged":
        assert s["merged_groups"] > 0 and s["unmerged_groups"] == 0 and s["hits"] > 0
    else:
        assert s["merged_groups"] == 0 and s["unmerged_groups"] > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("geom", GEOMETRIES[::4], ids=["k3", "pointwise"])
@pytest.mark.parametrize("mixes", [MIXES, EVEN], ids=["uneven", "even"])
def test_any_split_of_groups_matches_oracle(dtype, geom, mixes, monkeypatch):
    p = ConvProblem(dtype, seed=7, per=1, mixes=mixes, **geom)
    for pattern in SPLITS:
        monkeypatch.setattr(plan, "decide", split_decide(pattern))
        plan.reset_summary()
        p.check(p.run("cpu", "auto"))
        s = plan.last_summary()[f"{C_IN * geom['k'] ** 2}x{C_OUT}"]
        assert s["merged_groups"] > 0 and s["unmerged_groups"] > 0, bin(pattern)


@pytest.mark.parametrize("mode", ["unmerged", "merged"])
def test_channels_last_input_keeps_its_format(mode):
    p = ConvProblem(torch.float32, seed=3, k=1, padding=0)
    x = p.x.contiguous(memory_format=torch.channels_last)
    y = p.run("cpu", mode, x=x)
    p.check(y)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert p.run("cpu", mode).is_contiguous()


@pytest.mark.parametrize("mixes", [MIXES, EVEN], ids=["uneven", "even"])
def test_pointwise_pads_only_even_ranks(mixes):
    """The unmerged pointwise term pads every image to the largest summed rank (two batched
    GEMMs) only while that is < 1.5x the real work; else it runs per run of images."""
    p = ConvProblem(torch.float32, seed=4, k=1, padding=0, mixes=mixes)
    p.check(p.run("cpu", "unmerged"))
    host = hostplan.host(
        (*p.batch.tensors(p.x.shape[0])[0], *p.bank.tensors()[2:]),
        torch.float32,
        p.bank.lora_a,
        p.bank.lora_bt,
    )
    padded = host.derived[("conv-pointwise", None)]
    assert (padded is not None) == (mixes is EVEN)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=str)
def test_merged_weights_follow_in_place_weight_edits(fmt):
    """The merged cache is stamped with the conv parameter itself (a channels-last weight is
    copied to ``[C_out, K]`` per call; the copy's stamp could repeat)."""
    p = ConvProblem(torch.float32, seed=8, mixes=EVEN)
    p.weight = p.weight.contiguous(memory_format=fmt)
    p.check(p.run("cpu", "merged"))
    with torch.no_grad():
        p.weight.mul_(0.5)
    p.oracle()
    plan.reset_summary()
    p.check(p.run("cpu", "merged"))
    assert sum(v["built"] for v in plan.last_summary().values()) > 0


def test_autograd_runs_unmerged_and_matches_reference():
    p = ConvProblem(torch.float32, seed=5, k=1, padding=0)
    x1 = p.x.clone().requires_grad_()
    x2 = p.x.clone().requires_grad_()
    p.run("cpu", "merged", x=x1).square().sum().backward()
    p.run("reference", x=x2).square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    assert sum(v["merged_groups"] for v in plan.last_summary().values()) == 0


@pytest.mark.parametrize("k, pad", [(3, 1), (1, 0)], ids=["k3", "pointwise"])
@pytest.mark.parametrize("mode", ["unmerged", "merged"])
def test_steady_batch_builds_no_device_tensor(k, pad, mode, monkeypatch):
    p = ConvProblem(torch.float32, seed=3, k=k, padding=pad, mixes=EVEN)
    first = p.run("cpu", mode)
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **kw: made.append(a) or real(*a, **kw))
    again = p.run("cpu", mode)
    monkeypatch.setattr(torch, "tensor", real)
    assert made == [] and torch.equal(first, again)


def test_kernel_level_contract_matches_reference():
    """The backends' own entry point: ``(x, weight, bias, LoRAArgs, ConvMeta)``."""
    p = ConvProblem(torch.float32, seed=6)
    bank = BankTensors(*p.bank.tensors())
    batch_t, max_rows = p.batch.tensors(p.x.shape[0])
    lora = LoRAArgs(bank, batch_t, LaunchMeta(max_rows, 2, 5))
    conv = ConvMeta(C_IN, 3, 3, (1, 1), (1, 1), (1, 1))
    y = cpu.multi_lora_conv2d(p.x, p.weight, p.bias, lora, conv)
    p.check(y)


def test_conv_validates_its_arguments():
    p = ConvProblem(torch.float32, seed=1)
    with pytest.raises(ValueError, match="weight must be a 4-D"):
        lk.multi_lora_conv2d(p.x, p.weight[:, :, 0], p.bias, p.bank, p.batch)
    with pytest.raises(ValueError, match=r"x must be \[N, C_in=5"):
        lk.multi_lora_conv2d(p.x[:, :3], p.weight, p.bias, p.bank, p.batch)
    with pytest.raises(ValueError, match=r"bias must have shape \[C_out\]"):
        lk.multi_lora_conv2d(p.x, p.weight, p.bias[:3], p.bank, p.batch)
    with pytest.raises(ValueError, match="bank is for"):
        lk.multi_lora_conv2d(p.x, p.weight[:, :, :1, :1], p.bias, p.bank, p.batch)
    with pytest.raises(ValueError, match="stride must be"):
        lk.multi_lora_conv2d(p.x, p.weight, p.bias, p.bank, p.batch, stride=(1, 2, 3))
    with pytest.raises(ValueError, match="samples do not divide"):
        lk.multi_lora_conv2d(p.x[:5], p.weight, p.bias, p.bank, p.batch)
