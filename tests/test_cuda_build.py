"""The csrc CUDA kernels, checked on a machine without a GPU.

1. Compile: the library builds with nvcc for sm_80 and sm_90; ``ptxas -v`` shows no spills
   and a zero stack frame for every kernel; the SASS of the fp16/bf16 kernels has HMMA
   (tensor cores) and that of the fp32 kernels has none (fp32-exact FMAs).
2. Load: the library dlopens, reports its ABI and archs, and a launch without a GPU raises
   RuntimeError with the CUDA runtime's message instead of crashing.
3. Index arithmetic: the *same* kernel bodies compiled as host code (csrc/emulate) run over
   the whole launch grid under AddressSanitizer, with the tensor-core instructions replaced
   by their PTX fragment layouts, and their outputs are compared with a float64 reference.

Skipped, with the reason, when nvcc (or the host compiler, or cuobjdump for the SASS test)
is absent. Nothing here runs a kernel on a GPU.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("_lk_csrc_build", ROOT / "csrc" / "build.py")
build = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = build  # dataclasses look their module up while it executes
_spec.loader.exec_module(build)

NVCC = build.find_nvcc()
pytestmark = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found: the CUDA sources cannot be compiled here"
)

ARCHS = ["80", "90"]
SHRINK = ["lk_shrink_f32", "lk_shrink_f16", "lk_shrink_bf16"]
EXPAND = [
    "lk_expand_f32_f32",
    "lk_expand_f16_f16",
    "lk_expand_f16_f32",
    "lk_expand_bf16_bf16",
    "lk_expand_bf16_f32",
]
KERNELS = SHRINK + EXPAND


@pytest.fixture(scope="module")
def _builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Future]:
    """The library (nvcc) and the host emulator (g++) compile side by side: together they are
    most of this module's run time."""
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {
        "library": pool.submit(
            build.build_library, ",".join(ARCHS), tmp_path_factory.mktemp("lkcuda"), NVCC
        ),
        "emulator": pool.submit(build.build_emulator, tmp_path_factory.mktemp("lkemu"), NVCC),
        "emulated_lib": pool.submit(
            build.build_emulated_library, tmp_path_factory.mktemp("lkemulib"), NVCC
        ),
    }
    pool.shutdown(wait=False)
    return futures


@pytest.fixture(scope="module")
def built(_builds: dict[str, Future]):
    return _builds["library"].result()


# ------------------------------------------------------------------------------ 1. compile
def test_resources_no_spills_zero_stack(built) -> None:
    rows = build.parse_ptxas(built.ptxas_log)
    print("\n" + build.format_table(rows))
    seen = {(r.kernel, r.arch) for r in rows}
    missing = {(k, f"sm_{a}") for k in KERNELS for a in ARCHS} - seen
    assert not missing, f"ptxas reported no resources for {sorted(missing)}"
    for r in rows:
        assert r.spill_stores == 0 and r.spill_loads == 0, f"{r.kernel} {r.arch} spills: {r}"
        assert r.stack == 0, f"{r.kernel} {r.arch} uses a stack frame: {r}"
        assert r.registers <= 255 and r.smem <= 48 * 1024, r


def test_sass_tensor_cores(built) -> None:
    cuobjdump = build.find_tool("cuobjdump", NVCC)
    if cuobjdump is None or build.find_tool("nvdisasm", NVCC) is None:
        pytest.skip(
            "cuobjdump/nvdisasm not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)"
        )
    sass = build.sass_by_kernel(built.library, cuobjdump)
    print()
    for arch in ARCHS:
        for k in KERNELS:
            text = sass.get((k, f"sm_{arch}"))
            assert text, f"no SASS for {k} sm_{arch}"
            mma = re.findall(r"\bHMMA\.[\w.]+", text)
            print(f"{k:22s} sm_{arch}: {len(mma):3d} HMMA {sorted(set(mma))}")
            out_dtype = k.split("_")[2]
            if out_dtype == "f32":  # fp32 path: fp32 FMAs only, never tf32 tensor cores
                assert not mma and "FFMA" in text, f"{k} sm_{arch}"
                continue
            if k.startswith("lk_expand"):
                want = "HMMA.1688.F32.TF32"  # fp32 t split in two tf32 halves
            else:
                want = "HMMA.16816.F32.BF16" if out_dtype == "bf16" else "HMMA.16816.F32"
            assert want in mma, f"{k} sm_{arch}: expected {want}, found {sorted(set(mma))}"


