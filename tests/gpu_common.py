"""Shared set-up of the ``gpu``-marked tests (``tests/test_gpu_*.py``).

The device is ``cuda``; without one every GPU test skips with the reason. For checking the
tests' own logic on a CPU machine, ``LORAKERNELS_GPU_TEST_DEVICE=cpu TRITON_INTERPRET=1
pytest -m gpu tests/test_gpu_triton.py`` runs the Triton ones under the interpreter (small
sizes; graph capture and ``torch.compile`` tests still need CUDA and skip).
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = torch.device(os.environ.get("LORAKERNELS_GPU_TEST_DEVICE", "cuda"))
ON_GPU = DEVICE.type == "cuda"
NO_CUDA = "no CUDA device (torch.cuda.is_available() is False): GPU tests run on a GPU machine"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)


def gpu_marks() -> list:
    """``pytestmark`` of a GPU test module: the ``gpu`` marker and the skip without a device."""
    if ON_GPU:
        return [pytest.mark.gpu, needs_cuda]
    return [pytest.mark.gpu]


def to_device(args: dict) -> dict:
    return {k: (None if v is None else v.to(DEVICE)) for k, v in args.items()}
