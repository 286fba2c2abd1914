"""The merged/unmerged planner (lorakernels.plan) and the cpu backend's execution of its plans.

Numerics are checked against a float64 per-sample oracle on fresh random inputs; tolerances
come from what plain torch achieves in the same dtype. Merged groups on the upcast path keep
their merged weight in float32, so they meet the unmerged tolerance; merged groups on the
native half path round ``W + Σ w·s·B @ A`` once to the dtype, and their tolerance is derived
from plain torch doing exactly that (``fuse_lora`` in the dtype).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

import lorakernels as lk
from lorakernels import plan
from lorakernels.kernels import cpu, cpu_gemm
from lorakernels.testing import peft_style_oracle, random_problem, rounding_tolerance, tolerance

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def fake_calibration(**kw) -> plan.Calibration:
    """Round machine constants (a 2-core AVX-512 CPU's order of magnitude)."""
    fields = dict(
        key=plan.calibration_key(),
        gemm_flops={"fp32": 1e11},
        thin_flops=2e10,
        bandwidth=1e10,
        call_s=5e-6,
        row_block=0,
        pack_s={"fp32": 1e-9},
    )
    fields.update(kw)
    return plan.Calibration(**fields)


@pytest.fixture(autouse=True)
def fresh_planner(monkeypatch):
    """No measurement in tests; an empty cache and summary per test."""
    monkeypatch.delenv("LORAKERNELS_PLAN", raising=False)
    plan.set_calibration(fake_calibration())
    plan.CACHE.clear()
    plan.reset_summary()
    yield
    plan.set_calibration(None)
    plan.CACHE.clear()


def run(p, mode=None, x=None, batch=None):
    x = p.x if x is None else x
    return lk.multi_lora_linear(
        x, p.weight, p.bias, p.bank, p.batch if batch is None else batch, "cpu", plan=mode
    )


SPLITS = (0b0101, 0b1010, 0b0001, 0b1110)  # which of every 4 groups merge


def split_decide(pattern: int):
    """A stand-in for :func:`plan.decide` that merges the groups ``pattern`` names (bit
    ``i % 4`` for group ``i``), whatever the costs: every split of merged and unmerged."""

    def decide(cal, groups, *args):
        flags = [g.rank > 0 and bool(pattern >> (i % 4) & 1) for i, g in enumerate(groups)]
        return flags, [0.0] * len(groups)

    return decide


def merged_groups() -> int:
    return sum(v["merged_groups"] for v in plan.last_summary().values())


def unmerged_groups() -> int:
    return sum(v["unmerged_groups"] for v in plan.last_summary().values())


def plain_torch_merged_error(p, oracle) -> float:
    """Max error of merging in plain torch in the dtype: ``W_g`` computed in float32 and
    rounded once to the dtype (as ``fuse_lora`` stores it), then ``F.linear`` in the dtype."""
    dt = p.x.dtype
    per = p.x.shape[0] // p.batch.num_samples
    y = torch.empty(p.x.shape[0], p.weight.shape[0], dtype=dt)
    for s, mix in enumerate(p.mixtures):
        w = p.weight.float()
        for slot, strength in mix.items():
            a, b, scale = p.adapters[slot]
            w = w + (strength * scale) * (b.float() @ a.float())
        rows = slice(s * per, (s + 1) * per)
        y[rows] = F.linear(p.x[rows], w.to(dt), p.bias)
    return float((y.double() - oracle).abs().max())


# ---------------------------------------------------------------------- numerics
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("popularity", ["distinct", "zipf", "identical"])
def test_merged_groups_match_oracle(dtype, popularity):
    p = random_problem(
        samples=6,
        rows=9,
        K=40,
        N=56,
        ranks=[4, 7, 16],
        dtype=dtype,
        popularity=popularity,
        mixture_size=2,
        frac_empty=0.2,
        seed=11,
    )
    oracle = peft_style_oracle(p)
    tol = tolerance(p, oracle)
    for _ in range(2):  # build, then from the cache
        y = run(p, "merged")
        assert y.dtype == dtype and not torch.isnan(y).any()
        assert float((y.double() - oracle).abs().max()) <= tol
    assert merged_groups() > 0 and unmerged_groups() == 0
    assert sum(v["hits"] for v in plan.last_summary().values()) > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_native_half_merged_rounds_the_weight_once(dtype):
    """Where the calibration says the native half GEMM is faster, merged groups run it on a
    merged weight rounded once to the dtype: within a multiple of plain torch's merging."""
    name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    plan.set_calibration(fake_calibration(gemm_flops={"fp32": 1e11, name: 1e14}))
    p = random_problem(
        samples=4,
        rows=16,
        K=64,
        N=48,
        ranks=[8, 16],
        dtype=dtype,
        popularity="distinct",
        frac_empty=0.0,
        seed=3,
    )
    oracle = peft_style_oracle(p)
    tol = 4.0 * max(plain_torch_merged_error(p, oracle), tolerance(p, oracle, factor=1.0))
    y = run(p, "merged")
    assert plan.last_summary()["64x48"]["precision"] == name
    err = float((y.double() - oracle).abs().max())
    assert err <= tol
    # the LoRA is visible above that tolerance (a dropped adapter would fail)
    base = (p.x.double() @ p.weight.double().T + p.bias.double()).cpu()
    assert float((oracle - base).abs().max()) > 5 * tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["unmerged", "mixed"])
