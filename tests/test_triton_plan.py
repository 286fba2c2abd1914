"""The planner's merged groups on the Triton backend (issue 13, item 4), under the interpreter.

Through the public ``lorakernels.multi_lora_linear(..., backend="triton", plan=...)`` on CPU
tensors with ``TRITON_INTERPRET=1``: ``plan="merged"`` and ``plan="auto"`` (a calibration
that makes merging pay, so the ski rental merges on the second call) run merged and unmerged
groups in one launch of the segmented kernel; ``"unmerged"`` and the backward pass's own op
call run the fused/pair path as before (a forward that autograd records may merge);
under ``torch.compile`` the plan changes at run time without a recompile. fp16 and bf16;
a batch of uneven row counts with a two-adapter mixture used twice, a one-adapter mixture, a
negative strength and a base-only sample.

Oracles (float64 on fresh random inputs, outputs checked finite; the launch allocates its
output): the exact per-sample loop (``peft_style_oracle``), with a tolerance 2x the largest of
plain torch's error, one ulp of ``max |y|`` and plain torch *merging* in the dtype (``W_g``
computed in float32, rounded once to the dtype, then ``F.linear``: what ``fuse_lora`` does;
unmerged-only calls use ``testing.tolerance``); and, for merged rows,
``x @ W_stored.T + b`` in float64 from the weights the cache holds, within 4 ulps of the
output (the kernel's own error). Every LoRA-carrying sample must move the output by more
than the tolerance, so a dropped or stale adapter fails. Stale-cache cases: an adapter
reloaded with new weights in the same slot, a strength change (``batch.fill_``), ``W``
changed in place; each must give the new oracle on the next call.

Process model as ``tests/test_triton_interpret.py``: without ``TRITON_INTERPRET=1`` this
module holds one test that re-runs it in a fresh interpreter with the variable set.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import triton  # noqa: F401  ([dev] installs it: a broken install fails, not skips)
from interpreter import INTERPRET, rerun
from test_plan import fake_calibration

import lorakernels as lk
from lorakernels import plan
from lorakernels.bank import LoRABank
from lorakernels.batch import LoRABatch
from lorakernels.testing import Problem, peft_style_oracle, plain_torch_error, tolerance

HALF = (torch.float16, torch.bfloat16)
K, N = 48, 64
RANKS = {1: 4, 4: 8, 7: 16}  # slot -> rank (slot ids spread out, not 0..L-1)
ROWS = [9, 5, 7, 3, 11, 6]
# groups: {1, 4} (samples 0 and 3, not adjacent), {7} (1 and 5), base (2), {4} negative (4)
MIXTURES = [{1: 1.0, 4: -0.6}, {7: 1.2}, {}, {1: 1.0, 4: -0.6}, {4: -1.3}, {7: 1.2}]
LAYER = f"{K}x{N}"


def _f32(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32))


def make_problem(dtype: torch.dtype, seed: int) -> Problem:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    bank = LoRABank(K, N, dtype=dtype)
    adapters = {}
    for slot, r in RANKS.items():
        a, b = randn(r, K, std=K**-0.5), randn(N, r, std=r**-0.5)
        scale = 2.0  # a LoRA term of O(1): visible above the bf16 tolerance
        bank.add(slot, a, b, scale)
        adapters[slot] = (a.double(), b.double(), scale)
    batch = LoRABatch.from_mixtures(MIXTURES, rows_per_sample=ROWS)
    x = randn(sum(ROWS), K)
    weight = randn(N, K, std=K**-0.5)
    return Problem(x, weight, randn(N), bank, batch, adapters, [dict(m) for m in MIXTURES])


def bounds() -> list[tuple[int, int]]:
    out, acc = [], 0
    for r in ROWS:
        out.append((acc, acc + r))
        acc += r
    return out


def merged_tolerance(p: Problem, oracle: torch.Tensor) -> float:
    """2x the largest of plain torch merging in the dtype, plain torch's unmerged error and
    one ulp of ``max |y|``."""
    dt = p.x.dtype
    y = torch.empty(p.x.shape[0], N, dtype=dt)
    for (r0, r1), mix in zip(bounds(), p.mixtures, strict=True):
        w = p.weight.float()
        for slot, strength in mix.items():
            a, b, scale = p.adapters[slot]
            w = w + (_f32(strength) * _f32(scale)) * (b.float() @ a.float())
        y[r0:r1] = F.linear(p.x[r0:r1], w.to(dt), p.bias)
    merge_err = float((y.double() - oracle).abs().max())
    floor = torch.finfo(dt).eps * float(oracle.abs().max())
    return 2.0 * max(merge_err, plain_torch_error(p, oracle), floor)


def assert_matches(y: torch.Tensor, p: Problem, tol: float | None = None) -> None:
    oracle = peft_style_oracle(p)
    tol = merged_tolerance(p, oracle) if tol is None else tol
    assert y.dtype == p.x.dtype and y.shape == oracle.shape
    assert bool(torch.isfinite(y).all()), "NaN/inf in the output"
    err = float((y.double() - oracle).abs().max())
    assert err <= tol, f"max error {err:.3g} > tolerance {tol:.3g}"
    base = p.x.double() @ p.weight.double().T + p.bias.double()
    for (r0, r1), mix in zip(bounds(), p.mixtures, strict=True):
        if mix:
            moved = float((oracle[r0:r1] - base[r0:r1]).abs().max())
            assert moved > 1.5 * tol, f"LoRA moves rows {r0}:{r1} by {moved:.3g}, tol {tol:.3g}"


def stored_weights(p: Problem) -> dict[tuple, torch.Tensor]:
    """The merged weights the cache holds for this layer, by mixture key."""
    anchor = id(p.bank.tensors()[0])
    return {key[1]: t for key, t in plan.CACHE._entries.items() if key[0] == anchor and key[1]}


def assert_merged_rows_use_stored_weights(y: torch.Tensor, p: Problem) -> int:
    """Merged rows equal ``x @ W_stored.T + b`` up to the kernel's rounding, and every stored
    weight is ``W + Σ w·s·B @ A`` of the *current* inputs rounded once to the dtype (a stale
    weight is off by far more); returns how many samples were checked."""
    stored = stored_weights(p)
    x64, b64 = p.x.double(), p.bias.double()
    eps = torch.finfo(p.x.dtype).eps
    checked = 0
    for (r0, r1), mix in zip(bounds(), p.mixtures, strict=True):
        key = tuple(sorted((slot, _f32(w)) for slot, w in mix.items()))
        w = stored.get(key)
        if w is None or not mix:
            continue
        w64 = p.weight.double()
        for slot, strength in mix.items():
            a, b, scale = p.adapters[slot]
            w64 = w64 + (_f32(strength) * _f32(scale)) * (b @ a)
        # rounding once to the dtype: half an ulp; float32 accumulation: far below eps * 1e-3
        off = (w.double() - w64).abs() - eps * (w64.abs() + 1e-3)
        assert float(off.max()) <= 0, f"rows {r0}:{r1}: the stored weight is not W_g"
        ref = x64[r0:r1] @ w.double().T + b64
        tol = 4 * torch.finfo(p.x.dtype).eps * max(1.0, float(ref.abs().max()))
        err = float((y[r0:r1].double() - ref).abs().max())
        assert err <= tol, f"rows {r0}:{r1}: {err:.3g} > {tol:.3g} against the stored weight"
        checked += 1
    return checked


def input_grad(p: Problem, g: torch.Tensor) -> torch.Tensor:
    """``dL/dx`` for upstream ``g``, computed in ``g``'s dtype (float64: the oracle)."""
    dt = g.dtype
    dx = g @ p.weight.to(dt)
    for (r0, r1), mix in zip(bounds(), p.mixtures, strict=True):
        for slot, strength in mix.items():
            a, b, scale = p.adapters[slot]
            coef = _f32(strength) * _f32(scale)
            dx[r0:r1] = dx[r0:r1] + coef * ((g[r0:r1] @ b.to(dt)) @ a.to(dt))
    return dx


