"""Run one layer workload: build the case, prepare every provider, check it, time them together.

Correctness comes first: every provider's output is compared with the float64 per-adapter
oracle of :mod:`lorakernels.testing` (which shares no code with the reference backend; the
``base`` floors are compared with ``x @ W.T + b`` in float64) within ``TOLERANCE_FACTOR`` x
the error plain PyTorch makes in the same dtype (:func:`lorakernels.testing.plain_torch_error`),
floored at one ulp of the largest output. A provider that fails is reported and not timed.
The check refuses to run when the tolerance is not at least 10x below the LoRA term's size
(then it could not tell a missing adapter from rounding).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import LoRABank, LoRABatch
from ..testing import Problem, peft_style_oracle, plain_torch_error
from .providers import Forward, Ours, Provider, layer_providers, oracle_error
from .timing import TimingConfig, time_side_by_side
from .workloads import LayerCase, LayerWorkload, build_case

# Merged weights are rounded to the dtype (W + delta), an error plain PyTorch's does not
# include; 4x covers it (measured: merge/fuse/peft/loop stay within 1.1x of plain torch's
# error in bf16) while a missing adapter is ~20x the tolerance off in bf16 and ~1e5x in fp32.
TOLERANCE_FACTOR = 4.0
_FLOORS = ("base", "base32", "onednn")


@dataclass
class Checked:
    """A prepared provider and its correctness verdict."""

    provider: Provider
    forward: Forward | None
    max_err: float | None = None
    tol: float | None = None
    skipped: str | None = None

    @property
    def ok(self) -> bool:
        return self.forward is not None and self.skipped is None


def problem_of(case: LayerCase) -> Problem:
    """The case as a :class:`lorakernels.testing.Problem` (for its oracle and tolerance)."""
    w = case.workload
    bank = LoRABank(w.shape.K, w.shape.N, dtype=case.x.dtype)
    adapters = {}
    for name, (a, b, _) in case.adapters.items():
        adapters[case.slots[name]] = (a.double().cpu(), b.double().cpu(), case.scale(name))
    mixtures = [{case.slots[n]: s for n, s in mix.items()} for mix in case.mixtures]
    batch = LoRABatch.from_mixtures(case.mixtures, case.slots)
    x2 = case.x.reshape(-1, w.shape.K).cpu()
    return Problem(x2, case.weight.cpu(), case.bias.cpu(), bank, batch, adapters, mixtures)


@dataclass
class Reference:
    """What every provider of one case is checked against."""

    oracle: Tensor  # float64 [M, N], with the LoRA terms
    floor: Tensor  # float64 [M, N], x @ W.T + b (for base and base32)
    tol: float
    lora_term: float  # largest LoRA contribution to any output

    def as_dict(self) -> dict:
        return {"tol": self.tol, "lora_term": self.lora_term}


def reference(case: LayerCase) -> Reference:
    """The float64 oracle and the tolerance of ``case`` (see the module docstring)."""
    problem = problem_of(case)
    oracle = peft_style_oracle(problem)
    floor = problem.x.double() @ problem.weight.double().T + problem.bias.double()
    ulp = torch.finfo(case.x.dtype).eps * float(oracle.abs().max())
    tol = TOLERANCE_FACTOR * max(plain_torch_error(problem, oracle), ulp)
    delta = float((oracle - floor).abs().max())
    if delta > 0 and not tol < 0.1 * delta:
        raise RuntimeError(
            f"{case.workload.key}: tolerance {tol:.3g} is not 10x below the LoRA term "
            f"({delta:.3g}); the correctness check would be meaningless"
        )
    return Reference(oracle, floor, tol, delta)


def check(case: LayerCase, provider: Provider, ref: Reference) -> Checked:
    """Prepare ``provider`` on ``case`` and compare one output with the reference."""
    why = provider.unavailable(case)
    if why is not None:
        return Checked(provider, None, skipped=why)
    with torch.no_grad():
        fwd = provider.prepare(case)
        expected = ref.floor if provider.name in _FLOORS else ref.oracle
        err = oracle_error(fwd(), expected)
    c = Checked(provider, fwd, max_err=err, tol=ref.tol)
    if not err <= ref.tol:
        c.skipped = f"WRONG: max error {err:.3g} > tolerance {ref.tol:.3g}"
    return c


def check_providers(case: LayerCase, providers: list[Provider]) -> tuple[list[Checked], dict]:
    """Prepare every provider and check its output against the float64 oracle.

    Returns the checked providers and ``{"tol", "lora_term"}`` (the tolerance and the largest
    LoRA contribution, so that a reader can see the check was not trivial)."""
    ref = reference(case)
    return [check(case, p, ref) for p in providers], ref.as_dict()


def run_layer(
    workload: LayerWorkload,
    device: torch.device,
    timing: TimingConfig,
    *,
    providers: list[Provider] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> dict:
    """Check and time ``workload`` on ``device``; returns a JSON-ready record."""
    case = build_case(workload, device)
    providers = providers if providers is not None else layer_providers(device)
    checked, check = check_providers(case, providers)
    fns = {c.provider.name: c.forward for c in checked if c.ok}
    with torch.no_grad():
        timings = time_side_by_side(fns, timing, device=device)
    record: dict = {
        "workload": workload.as_dict(),
        "device": str(device),
        "check": check,
        "providers": {},
    }
    for c in checked:
        entry: dict = {"max_err": c.max_err}
        if isinstance(c.provider, Ours):
            entry["backend"] = c.provider.resolved(device) if c.skipped is None else None
        if c.ok:
            entry.update(timings[c.provider.name].as_dict())
        else:
            entry["skipped"] = c.skipped
        record["providers"][c.provider.name] = entry
    if on_step is not None:
        on_step(workload.label)
    return record
