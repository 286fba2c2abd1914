"""pytest-benchmark suite over the workloads and providers of ``lorakernels bench``.

``pytest benchmarks --benchmark-only`` times every (workload, provider) pair, grouped per
workload. Sizes: ``--bench-size smoke|quick|full``; the default is ``smoke`` when
``--benchmark-disable`` is given (CI runs every path once, under a minute) and ``quick``
otherwise. Every provider is checked against the float64 oracle before it is timed.

This conftest only applies to ``benchmarks/``; the unit tests in ``tests/`` never load it.
"""

from __future__ import annotations

import pytest
import torch

from lorakernels.bench.providers import layer_providers
from lorakernels.bench.unet import default_unet_workloads
from lorakernels.bench.workloads import layer_suite, shapes_suite, smoke_suite, sweep_suite

SIZES = ("smoke", "quick", "full")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bench-size",
        choices=SIZES,
        default=None,
        help="workload sizes: smoke (default with --benchmark-disable), quick (default), full",
    )


def bench_size(config: pytest.Config) -> str:
    size = config.getoption("--bench-size")
    if size:
        return size
    return "smoke" if config.getoption("benchmark_disable", default=False) else "quick"


def _layer_workloads(size: str) -> list:
    dtypes = ["fp32", "bf16"]
    if size == "smoke":
        return smoke_suite(dtypes)
    if size == "quick":
        return layer_suite(dtypes, row_factor=4)
    return layer_suite(dtypes) + shapes_suite(dtypes) + sweep_suite(dtypes)


def _unet_workloads(size: str) -> list:
    return default_unet_workloads({"smoke": "smoke", "quick": "quick", "full": "default"}[size])


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    size = bench_size(metafunc.config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if "layer_workload" in metafunc.fixturenames:
        ws = _layer_workloads(size)
        ids = [w.key.replace("|", " ").replace(" ", "-") for w in ws]
        metafunc.parametrize("layer_workload", ws, ids=ids, scope="module")
    if "layer_provider" in metafunc.fixturenames:
        ps = layer_providers(device, all_backends=size == "full")
        metafunc.parametrize("layer_provider", ps, ids=[p.name for p in ps])
    if "unet_workload" in metafunc.fixturenames:
        ws = _unet_workloads(size)
        ids = [w.key.replace("|", "-").replace(" ", "-") for w in ws]
        metafunc.parametrize("unet_workload", ws, ids=ids, scope="module")
    if "unet_provider" in metafunc.fixturenames:
        names = ["base", "ours", "peft", "fused", "base_grouped"]
        metafunc.parametrize("unet_provider", names)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
