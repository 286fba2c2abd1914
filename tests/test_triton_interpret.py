"""Triton kernels run by Triton's interpreter on CPU tensors, against the float64 reference.

Covers the fused kernel, the shrink/expand pair (with and without split-K) and the dispatch's
own choice, over fp32/fp16/bf16, odd K/N (33, 127), ranks 1..128 mixed in one batch, up to 8
adapters, mixtures of up to 3 entries, negative and zero strengths, rows without adapters,
samples without rows, an adapter absent from the layer (rank 0), bias on/off, non-contiguous
inputs, more samples than one step of the tile search, and a CUDA-graph replay emulation
(one launch plan re-run after the batch tensors were rewritten in place).

Every output is poisoned with NaN before the launch. The tolerance comes from what plain
PyTorch achieves in the same dtype: the error of the op computed with torch ops in that dtype
(rounding after every op, as PEFT does) against float64, times 2, never below one unit of
rounding at the output's largest magnitude. Each LoRA-carrying sample must also move the
output by more than the tolerance, so a kernel that dropped the LoRA term would fail.

Process model: ``TRITON_INTERPRET=1`` must be set before the kernels are first imported, and
the AOT test (``test_triton_aot.py``) needs them compiled for real. So when this module is
collected without the variable, it holds a single test that re-runs this file in a fresh
interpreter with ``TRITON_INTERPRET=1`` (the mark expression is passed on). Run it directly
with ``TRITON_INTERPRET=1 pytest tests/test_triton_interpret.py`` to see each case.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch  # noqa: E402
import triton  # noqa: E402, F401  ([dev] installs it: a broken install fails, not skips)
from interpreter import INTERPRET, rerun
from torch import Tensor  # noqa: E402

from lorakernels.kernels import BankTensors, BatchTensors, LaunchMeta, LoRAArgs, reference  # noqa: E402
from lorakernels.kernels.triton import dispatch  # noqa: E402

FLOAT_ARGS = ("x", "weight", "bias", "lora_a", "lora_bt")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Case:
    """Kernel-level arguments of one random batch (see ``lorakernels.kernels``)."""

    args: dict[str, Tensor | None]
    meta: LaunchMeta
    rows: list[int]
    mixtures: list[list[tuple[int, float]]]
    ranks: list[int]


def bundled(args: dict[str, Tensor | None], meta: LaunchMeta) -> tuple:
    """``(x, weight, bias, LoRAArgs)``: a case's arguments as backends and launch plans take
    them."""
    bank = BankTensors(*(args[k] for k in BankTensors._fields))
    batch = BatchTensors(*(args[k] for k in BatchTensors._fields))
    return args["x"], args["weight"], args["bias"], LoRAArgs(bank, batch, meta)


def make_case(
    dtype: torch.dtype,
    rows: list[int],
    k: int,
    n: int,
    ranks: list[int],
    mixtures: list[list[tuple[int, float]]],
    *,
    bias: bool = True,
    seed: int = 0,
    max_rank: int | None = None,
    max_entries: int | None = None,
    entry_capacity: int | None = None,
) -> Case:
    """A random batch; the bank stores slots in shuffled order with gaps between them."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ranks), generator=gen).tolist()
    starts, cursor = [0] * len(ranks), 0
    for slot in order:
        starts[slot] = cursor
        cursor += ranks[slot] + 3  # gap rows: a kernel reading past a slot's rank sees junk
    bank_rows = cursor

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    x = randn(sum(rows), k)
    row_scale = torch.ones(bank_rows)
    for slot, rank in enumerate(ranks):
        row_scale[starts[slot] : starts[slot] + rank] = max(rank, 1) ** -0.5
    entry_ptr, entry_slot, entry_weight = [0], [], []
    for mix in mixtures:
        for slot, strength in mix:
            entry_slot.append(slot)
            entry_weight.append(strength)
        entry_ptr.append(len(entry_slot))
    # Spare capacity past the last entry (a fixed-capacity batch), filled with junk.
    spare = 2 if entry_capacity is None else entry_capacity - len(entry_slot)
    entry_slot += [len(ranks) - 1] * spare
    entry_weight += [123.0] * spare
    row_ptr = torch.tensor([0, *rows], dtype=torch.int64).cumsum(0).to(torch.int32)
    args = {
        "x": x,
        "weight": randn(n, k, scale=k**-0.5),
        "bias": randn(n) if bias else None,
        "lora_a": randn(bank_rows, k, scale=k**-0.5),
        # B rows scaled by 1/sqrt(rank) (as trained adapters are): every adapter moves the
        # output by O(1), whatever its rank.
        "lora_bt": randn(bank_rows, n) * row_scale.to(dtype)[:, None],
        "slot_start": torch.tensor(starts, dtype=torch.int32),
        "slot_rank": torch.tensor(ranks, dtype=torch.int32),
        "slot_scale": (torch.rand(len(ranks), generator=gen) + 0.5).float(),
        "row_ptr": row_ptr,
        "entry_ptr": torch.tensor(entry_ptr, dtype=torch.int32),
        "entry_slot": torch.tensor(entry_slot, dtype=torch.int32),
        "entry_weight": torch.tensor(entry_weight, dtype=torch.float32),
    }
    meta = LaunchMeta(
        max_rows=max(rows),
        max_entries=max_entries or max(1, max(len(m) for m in mixtures)),
        max_rank=max(ranks) if max_rank is None else max_rank,
    )
    return Case(args, meta, list(rows), [list(m) for m in mixtures], list(ranks))