def test_native_half_base_for_unmerged_rows(dtype, mode, monkeypatch):
    """Where the native half GEMM is faster (a CPU with avx512_bf16: 4.5x float32), unmerged
    rows run their base GEMM in the dtype (rounded once) and add the float32 LoRA term: two
    roundings, within 3x plain torch's single-rounding error (tests/test_ops.py's bar)."""
    name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    plan.set_calibration(fake_calibration(gemm_flops={"fp32": 1e11, name: 1e14}))
    calls = []
    real_native = cpu._unmerged_native
    monkeypatch.setattr(
        cpu, "_unmerged_native", lambda *a: calls.append(a[1].shape[0]) or real_native(*a)
    )
    p = random_problem(
        samples=6,
        rows=[9, 4, 12, 7, 5, 11],
        K=320,
        N=96,
        ranks=[16, 8, 4],
        dtype=dtype,
        popularity="uniform",
        mixture_size=2,
        frac_empty=0.2,
        seed=13,
    )
    if mode == "mixed":  # every other group merged, the rest unmerged on the native base
        monkeypatch.setattr(
            plan,
            "decide",
            lambda cal, groups, *a: (
                [g.rank > 0 and i % 2 == 0 for i, g in enumerate(groups)],
                [0.0] * len(groups),
            ),
        )
    oracle = peft_style_oracle(p)
    tol = rounding_tolerance(p, oracle)
    y = run(p, "unmerged" if mode == "unmerged" else "auto")
    assert calls, "the native-base unmerged path did not run"
    assert float((y.double() - oracle).abs().max()) <= tol
    base = (p.x.double() @ p.weight.double().T + p.bias.double()).cpu()
    assert float((oracle - base).abs().max()) > 5 * tol  # the LoRA term is visible


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_merged_and_unmerged_groups(dtype, monkeypatch):
    """Any split of the groups into merged and unmerged gives the oracle's answer."""
    p = random_problem(
        samples=8,
        rows=[5, 9, 3, 12, 7, 5, 9, 2],
        K=48,
        N=40,
        ranks=[4, 8, 5],
        dtype=dtype,
        popularity="uniform",
        mixture_size=2,
        frac_empty=0.25,
        seed=5,
    )
    oracle = peft_style_oracle(p)
    tol = tolerance(p, oracle)
    real = plan.decide
    for pattern in SPLITS:
        monkeypatch.setattr(plan, "decide", split_decide(pattern))
        plan.reset_summary()
        y = run(p, "auto")
        assert float((y.double() - oracle).abs().max()) <= tol, bin(pattern)
        s = plan.last_summary()["48x40"]
        assert s["merged_groups"] > 0 and s["unmerged_groups"] > 0
    monkeypatch.setattr(plan, "decide", real)


