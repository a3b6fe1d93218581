"""Shared test settings: where the real volumes are (../shared/data beside the checkout)."""

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# The GPU paths (bfloat16 autocast, NCCL, recomputation, pinned memory) run wherever a CUDA
# device is; `benchmarks/gpu_session.sh` runs them on a lent GPU machine.
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]


@pytest.fixture
def shared_data() -> Path:
    """The shared real-data folder; tests that need it skip in a fresh clone without ../shared."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real volumes not available: {SHARED_DATA} is absent (a fresh clone has no ../shared)")
    return SHARED_DATA
