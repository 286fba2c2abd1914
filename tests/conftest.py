"""Shared fixtures: the real LoRA files beside the repository, when present.

They live in ``../shared/fixtures`` (or wherever ``LORAKERNELS_FIXTURES`` points); the README's
"Tests" section says where each file comes from.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FIXTURES = Path(
    os.environ.get("LORAKERNELS_FIXTURES")
    or Path(__file__).resolve().parents[2] / "shared" / "fixtures"
)
MISSING = (
    f"real LoRA fixtures not found at {FIXTURES} (set LORAKERNELS_FIXTURES; the README's "
    "Tests section lists the files and where to get them)"
)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The real-file fixtures folder (made outside the project); skip when absent."""
    if not FIXTURES.is_dir():
        pytest.skip(MISSING)
    return FIXTURES
