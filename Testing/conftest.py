"""Shared test settings: where the real volumes are (../shared/data beside the checkout)."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The shared real-data folder; tests that need it skip in a fresh clone without ../shared."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real volumes not available: {SHARED_DATA} is absent (a fresh clone has no ../shared)")
    return SHARED_DATA