def reference64(case: Case, *, lora: bool = True) -> Tensor:
    """The oracle on float64 copies of the float inputs."""
    args = {
        name: (v.double() if name in FLOAT_ARGS and v is not None else v)
        for name, v in case.args.items()
    }
    if not lora:
        args["entry_ptr"] = torch.zeros_like(args["entry_ptr"])
    return reference.multi_lora_linear(*bundled(args, case.meta))


def plain_torch(case: Case) -> Tensor:
    """The op with torch ops in the input dtype, rounding after each (PEFT-like)."""
    a = case.args
    y = a["x"] @ a["weight"].T
    if a["bias"] is not None:
        y = y + a["bias"]
    starts, ranks = a["slot_start"].tolist(), a["slot_rank"].tolist()
    scales = a["slot_scale"].tolist()
    row_ptr = a["row_ptr"].tolist()
    out = []
    for s, mix in enumerate(case.mixtures):
        ys, xs = y[row_ptr[s] : row_ptr[s + 1]], a["x"][row_ptr[s] : row_ptr[s + 1]]
        for slot, strength in mix:
            lo, hi = starts[slot], starts[slot] + ranks[slot]
            t = xs @ a["lora_a"][lo:hi].T
            ys = ys + (strength * scales[slot]) * (t @ a["lora_bt"][lo:hi])
        out.append(ys)
    return torch.cat(out)


def tolerance(case: Case, ref: Tensor) -> float:
    dtype = case.args["x"].dtype
    plain_err = (plain_torch(case).double() - ref).abs().max().item()
    floor = torch.finfo(dtype).eps * ref.abs().max().item()
    return 2.0 * max(plain_err, floor)


def assert_lora_is_visible(case: Case, ref: Tensor, tol: float) -> None:
    """Every sample with a real LoRA term moves its rows by more than ``tol`` with a margin, so
    a kernel that dropped any one sample's LoRA would fail."""
    base = reference64(case, lora=False)
    row_ptr = case.args["row_ptr"].tolist()
    for s, mix in enumerate(case.mixtures):
        rows = slice(row_ptr[s], row_ptr[s + 1])
        live = any(w != 0 and case.ranks[slot] > 0 for slot, w in mix)
        if live and rows.stop > rows.start:
            moved = (ref[rows] - base[rows]).abs().max().item()
            assert moved > 1.5 * tol, f"sample {s}: LoRA moves {moved:.3g}, tolerance {tol:.3g}"


def assert_close(out: Tensor, case: Case) -> None:
    ref = reference64(case)
    tol = tolerance(case, ref)
    assert out.dtype == case.args["x"].dtype and out.shape == ref.shape
    assert torch.isfinite(out).all(), "NaN/inf left in the output (a tile was not written)"
    err = (out.double() - ref).abs().max().item()
    assert err <= tol, f"max error {err:.3g} > tolerance {tol:.3g}"
    assert_lora_is_visible(case, ref, tol)


