"""What CT padding outside the field of view does to `cycleinr upsample`: the README's figure.

Every voxel of the 8 mm demo CT more than 250 voxels from the in-plane centre is set to -3024
HU (a scanner's padding) in one copy and to -1024 (air) in another; both are upsampled, and
the script reports the padding's range in the output and how many voxels inside the circle
differ between the two outputs.

    .venv/bin/python benchmarks/padding_check.py                  # --factor 4, about 2.5 min on 2 cores
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPOSITORY = Path(__file__).resolve().parents[1]
DEMO_CT = REPOSITORY.parent / "shared" / "data" / "demo" / "lung-pet-ct-dx-a0002_chest_ct_8mm.nii.gz"
RADIUS = 250  # voxels from the in-plane centre: the field-of-view circle
PADDING, AIR = -3024, -1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__ and __doc__.splitlines()[0])
    parser.add_argument("--factor", default="4")
    args = parser.parse_args()
    image = sitk.ReadImage(str(DEMO_CT))
    rows, columns = np.mgrid[0:image.GetHeight(), 0:image.GetWidth()]
    centre_row, centre_column = image.GetHeight() / 2 - 0.5, image.GetWidth() / 2 - 0.5
    outside = (rows - centre_row) ** 2 + (columns - centre_column) ** 2 > RADIUS ** 2
    outputs = {}
    with tempfile.TemporaryDirectory() as folder:
        for value in (PADDING, AIR):
            array = sitk.GetArrayFromImage(image)
            array[:, outside] = value
            source = sitk.GetImageFromArray(array)
            source.CopyInformation(image)
            sitk.WriteImage(source, f"{folder}/in{value}.nii.gz")
            subprocess.run([sys.executable, "-m", "CycleINRLib.cli", "upsample", f"{folder}/in{value}.nii.gz",
                            f"{folder}/out{value}.nii.gz", "--factor", args.factor], check=True, cwd=REPOSITORY)
            outputs[value] = sitk.GetArrayFromImage(sitk.ReadImage(f"{folder}/out{value}.nii.gz")).astype(np.int32)
    padded, air = outputs[PADDING], outputs[AIR]
    difference = np.abs(padded[:, ~outside] - air[:, ~outside])
    print(f"outside the circle: {outside.mean():.0%} of each slice; padding in the output "
          f"{padded[:, outside].min()} to {padded[:, outside].max()} HU")
    print(f"inside: {(difference > 10).sum()} of {difference.size} voxels ({(difference > 10).mean():.1%}) differ by "
          f"more than 10 HU from the output with air in place of the padding, at most {difference.max()} HU")


if __name__ == "__main__":
    main()
