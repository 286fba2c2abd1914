"""Model level: one UNet denoising step per provider, checked against PEFT / base, timed."""

from __future__ import annotations

import pytest
import torch

from lorakernels.bench.unet import build_unet_case, check_unet, unet_providers

pytest.importorskip("diffusers")
pytest.importorskip("peft")

_CACHE: dict = {}


@pytest.fixture(scope="module")
def unet_case(unet_workload, device):
    """The two patched models, the providers and the reference outputs (base, peft)."""
    key = (unet_workload, str(device))
    if key not in _CACHE:
        _CACHE.clear()
        case = build_unet_case(unet_workload, device)
        fns = unet_providers(case)
        with torch.no_grad():
            refs = {"base": fns["base"](), "peft": fns["peft"]()}
        _CACHE[key] = (case, fns, refs)
    return _CACHE[key]


def test_unet_step(benchmark, unet_case, unet_provider):
    case, fns, refs = unet_case
    fn = fns[unet_provider]
    with torch.no_grad():
        verdict = check_unet(unet_provider, fn(), refs, case.workload)
    assert "skipped" not in verdict, verdict["skipped"]
    benchmark.group = case.workload.key
    benchmark.extra_info.update(max_err=verdict["max_err"])
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=case.workload.repeats, iterations=1, warmup_rounds=0)
