"""Fresh-process checks: ``import lorakernels`` needs torch alone; optional parts stay lazy."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = {"triton", "diffusers", "transformers", "peft", "matplotlib"}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked for this test")
    sys.meta_path.insert(0, Block())
    """
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_import_and_cpu_op_without_optional_packages():
    res = _run(
        """
        import torch, lorakernels as lk
        from lorakernels.testing import random_problem, peft_style_oracle
        p = random_problem(samples=3, rows=4, K=16, N=8, ranks=[4, 2], seed=0)
        y = lk.multi_lora_linear(p.x, p.weight, p.bias, p.bank, p.batch)
        assert (y.double() - peft_style_oracle(p)).abs().max() < 1e-4
        import lorakernels.prompt, lorakernels.formats
        for mod in ("triton", "diffusers", "transformers", "peft"):
            assert mod not in sys.modules, mod
        print("ok")
        """
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("ok")


def test_explicit_triton_backend_without_triton_says_why():
    res = _run(
        """
        import torch, lorakernels as lk
        bank, batch = lk.LoRABank(8, 4), lk.LoRABatch.from_mixtures([{}])
        try:
            lk.multi_lora_linear(torch.randn(2, 8), torch.randn(4, 8), None, bank, batch,
                                 backend="triton")
        except RuntimeError as exc:
            print("refused:", exc)
        """
    )
    assert res.returncode == 0, res.stderr
    assert "refused: backend 'triton'" in res.stdout


def test_environment_report_runs_without_optional_packages():
    res = _run("import lorakernels.__main__ as m; print(m.info())")
    assert res.returncode == 0, res.stderr
    assert "backends on cpu: auto -> cpu" in res.stdout
    assert "triton" in res.stdout and "not installed" in res.stdout
