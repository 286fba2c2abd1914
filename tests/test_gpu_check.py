"""The ``gpu-check`` runner on a machine without a GPU: it refuses fast and clearly, its dry run
lists the stages within the 8-minute budget, and its report renders (issue 9)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakernels import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "lorakernels", "gpu-check", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_budgets_fit_eight_minutes():
    assert sum(s.budget_s for s in gpu_check.STAGES) < gpu_check.TOTAL_BUDGET_S <= 480
    assert [s.name for s in gpu_check.STAGES] == [
        "environment",
        "correctness",
        "speed-layer",
        "speed-unet",
    ]


def test_dry_run_prints_stages_and_budgets():
    done = _cli("--dry-run")
    assert done.returncode == 0, done.stderr
    for stage in gpu_check.STAGES:
        assert f"{stage.name} ({stage.budget_s} s)" in done.stdout
    assert "total budget" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_one_line_and_nonzero_exit(tmp_path):
    done = _cli("--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("no CUDA device found; would have run:")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_layer_workloads_cover_sd15_and_sdxl_in_both_dtypes():
    work = gpu_check.layer_workloads()
    models = {(w.shape.model, w.dtype) for w in work}
    assert models == {(m, d) for m in ("sd15", "sdxl") for d in ("fp16", "bf16")}
    assert all(w.samples == 16 and w.adapters == 8 and set(w.ranks) == {16} for w in work)


def test_report_renders_failures_and_tables():
    records = [
        {
            "stage": "environment",
            "budget_s": 30,
            "wall_s": 2.0,
            "status": "ok",
            "result": {"device": "NVIDIA H200", "capability": "9.0", "torch": "2.x"},
        },
        {
            "stage": "correctness",
            "budget_s": 270,
            "wall_s": 200.0,
            "status": "failed (exit 1)",
            "summary": "1 failed, 90 passed",
            "failures": ["FAILED tests/x.py::t - boom"],
            "skips": [],
            "tail": "boom",
        },
        {
            "stage": "speed-layer",
            "budget_s": 120,
            "wall_s": 80.0,
            "status": "ok",
            "result": {"table": "ROW ours/base 1.05"},
        },
    ]
    md = gpu_check._markdown(records, 282.0)
    assert "NVIDIA H200" in md and "FAILED tests/x.py::t - boom" in md
    assert "ROW ours/base 1.05" in md and "| correctness | 270 | 200.0 | failed (exit 1)" in md