def test_rank_intermediate_stays_fp32_when_merged_or_not():
    """bf16 inputs where rounding ``x @ A.T`` (or the merged weight) to bf16 would show."""
    p = random_problem(
        samples=2,
        rows=8,
        K=64,
        N=32,
        ranks=[16],
        dtype=torch.bfloat16,
        popularity="identical",
        frac_empty=0.0,
        seed=8,
        strengths="one",
    )
    oracle = peft_style_oracle(p)
    tol = tolerance(p, oracle)
    for mode in ("merged", "unmerged"):
        y = run(p, mode)
        assert float((y.double() - oracle).abs().max()) <= tol, mode


# ---------------------------------------------------------------------- planner decisions
def test_decide_merges_long_narrow_groups_only_after_reuse():
    cal = fake_calibration()
    big = [plan.Group(((1, 1.0),), 8192, 2, 16), plan.Group(((3, 1.0),), 8192, 2, 16)]
    flags, gains = plan.decide(cal, big, 320, 320, "fp32", False, [False] * 2, [0.0] * 2, "auto")
    assert flags == [False, False] and all(g > 0 for g in gains)  # seen once: no merge
    flags, _ = plan.decide(cal, big, 320, 320, "fp32", False, [False] * 2, gains, "auto")
    assert flags == [True, True]  # seen again, the build costs less than one call's gain
    flags, _ = plan.decide(cal, big, 320, 320, "fp32", False, [True] * 2, [0.0] * 2, "auto")
    assert flags == [True, True]
    # short scattered runs on a 1280-wide layer: every run would re-read a 6.5 MB weight
    scattered = [plan.Group(((k, 1.0),), 32, 16, 16) for k in range(8)]
    flags, _ = plan.decide(cal, scattered, 1280, 1280, "fp32", False, [True] * 8, [1.0] * 8, "auto")
    assert flags == [False] * 8


def test_run_overhead_is_measured_per_shape(monkeypatch):
    """A measured calibration prices each merged run by a per-shape measurement (never below
    the model); a hand-set one uses the model as given."""
    cal = fake_calibration()
    model = cal.call_s + 1e-9 * 640 * 640
    assert plan.run_overhead(cal, 256, 640, 640) == pytest.approx(model)
    calls = []
    monkeypatch.setattr(plan, "_RUN_OVERHEAD", {})
    monkeypatch.setattr(plan, "_measure_run_overhead", lambda *a: calls.append(a) or 0.5)
    measured = dataclasses.replace(cal, measured_s=1.0)
    assert plan.run_overhead(measured, 200, 640, 5120) == 0.5
    assert plan.run_overhead(measured, 256, 640, 5120) == 0.5  # same power-of-two bucket
    assert calls == [("fp32", 256, 640, 5120, "torch")]  # with the cpu backend's GEMM
    # merged runs that cost 0.5 s each never pay, even with the weights cached
    big = [plan.Group(((1, 1.0),), 8192, 2, 16), plan.Group(((3, 1.0),), 8192, 2, 16)]
    args = (big, 640, 5120, "fp32", False, [True] * 2, [0.0] * 2, "auto")
    assert plan.decide(cal, *args)[0] == [True, True]
    assert plan.decide(measured, *args)[0] == [False, False]
    monkeypatch.setattr(plan, "_measure_run_overhead", lambda *a: 0.0)  # below the model
    monkeypatch.setattr(plan, "_RUN_OVERHEAD", {})
    assert plan.run_overhead(measured, 256, 640, 640) == pytest.approx(model)


@pytest.mark.parametrize("impl", ["torch", "onednn"])
def test_run_overhead_measurement_is_sane(impl):
    if impl == "onednn" and not cpu_gemm.available():
        pytest.skip("this torch build has no oneDNN prepacked linear")
    assert 0.0 <= plan._measure_run_overhead("fp32", 64, 64, 48, impl) < 0.1


def test_decide_overrides():
    cal = fake_calibration()
    groups = [plan.Group(((1, 0.5),), 10, 1, 4), plan.Group((), 10, 1, 0)]
    args = (cal, groups, 64, 64, "fp32", False, [False] * 2, [0.0] * 2)
    assert plan.decide(*args, "merged")[0] == [True, False]
    assert plan.decide(*args, "unmerged")[0] == [False, False]