# Ranks 1..128 in one bank; slot 8 is an adapter that does not touch this layer (rank 0).
MIXED_RANKS = [1, 3, 8, 16, 37, 64, 128, 5, 0]
MIXED = {
    "rows": [5, 17, 0, 9, 1, 6, 4],
    "mixtures": [
        [(2, 1.0)],
        [(6, -0.7), (4, 0.5), (3, 1.2)],  # summed rank 181: several rank blocks
        [(5, 1.0)],  # a sample with no rows
        [(1, 1.0), (8, 1.0)],  # one entry is absent from this layer
        [(7, 0.0)],  # strength 0
        [],  # no adapter
        [(0, -2.0), (5, 0.3)],
    ],
    "ranks": MIXED_RANKS,
}
ODD = {"rows": [20, 13], "mixtures": [[(0, 1.0)], [(1, -1.5), (0, 0.25)]], "ranks": [4, 16]}
SMALL_RANKS = {
    "rows": [21, 0, 11, 3],
    "mixtures": [[(0, 1.0)], [(1, 1.0)], [(2, 0.5), (1, -1.0), (0, 2.0)], []],
    "ranks": [2, 5, 12],
}
CASES = {
    "mixed": dict(MIXED, k=33, n=127, bias=True),
    "odd": dict(ODD, k=127, n=33, bias=False),
    "small_ranks": dict(SMALL_RANKS, k=48, n=40, bias=True),
}


def build(name: str, dtype: torch.dtype, seed: int = 0) -> Case:
    spec = dict(CASES[name])
    return make_case(
        dtype,
        spec.pop("rows"),
        spec.pop("k"),
        spec.pop("n"),
        spec.pop("ranks"),
        spec.pop("mixtures"),
        seed=seed,
        **spec,
    )


def forced_plan(path: str, case: Case) -> dispatch.Plan | None:
    """Plans the tests force (None = the dispatch's own choice)."""
    dtype = str(case.args["x"].dtype).removeprefix("torch.")
    n = case.args["weight"].shape[0]
    r_cap = case.meta.max_entries * case.meta.max_rank
    if path == "auto":
        return None
    if path == "fused":  # the dispatch table's fused tile, whatever the summed rank
        return dispatch.Plan(
            "fused", dispatch.fused_config(case.meta.max_rows, n, r_cap, dtype), None, 1, None
        )
    if path == "fused_tiny":  # many row tiles per sample, K steps and rank blocks
        return dispatch.Plan(
            "fused", dispatch.FusedConfig(16, 16, 16, 16, 4, 2, multi_block=True), None, 1, None
        )
    if path == "pair":
        shrink = dispatch.shrink_config(r_cap, dtype)
        return dispatch.Plan("pair", None, shrink, 1, dispatch.expand_config(n, dtype))
    if path == "pair_split":  # 16-deep K blocks over 3 splits: several blocks per split
        shrink = replace(dispatch.shrink_config(r_cap, dtype), block_k=16)
        return dispatch.Plan("pair", None, shrink, 3, dispatch.expand_config(n, dtype))
    raise ValueError(path)


if not INTERPRET:

    def test_interpreter_suite_in_subprocess(request):
        """Re-run this module with ``TRITON_INTERPRET=1`` (see the module docstring)."""
        rerun(__file__, request)

