"""Shared test fixtures: the oracle folder (../shared/oracles) and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORACLES = Path(os.environ.get("VLMLAB_ORACLES", ROOT.parent / "shared" / "oracles"))
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def oracles() -> Path:
    """Path of the oracle data; skips the test with a clear message where it is absent."""
    if not ORACLES.is_dir():
        pytest.skip(f"oracle data not found at {ORACLES} (set VLMLAB_ORACLES to its folder)")
    return ORACLES


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES


def oracle_path(*parts: str) -> Path:
    """Path inside the oracles folder; skips where it is absent (for use at collection time)."""
    p = ORACLES.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"oracle file not found: {p}")
    return p