def test_plan_override_order(monkeypatch):
    p = random_problem(samples=4, rows=6, K=24, N=16, ranks=[4], frac_empty=0.0, seed=2)
    monkeypatch.setenv("LORAKERNELS_PLAN", "merged")
    run(p)
    assert merged_groups() > 0 and unmerged_groups() == 0
    plan.reset_summary()
    with plan.use_plan("unmerged"):
        run(p)  # the context beats the environment
        assert merged_groups() == 0
        run(p, "merged")  # the argument beats the context
        assert merged_groups() > 0
    monkeypatch.setenv("LORAKERNELS_PLAN", "bogus")
    with pytest.raises(ValueError, match="LORAKERNELS_PLAN"):
        run(p)
    with pytest.raises(ValueError, match="plan="):
        run(p, "fused")
    with pytest.raises(ValueError, match="use_plan"):
        with plan.use_plan("always"):
            pass


def test_autograd_runs_unmerged_and_matches_reference():
    p = random_problem(samples=3, rows=5, K=16, N=12, ranks=[4, 6], frac_empty=0.0, seed=4)
    grads = []
    for backend, mode in (("reference", None), ("cpu", "merged")):
        x = p.x.clone().requires_grad_(True)
        w = p.weight.clone().requires_grad_(True)
        y = lk.multi_lora_linear(x, w, p.bias, p.bank, p.batch, backend, plan=mode)
        y.square().sum().backward()
        grads.append((x.grad, w.grad))
    assert merged_groups() == 0  # the cpu call with plan="merged" ran unmerged
    for g_ref, g_cpu in zip(*grads, strict=True):
        torch.testing.assert_close(g_cpu, g_ref, rtol=1e-5, atol=1e-5)


def test_one_off_calls_never_merge_in_auto():
    p = random_problem(samples=4, rows=64, K=32, N=32, ranks=[4], frac_empty=0.0, seed=6)
    run(p, "auto")
    assert merged_groups() == 0 and len(plan.CACHE) == 0


def test_compiled_model_plans_inside_the_op_without_recompiling():
    from torch._dynamo.testing import CompileCounter

    p = random_problem(samples=4, rows=6, K=24, N=16, ranks=[4, 4], frac_empty=0.0, seed=7)
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def f(x, batch):
        return lk.multi_lora_linear(x, p.weight, p.bias, p.bank, batch, "cpu")

    oracle = peft_style_oracle(p)
    for mode in ("unmerged", "merged", "merged", "auto"):
        with plan.use_plan(mode):
            y = f(p.x, p.batch)
        assert float((y.double() - oracle).abs().max()) <= tolerance(p, oracle)
    assert counter.frame_count == 1
    assert merged_groups() > 0 and unmerged_groups() > 0


# ---------------------------------------------------------------------- cache: never stale
def bank_oracle(p, mixtures) -> torch.Tensor:
    """Float64 per-sample loop over the bank's *current* contents (``bank.get``)."""
    x = p.x.double()
    y = x @ p.weight.double().T + p.bias.double()
    per = x.shape[0] // len(mixtures)
    slots = p.bank.slots()
    for s, mix in enumerate(mixtures):
        for slot, w in mix.items():
            if slot not in slots:
                continue
            a, b, scale = p.bank.get(slot)
            coef = float(torch.tensor(w * scale, dtype=torch.float32))
            y[s * per : (s + 1) * per] += (
                coef * (x[s * per : (s + 1) * per] @ a.double().T) @ (b.double().T)
            )
    return y


def stale_problem():
    p = random_problem(
        samples=4,
        rows=8,
        K=32,
        N=24,
        ranks=[4, 6, 5],
        popularity="distinct",
        frac_empty=0.0,
        strengths="one",
        seed=12,
    )
    slots = sorted(p.adapters)
    mixtures = [{slots[0]: 1.0}, {slots[1]: 0.5}, {slots[2]: -0.7}, {slots[0]: 1.0}]
    return p, slots, mixtures, lk.LoRABatch.from_mixtures(mixtures)


