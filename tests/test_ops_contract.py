"""The kernel contract: bundles, the one file of op schemas, and the linear op's checks.

* every ``torch.library`` definition lives in ``lorakernels/_ops.py`` and exists after a bare
  ``import lorakernels`` (no backend imported);
* the fakes check shapes (a mismatched bank is refused at trace time, not in a kernel);
* ``opcheck`` on ``multi_lora_linear`` through both eager-direct backends;

The convolution backends are checked in ``tests/test_conv.py``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorakernels as lk
from lorakernels import _ops, ops
from lorakernels.kernels import (
    BankTensors,
    BatchTensors,
    LaunchMeta,
    LoRAArgs,
)
from lorakernels.testing import random_problem

ROOT = Path(__file__).resolve().parents[1]


def test_every_library_definition_is_in_ops_file():
    pattern = re.compile(r"torch\.library\.(custom_op|define|Library)\b|\.define\(|register_fake")
    offenders = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in (ROOT / "lorakernels").rglob("*.py")
        if p.name != "_ops.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_ops_exist_after_bare_import():
    code = (
        "import sys, torch, lorakernels\n"
        "assert 'lorakernels.kernels.cuda' not in sys.modules\n"
        "for op in ('multi_lora_linear', 'sgmv_shrink', 'sgmv_expand', 'sgmv_expand_'):\n"
        "    getattr(torch.ops.lorakernels, op).default\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def _lora(bank, batch, rows: int) -> LoRAArgs:
    batch_t, per = batch.tensors(rows)
    return LoRAArgs(
        ops.bank_tensors(bank), batch_t, LaunchMeta(per, batch.max_entries, bank.max_rank)
    )


def _flat_args(p, backend: str) -> tuple:
    lora = _lora(p.bank, p.batch, p.x.shape[0])
    return (p.x, p.weight, p.bias, *lora.bank, *lora.batch, *_ops._caps(lora.meta), backend)


def test_bundles_round_trip_through_the_schema():
    p = random_problem(samples=2, rows=3, K=8, N=6, ranks=[2], seed=1)
    args = _flat_args(p, "cpu")
    assert _ops._unflatten(args[3:15]) == _lora(p.bank, p.batch, 6)
    assert BankTensors._fields == ("lora_a", "lora_bt", "slot_start", "slot_rank", "slot_scale")
    assert BatchTensors._fields == ("row_ptr", "entry_ptr", "entry_slot", "entry_weight")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck_linear(backend):
    p = random_problem(samples=3, rows=4, K=16, N=12, ranks=[4, 2], seed=4)
    torch.library.opcheck(torch.ops.lorakernels.multi_lora_linear.default, _flat_args(p, backend))


def test_fakes_check_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    p = random_problem(samples=2, rows=3, K=8, N=6, ranks=[2], seed=2)
    args = list(_flat_args(p, "cpu"))
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = torch.ops.lorakernels.multi_lora_linear(*args)
        assert y.shape == (6, 6)
        bad = list(args)
        bad[3] = torch.empty(p.bank.lora_a.shape[0], 9)  # lora_a for K=9
        with pytest.raises(RuntimeError, match="lora_a"):
            torch.ops.lorakernels.multi_lora_linear(*bad)
        bad = list(args)
        bad[11] = torch.empty(p.batch.entry_slot.numel() + 1)  # entry_weight longer
        with pytest.raises(RuntimeError, match="entry_weight"):
            torch.ops.lorakernels.multi_lora_linear(*bad)
        x, a = torch.empty(5, 8), torch.empty(4, 7)
        i = torch.zeros(3, dtype=torch.int32)
        with pytest.raises(RuntimeError, match="lora_a"):
            torch.ops.lorakernels.sgmv_shrink(x, a, i, i, i, i, i, 5, 1, 4)
        t, bt, y = torch.empty(5, 3), torch.empty(4, 6), torch.empty(5, 6)
        with pytest.raises(RuntimeError, match="max_entries"):
            torch.ops.lorakernels.sgmv_expand(
                y, t, bt, i, i, i.float(), i, i, i, i.float(), 5, 1, 4
            )


def test_backward_through_the_op_swaps_the_bank():
    """dx from the op's autograd equals autograd through the (differentiable) reference."""
    p = random_problem(samples=2, rows=3, K=8, N=6, ranks=[3, 2], dtype=torch.float64, seed=5)
    x = p.x.clone().requires_grad_()
    args = list(_flat_args(p, "reference"))
    args[0] = x
    torch.ops.lorakernels.multi_lora_linear(*args).square().sum().backward()
    x2 = p.x.clone().requires_grad_()
    lk.multi_lora_linear(
        x2, p.weight, p.bias, p.bank, p.batch, "reference"
    ).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
