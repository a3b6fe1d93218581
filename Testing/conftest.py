"""Shared test settings: where the real volumes are (../shared/data beside the checkout)."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
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


def write_dicom_series(image: sitk.Image, folder: Path, series_uid: str, description: str, positions=None) -> Path:
    """`image` written as a DICOM series, one file per slice, with its geometry in the headers
    (`positions`: each slice's Image Position (Patient) instead of the image's grid)."""
    folder.mkdir(exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        for key, value in {
            "0020|000d": "1.2.826.0.1.3680043.2.1125.7", "0020|000e": series_uid, "0008|0060": "MR",
            "0008|103e": description, "0020|0013": str(k + 1), "0008|0018": f"{series_uid}.{k + 1}",
            "0020|0032": "\\".join(f"{v:.8g}" for v in (positions[k] if positions else
                                                         image.TransformIndexToPhysicalPoint((0, 0, k)))),
            "0020|0037": "\\".join(f"{v:.8g}" for v in (*direction[:, 0], *direction[:, 1])),
            "0018|0050": f"{image.GetSpacing()[2]:g}",
        }.items():
            plane.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{series_uid.rsplit('.', 1)[-1]}-{k + 1:03d}.dcm"))
        writer.Execute(plane)
    return folder