def check(p, mixtures, batch):
    oracle = bank_oracle(p, mixtures)
    y = run(p, "merged", batch=batch)
    err = float((y.double() - oracle).abs().max())
    assert err <= 1e-4 * max(1.0, float(oracle.abs().max())), err


def cached_slots() -> set[int]:
    return {s for key in plan.CACHE._entries for s, _ in key[1]}


def test_cache_reused_across_calls():
    p, slots, mixtures, batch = stale_problem()
    check(p, mixtures, batch)
    builds = plan.CACHE.builds
    check(p, mixtures, batch)
    assert plan.CACHE.builds == builds and plan.CACHE.hits >= 3


def test_unload_invalidates_only_that_adapter():
    p, slots, mixtures, batch = stale_problem()
    check(p, mixtures, batch)
    assert cached_slots() == set(slots)
    p.bank.remove(slots[1])  # compacts the rows of slots[2] behind it
    assert cached_slots() == set(slots)  # nothing validated yet
    builds = plan.CACHE.builds
    # a batch naming the unloaded slot is refused (ops: "holds no adapter"); its sample now
    # runs the base model
    rest = [{} if slots[1] in mix else mix for mix in mixtures]
    batch.fill_(rest)
    check(p, rest, batch)
    assert cached_slots() == {slots[0], slots[2]}
    assert plan.CACHE.builds == builds  # slots[2] moved but its contents did not: kept


def test_reload_same_slot_with_new_weights():
    p, slots, mixtures, batch = stale_problem()
    check(p, mixtures, batch)
    a, b, scale = (t.clone() if isinstance(t, torch.Tensor) else t for t in p.bank.get(slots[0]))
    p.bank.remove(slots[0])
    p.bank.add(slots[0], a * 1.5, b, scale)  # same name, same slot, same rank and scale
    check(p, mixtures, batch)
    p.bank.remove(slots[0])
    p.bank.add(slots[0], a * 1.5, b, scale * 2)  # only the scale changes
    check(p, mixtures, batch)


def test_replace_rows_in_place():
    p, slots, mixtures, batch = stale_problem()
    check(p, mixtures, batch)
    start, r, _ = p.bank.slots()[slots[2]]
    with torch.no_grad():
        p.bank.lora_bt[start : start + r, 0] += 1e-3  # one column of B, nothing else
    builds = plan.CACHE.builds
    check(p, mixtures, batch)
    assert plan.CACHE.builds == builds + 1  # exactly the entry that uses slots[2]


def test_strength_change_and_refill():
    p, slots, mixtures, batch = stale_problem()
    check(p, mixtures, batch)
    new = [{slots[0]: 0.25}, {slots[1]: 0.5}, {slots[2]: 1.3}, {}]
    batch.fill_(new)
    check(p, new, batch)


def test_weight_changed_in_place():
    p, slots, mixtures, batch = stale_problem()
    check(p, mixtures, batch)
    with torch.no_grad():
        p.weight.mul_(1.01)
    check(p, mixtures, batch)


def test_cache_is_bounded_in_bytes():
    p, slots, mixtures, batch = stale_problem()
    one = 32 * 24 * 4  # one merged fp32 weight
    old = plan.CACHE.budget
    plan.CACHE.budget = 2 * one
    try:
        check(p, mixtures, batch)  # three mixtures, room for two
        assert plan.CACHE.bytes <= 2 * one and len(plan.CACHE) == 2
    finally:
        plan.CACHE.budget = old


def test_content_hash_sees_every_bit():
    t = torch.randn(4, 8)
    h = plan.content_hash(t)
    u = t.clone()
    u.view(torch.int32)[2, 5] ^= 1  # the last mantissa bit of one element
    assert plan.content_hash(u) != h and plan.content_hash(t.clone()) == h