else:
    from lorakernels.kernels import triton as backend
    from lorakernels.kernels.triton import launch

    def run(case: Case, plan: dispatch.Plan | None) -> tuple[Tensor, launch.Launch]:
        job = launch.plan_multi_lora_linear(*bundled(case.args, case.meta), plan=plan)
        job.out.fill_(float("nan"))
        return job(), job

    def test_cpu_is_available_under_the_interpreter():
        assert backend.unavailable_reason(torch.device("cpu")) is None
        assert launch.interpreting()

    @pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
    @pytest.mark.parametrize(
        "case_name, path",
        [
            ("mixed", "auto"),
            ("mixed", "fused"),
            ("mixed", "pair"),
            ("odd", "fused"),
            ("odd", "pair_split"),
            ("small_ranks", "fused_tiny"),
        ],
    )
    def test_matches_reference(case_name, path, dtype):
        case = build(case_name, dtype)
        out, job = run(case, forced_plan(path, case))
        kernels = [r["kernel"] for r in job.records]
        if path.startswith("pair"):
            assert "_lora_shrink_kernel" in kernels and "_lora_expand_kernel" in kernels
        elif path.startswith("fused"):
            assert kernels == ["_fused_multi_lora_kernel"]
        assert_close(out, case)

    def test_public_backend_function_matches_reference():
        case = build("odd", torch.float16, seed=1)
        assert_close(backend.multi_lora_linear(*bundled(case.args, case.meta)), case)

    @pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
    @pytest.mark.parametrize("split_k", [1, 3])
    def test_shrink_writes_the_contract_layout(dtype, split_k):
        case = build("mixed", dtype, seed=2)
        a, meta = case.args, case.meta
        r_cap = meta.max_entries * meta.max_rank
        config = replace(dispatch.shrink_config(r_cap, str(dtype)[6:]), block_k=16)
        job = launch.plan_lora_shrink(a["x"], bundled(a, meta)[3], config=config, split_k=split_k)
        job.out.fill_(float("nan"))
        t = job()
        assert t.dtype == torch.float32 and t.shape == (a["x"].shape[0], r_cap)
        x64, a64 = a["x"].double(), a["lora_a"].double()
        row_ptr, starts = a["row_ptr"].tolist(), a["slot_start"].tolist()
        checked = 0
        for s, mix in enumerate(case.mixtures):
            rows = slice(row_ptr[s], row_ptr[s + 1])
            for j, (slot, _) in enumerate(mix):
                a_rows = a64[starts[slot] : starts[slot] + case.ranks[slot]]
                want = x64[rows] @ a_rows.T
                if want.numel() == 0:
                    continue  # no rows, or an adapter absent from the layer
                got = t[rows, j * meta.max_rank : j * meta.max_rank + a_rows.shape[0]].double()
                # fp32 accumulation of exact products: a few fp32 rounding units of the sum
                # of magnitudes (whatever the order the splits were added in).
                bound = (x64[rows].abs() @ a_rows.abs().T).max().item()
                err = (got - want).abs().max().item()
                assert err <= 8 * torch.finfo(torch.float32).eps * bound, (s, j, err, bound)
                checked += want.numel()
        assert checked > 0

    @pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
    def test_expand_adds_in_place_and_reads_only_live_columns(dtype):
        case = build("mixed", dtype, seed=3)
        a, meta = case.args, case.meta
        m = a["x"].shape[0]
        # t in the contract layout from float64, NaN in every column that must not be read.
        t = torch.full((m, meta.max_entries * meta.max_rank), float("nan"))
        x64, a64 = a["x"].double(), a["lora_a"].double()
        row_ptr, starts = a["row_ptr"].tolist(), a["slot_start"].tolist()
        for s, mix in enumerate(case.mixtures):
            rows = slice(row_ptr[s], row_ptr[s + 1])
            for j, (slot, _) in enumerate(mix):
                lo, r = starts[slot], case.ranks[slot]
                t[rows, j * meta.max_rank : j * meta.max_rank + r] = (
                    x64[rows] @ a64[lo : lo + r].T
                ).float()
        y0 = torch.randn(m, a["weight"].shape[0]).to(dtype)
        y = y0.clone()
        backend.lora_expand(y, t, bundled(a, meta)[3])
        lora64 = reference64(case) - reference64(case, lora=False)
        want = y0.double() + lora64
        # One rounding of the sum in the output dtype (two units: bf16 truncates in the
        # interpreter), plus fp32 accumulation.
        tol = 2 * torch.finfo(dtype).eps * want.abs().max().item()
        assert torch.isfinite(y).all()
        assert (y.double() - want).abs().max().item() <= tol
        for s, mix in enumerate(case.mixtures):
            if not any(case.ranks[slot] for slot, _ in mix):
                rows = slice(row_ptr[s], row_ptr[s + 1])
                assert torch.equal(y[rows], y0[rows]), f"sample {s} has no LoRA but changed"

    @pytest.mark.parametrize("path", ["fused", "pair"])
    def test_graph_replay_with_batch_rewritten_in_place(path):
        """Capture-once / replay-many: a plan built for a one-adapter batch is re-run after
        every batch tensor (rows, mixtures, strengths, scales, bank contents, x) was rewritten
        in place with several adapters; the output must follow the new batch."""
        dtype, rows, k, n, ranks = torch.float16, [6, 6, 6, 6], 40, 72, [8, 24, 16, 4]
        fixed = {"max_rank": 24, "max_entries": 3, "entry_capacity": 8}
        case = make_case(dtype, rows, k, n, ranks, [[(0, 1.0)]] * 4, seed=4, **fixed)
        plan = forced_plan(path, case)
        job = launch.plan_multi_lora_linear(*bundled(case.args, case.meta), plan=plan)
        job.out.fill_(float("nan"))
        assert_close(job(), case)

        def auto_records() -> list[dict]:
            auto = launch.plan_multi_lora_linear(*bundled(case.args, case.meta))
            return [{k: v for k, v in r.items() if k != "args"} for r in auto.records]

        captured = auto_records()

        replays = [
            ([3, 9, 0, 12], [[(1, 1.0), (2, -0.5), (3, 2.0)], [(3, 0.7)], [(0, 1.0)], []]),
            ([1, 1, 10, 12], [[], [(2, 1.0), (1, 1.0)], [(1, -1.0), (0, 0.5), (2, 1.5)], [(3, 1)]]),
        ]
        for seed, (new_rows, new_mix) in enumerate(replays, start=5):
            new = make_case(dtype, new_rows, k, n, ranks, new_mix, seed=seed, **fixed)
            for name, tensor in new.args.items():
                if tensor is not None:
                    case.args[name].copy_(tensor)  # same shapes: the capacities are fixed
            job.out.fill_(float("nan"))
            assert_close(job(), new)  # the same launches, grids and arguments as captured
            # The dispatch makes the same choice (kernels, grids, constants) for the new
            # contents: nothing it decides depends on device values.
            assert auto_records() == captured

    def test_plans_are_built_from_shapes_only():
        """Planning works on meta tensors: it reads no device value (no .item(), .tolist(),
        .cpu() or data-dependent branching), which is what CUDA-graph capture needs."""
        case = build("mixed", torch.float16)
        meta_args = {
            name: (torch.empty_like(v, device="meta") if v is not None else None)
            for name, v in case.args.items()
        }
        for path in ("auto", "fused", "fused_tiny", "pair", "pair_split"):
            job = launch.plan_multi_lora_linear(
                *bundled(meta_args, case.meta), plan=forced_plan(path, case)
            )
            assert job.out.device.type == "meta" and job.records
            for record in job.records:
                if "grid" in record:
                    assert isinstance(record["grid"], int) and record["grid"] > 0

    def test_more_samples_than_one_tile_search_step():
        """S = 70 > BLOCK_S = 64 samples, many with no rows, in 16-row tiles."""
        gen = torch.Generator().manual_seed(7)
        rows = torch.randint(0, 4, (70,), generator=gen).tolist()
        rows[-1] = 5
        mixtures = [[(s % 3, 1.0 - 0.1 * (s % 7))] if s % 4 else [] for s in range(70)]
        case = make_case(torch.float32, rows, 24, 20, [4, 2, 6], mixtures, seed=7)
        plan = dispatch.Plan("fused", dispatch.FusedConfig(16, 32, 16, 16, 4, 2), None, 1, None)
        out, _ = run(case, plan)
        assert_close(out, case)

    def test_non_contiguous_inputs():
        """x with a padded row stride, weight and bank views with non-unit strides."""
        case = build("odd", torch.float16, seed=8)
        a = case.args
        m, k = a["x"].shape
        wide = torch.full((m, k + 7), float("nan"), dtype=torch.float16)
        wide[:, :k] = a["x"]
        a["x"] = wide[:, :k]
        a["weight"] = a["weight"].T.contiguous().T  # stride (1, N)
        a["lora_bt"] = a["lora_bt"].T.contiguous().T
        assert not a["x"].is_contiguous() and a["weight"].stride(0) == 1
        for path in ("fused", "pair"):
            out, _ = run(case, forced_plan(path, case))
            assert_close(out, case)

    @pytest.mark.parametrize("path", ["fused", "pair"])
    def test_rerun_after_non_canonical_x_changed_in_place(path):
        """A padded x is copied by the launch's first step, not at planning: re-running the
        launch (a graph replay) after x changed in place uses the new contents."""
        case = build("small_ranks", torch.float16, seed=9)
        a = case.args
        m, k = a["x"].shape
        wide = torch.full((m, k + 5), float("nan"), dtype=torch.float16)
        wide[:, :k] = a["x"]
        a["x"] = wide[:, :k]
        job = launch.plan_multi_lora_linear(*bundled(a, case.meta), plan=forced_plan(path, case))
        job.out.fill_(float("nan"))
        assert_close(job(), case)
        fresh = make_case(
            torch.float16, case.rows, k, a["weight"].shape[0], case.ranks, case.mixtures, seed=10
        )
        a["x"].copy_(fresh.args["x"])
        job.out.fill_(float("nan"))
        assert_close(job(), replace(case, args={**a, "x": fresh.args["x"]}))

    def test_wrong_index_dtype_is_a_type_error():
        case = build("odd", torch.float32)
        case.args["row_ptr"] = case.args["row_ptr"].long()
        with pytest.raises(TypeError, match="row_ptr"):
            backend.multi_lora_linear(*bundled(case.args, case.meta))

    def test_float64_is_a_type_error_naming_x():
        case = build("odd", torch.float32)
        for name in FLOAT_ARGS:
            if case.args[name] is not None:
                case.args[name] = case.args[name].double()
        with pytest.raises(TypeError, match="x"):
            backend.multi_lora_linear(*bundled(case.args, case.meta))

    @pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
    @pytest.mark.parametrize(
        "popularity, mixture_size", [("distinct", 1), ("zipf", 3), ("identical", 2)]
    )
    def test_public_api_backend_triton(dtype, popularity, mixture_size):
        """``lorakernels.ops.multi_lora_linear(..., backend="triton")`` through the custom op,
        against the PEFT-style float64 oracle of ``lorakernels.testing``."""
        from lorakernels import ops, testing

        problem = testing.random_problem(
            samples=4,
            rows=[7, 0, 12, 5],
            K=129,
            N=130,
            ranks=[1, 8, 37, 128, 5],
            popularity=popularity,
            mixture_size=mixture_size,
            dtype=dtype,
            seed=21,
        )
        oracle = testing.peft_style_oracle(problem)
        y = ops.multi_lora_linear(
            problem.x, problem.weight, problem.bias, problem.bank, problem.batch, backend="triton"
        )
        assert y.dtype == dtype and torch.isfinite(y).all()
        tol = testing.tolerance(problem, oracle, factor=2.0)
        assert (y.double() - oracle).abs().max().item() <= tol
        if dtype == torch.float32:  # the same draw in every dtype: check once, tolerance tight
            base = problem.x.double() @ problem.weight.double().T
            if problem.bias is not None:
                base = base + problem.bias.double()
            assert (oracle - base).abs().max().item() > 10 * tol  # the LoRA term is visible

    def test_public_api_traces_under_torch_compile():
        """dynamo traces the custom op with the triton backend without graph breaks."""
        from lorakernels import ops, testing

        problem = testing.random_problem(
            samples=2, rows=6, K=32, N=48, ranks=[4, 16], dtype=torch.float32, seed=22
        )

        def layer(x):
            return ops.multi_lora_linear(
                x, problem.weight, problem.bias, problem.bank, problem.batch, backend="triton"
            )

        compiled = torch.compile(layer, backend="eager", fullgraph=True)
        oracle = testing.peft_style_oracle(problem)
        y = compiled(problem.x)
        assert (y.double() - oracle).abs().max().item() <= testing.tolerance(problem, oracle)

    def _without(case: Case, drop: set[int]) -> Case:
        """The same case with mixture entries number ``drop`` (flat entry indices) removed."""
        mixtures, e = [], 0
        for mix in case.mixtures:
            kept = []
            for item in mix:
                if e not in drop:
                    kept.append(item)
                e += 1
            mixtures.append(kept)
        return replace(case, mixtures=mixtures)

    def _reference_of(case: Case) -> Tensor:
        """float64 oracle of ``case.mixtures`` (which may differ from the batch tensors)."""
        args = {
            name: (v.double() if name in FLOAT_ARGS and v is not None else v)
            for name, v in case.args.items()
        }
        row_ptr = args["row_ptr"].tolist()
        y = args["x"] @ args["weight"].T + (0 if args["bias"] is None else args["bias"])
        starts, ranks = args["slot_start"].tolist(), args["slot_rank"].tolist()
        scales = args["slot_scale"].tolist()
        for s, mix in enumerate(case.mixtures):
            rows = slice(row_ptr[s], row_ptr[s + 1])
            for slot, w in mix:
                lo, hi = starts[slot], starts[slot] + ranks[slot]
                t = args["x"][rows] @ args["lora_a"][lo:hi].T
                coef = float(torch.tensor(w, dtype=torch.float32)) * scales[slot]
                y[rows] += coef * (t @ args["lora_bt"][lo:hi])
        return y

    @pytest.mark.parametrize("path", ["fused", "pair"])
    @pytest.mark.parametrize(
        "broken",
        ["slot_past_L", "negative_slot", "rank_over_cap", "rows_past_bank", "entries_over_cap"],
    )
    def test_invalid_entries_are_skipped_like_the_cuda_backend(path, broken):
        """What the csrc kernels do (``resolve_entry``): an entry whose slot is outside
        ``[0, L)``, whose rank exceeds ``meta.max_rank`` or whose rows leave the bank is
        skipped whole; entries past ``meta.max_entries`` are ignored. Never truncated, never
        read out of bounds (issue 9, item 6)."""
        dtype = torch.float32
        ranks = [4, 16, 8]
        mixtures = [[(0, 1.0), (1, -0.5)], [(2, 1.5)], [(1, 0.75), (0, 1.0)]]
        case = make_case(dtype, [5, 7, 6], 48, 40, ranks, mixtures, seed=31, max_entries=2)
        a = case.args
        if broken == "slot_past_L":
            a["entry_slot"][1] = len(ranks)  # entry 1 of sample 0
            want = _without(case, {1})
        elif broken == "negative_slot":
            a["entry_slot"][2] = -1
            want = _without(case, {2})
        elif broken == "rank_over_cap":
            case = replace(case, meta=replace(case.meta, max_rank=8))  # slot 1 has rank 16
            want = _without(case, {1, 3})
        elif broken == "rows_past_bank":
            a["slot_start"][2] = a["lora_a"].shape[0] - 3  # rank 8 from 3 rows before the end
            want = _without(case, {2})
        else:
            case = replace(case, meta=replace(case.meta, max_entries=1))
            want = _without(case, {1, 4})
        ref = _reference_of(want)
        out, _ = run(case, forced_plan(path, case))
        assert torch.isfinite(out).all()
        err = (out.double() - ref).abs().max().item()
        tol = 64 * torch.finfo(dtype).eps * ref.abs().max().item()
        assert err <= tol, f"max error {err:.3g} > {tol:.3g}: the invalid entry was not skipped"

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
    @pytest.mark.parametrize("path", ["fused", "pair"])
    def test_rank_intermediate_is_not_rounded_to_16_bits(dtype, path):
        """Fails if ``x @ A.T`` is rounded to the input dtype anywhere (issue 10, D4).

        A rank-2 adapter whose two ``A`` rows differ in one element and whose ``B`` columns
        are opposite: ``t`` is large (|t| up to ~6000) while the LoRA term ``(t0 - t1) * b``
        is small. All inputs are small integers or dyadic fractions, so ``t`` (an integer
        below 2^24), its hi/lo split (hi = t rounded to the dtype, lo = the exact rest) and
        every product and sum are exact in fp32: a kernel keeping ``t`` in fp32 is exact up
        to the one rounding of the output. Rounding ``t`` to the dtype (bf16 keeps 8
        significant bits, fp16 11) erases the LoRA term wherever ``t0`` and ``t1`` round to
        the same value -- many times the tolerance, which the other tests (whose tolerance
        follows plain PyTorch, which rounds ``t``) cannot see.
        """
        gen = torch.Generator().manual_seed(41)
        k, n, m = 64, 32, 16
        case = make_case(dtype, [m], k, n, [2], [[(0, 1.0)]], bias=False, seed=42)
        args = case.args

        def ints(lo, hi, *shape):
            return torch.randint(lo, hi + 1, shape, generator=gen).to(torch.float64)

        x = ints(-8, 8, m, k)
        a0 = ints(-100, 100, k)
        a1 = a0.clone()
        a1[3] += 1
        b = ints(-4, 4, n) / 16
        start = args["slot_start"][0].item()
        args["x"].copy_(x)
        args["weight"].copy_(ints(-8, 8, n, k) / 256)
        args["lora_a"][start : start + 2] = torch.stack([a0, a1]).to(dtype)
        args["lora_bt"][start : start + 2] = torch.stack([b, -b]).to(dtype)
        args["slot_scale"][0] = 1.0
        ref = reference64(case)
        out, _ = run(case, forced_plan(path, case))
        # one rounding of an exact fp32 value (two units: the interpreter truncates bf16)
        tol = 2 * torch.finfo(dtype).eps * ref.abs().max().item()
        err = (out.double() - ref).abs().max().item()
        # The premise: the same computation with t rounded to the dtype misses by far.
        t = x @ torch.stack([a0, a1]).T
        rounded = x @ args["weight"].double().T + t.to(dtype).double() @ torch.stack([b, -b])
        assert (rounded - ref).abs().max().item() > 10 * tol
        assert err <= tol, f"max error {err:.3g} > {tol:.3g}: x @ A.T was rounded?"

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
    @pytest.mark.parametrize("tile", ["table", "tiny_multi"])
    def test_segmented_kernel_mixes_merged_and_unmerged_groups(dtype, tile):
        """Issue 13, item 4: per sample the base weight or a merged one, LoRA on or off, in
        one launch, against float64 per-sample references (merged weights are rounded to the
        dtype once when stored, so the oracle uses the stored weights)."""
        ranks = [4, 16, 8, 12]
        mixtures = [[(0, 1.0), (1, -0.5)], [(2, 1.5)], [(1, 0.75)], [], [(3, 1.0), (0, 2.0)]]
        case = make_case(dtype, [18, 9, 0, 7, 21], 48, 64, ranks, mixtures, seed=51, max_entries=2)
        a = case.args
        w64 = a["weight"].double()
        starts, scales = a["slot_start"].tolist(), a["slot_scale"].tolist()

        def delta(mix):
            d = torch.zeros_like(w64)
            for slot, strength in mix:
                lo, hi = starts[slot], starts[slot] + ranks[slot]
                coef = float(torch.tensor(strength, dtype=torch.float32)) * scales[slot]
                d += coef * a["lora_bt"][lo:hi].double().T @ a["lora_a"][lo:hi].double()
            return d

        # group 0: sample 1's mixture merged; group 1: sample 4's mixture merged
        merged = torch.stack([(w64 + delta(mixtures[1])), (w64 + delta(mixtures[4]))]).to(dtype)
        seg_weight = torch.tensor([-1, 0, -1, -1, 1], dtype=torch.int32)
        seg_lora = torch.tensor([1, 0, 1, 0, 0], dtype=torch.int32)
        if tile == "table":
            config = None
        else:
            config = dispatch.FusedConfig(16, 16, 16, 16, 4, 2, multi_block=True)
        job = launch.plan_fused_segmented(
            a["x"],
            a["weight"],
            merged,
            seg_weight,
            seg_lora,
            a["bias"],
            bundled(a, case.meta)[3],
            config,
        )
        job.out.fill_(float("nan"))
        out = job()
        ref = reference64(case)  # samples 0 and 2 (unmerged, LoRA on)
        x64, b64 = a["x"].double(), a["bias"].double()
        row_ptr = a["row_ptr"].tolist()
        for s, g in ((1, 0), (4, 1)):  # merged rows: x @ merged.T + b, no LoRA on top
            rows = slice(row_ptr[s], row_ptr[s + 1])
            ref[rows] = x64[rows] @ merged[g].double().T + b64
        rows = slice(row_ptr[3], row_ptr[4])  # LoRA off, base weight
        ref[rows] = x64[rows] @ w64.T + b64
        assert torch.isfinite(out).all()
        tol = 4 * torch.finfo(dtype).eps * ref.abs().max().item()
        err = (out.double() - ref).abs().max().item()
        assert err <= tol, f"max error {err:.3g} > {tol:.3g}"
        # the merged groups really differ from the base weight beyond the tolerance
        for s in (1, 4):
            rows = slice(row_ptr[s], row_ptr[s + 1])
            assert (ref[rows] - (x64[rows] @ w64.T + b64)).abs().max().item() > 4 * tol

    @pytest.mark.slow
    @pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
    @pytest.mark.parametrize("popularity", ["identical", "distinct", "uniform", "zipf", "skewed"])
    @pytest.mark.parametrize("path", ["auto", "fused", "pair"])
    def test_popularity_sweep(dtype, popularity, path):
        """Adapter popularity over 8 adapters and 12 samples at a 320-wide layer."""
        gen = torch.Generator().manual_seed(11)
        ranks = [4, 8, 16, 32, 64, 128, 12, 1]
        if popularity == "identical":
            slots = [2] * 12
        elif popularity == "distinct":
            slots = list(range(8)) + [None] * 4
        elif popularity == "uniform":
            slots = torch.randint(0, 8, (12,), generator=gen).tolist()
        elif popularity == "zipf":
            p = torch.tensor([1 / (i + 1) for i in range(8)])
            slots = torch.multinomial(p, 12, replacement=True, generator=gen).tolist()
        else:
            slots = [0] * 10 + [5, None]
        mixtures = [[] if s is None else [(s, 1.0 - 0.25 * (i % 5))] for i, s in enumerate(slots)]
        mixtures[3] = [(1, 0.5), (6, -1.0), (7, 2.0)]
        rows = torch.randint(1, 20, (12,), generator=gen).tolist()
        case = make_case(dtype, rows, 320, 320, ranks, mixtures, seed=12)
        out, _ = run(case, forced_plan(path, case))
        assert_close(out, case)
