"""``python -m lorakernels gpu-check`` (``make gpu-check``): every GPU path and the GPU benchmark
in one command, under 8 minutes on one H200, for a machine that is lent now and then.

Stages run one after the other, each in its own process with a time budget (the process is
stopped when the budget is spent); a stage that fails or runs out of time is recorded and the
next one still runs:

* ``environment`` -- device, driver, CUDA/torch/triton versions, ``python -m lorakernels``;
* ``correctness`` -- ``pytest -m gpu tests/`` (the repository's ``tests/`` folder: run from a
  checkout);
* ``speed-layer`` -- the layer table: SD1.5 and SDXL shapes, fp16 and bf16, 16 samples over 8
  rank-16 adapters, ours / base, best-case merge, PEFT, loop, absolute times;
* ``speed-unet`` -- the SD1.5 UNet step (real config, random weights) at 64x64 latents, 16 rows
  (8 prompts with guidance) over 8 adapters: ours / base, ours / PEFT grouped, ours /
  fused-per-group.

Timed numbers exclude warm-up (the first calls, which include Triton's JIT compiles); each
speed stage's wall time, which includes them, is reported next to them. Writes
``GPU.md`` and ``results.json`` into ``--out`` (default ``gpu-results/``) and prints the tables.
``--dry-run`` prints the stages and budgets. Without a CUDA device: one line saying what would
have run, exit status 2, within seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 480


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: int
    what: str


STAGES = (
    Stage("environment", 30, "device, driver, CUDA/torch/triton versions, backend report"),
    Stage(
        "correctness",
        270,
        "pytest -m gpu tests/ (Triton configs, csrc, graphs, compile, planner's merged groups)",
    ),
    Stage("speed-layer", 120, "layer table: SD1.5 + SDXL shapes, fp16/bf16, 16 samples / 8 r16"),
    Stage("speed-unet", 55, "SD1.5 UNet step at 64x64 latents, 16 rows over 8 adapters"),
)


def plan_text() -> str:
    lines = [f"{s.name} ({s.budget_s} s): {s.what}" for s in STAGES]
    lines.append(f"total budget {sum(s.budget_s for s in STAGES)} s (limit {TOTAL_BUDGET_S} s)")
    return "\n".join(lines)


# ---------------------------------------------------------------------- stage bodies
def _environment() -> dict:
    import torch

    from .__main__ import info

    env: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError as exc:
        env["triton"] = f"not importable ({exc})"
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run(
            [
                smi,
                "--query-gpu=driver_version,name,clocks.max.sm,power.limit",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        env["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
    env["report"] = info()
    return env


DTYPES = ("fp16", "bf16")


def layer_workloads() -> list:
    """The SD1.5 layer table (mixtures of 1 and 2) and the SDXL shapes, in fp16 and bf16."""
    from dataclasses import replace

    from .bench.workloads import layer_suite, shapes_suite

    work = layer_suite(list(DTYPES))
    sdxl = [w for w in shapes_suite(list(DTYPES[:1])) if w.shape.model == "sdxl"]
    return work + [replace(w, dtype=dt) for w in sdxl for dt in DTYPES]


def _speed_layer() -> dict:
    import torch

    from .bench import report
    from .bench.providers import layer_providers
    from .bench.runner import run_layer
    from .bench.timing import TimingConfig

    dtypes = list(DTYPES)
    work = layer_workloads()
    device = torch.device("cuda")
    providers = layer_providers(device, names=["ours", "merge", "peft", "loop"])
    timing = TimingConfig(repeats=5, warmup=2, min_sample_s=0.02)
    doc: dict = {
        "schema": report.SCHEMA,
        "provenance": report.provenance(device, dtypes, []),
        "mode": "gpu-check",
        "notes": [],
        "layer": [],
        "model": [],
    }
    for w in work:
        doc["layer"].append(run_layer(w, device, timing, providers=providers))
    report.finish_provenance(doc)
    return {"doc": doc, "table": report.text_report(doc)}


def _speed_unet() -> dict:
    import torch

    from .bench import report
    from .bench.unet import UNetWorkload, run_unet

    device = torch.device("cuda")
    doc: dict = {
        "schema": report.SCHEMA,
        "provenance": report.provenance(device, ["fp16"], []),
        "mode": "gpu-check",
        "notes": [],
        "layer": [],
        "model": [],
    }
    w = UNetWorkload(model="sd15", latent=64, prompts=8, adapters=8, dtype="fp16", repeats=3)
    doc["model"].append(run_unet(w, device))
    report.finish_provenance(doc)
    return {"doc": doc, "table": report.text_report(doc)}


_BODIES = {"environment": _environment, "speed-layer": _speed_layer, "speed-unet": _speed_unet}


def _run_body(name: str, result_path: Path) -> int:
    """Child process: run one stage body, write its JSON result."""
    data = _BODIES[name]()
    result_path.write_text(json.dumps(data, indent=1, default=str))
    return 0


# ---------------------------------------------------------------------- driver
def _command(stage: Stage, out: Path) -> list[str]:
    if stage.name == "correctness":
        return [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "-q",
            "-rfEs",
            "-p",
            "no:cacheprovider",
            f"--junitxml={out / 'pytest-gpu.xml'}",
            str(ROOT / "tests"),
        ]
    return [sys.executable, "-m", "lorakernels.gpu_check", "--stage", stage.name, "--out", str(out)]


def _run_stage(stage: Stage, out: Path) -> dict:
    print(f"== {stage.name} (budget {stage.budget_s} s): {stage.what}", flush=True)
    if stage.name == "correctness" and not (ROOT / "tests").is_dir():
        status = f"not run: {ROOT / 'tests'} does not exist (run gpu-check from a checkout)"
        print(f"   {status}", flush=True)
        return {"stage": stage.name, "budget_s": stage.budget_s, "wall_s": 0.0, "status": status}
    log = out / f"{stage.name}.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(
            _command(stage, out), stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env
        )
        try:
            code = proc.wait(timeout=stage.budget_s)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            status = f"stopped at its {stage.budget_s} s budget"
    wall = time.perf_counter() - t0
    record: dict = {
        "stage": stage.name,
        "budget_s": stage.budget_s,
        "wall_s": round(wall, 1),
        "status": status,
        "log": log.name,
    }
    text = log.read_text(errors="replace")
    if stage.name == "correctness":
        summary = [
            ln
            for ln in text.splitlines()
            if " passed" in ln or " failed" in ln or " error" in ln or " skipped" in ln
        ]
        record["summary"] = summary[-1] if summary else "(no pytest summary)"
        record["failures"] = [ln for ln in text.splitlines() if ln.startswith(("FAILED", "ERROR"))]
        record["skips"] = [ln for ln in text.splitlines() if ln.startswith("SKIPPED")]
    else:
        result = out / f"{stage.name}.json"
        if result.is_file():
            record["result"] = json.loads(result.read_text())
    if status != "ok":
        record["tail"] = text[-3000:]
    print(
        f"   {status} in {wall:.0f} s"
        + (f": {record.get('summary')}" if "summary" in record else ""),
        flush=True,
    )
    return record


def _markdown(records: list[dict], total_s: float) -> str:
    env = next((r.get("result", {}) for r in records if r["stage"] == "environment"), {})
    lines = [
        "# GPU check results",
        "",
        f"Written by `python -m lorakernels gpu-check` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"  # noqa: E501
        f" in {total_s:.0f} s.",
        "",
        f"- device: {env.get('device', '?')} (sm_{env.get('capability', '?')}, "
        f"{env.get('gpu_memory_gib', '?')} GiB); nvidia-smi: {env.get('nvidia_smi', '?')}",
        f"- python {env.get('python', '?')}, torch {env.get('torch', '?')} (CUDA "
        f"{env.get('torch_cuda', '?')}), triton {env.get('triton', '?')}, TF32 "
        f"{env.get('tf32', '?')}",
        "",
        "| stage | budget s | wall s | status |",
        "|---|---|---|---|",
    ]
    for r in records:
        extra = f" -- {r['summary']}" if "summary" in r else ""
        lines.append(f"| {r['stage']} | {r['budget_s']} | {r['wall_s']} | {r['status']}{extra} |")
    for r in records:
        if r.get("failures"):
            lines += ["", f"## {r['stage']}: failures", "", "```", *r["failures"], "```"]
        if r.get("skips"):
            lines += ["", f"## {r['stage']}: skips", "", "```", *r["skips"], "```"]
        table = r.get("result", {}).get("table") if isinstance(r.get("result"), dict) else None
        if table:
            head = f"## {r['stage']} (warm-up excluded; the stage's {r['wall_s']} s include it)"
            lines += ["", head, "", "```", table, "```"]
        if "tail" in r:
            lines += ["", f"## {r['stage']}: last output", "", "```", r["tail"], "```"]
    if env.get("report"):
        lines += ["", "## python -m lorakernels", "", "```", env["report"], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lorakernels gpu-check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("gpu-results"), help="results folder")
    ap.add_argument("--dry-run", action="store_true", help="print the stages and budgets")
    ap.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage body
    args = ap.parse_args(argv)
    if args.dry_run:
        print(plan_text())
        return 0
    if args.stage:
        return _run_body(args.stage, args.out / f"{args.stage}.json")
    stages = ", ".join(f"{s.name} ({s.budget_s} s)" for s in STAGES)
    try:
        import torch
    except ImportError as exc:
        print(f"torch is not importable ({exc}); would have run: {stages}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(f"no CUDA device found; would have run: {stages}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    records = [_run_stage(stage, args.out) for stage in STAGES]
    total = time.perf_counter() - t0
    (args.out / "results.json").write_text(
        json.dumps({"total_s": round(total, 1), "stages": records}, indent=1, default=str)
    )
    (args.out / "GPU.md").write_text(_markdown(records, total))
    for r in records:
        table = r.get("result", {}).get("table") if isinstance(r.get("result"), dict) else None
        if table:
            print(f"\n{r['stage']}:\n{table}")
    print(f"\nwrote {args.out / 'GPU.md'} and {args.out / 'results.json'} in {total:.0f} s")
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