# ---------------------------------------------------------------------- calibration
def test_calibration_cached_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("LORAKERNELS_CALIBRATION", raising=False)
    plan.set_calibration(None)
    measured = fake_calibration(thin_flops=123.0)
    monkeypatch.setattr(plan, "measure", lambda probe=None: measured)
    assert plan.calibration() is measured
    stored = json.loads((tmp_path / "plan-calibration.json").read_text())
    assert stored[plan.calibration_key()]["thin_flops"] == 123.0
    plan.set_calibration(None)
    monkeypatch.setattr(plan, "measure", lambda probe=None: pytest.fail("measured again"))
    assert plan.calibration().thin_flops == 123.0
    # an explicit file wins
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({**stored[plan.calibration_key()], "thin_flops": 7.0}))
    monkeypatch.setenv("LORAKERNELS_CALIBRATION", str(own))
    plan.set_calibration(None)
    assert plan.calibration().thin_flops == 7.0
    monkeypatch.setenv("LORAKERNELS_CALIBRATION", str(tmp_path / "missing.json"))
    plan.set_calibration(None)
    with pytest.raises(ValueError, match="LORAKERNELS_CALIBRATION"):
        plan.calibration()


def test_measure_gives_usable_constants():
    cal = plan.measure(cpu._row_block_probe)
    assert set(cal.gemm_flops) == set(cal.pack_s) and "fp32" in cal.gemm_flops
    assert all(v > 0 and math.isfinite(v) for v in cal.gemm_flops.values())
    assert all(v >= 0 and math.isfinite(v) for v in cal.pack_s.values())
    assert cal.bandwidth > 0 and cal.thin_flops > 0 and cal.call_s > 0
    assert cal.row_block in (0, 256, 1024)


def test_row_blocked_unmerged_path_matches_oracle(monkeypatch):
    plan.set_calibration(fake_calibration(row_block=4))
    blocked = []
    real = cpu._blocked
    monkeypatch.setattr(cpu, "_blocked", lambda *a: blocked.append(a[-1]) or real(*a))
    p = random_problem(
        samples=3, rows=[13, 9, 20], K=24, N=20, ranks=[4, 8], frac_empty=0.3, seed=9
    )
    oracle = peft_style_oracle(p)
    y = run(p, "unmerged")
    assert float((y.double() - oracle).abs().max()) <= tolerance(p, oracle)
    p2 = random_problem(samples=4, rows=16, K=24, N=20, ranks=[4, 8], frac_empty=0.25, seed=1)
    oracle2 = peft_style_oracle(p2)
    y2 = run(p2, "unmerged")
    assert float((y2.double() - oracle2).abs().max()) <= tolerance(p2, oracle2)
    assert blocked == [4, 4]
    # wider outputs than the probe's (N = 320) or samples shorter than a block: one pass
    plan.set_calibration(fake_calibration(row_block=8))
    run(random_problem(samples=4, rows=16, K=24, N=400, ranks=[4], seed=2), "unmerged")
    run(random_problem(samples=4, rows=6, K=24, N=20, ranks=[4], seed=2), "unmerged")
    assert blocked == [4, 4]


def test_full_cache_keeps_its_densest_weights():
    """Over budget, a new weight evicts only less valuable (or stale) ones, else is refused."""
    cache = plan.MergedCache(budget_bytes=2 * 400)
    anchor = torch.zeros(1)
    st = cache.layer(anchor)
    t = torch.zeros(100)  # 400 bytes each
    assert cache.put(st, (id(anchor), ((1, 1.0),), "fp32"), t, {}, density=1.0)
    assert cache.put(st, (id(anchor), ((2, 1.0),), "fp32"), t, {}, density=3.0)
    assert not cache.put(st, (id(anchor), ((3, 1.0),), "fp32"), t, {}, density=0.5)
    assert len(cache) == 2 and cache.bytes == 800
    assert cache.put(st, (id(anchor), ((4, 1.0),), "fp32"), t, {}, density=2.0)
    assert not cache.has((id(anchor), ((1, 1.0),), "fp32"))  # the least dense one went
    assert cache.has((id(anchor), ((2, 1.0),), "fp32"))
    cache.stale_s = 0.0  # everything unused counts as stale: plain LRU
    assert cache.put(st, (id(anchor), ((5, 1.0),), "fp32"), t, {}, density=0.1)
    assert not cache.has((id(anchor), ((2, 1.0),), "fp32"))


