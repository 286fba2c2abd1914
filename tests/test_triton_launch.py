"""The Triton launcher's host side, on CPU: device guard, dispatch cache, fp32/TF32 routing,
canonical layouts and per-GPU constants (issue 9, items 2, 8, 9, 10, 11).

Plans are built on ``device="meta"`` tensors (no kernel runs, no GPU needed); the device
guard is checked with torch's CUDA device calls replaced by recorders, since this machine
has one device type only. What needs a real GPU is in ``tests/test_gpu_triton.py``.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import triton  # noqa: F401  (the [dev] extra installs it: a broken install must fail here)

from lorakernels.kernels import BankTensors, BatchTensors, LaunchMeta, LoRAArgs
from lorakernels.kernels.triton import dispatch, launch

META = torch.device("meta")


def _args(
    m=64, k=320, n=320, dtype=torch.float16, bias=True, slots=8, bank_rows=256, entries=4, s=2
):
    def t(*shape, dt=dtype):
        return torch.empty(shape, dtype=dt, device=META)

    i32 = torch.int32
    return {
        "x": t(m, k),
        "weight": t(n, k),
        "bias": t(n) if bias else None,
        "lora_a": t(bank_rows, k),
        "lora_bt": t(bank_rows, n),
        "slot_start": t(slots, dt=i32),
        "slot_rank": t(slots, dt=i32),
        "slot_scale": t(slots, dt=torch.float32),
        "row_ptr": t(s + 1, dt=i32),
        "entry_ptr": t(s + 1, dt=i32),
        "entry_slot": t(entries, dt=i32),
        "entry_weight": t(entries, dt=torch.float32),
    }


def _bundled(args: dict, meta: LaunchMeta) -> tuple:
    """``(x, weight, bias, LoRAArgs)`` from :func:`_args`' flat tensors, as the plans take them."""
    bank = BankTensors(*(args[k] for k in BankTensors._fields))
    batch = BatchTensors(*(args[k] for k in BatchTensors._fields))
    return args["x"], args["weight"], args["bias"], LoRAArgs(bank, batch, meta)


def _kernels(job: launch.Launch) -> list[str]:
    return [r["kernel"] for r in job.records]


@contextlib.contextmanager
def _tf32(on: bool):
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


# ------------------------------------------------------------------ item 9: fp32 and TF32
@pytest.mark.parametrize("tf32", [False, True])
def test_fp32_goes_to_cublas_and_the_pair_following_tf32(tf32):
    meta = LaunchMeta(32, 2, 16)
    with _tf32(tf32):
        job = launch.plan_multi_lora_linear(*_bundled(_args(dtype=torch.float32), meta))
    assert _kernels(job) == ["base_gemm", "zero_", "_lora_shrink_kernel", "_lora_expand_kernel"]
    want = "tf32" if tf32 else "ieee"
    for record in job.records:
        if "fn" in record:
            assert record["INPUT_PRECISION"] == want, record["kernel"]


def test_fp32_is_never_fused_by_the_dispatcher():
    for r_cap in (0, 1, 16, 64, 384):
        for arch in dispatch.ARCHS:
            plan = dispatch.choose(4096, 320, 320, 4096, 1, r_cap, "float32", arch=arch)
            assert plan.path == "pair" and plan.fused is None
    assert not [c for c in dispatch.all_configs()["fused"] if c[1] == "float32"]


def test_16bit_ignores_tf32_switch():
    meta = LaunchMeta(32, 1, 16)
    with _tf32(False):
        off = launch.plan_multi_lora_linear(*_bundled(_args(), meta)).records
    with _tf32(True):
        on = launch.plan_multi_lora_linear(*_bundled(_args(), meta)).records
    assert [r["INPUT_PRECISION"] for r in off] == [r["INPUT_PRECISION"] for r in on] == ["tf32"]


# ------------------------------------------------------------------ item 8: canonical layouts
@pytest.mark.parametrize("k, n", [(77, 320), (320, 328), (33, 127)])
def test_odd_k_or_n_goes_to_the_pair(k, n):
    job = launch.plan_multi_lora_linear(*_bundled(_args(k=k, n=n), LaunchMeta(32, 1, 16)))
    assert "_fused_multi_lora_kernel" not in _kernels(job)
    assert "_lora_shrink_kernel" in _kernels(job)


def test_non_contiguous_weight_goes_to_the_pair():
    args = _args()
    args["weight"] = torch.empty(320, 320, dtype=torch.float16, device=META).T
    job = launch.plan_multi_lora_linear(*_bundled(args, LaunchMeta(32, 1, 16)))
    assert _kernels(job)[0] == "base_gemm"


@pytest.mark.parametrize("layout", ["padded", "misaligned"])
def test_x_is_made_canonical_before_launch(layout):
    args = _args()
    if layout == "padded":
        args["x"] = torch.empty(64, 327, dtype=torch.float16, device=META)[:, :320]
    else:
        args["x"] = torch.empty(64 * 320 + 1, dtype=torch.float16, device=META)[1:].view(64, 320)
    assert not launch._is_canonical(args["x"])
    job = launch.plan_multi_lora_linear(*_bundled(args, LaunchMeta(32, 1, 16)))
    # the copy is a step of the launch (a replay re-copies x), then the kernel
    assert [r["kernel"] for r in job.records] == ["copy_", "_fused_multi_lora_kernel"]
    x = job.records[1]["args"][0]
    assert x.is_contiguous() and x.data_ptr() % 16 == 0 and x.stride(0) == 320


