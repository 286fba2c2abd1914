"""Ahead-of-time compile of every Triton config the dispatch can pick, for sm_80 and sm_90.

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` runs the
whole pipeline down to a cubin with the ``ptxas`` that ships with Triton. The dispatch keeps
one config table per architecture (sm_80, sm_90); each config is compiled for its own
architecture and checked: it compiles; ``cuobjdump --dump-resource-usage`` shows no stack
frame and no local memory (Triton kernels make no calls and hold no local arrays, so a stack
frame means register spills: ptxas reports its spill stores there); the shared memory Triton
allocates fits one block (sm_80: 163 KiB, sm_90: 227 KiB); and the fp16/bf16 kernels use
tensor-core MMA (``mma.sync``/``wgmma`` in PTX, ``HMMA``/``HGMMA`` in SASS, disassembled with
the ``cuobjdump`` shipped with Triton). Compiles are cached by Triton (``~/.triton/cache``), so
only the first run on a machine pays for them (about 3 minutes on 2 cores).

The arguments and compile-time constants are taken from the real launch plans (built on
``device="meta"`` tensors of an SD1.5 layer shape), and the argument specialisation mimics
Triton's JIT (integers equal to 1 become constants, multiples of 16 and 16-byte aligned
pointers get divisibility hints), so this compiles what a launch on a GPU would compile.

Process model: the kernels must be real ``JITFunction`` objects, so this module needs
``TRITON_INTERPRET`` unset; when it is set the module re-runs itself in a subprocess without
it. ``python tests/test_triton_aot.py`` prints the table of registers/spills/shared memory.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch  # noqa: E402
import triton  # noqa: E402  ([dev] installs it: a broken install fails, not skips)

from lorakernels.kernels import BankTensors, BatchTensors, LaunchMeta, LoRAArgs  # noqa: E402
from lorakernels.kernels.triton import dispatch  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Largest dynamic shared memory one block may use (CUDA programming guide, per arch).
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
_TRITON_DTYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.int32: "i32",
}
_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_REPORT_CACHE = Path(
    os.environ.get("LORAKERNELS_AOT_CACHE", Path.home() / ".cache" / "lorakernels" / "aot")
)


@dataclass(frozen=True)
class Spec:
    """One argument specialization: what Triton's JIT keys a compile on besides the configs.

    Triton specializes every runtime integer on ``% 16 == 0`` (and ``== 1``) and every pointer
    on 16-byte alignment. The launcher makes every float tensor it passes contiguous and
    16-byte aligned (``launch.canonical``), pads ``t``'s row stride to a multiple of 16
    (``launch._t_buffer``) and sends layers whose K or N is not a multiple of 16 to the pair,
    so what remains is: the fused kernel with and without ``bias`` (K, N multiples of 16);
    the shrink in the two classes of ``K`` (= ``stride_xm``, ``stride_ar``); the expand in the
    two classes of ``N`` (= ``stride_ym``, ``stride_btr``); fp32 pair kernels with and
    without TF32. ``k``/``n`` stand for their class: 320 for multiples of 16 (every SD/SDXL
    width), 77 and 328 for the rest.
    """

    bias: bool = True
    k: int = 320
    n: int = 320
    width: tuple[int, int] = (3, 64)  # (max_entries, max_rank) of the pair kernels' t
    tf32: bool = False  # torch.backends.cuda.matmul.allow_tf32 (fp32 pair kernels only)

    def label(self, kind: str) -> str:
        if kind in ("fused", "segmented"):
            return "bias" if self.bias else "no bias"
        words = [f"K{self.k}" if kind == "shrink" else f"N{self.n}"]
        if self.tf32:
            words.append("tf32")
        return " ".join(words)


# Every class each kernel can meet; test_specializations_are_complete proves by a sweep of
# real launch plans that the dispatcher meets no other.
SPECS = {
    "fused": [Spec(True), Spec(False)],
    "segmented": [Spec(True), Spec(False)],  # the fused kernel with per-sample weights
    "shrink": [Spec(False, k, 320) for k in (320, 77)],
    "expand": [Spec(False, 320, n) for n in (320, 328)],
}


@dataclass(frozen=True)
class Compiled:
    kernel: str
    dtype: str
    config: str
    spec: str
    arch: int
    registers: int
    stack_bytes: int  # ptxas puts register spills in the stack frame (no calls, no arrays)
    local_bytes: int
    shared_bytes: int
    ptx_mma: tuple[str, ...]
    sass_mma: tuple[str, ...]


def _plans(dtype: str, kind: str, config, spec: Spec) -> list[dict]:
    """Launch records of one config and specialization, planned on meta tensors."""
    from lorakernels.kernels.triton import launch

    td = _TORCH_DTYPES[dtype]
    m, k, n, s = 8192, spec.k, spec.n, 2
    # Capacities the config is chosen for: one rank block unless it loops over several.
    single = kind in ("fused", "segmented") and not config.multi_block
    max_entries, max_rank = (1, config.block_r) if single else spec.width
    bank_rows = 512
    meta_dev = torch.device("meta")

    def t(*shape, dt=td):
        return torch.empty(shape, dtype=dt, device=meta_dev)

    i32 = torch.int32
    meta = LaunchMeta(4096, max_entries, max_rank)
    x = t(m, k)
    w, b = t(n, k), (t(n) if spec.bias else None)
    a, bt = t(bank_rows, k), t(bank_rows, n)
    starts, ranks, scales = t(8, dt=i32), t(8, dt=i32), t(8, dt=torch.float32)
    row_ptr, entry_ptr = t(s + 1, dt=i32), t(s + 1, dt=i32)
    entry_slot, entry_weight = t(s * max_entries, dt=i32), t(s * max_entries, dt=torch.float32)
    lora = LoRAArgs(
        BankTensors(a, bt, starts, ranks, scales),
        BatchTensors(row_ptr, entry_ptr, entry_slot, entry_weight),
        meta,
    )
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = spec.tf32
    try:
        if kind == "fused":
            plan = launch.plan_fused(x, w, b, lora, config)
        elif kind == "segmented":
            merged, seg = t(3, n, k), t(s, dt=i32)
            plan = launch.plan_fused_segmented(
                x,
                w,
                merged,
                seg,
                seg,
                b,
                lora,
                config,
            )
        elif kind == "shrink":
            plan = launch.plan_shrink(x, lora, config, 2)
        else:
            y, tt = t(m, n), launch._t_buffer(m, max_entries * max_rank, meta_dev)
            plan = launch.plan_expand(y, tt, lora, config)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return [r for r in plan.records if "fn" in r]


def specialization(record: dict) -> tuple:
    """The key Triton's JIT compiles one launch record under: each runtime argument's type and
    divisibility/alignment class (Triton's own ``specialize_impl``), plus the constexprs."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    fn = record["fn"]
    runtime = [p for p in fn.params if not p.is_constexpr]
    key = []
    for param, value in zip(runtime, record["args"], strict=True):
        spec = not param.do_not_specialize
        key.append(native_specialize_impl(BaseBackend, value, False, spec, True))
    consts = tuple((p.name, record[p.name]) for p in fn.params if p.is_constexpr)
    opts = (record["num_warps"], record["num_stages"])
    return (fn.__name__, tuple(key), consts, opts)


def _source(record: dict):
    """ASTSource + options for one launch record, specialised exactly as Triton's JIT would."""
    from triton.compiler import ASTSource

    fn = record["fn"]
    runtime = [p for p in fn.params if not p.is_constexpr]
    _, key, _, _ = specialization(record)
    signature, constexprs, attrs = {}, {}, {}
    for param, value, (kind, attr) in zip(runtime, record["args"], key, strict=True):
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = value if value is None else attr
        elif attr == "D":
            attrs[(param.num,)] = [["tt.divisibility", 16]]
    for param in fn.params:
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", record[param.name]
    options = {"num_warps": record["num_warps"], "num_stages": record["num_stages"]}
    return ASTSource(fn, signature, constexprs, attrs), options


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _compile(job: tuple) -> Compiled:
    from triton.backends.compiler import GPUTarget

    kind, dtype, config, arch, spec = job
    (record,) = _plans(dtype, kind, config, spec)
    src, options = _source(record)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    # The report of a compile Triton already cached is cached beside it (keyed by Triton's
    # hash of source, specialization, options and target): reruns skip the two cuobjdump calls.
    report = _REPORT_CACHE / f"{compiled.hash}-{arch}.json"
    names = {
        "kernel": record["kernel"],
        "dtype": dtype,
        "config": _describe(config),
        "spec": spec.label(kind),
        "arch": arch,
    }
    if report.is_file():
        cached = json.loads(report.read_text())
        return Compiled(
            **{
                **cached,
                **names,
                "ptx_mma": tuple(cached["ptx_mma"]),
                "sass_mma": tuple(cached["sass_mma"]),
            }
        )
    ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    with tempfile.TemporaryDirectory() as tmp:
        cubin_path = Path(tmp, "k.cubin")
        cubin_path.write_bytes(cubin)
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", str(cubin_path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        sass = subprocess.run(
            [_tool("cuobjdump"), "-sass", str(cubin_path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    if not found:
        raise RuntimeError(f"unexpected cuobjdump output:\n{usage}")
    result = Compiled(
        **names,
        registers=int(found.group(1)),
        stack_bytes=int(found.group(2)),
        local_bytes=int(found.group(3)),
        shared_bytes=int(compiled.metadata.shared),
        ptx_mma=tuple(sorted(set(re.findall(r"\b(mma\.sync|wgmma\.mma_async)", ptx)))),
        sass_mma=tuple(sorted(set(re.findall(r"\b(HMMA|HGMMA)\.", sass)))),
    )
    _REPORT_CACHE.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(dataclasses.asdict(result)))
    return result


def _describe(config) -> str:
    short = {
        "block_m": "M",
        "block_n": "N",
        "block_k": "K",
        "block_r": "R",
        "num_warps": "w",
        "num_stages": "s",
    }
    flags = {"atomic": "atomic", "multi_block": "multi"}
    words = [f"{short[k]}{v}" for k, v in vars(config).items() if k in short]
    words += [flags[k] for k, v in vars(config).items() if k in flags and v]
    return " ".join(words)


def _jobs() -> list[tuple]:
    """Each config of the dispatch tables, for the architecture whose table holds it, in each
    specialization; fp32 pair kernels with and without TF32. Jobs that Triton would compile
    identically are listed once."""
    jobs, seen = [], set()
    tables = dict(dispatch.all_configs())
    # the fused tiles for the per-sample-weight entry (issue 13), as its launcher adapts them
    tables["segmented"] = [
        (arch, dtype, dispatch.segmented_config(config, arch))
        for arch, dtype, config in tables["fused"]
    ]
    for kind, configs in tables.items():
        for arch, dtype, config in configs:
            for spec in SPECS[kind]:
                for tf32 in (False, True) if dtype == "float32" else (False,):
                    job = (kind, dtype, config, arch, replace(spec, tf32=tf32))
                    (record,) = _plans(dtype, kind, config, job[4])
                    key = (arch, specialization(record))
                    if key not in seen:
                        seen.add(key)
                        jobs.append(job)
    return jobs


def compile_all() -> list[Compiled]:
    """Compile every job, in parallel processes (compiles are CPU bound and independent)."""
    jobs = _jobs()
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    context = multiprocessing.get_context("spawn")  # no inherited interpreter/JIT state
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(_compile, jobs, chunksize=4))


def format_table(results: list[Compiled]) -> str:
    head = f"{'kernel':<26} {'dtype':<9} {'config':<24} {'specialization':<26} {'arch':<6} "
    head += f"{'regs':>4} {'spill':>5} {'smem KiB':>8}  MMA (PTX / SASS)"
    lines = [head, "-" * len(head)]
    for r in results:
        mma = f"{','.join(r.ptx_mma) or '-'} / {','.join(r.sass_mma) or '-'}"
        lines.append(
            f"{r.kernel:<26} {r.dtype:<9} {r.config:<24} {r.spec:<26} sm_{r.arch:<3} "
            f"{r.registers:>4} {r.stack_bytes + r.local_bytes:>5} {r.shared_bytes / 1024:>8.1f}"
            f"  {mma}"
        )
    return "\n".join(lines)


if INTERPRET:

    def test_aot_in_subprocess_without_interpreter(request):
        """Re-run this module where the kernels are real JIT functions (see module docstring)."""
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
        if request.config.option.markexpr:
            cmd += ["-m", request.config.option.markexpr]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        print(done.stdout[-6000:], done.stderr[-2000:])
        assert done.returncode == 0, done.stdout[-6000:]

else:

    @pytest.fixture(scope="module")
    def compiled() -> list[Compiled]:
        results = compile_all()
        print("\n" + format_table(results))
        return results

    def test_every_dispatch_config_is_compiled(compiled):
        assert len(compiled) == len(_jobs()) > 0
        configs = {(r.arch, r.dtype, r.kernel, r.config) for r in compiled}
        want = {
            (
                arch,
                dtype,
                f"_{'fused_multi_lora' if kind == 'fused' else 'lora_' + kind}_kernel",
                _describe(config),
            )
            for kind, items in dispatch.all_configs().items()
            for arch, dtype, config in items
        }
        assert configs - {c for c in configs if c[2] == "_fused_segmented_kernel"} == want
        segmented = {(a, d, c) for a, d, k, c in configs if k == "_fused_segmented_kernel"}
        assert segmented == {
            (arch, dtype, _describe(dispatch.segmented_config(config, arch)))
            for arch, dtype, config in dispatch.all_configs()["fused"]
        }
        kinds = {r.kernel for r in compiled}
        assert kinds == {
            "_fused_multi_lora_kernel",
            "_fused_segmented_kernel",
            "_lora_shrink_kernel",
            "_lora_expand_kernel",
        }

    def test_no_register_spills(compiled):
        spilling = [r for r in compiled if r.stack_bytes or r.local_bytes]
        assert not spilling, format_table(spilling)

    def test_shared_memory_fits_the_architecture(compiled):
        too_big = [r for r in compiled if r.shared_bytes > SMEM_LIMIT[r.arch]]
        assert not too_big, format_table(too_big)

    def test_16bit_fused_kernel_uses_tensor_cores(compiled):
        want_ptx = {80: "mma.sync", 90: "wgmma.mma_async"}
        want_sass = {80: "HMMA", 90: "HGMMA"}
        fused = [r for r in compiled if r.kernel.startswith("_fused") and r.dtype != "float32"]
        assert fused
        missing = [
            r
            for r in fused
            if want_ptx[r.arch] not in r.ptx_mma or want_sass[r.arch] not in r.sass_mma
        ]
        assert not missing, format_table(missing)

    def test_16bit_pair_kernels_use_tensor_cores(compiled):
        pair = [r for r in compiled if r.kernel.startswith("_lora") and r.dtype != "float32"]
        assert pair
        missing = [r for r in pair if not r.sass_mma]
        assert not missing, format_table(missing)

    def _sweep_keys() -> set:
        """Specialization keys of real launch plans over what the dispatcher can meet: SD1.5,
        SD2 and SDXL widths and odd ones, bias on/off, 77-token text rows and image rows,
        summed-rank capacities 1..384, contiguous, padded and misaligned x, fp32 with and
        without TF32, for both GPU generations (meta tensors: nothing is compiled)."""
        from lorakernels.kernels.triton import launch

        widths = [
            (320, 320),
            (320, 1280),
            (640, 640),
            (768, 320),
            (1024, 640),
            (2048, 1280),
            (1280, 10240),
            (5120, 1280),
            (77, 328),
            (33, 127),
            (328, 77),
        ]
        caps = [(1, 1), (1, 16), (1, 32), (4, 32), (3, 64), (2, 37), (1, 128), (3, 128)]
        keys = set()
        for arch, dtype, tf32 in itertools.product(dispatch.ARCHS, _TORCH_DTYPES, (False, True)):
            if tf32 and dtype != "float32":
                continue
            td = _TORCH_DTYPES[dtype]
            for (k, n), bias, rows, (entries, rank), layout in itertools.product(
                widths, (True, False), (77, 4096), caps, ("contiguous", "padded", "offset")
            ):
                m = 2 * rows

                def t(*shape, dt=td):
                    return torch.empty(shape, dtype=dt, device="meta")

                if layout == "padded":
                    x = t(m, k + 3)[:, :k]
                elif layout == "offset":
                    x = t(m * k + 1)[1:].view(m, k)
                else:
                    x = t(m, k)
                i32, f32 = torch.int32, torch.float32
                meta = LaunchMeta(rows, entries, rank)
                w = t(n, k)
                saved = torch.backends.cuda.matmul.allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = tf32
                try:
                    plan = launch.choose_plan(x, w, meta, arch=arch)
                    job = launch.plan_multi_lora_linear(
                        x,
                        w,
                        t(n) if bias else None,
                        LoRAArgs(
                            BankTensors(
                                t(300, k), t(300, n), t(9, dt=i32), t(9, dt=i32), t(9, dt=f32)
                            ),
                            BatchTensors(
                                t(3, dt=i32),
                                t(3, dt=i32),
                                t(2 * entries, dt=i32),
                                t(2 * entries, dt=f32),
                            ),
                            meta,
                        ),
                        plan,
                    )
                finally:
                    torch.backends.cuda.matmul.allow_tf32 = saved
                for record in job.records:
                    if "fn" in record:
                        keys.add((arch, specialization(record)))
        return keys

    def test_specializations_are_complete():
        """Every (config, argument specialization) a real launch can produce is one the AOT
        jobs compile: the enumeration in SPECS misses nothing the dispatcher meets."""
        compiled_keys = set()
        for kind, dtype, config, arch, spec in _jobs():
            (record,) = _plans(dtype, kind, config, spec)
            compiled_keys.add((arch, specialization(record)))
        met = _sweep_keys()
        missing = met - compiled_keys
        assert not missing, f"{len(missing)} specializations met but never compiled: " + str(
            sorted(missing, key=str)[:3]
        )
        assert len(met) > 40

    def test_import_without_triton_reports_instead_of_failing():
        """``import lorakernels.kernels.triton`` works when triton cannot be imported."""
        code = (
            "import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'triton' or name.startswith('triton.'):\n"
            "            raise ImportError('triton blocked for this test')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import torch\n"
            "import lorakernels.kernels.triton as backend\n"
            "reason = backend.unavailable_reason(torch.device('cpu'))\n"
            "assert reason and 'triton' in reason, reason\n"
            "print('ok', reason)\n"
        )
        root = Path(__file__).resolve().parents[1]
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=root,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(root)},
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("ok")

    def test_cpu_without_interpreter_is_unavailable_with_reason():
        from lorakernels.kernels.triton import unavailable_reason

        reason = unavailable_reason(torch.device("cpu"))
        assert reason is not None and "TRITON_INTERPRET=1" in reason


if __name__ == "__main__":
    print(format_table(compile_all()))