def test_dropping_a_layer_frees_its_entries():
    p, slots, mixtures, batch = stale_problem()
    check(p, mixtures, batch)
    assert len(plan.CACHE) > 0
    p.bank.reserve(p.bank.lora_a.shape[0] * 4, 64)  # growth reallocates lora_a: a new layer
    del p
    import gc

    gc.collect()
    assert plan.CACHE.bytes == 0 and len(plan.CACHE) == 0


def test_threads_share_the_caches_safely():
    """Two threads, two batches, one layer, merged and unmerged interleaved: every output is
    its own batch's (the host-plan and merged-weight caches are shared and locked)."""
    import threading

    p, slots, mixtures, batch = stale_problem()
    other = [{slots[2]: 0.3}, {}, {slots[0]: -1.0}, {slots[1]: 2.0}]
    batches = [(mixtures, batch), (other, lk.LoRABatch.from_mixtures(other))]
    oracles = [bank_oracle(p, m) for m, _ in batches]
    errors: list[float] = []

    def work(i: int) -> None:
        _, b = batches[i]
        for j in range(20):
            y = run(p, ("merged", "unmerged", "auto")[j % 3], batch=b)
            errors.append(float((y.double() - oracles[i]).abs().max()))

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 40 and max(errors) <= 1e-4 * float(max(o.abs().max() for o in oracles))


def test_manager_plan_overrides_every_layer():
    """``MultiLoRA(plan=...)`` reaches every patched layer; a bad name fails at construction."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    mixes = [{"a": 1.0}, {"a": 1.0}, {"b": -0.5}, {}]
    factors = {
        n: {k: (torch.randn(4, 16), torch.randn(16, 4), 4.0) for k in ("0", "1")} for n in "ab"
    }
    x = torch.randn(4, 64, 16)
    outs = {}
    for mode in ("merged", "unmerged"):
        m = copy.deepcopy(model)
        mlora = lk.MultiLoRA(m, targets=["0", "1"], plan=mode)
        for n, f in factors.items():
            mlora.load(n, f)
        plan.reset_summary()
        with torch.no_grad(), mlora.use(mixes):  # autograd always runs unmerged
            outs[mode] = m(x)
        summary = plan.last_summary()["16x16"]
        assert summary["calls"] == 2
        if mode == "merged":
            assert summary["merged_groups"] == 2 * 2 and summary["unmerged_groups"] == 0
        else:
            assert summary["merged_groups"] == 0 and summary["unmerged_groups"] == 2 * 2
    # two fp32 formulations of the same sum: relative noise ~1e-6 of the output scale
    scale = float(outs["unmerged"].abs().max())
    torch.testing.assert_close(outs["merged"], outs["unmerged"], rtol=1e-4, atol=1e-5 * scale)
    with pytest.raises(ValueError, match="unknown plan 'fast'"):
        lk.MultiLoRA(copy.deepcopy(model), plan="fast")


def test_half_precision_crossover_is_measured_once_per_shape(monkeypatch):
    """With a measured calibration the native-vs-upcast choice is a measurement at the layer's
    shape (rows rounded up to a power of two), memoised; a hand-set one uses the model."""
    calls = []

    def fake_measure(dtype, name, m, k, n):
        calls.append((name, m, k, n))
        return name if k == 320 else "fp32"

    monkeypatch.setattr(plan, "_measure_precision", fake_measure)
    monkeypatch.setattr(plan, "_PRECISION", {})
    cal = fake_calibration(gemm_flops={"fp32": 1e11, "bf16": 1e9})
    assert plan.choose_precision(cal, torch.bfloat16, 4000, 320, 320) == "fp32"  # model: slow
    assert calls == []
    cal = fake_calibration(gemm_flops={"fp32": 1e11, "bf16": 1e9}, measured_s=1.0)
    assert plan.choose_precision(cal, torch.bfloat16, 4000, 320, 320) == "bf16"
    assert plan.choose_precision(cal, torch.bfloat16, 3000, 320, 320) == "bf16"  # same bucket
    assert plan.choose_precision(cal, torch.bfloat16, 65536, 640, 640) == "fp32"
    assert calls == [("bf16", 4096, 320, 320), ("bf16", 65536, 640, 640)]
    assert plan.choose_precision(cal, torch.float32, 4000, 320, 320) == "fp32"
