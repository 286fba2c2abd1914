"""Layer level: every provider on every workload, checked against the float64 oracle, timed."""

from __future__ import annotations

import pytest
import torch

from lorakernels.bench.runner import check, reference
from lorakernels.bench.workloads import build_case

_CACHE: dict = {}


@pytest.fixture(scope="module")
def layer_case(layer_workload, device):
    """The case and its reference, built once per workload."""
    key = (layer_workload, str(device))
    if key not in _CACHE:
        _CACHE.clear()  # keep one workload's tensors alive at a time
        case = build_case(layer_workload, device)
        _CACHE[key] = (case, reference(case))
    return _CACHE[key]


def test_layer(benchmark, layer_case, layer_provider):
    case, ref = layer_case
    checked = check(case, layer_provider, ref)
    if checked.forward is None:
        pytest.skip(checked.skipped)
    assert checked.ok, checked.skipped  # correctness before timing
    w = case.workload
    benchmark.group = w.key
    benchmark.extra_info.update(ideal=w.ideal(), max_err=checked.max_err, tol=ref.tol)
    with torch.no_grad():
        benchmark(checked.forward)
