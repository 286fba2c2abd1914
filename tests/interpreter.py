"""Re-running a test module under Triton's interpreter (``TRITON_INTERPRET=1``).

Triton reads the variable when its kernels are first imported, so a module whose tests need
the interpreter holds, without the variable, one test that calls :func:`rerun` on itself in a
fresh interpreter with the variable set (``tests/test_triton_interpret.py``,
``tests/test_triton_plan.py``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def rerun(test_file: str, request) -> None:  # noqa: ANN001  (pytest's FixtureRequest)
    """Run ``test_file`` with ``TRITON_INTERPRET=1`` under this session's ``-m`` expression;
    fail unless it passes and ran something (exit code 5, nothing collected, fails too: the
    calling test was selected, so the interpreter suite must run)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file]
    markexpr = request.config.option.markexpr
    if markexpr:
        cmd += ["-m", markexpr]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    print(done.stdout[-8000:], done.stderr[-2000:])
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]
    assert re.search(r"\b[1-9]\d* passed", done.stdout), done.stdout[-2000:]