# ------------------------------------------------------------------------------ 2. load
@pytest.fixture(scope="module")
def native(built):
    from lorakernels import _native

    os.environ[_native.ENV_LIB] = str(built.library)
    try:
        yield _native
    finally:
        del os.environ[_native.ENV_LIB]


def test_library_loads_and_reports(native, built) -> None:
    present, why = native.status()
    assert present, why
    lib = native.load()
    assert lib.lk_abi_version() == native.ABI_VERSION
    assert lib.lk_build_archs().decode() == ",".join(ARCHS)
    assert str(built.library) in why
    # which toolkit built it travels with the library and is reported (issue 9, item 4)
    assert f"built by nvcc {build.nvcc_version(NVCC)} ({NVCC})" in why, why


def test_toolkit_must_match_torch_cuda(monkeypatch) -> None:
    """A torch built with a CUDA major no toolkit here has is refused, naming what was found;
    the matching major is taken when present."""
    found = build.nvcc_version(NVCC)
    assert found is not None
    major = int(found.split(".")[0])
    with pytest.raises(build.BuildError, match=f"no CUDA {major - 1}.x toolkit.*found: .*{found}"):
        build.select_nvcc(f"{major - 1}.8")
    nvcc, note = build.select_nvcc(f"{major}.99")  # same major, other minor: accepted
    assert build.nvcc_version(nvcc).split(".")[0] == str(major) and "for torch CUDA" in note


def test_invalid_arguments_raise(native) -> None:
    from lorakernels.kernels import cuda

    lib = native.load()
    x = torch.zeros(4, 8, dtype=torch.float16)
    idx = {k: torch.zeros(2, dtype=torch.int32) for k in cuda._INDEX_ARGS}
    t = torch.zeros(4, 4)
    with pytest.raises(RuntimeError, match="invalid argument.*ldt"):
        # t narrower than max_entries * max_rank
        cuda._launch_shrink(lib, x, x, idx, t, 4, 2, 4, 0)
    with pytest.raises(TypeError, match="x: .*float64"):
        cuda._launch_shrink(lib, x.double(), x, idx, t, 4, 1, 4, 0)


def test_launch_without_gpu_is_an_error_not_a_crash(native) -> None:
    from lorakernels.kernels import cuda

    lib = native.load()
    problem = native.device_problem(lib)
    if problem is None:
        pytest.skip("a CUDA device is visible: the no-GPU error path cannot be exercised")
    x = torch.randn(8, 16, dtype=torch.bfloat16)
    idx = {
        "slot_start": torch.tensor([0], dtype=torch.int32),
        "slot_rank": torch.tensor([4], dtype=torch.int32),
        "row_ptr": torch.tensor([0, 8], dtype=torch.int32),
        "entry_ptr": torch.tensor([0, 1], dtype=torch.int32),
        "entry_slot": torch.tensor([0], dtype=torch.int32),
    }
    t = torch.zeros(8, 4)
    with pytest.raises(RuntimeError, match="sgmv_shrink failed \\(CUDA error\\): .*\\w+") as exc:
        cuda._launch_shrink(lib, x, x[:4], idx, t, 8, 1, 4, 0)
    print(f"\nno-GPU launch error: {exc.value}")
    y = torch.randn(8, 16)
    with pytest.raises(RuntimeError, match="sgmv_expand failed \\(CUDA error\\)"):
        cuda._launch_expand(
            lib, y, y.bfloat16(), t, x[:4], idx, torch.ones(1), torch.ones(1), 8, 1, 4, 0
        )


def test_ops_exist_without_library(tmp_path: Path) -> None:
    """Fresh process, no library: schemas, fake kernels and the 'why not' are all there."""
    code = """
import torch
from lorakernels import _native
from lorakernels.kernels import cuda
present, why = _native.status()
assert not present and "not built" in why, why
assert "CUDA tensors only" in cuda.unavailable_reason(torch.device("cpu"))
reason = cuda.unavailable_reason(torch.device("cuda"))
assert reason and ("no CUDA device" in reason or "not built" in reason), reason
x = torch.empty(10, 33, device="meta", dtype=torch.float16)
i = torch.empty(3, device="meta", dtype=torch.int32)
t = torch.ops.lorakernels.sgmv_shrink(x, x, i, i, i, i, i, 10, 2, 16)
assert t.shape == (10, 32) and t.dtype == torch.float32, t
y = torch.ops.lorakernels.sgmv_expand(t.new_empty(10, 40), t, x.new_empty(5, 40), i, i,
    t.new_empty(3), i, i, i, t.new_empty(3), 10, 2, 16)
assert y.shape == (10, 40) and y.dtype == torch.float16, y
print("ok")
"""
    env = dict(os.environ, LORAKERNELS_CUDA_LIB=str(tmp_path / "absent.so"))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=False
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


