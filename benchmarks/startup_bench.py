"""Start-up cost of `cycleinr upsample`: the whole process on an input so small that the model
takes milliseconds, so what is timed is Python, the imports, reading and writing.

Every Apply in the Slicer module starts this process, so its start is what a user waits for
on small volumes, also on a GPU.

    .venv/bin/python benchmarks/startup_bench.py            # 7 runs, best and median seconds
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__ and __doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        source, output = Path(folder) / "tiny.nii.gz", Path(folder) / "out.nii.gz"
        image = sitk.GetImageFromArray(np.full((4, 16, 16), -500, dtype=np.int16))
        image.SetSpacing((0.8, 0.8, 5.0))
        sitk.WriteImage(image, str(source))
        command = [sys.executable, "-m", "CycleINRLib.cli", "upsample", str(source), str(output),
                   "--factor", "2", "--device", "cpu", "--overwrite"]
        seconds = []
        for _ in range(args.runs):
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            seconds.append(time.perf_counter() - start)
    print(f"cycleinr upsample, 4 x 16 x 16 input, {args.runs} runs: best {min(seconds):.2f} s, "
          f"median {statistics.median(seconds):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
