"""Shared fixtures: the real LoRA files beside the repository, when present."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """``../shared/fixtures`` (real files made outside the project); skip when absent."""
    if not FIXTURES.is_dir():
        pytest.skip(f"real LoRA fixtures not found at {FIXTURES}")
    return FIXTURES