# ------------------------------------------------------------------------------ 3. emulation
@pytest.fixture(scope="module")
def emulator(_builds: dict[str, Future]) -> Path:
    return _host_build(_builds["emulator"])


def _host_build(fut: Future) -> Path:
    try:
        return fut.result()
    except build.BuildError as exc:
        if "no host C++ compiler" in str(exc):
            pytest.skip(str(exc))
        raise


_TORCH = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}
_EPS = {0: 2.0**-22, 1: 2.0**-10, 2: 2.0**-7}  # output rounding allowance per dtype code


def _strided(
    rows: int, cols: int, ld: int, dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A [rows, cols] view with leading stride ld, and the exact flat storage behind it
    ((rows-1)*ld + cols elements, so any overrun is outside the allocation)."""
    n = (rows - 1) * ld + cols
    flat = (torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return torch.as_strided(flat, (rows, cols), (ld, 1)), flat


def _case(code: int, y_in_f32: bool, aligned: bool, seed: int) -> dict:
    """A batch with every awkward feature: an empty sample, a sample without entries, a
    mixture of two adapters, a rank-0 (absent) slot, ranks 40 > BN and 13, strengths 0 and
    negative, K and N not multiples of the tiles, capacities above the actual values, free
    bank rows between adapters, unused entry capacity, and (odd) strides that defeat vector
    loads."""
    gen = torch.Generator().manual_seed(seed)
    dt = _TORCH[code]
    K, N = (72, 80) if aligned else (37, 45)
    rows = [70, 0, 9, 130, 5]
    mixtures = [[(0, 1.0), (2, -0.5)], [(1, 1.0)], [(3, 0.7)], [(2, 1.3), (1, 0.0), (4, 0.4)], []]
    ranks = [16, 8, 40, 13, 0]
    starts = [3 + sum(ranks[:i]) + 3 * i for i in range(len(ranks))]  # 3 free rows between
    R, M = starts[-1] + ranks[-1] + 3, sum(rows)
    cap = {"max_rows": 140, "max_entries": 4, "max_rank": 48}
    width = cap["max_entries"] * cap["max_rank"]
    if aligned:
        ld = {"ldx": K + 8, "lda": K, "ldb": N, "ldt": width, "ldyi": N + 8, "ldyo": N}
    else:
        ld = {"ldx": K + 5, "lda": K + 1, "ldb": N + 7, "ldt": width + 3, "ldyi": N + 1, "ldyo": N}
    x, x_flat = _strided(M, K, ld["ldx"], dt, gen)
    a, a_flat = _strided(R, K, ld["lda"], dt, gen, 0.5)
    bt, bt_flat = _strided(R, N, ld["ldb"], dt, gen, 0.5)
    y_in, y_flat = _strided(M, N, ld["ldyi"], torch.float32 if y_in_f32 else dt, gen)
    idx = {
        "slot_start": torch.tensor(starts, dtype=torch.int32),
        "slot_rank": torch.tensor(ranks, dtype=torch.int32),
        "row_ptr": torch.tensor(np.cumsum([0, *rows]), dtype=torch.int32),
        "entry_ptr": torch.tensor(np.cumsum([0, *map(len, mixtures)]), dtype=torch.int32),
        # two unused entries of capacity past E: never read
        "entry_slot": torch.tensor([s for m in mixtures for s, _ in m] + [0, 0], dtype=torch.int32),
    }
    floats = {
        "slot_scale": (torch.rand(len(ranks), generator=gen) + 0.25).float(),
        "entry_weight": torch.tensor([w for m in mixtures for _, w in m] + [9.0, 9.0]),
    }
    meta = dict(
        dtype=code,
        y_in_f32=int(y_in_f32),
        K=K,
        N=N,
        S=len(rows),
        L=len(ranks),
        R=R,
        t_numel=(M - 1) * ld["ldt"] + width,
        y_out_numel=(M - 1) * ld["ldyo"] + N,
        **cap,
        **ld,
    )
    return {
        "meta": meta,
        "idx": idx,
        "floats": floats,
        "x": x,
        "a": a,
        "bt": bt,
        "y_in": y_in,
        "flat": {"x": x_flat, "lora_a": a_flat, "lora_bt": bt_flat, "y_in": y_flat},
        "rows": rows,
        "mixtures": mixtures,
        "starts": starts,
        "ranks": ranks,
    }


def _reference(c: dict, y_in: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """float64 oracle from the same (dtype-rounded) inputs: each entry's t and the final y."""
    x, a, bt = c["x"].double(), c["a"].double(), c["bt"].double()
    y = y_in.double().clone()
    t_ref: dict[tuple[int, int], torch.Tensor] = {}
    r0 = 0
    for s, (n, mix) in enumerate(zip(c["rows"], c["mixtures"], strict=True)):
        for j, (slot, w) in enumerate(mix):
            st, rk = c["starts"][slot], c["ranks"][slot]
            if rk and n:
                t_ref[(s, j)] = t = x[r0 : r0 + n] @ a[st : st + rk].T
                scale = float(c["floats"]["slot_scale"][slot])
                y[r0 : r0 + n] += w * scale * (t @ bt[st : st + rk])
        r0 += n
    return t_ref, y


def _check_t(c: dict, t_out: torch.Tensor, t_ref: dict, unwritten: str) -> None:
    """Each (entry, rank column) within fp32 accumulation error; every other column still
    holds the `unwritten` marker ("nan" poison or "zero")."""
    m, K = c["meta"], c["meta"]["K"]
    written = torch.zeros(t_out.shape, dtype=torch.bool)
    r0 = 0
    for s, n in enumerate(c["rows"]):
        for j in range(len(c["mixtures"][s])):
            if (s, j) in t_ref:
                ref = t_ref[(s, j)]
                cols = slice(j * m["max_rank"], j * m["max_rank"] + ref.shape[1])
                got = t_out[r0 : r0 + n, cols].double()
                bound = 1e-6 * K * (c["x"][r0 : r0 + n].double().abs().max() + 1)
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=float(bound))
                written[r0 : r0 + n, cols] = True
        r0 += n
    rest = t_out[~written]
    ok = torch.isnan(rest).all() if unwritten == "nan" else (rest == 0).all()
    assert ok, "the shrink wrote outside its entries' rank columns"