def merging_calibration() -> plan.Calibration:
    """Constants under which merging pays at these tiny shapes: a slow rank GEMM (the LoRA
    term costs ~10 ms a group) against a fast GEMM and memory (a build costs ~1 us)."""
    return fake_calibration(
        gemm_flops={"fp32": 1e12}, thin_flops=1e6, bandwidth=1e12, call_s=1e-9, pack_s={}
    )


if not INTERPRET:

    def test_interpreter_suite_in_subprocess(request):
        """Re-run this module with ``TRITON_INTERPRET=1`` (see the module docstring)."""
        rerun(__file__, request)

else:
    from lorakernels.kernels.triton import launch, planned

    @pytest.fixture(autouse=True)
    def fresh_planner(monkeypatch):
        """No measurement; an empty cache and summary per test; launches counted."""
        monkeypatch.delenv("LORAKERNELS_PLAN", raising=False)
        plan.set_calibration(merging_calibration())
        plan.CACHE.clear()
        plan.reset_summary()
        yield
        plan.set_calibration(None)
        plan.CACHE.clear()

    @pytest.fixture
    def launches(monkeypatch) -> dict[str, list]:
        """The arguments of every segmented and fused/pair launch plan built."""
        seen: dict[str, list] = {"segmented": [], "fused_or_pair": []}
        seg, old = launch.plan_fused_segmented, launch.plan_multi_lora_linear

        def segmented(*args, **kw):
            seen["segmented"].append(args)
            return seg(*args, **kw)

        def fused_or_pair(*args, **kw):
            seen["fused_or_pair"].append(args)
            return old(*args, **kw)

        monkeypatch.setattr(launch, "plan_fused_segmented", segmented)
        monkeypatch.setattr(launch, "plan_multi_lora_linear", fused_or_pair)
        return seen

    def run(p: Problem, mode: str | None, x: torch.Tensor | None = None) -> torch.Tensor:
        return lk.multi_lora_linear(
            p.x if x is None else x, p.weight, p.bias, p.bank, p.batch, "triton", plan=mode
        )

    @pytest.mark.parametrize("dtype", HALF, ids=str)
    def test_merged_plan_matches_oracle(dtype, launches):
        p = make_problem(dtype, seed=1)
        for call in range(2):  # build, then from the cache (and the cached stack)
            y = run(p, "merged")
            assert_matches(y, p)
            assert assert_merged_rows_use_stored_weights(y, p) == 5
            s = plan.last_summary()[LAYER]
            assert (s["merged_groups"], s["unmerged_groups"]) == (3 * (call + 1), 0)
        name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
        assert s["built"] == 3 and s["hits"] == 3 and s["precision"] == name
        assert len(launches["segmented"]) == 2 and not launches["fused_or_pair"]
        (_, _, m1, sw1, sl1, *_), (_, _, m2, sw2, sl2, *_) = launches["segmented"]
        assert m1.shape == (3, N, K) and m1.dtype == dtype
        assert m2 is m1 and sw2 is sw1 and sl2 is sl1  # nothing re-stacked or re-uploaded
        # groups in first-seen order: {1,4} -> 0, {7} -> 1, base -> -1, {4} -> 2
        assert sw1.tolist() == [0, 1, -1, 0, 2, 1] and sl1.tolist() == [0] * 6

    @pytest.mark.parametrize("dtype", HALF, ids=str)
    def test_auto_merges_after_reuse(dtype, launches):
        p = make_problem(dtype, seed=2)
        y = run(p, "auto")  # seen once: the ski rental does not buy yet
        assert_matches(y, p, tolerance(p, peft_style_oracle(p)))
        s = plan.last_summary()[LAYER]
        assert (s["merged_groups"], s["unmerged_groups"]) == (0, 3)
        assert not launches["segmented"] and len(launches["fused_or_pair"]) == 1
        y = run(p, "auto")  # seen again: every group's credit covers its build
        assert_matches(y, p)
        assert plan.last_summary()[LAYER]["merged_groups"] == 3
        y = run(p, "auto")
        assert_matches(y, p)
        assert assert_merged_rows_use_stored_weights(y, p) == 5
        s = plan.last_summary()[LAYER]
        assert (s["merged_groups"], s["built"], s["hits"]) == (6, 3, 3)
        assert len(launches["segmented"]) == 2

    @pytest.mark.parametrize("dtype", HALF, ids=str)
    def test_merged_and_unmerged_groups_in_one_launch(dtype, launches, monkeypatch):
        """Group {7} runs unmerged (LoRA in the kernel), {1,4} and {4} merged, the base-only
        sample on the base weight: one segmented launch."""
        p = make_problem(dtype, seed=3)

        def decide(cal, groups, *args):
            return [g.rank > 0 and g.key[0][0] != 7 for g in groups], [0.0] * len(groups)

        monkeypatch.setattr(plan, "decide", decide)
        y = run(p, "auto")
        assert_matches(y, p)
        assert assert_merged_rows_use_stored_weights(y, p) == 3
        (args,) = launches["segmented"]
        assert args[3].tolist() == [0, -1, -1, 0, 1, -1]
        assert args[4].tolist() == [0, 1, 0, 0, 0, 1]
        s = plan.last_summary()[LAYER]
        assert (s["merged_groups"], s["unmerged_groups"]) == (2, 1)

    @pytest.mark.parametrize("dtype", HALF, ids=str)
    def test_stale_merged_weights_are_never_used(dtype, launches):
        p = make_problem(dtype, seed=4)
        assert_matches(run(p, "merged"), p)
        old = peft_style_oracle(p)
        # 1. slot 7 reloaded with new weights (same slot, rank and scale)
        a, b, scale = p.adapters[7]
        a2 = (-0.5 * a).to(dtype)
        p.bank.remove(7)
        p.bank.add(7, a2, b.to(dtype), scale)
        p.adapters[7] = (a2.double(), b, scale)
        y = run(p, "merged")
        assert_matches(y, p)
        assert assert_merged_rows_use_stored_weights(y, p) == 5
        new = peft_style_oracle(p)
        assert float((new - old).abs().max()) > 2 * merged_tolerance(p, new)  # stale would fail
        # 2. a strength change in place (same batch tensors, new contents)
        p.mixtures[4] = {4: 0.9}
        p.mixtures[1] = p.mixtures[5] = {7: -0.8}
        p.batch.fill_(p.mixtures)
        y = run(p, "merged")
        assert_matches(y, p)
        assert assert_merged_rows_use_stored_weights(y, p) == 5
        # 3. W changed in place
        with torch.no_grad():
            p.weight.mul_(1.25)
        assert_matches(run(p, "merged"), p)
        assert len(launches["segmented"]) == 4

    @pytest.mark.parametrize("dtype", HALF, ids=str)
    def test_unmerged_and_autograd_run_the_fused_or_pair_path(dtype, launches):
        p = make_problem(dtype, seed=5)
        y = run(p, "unmerged")
        assert_matches(y, p, tolerance(p, peft_style_oracle(p)))
        x = p.x.clone().requires_grad_(True)
        with plan.use_plan("merged"):  # the backward's op call (dx) sees it too
            y = run(p, None, x=x)
            assert_matches(y.detach(), p, tolerance(p, peft_style_oracle(p)))
            g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
            y.backward(g)
        # dx = g @ W + Σ coef (g @ B) @ A per sample: float64 against plain torch in the dtype
        exact, plain = input_grad(p, g.double()), input_grad(p, g)
        tol = 2 * max(
            float((plain.double() - exact).abs().max()),
            torch.finfo(dtype).eps * float(exact.abs().max()),
        )
        assert float((x.grad.double() - exact).abs().max()) <= tol
        # "unmerged" and the backward's dx ran the fused/pair path; the forward that autograd
        # recorded merged (its gradient comes from the op's backward formula)
        assert len(launches["segmented"]) == 1 and len(launches["fused_or_pair"]) == 2

    def test_planner_mode_conditions():
        """fp32, K or N not a multiple of 16, a non-contiguous weight, and the plan in force."""
        x, w = torch.zeros(4, 48, dtype=torch.bfloat16), torch.zeros(64, 48, dtype=torch.bfloat16)
        with plan.use_plan("merged"):
            assert planned.planner_mode(x, w) == "merged"
            assert planned.planner_mode(x.float(), w.float()) == "unmerged"
            assert planned.planner_mode(x[:, :40], w[:, :40]) == "unmerged"
            assert planned.planner_mode(x, w[:56]) == "unmerged"
            wt = torch.zeros(48, 64, dtype=torch.bfloat16).T
            assert planned.planner_mode(x, wt) == "unmerged"
            # a forward that autograd records may merge: the op's backward formula gives the
            # gradients (the backward's own op call is checked in the autograd test above)
            assert planned.planner_mode(x.clone().requires_grad_(), w) == "merged"
        assert planned.planner_mode(x, w) == "auto"  # CPU tensors: the CPU calibration
        with plan.use_plan("unmerged"):
            assert planned.planner_mode(x, w) == "unmerged"

    def test_compiled_call_plans_inside_the_op_without_recompiling(launches):
        """Under ``torch.compile`` the plan is taken at run time inside the custom op: the
        plan in force changes, the graph does not."""
        from torch._dynamo.testing import CompileCounter

        p = make_problem(torch.float16, seed=6)
        counter = CompileCounter()

        @torch.compile(backend=counter, fullgraph=True)
        def f(x, batch):
            return lk.multi_lora_linear(x, p.weight, p.bias, p.bank, batch, "triton")

        for mode in ("unmerged", "merged", "merged"):
            with plan.use_plan(mode):
                y = f(p.x, p.batch)
            assert_matches(y, p)
        assert counter.frame_count == 1
        assert len(launches["segmented"]) == 2 and len(launches["fused_or_pair"]) == 1
        assert plan.last_summary()[LAYER]["merged_groups"] == 6