@pytest.mark.parametrize("entries, rank", [(1, 1), (3, 37), (1, 16), (4, 33)])
def test_t_row_stride_is_padded_to_16(entries, rank):
    job = launch.plan_multi_lora_linear(
        *_bundled(_args(dtype=torch.float32), LaunchMeta(32, entries, rank))
    )
    shrink = next(r for r in job.records if r["kernel"] == "_lora_shrink_kernel")
    t = shrink["args"][7]
    assert t.shape == (64, entries * rank)
    assert t.stride(0) % 16 == 0 and t.stride(1) == 1


def test_expand_rejects_y_it_cannot_add_into():
    cpu = _args()
    y = torch.empty(64, 330, dtype=torch.float16, device=META)[:, :320]
    t = torch.empty(64, 16, dtype=torch.float32, device=META)
    with pytest.raises(ValueError, match="y: the triton expand"):
        launch.plan_lora_expand(y, t, _bundled(cpu, LaunchMeta(32, 1, 16))[3])


# ------------------------------------------------------------------ item 6: bound arguments
def test_kernels_get_slot_count_and_bank_rows():
    """The in-kernel bound checks (slot < L, start + rank <= bank rows) get the real sizes."""
    meta = LaunchMeta(32, 3, 64)
    for path in ("fused", "pair"):
        r_cap = meta.max_entries * meta.max_rank
        if path == "fused":
            plan = dispatch.Plan(
                "fused", dispatch.fused_config(32, 320, r_cap, "float16"), None, 1, None
            )
        else:
            plan = dispatch.Plan(
                "pair",
                None,
                dispatch.shrink_config(r_cap, "float16"),
                1,
                dispatch.expand_config(320, "float16"),
            )
        job = launch.plan_multi_lora_linear(
            *_bundled(_args(slots=11, bank_rows=300), meta), plan=plan
        )
        for record in job.records:
            if "fn" not in record:
                continue
            names = [p.name for p in record["fn"].params if not p.is_constexpr]
            values = dict(zip(names, record["args"], strict=True))
            assert values["num_slots"] == 11, record["kernel"]
            assert values["bank_rows"] == 300, record["kernel"]


# ------------------------------------------------------------------ item 10: per-call cost
def test_dispatch_decision_is_cached(monkeypatch):
    calls = []
    real = dispatch.fused_costs

    def counting(*a, **kw):
        calls.append(a)
        return real(*a, **kw)

    monkeypatch.setattr(dispatch, "fused_costs", counting)
    dispatch.choose.cache_clear()
    meta = LaunchMeta(4096, 4, 32)
    for _ in range(5):
        launch.plan_multi_lora_linear(*_bundled(_args(m=8192), meta))
    assert len(calls) == 1
    assert dispatch.choose.cache_info().hits >= 4


def test_device_check_is_cached():
    launch._unavailable_reason.cache_clear()
    for _ in range(3):
        launch.unavailable_reason(torch.device("cpu"))
    assert launch._unavailable_reason.cache_info().hits == 2


# ------------------------------------------------------------------ item 2: device guard
class _FakeCuda:
    """Records which device was current while the launch's steps ran."""

    def __init__(self, current: int) -> None:
        self.current = current
        self.entered: list[int] = []

    def current_device(self) -> int:
        return self.current

    @contextlib.contextmanager
    def device(self, index: int):
        self.entered.append(index)
        saved, self.current = self.current, index
        try:
            yield
        finally:
            self.current = saved


@pytest.mark.parametrize("current, target, switched", [(0, 1, [1]), (1, 1, []), (1, 0, [0])])
def test_launch_switches_to_the_device_of_its_tensors(monkeypatch, current, target, switched):
    fake = _FakeCuda(current)
    monkeypatch.setattr(torch.cuda, "current_device", fake.current_device)
    monkeypatch.setattr(torch.cuda, "device", fake.device)
    seen = []

    class Out:  # stands in for a CUDA tensor: only .device is read
        device = torch.device("cuda", target)

    job = launch.Launch(Out(), steps=[lambda: seen.append(fake.current)] * 2)
    assert job() is not None
    assert seen == [target, target]
    assert fake.entered == switched
    assert fake.current == current  # restored


def test_cpu_and_meta_launches_need_no_guard():
    for dev in ("cpu", "meta"):
        assert isinstance(launch.device_guard(torch.device(dev)), contextlib.nullcontext)


# ------------------------------------------------------------------ item 11: per-GPU constants
@pytest.mark.parametrize(
    "name, machine",
    [
        ("NVIDIA A100-SXM4-80GB", dispatch.A100),
        ("NVIDIA A100 80GB PCIe", dispatch.A100),
        ("NVIDIA H100 80GB HBM3", dispatch.H100),
        ("NVIDIA H100 PCIe", dispatch.H100_PCIE),
        ("NVIDIA H200", dispatch.H200),
        ("NVIDIA GH200 480GB", dispatch.H200),
        ("NVIDIA L40S", dispatch.H100),
    ],
)
def test_machine_constants_by_device_name(name, machine):
    assert dispatch.machine_for(name) is machine


def test_h200_bandwidth_changes_the_roofline_not_the_peak():
    assert dispatch.H200.mma_flops_16bit == dispatch.H100.mma_flops_16bit
    assert dispatch.H200.bandwidth > 1.4 * dispatch.H100.bandwidth
    costs = dispatch.base_costs(4096, 320, 320, "float16")
    assert dispatch.seconds(costs, "float16", dispatch.H200) < dispatch.seconds(
        costs, "float16", dispatch.H100
    )