def _check_y(
    code: int, y_out: torch.Tensor, y_ref: torch.Tensor, y_base: torch.Tensor, roundings: int = 1
) -> None:
    """Every row written; error within the output dtype's rounding (+ fp32 accumulation); and
    the LoRA term really present (a kernel that skipped it would fail)."""
    y = y_out.double()
    assert torch.isfinite(y).all(), "expand left rows unwritten"
    eps, scale = _EPS[code] * roundings, y_ref.abs().max()
    err, bound = (y - y_ref).abs(), eps * y_ref.abs() + 1e-5 * scale
    assert (err <= bound).all(), f"max err {err.max():.3g}, worst excess {(err - bound).max():.3g}"
    assert (y_ref - y_base.double()).abs().max() > 100 * eps * scale


_DTYPE_CASES = pytest.mark.parametrize(
    "code,y_in_f32",
    [(0, True), (1, True), (1, False), (2, True), (2, False)],
    ids=["f32", "f16-yf32", "f16", "bf16-yf32", "bf16"],
)
_LAYOUTS = pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "odd-strides"])


def _raw(v: torch.Tensor) -> bytes:
    if v.dtype in (torch.float16, torch.bfloat16):
        v = v.view(torch.int16)
    return v.numpy().tobytes()


@_LAYOUTS
@_DTYPE_CASES
def test_emulated_kernels_match_reference(
    emulator, tmp_path: Path, code: int, y_in_f32: bool, aligned: bool
) -> None:
    """Kernel bodies on the host under ASan, fed exactly-sized buffers through the C ABI."""
    c = _case(code, y_in_f32, aligned, seed=1000 + 10 * code + int(aligned))
    m = c["meta"]
    (tmp_path / "meta.txt").write_text("".join(f"{k} {v}\n" for k, v in m.items()))
    for name, arr in {**c["flat"], **c["idx"], **c["floats"]}.items():
        (tmp_path / f"{name}.bin").write_bytes(_raw(arr))
    proc = subprocess.run(
        [str(emulator), str(tmp_path)], capture_output=True, text=True, check=False, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    M = sum(c["rows"])
    t_flat = torch.from_numpy(np.fromfile(tmp_path / "t_out.bin", dtype=np.float32))
    t_out = torch.as_strided(t_flat, (M, m["max_entries"] * m["max_rank"]), (m["ldt"], 1))
    raw = torch.from_numpy(np.fromfile(tmp_path / "y_out.bin", dtype=np.uint8).copy())
    y_out = torch.as_strided(raw.view(_TORCH[code]), (M, m["N"]), (m["ldyo"], 1))
    t_ref, y_ref = _reference(c, c["y_in"])
    _check_t(c, t_out, t_ref, unwritten="nan")  # the emulator NaN-poisons t
    _check_y(code, y_out, y_ref, c["y_in"])


# ------------------------------------------------------------------------------ 4. Python side
@pytest.fixture(scope="module")
def emulated_ops(_builds: dict[str, Future]):
    """The op kernels of lorakernels.kernels.cuda registered for CPU as well, over the host
    emulation of the library: the ctypes marshalling, the torch.library ops and
    multi_lora_linear then run here exactly as they would on a GPU, minus the GPU."""
    path = _host_build(_builds["emulated_lib"])
    from lorakernels.kernels import cuda

    lib = torch.library.Library("lorakernels", "IMPL")
    for name, fn in cuda.OP_IMPLS.items():
        lib.impl(name, fn, "CPU")
    yield path
    lib._destroy()


def _lora(c: dict, meta):
    """The case's ``LoRAArgs``, as the backend entry points take them."""
    from lorakernels.kernels import BankTensors, BatchTensors, LoRAArgs

    idx, fl = c["idx"], c["floats"]
    bank = BankTensors(c["a"], c["bt"], idx["slot_start"], idx["slot_rank"], fl["slot_scale"])
    batch = BatchTensors(idx["row_ptr"], idx["entry_ptr"], idx["entry_slot"], fl["entry_weight"])
    return LoRAArgs(bank, batch, meta)


def _launch_meta(c: dict):
    from lorakernels.kernels import LaunchMeta

    m = c["meta"]
    return LaunchMeta(m["max_rows"], m["max_entries"], m["max_rank"])


@_LAYOUTS
@pytest.mark.parametrize("code", [0, 1, 2], ids=["f32", "f16", "bf16"])
def test_ops_through_ctypes(emulated_ops, monkeypatch, code: int, aligned: bool) -> None:
    from lorakernels import _native
    from lorakernels.kernels import cuda

    monkeypatch.setenv(_native.ENV_LIB, str(emulated_ops))
    c = _case(code, True, aligned, seed=2000 + 10 * code + int(aligned))
    idx, fl, meta = c["idx"], c["floats"], _launch_meta(c)
    lora = _lora(c, meta)
    t = cuda.lora_shrink(c["x"], lora)
    t_ref, y_ref = _reference(c, c["y_in"])
    _check_t(c, t, t_ref, unwritten="zero")  # the contract: zeros past the ranks
    args = (
        t,
        c["bt"],
        idx["slot_start"],
        idx["slot_rank"],
        fl["slot_scale"],
        idx["row_ptr"],
        idx["entry_ptr"],
        idx["entry_slot"],
        fl["entry_weight"],
    )
    caps = (meta.max_rows, meta.max_entries, meta.max_rank)
    y = torch.ops.lorakernels.sgmv_expand(c["y_in"], *args, *caps)  # fp32 in, one rounding
    assert y.dtype == _TORCH[code]
    _check_y(code, y, y_ref, c["y_in"])
    y2 = c["y_in"].to(_TORCH[code])  # in place on the bank dtype: base rounded, then once more
    y2_base = y2.clone()
    cuda.lora_expand(y2, t, lora)
    _check_y(code, y2, _reference(c, y2_base)[1], y2_base)


@pytest.mark.parametrize("code", [0, 1, 2], ids=["f32", "f16", "bf16"])
def test_multi_lora_linear_through_ctypes(emulated_ops, monkeypatch, code: int) -> None:
    """The backend's entry point against the reference backend in float64."""
    from lorakernels import _native
    from lorakernels.kernels import LaunchMeta, cuda, reference

    monkeypatch.setenv(_native.ENV_LIB, str(emulated_ops))
    c = _case(code, True, False, seed=3000 + code)
    gen = torch.Generator().manual_seed(7 + code)
    w = torch.randn(c["meta"]["N"], c["meta"]["K"], generator=gen).to(_TORCH[code])
    b = torch.randn(c["meta"]["N"], generator=gen).to(_TORCH[code])
    x64, w64, b64, a64, bt64 = (t.double() for t in (c["x"], w, b, c["a"], c["bt"]))
    base = x64 @ w64.T + b64
    for meta in (_launch_meta(c), LaunchMeta(140, 0, 0)):  # with LoRA, and none resident
        lora = _lora(c, meta)
        y = cuda.multi_lora_linear(c["x"], w, b, lora)
        if meta.max_rank:
            bank64 = lora.bank._replace(lora_a=a64, lora_bt=bt64)
            ref = reference.multi_lora_linear(x64, w64, b64, lora._replace(bank=bank64))
        else:  # max_rank 0: no adapter resident in this layer, exactly the base layer
            ref = base
        assert y.dtype == _TORCH[code]
        eps = _EPS[code]
        err, scale = (y.double() - ref).abs(), ref.abs().max()
        bound = eps * ref.abs() + 1e-5 * c["meta"]["K"] ** 0.5 * scale
        assert (err <= bound).all(), f"max err {err.max():.3g}"
        if meta.max_rank:
            assert (ref - base).abs().max() > 100 * eps * scale


def test_opcheck(emulated_ops, monkeypatch) -> None:
    """torch.library.opcheck on the three ops (schema, fake kernels, dispatch)."""
    from lorakernels import _native

    monkeypatch.setenv(_native.ENV_LIB, str(emulated_ops))
    c = _case(1, True, True, seed=4000)
    idx, fl, meta = c["idx"], c["floats"], _launch_meta(c)
    caps = (meta.max_rows, meta.max_entries, meta.max_rank)
    x, a, bt = c["x"].contiguous(), c["a"].contiguous(), c["bt"].contiguous()
    index = (
        idx["slot_start"],
        idx["slot_rank"],
        idx["row_ptr"],
        idx["entry_ptr"],
        idx["entry_slot"],
    )
    torch.library.opcheck(torch.ops.lorakernels.sgmv_shrink.default, (x, a, *index, *caps))
    t = torch.ops.lorakernels.sgmv_shrink(x, a, *index, *caps)
    rest = (
        t,
        bt,
        idx["slot_start"],
        idx["slot_rank"],
        fl["slot_scale"],
        idx["row_ptr"],
        idx["entry_ptr"],
        idx["entry_slot"],
        fl["entry_weight"],
        *caps,
    )
    y = c["y_in"].contiguous()
    torch.library.opcheck(torch.ops.lorakernels.sgmv_expand.default, (y, *rest))
    torch.library.opcheck(torch.ops.lorakernels.sgmv_expand_.default, (y.half(), *rest))


def test_arrays_reinterpreted_as_vectors_are_16_byte_aligned() -> None:
    """``copy_bytes<8|16>`` reads/writes local arrays as ``uint2``/``uint4``: each such array
    is declared ``alignas(16)`` (issue 9, item 12; 2-byte alignment only works while the array
    stays in registers)."""
    import re

    found = set()
    for path in sorted((ROOT / "csrc" / "cuda").glob("*.cuh")):
        text = path.read_text()
        for call in re.finditer(r"copy_bytes<[^;]*?>\((.*?)\);", text, flags=re.DOTALL):
            heads = [
                re.match(r"\s*(?:reinterpret_cast<[^>]*>\()?&?\s*([a-z_]\w*)", arg)
                for arg in call.group(1).split(",")
            ]
            for name in {h.group(1) for h in heads if h}:
                decl = re.search(
                    rf"^\s*(alignas\(16\)\s+)?\w+ {name}\[[\w *()]+\];", text, flags=re.MULTILINE
                )
                if decl is None:
                    continue  # a pointer (global or shared memory) or an index, not an array
                found.add((path.name, name))
                assert decl.group(1), f"{path.name}: local array {name!r} lacks alignas(16)"
    assert len(found) >= 3, found
