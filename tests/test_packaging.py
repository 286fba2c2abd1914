"""Set-up promises: which torch the Makefile installs, and what each extra pulls in."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _extra(name: str, table: dict) -> set[str]:
    """Requirement names of an extra, with ``lorakernels[...]`` self-references expanded."""
    out = set()
    for req in table[name]:
        m = re.match(r"lorakernels\[([^\]]+)\]", req)
        if m:
            for sub in m[1].split(","):
                out |= _extra(sub.strip(), table)
        else:
            out.add(re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower())
    return out


def test_bench_extra_has_no_triton_and_dev_has_everything():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = table["optional-dependencies"]
    assert "triton" not in _extra("bench", extras)  # make bench: no 1 GB triton wheel
    assert {"diffusers", "peft", "matplotlib"} <= _extra("bench", extras)
    assert {"triton", "pytest", "diffusers", "peft"} <= _extra("dev", extras)
    assert table["license"] == "Apache-2.0"  # an SPDX string: no setuptools warning


def _torch_plan(tmp_path: Path, driver: bool) -> str:
    make = shutil.which("make")
    assert make, "make is not installed"
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "nvidia-smi"
    if driver:
        fake.write_text("#!/bin/sh\nexit 0\n")
        fake.chmod(0o755)
    elif fake.exists():
        fake.unlink()
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    venv = tmp_path / "venv"
    # without a driver: detection on this machine is replaced by an empty HAS_NVIDIA (a
    # command-line variable overrides the Makefile's), so the test runs on GPU machines too
    extra = [] if driver else ["HAS_NVIDIA="]
    res = subprocess.run(
        [make, "-n", f"{venv}/.torch", f"VENV={venv}", *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_make_installs_cpu_torch_without_a_driver_with_a_fast_fallback(tmp_path):
    plan = _torch_plan(tmp_path, driver=False)
    assert f'[ -n "{CPU_INDEX}" ]' in plan
    assert "--timeout 5 --retries 0" in plan and "default index" in plan  # the fallback
    plan = _torch_plan(tmp_path, driver=True)  # a fake nvidia-smi on PATH is detected
    assert '[ -n "" ]' in plan  # a driver: the default index (the CUDA build)
