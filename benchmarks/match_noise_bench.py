"""How long does --match-noise add to an upsampling? Times noise_matching on the whole
validation CT (its own cost does not depend on the model, so linear interpolation stands in
for the model's output) and prints a Markdown table:

    .venv/bin/python benchmarks/match_noise_bench.py [--cases 2:2 5:5]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np

from CycleINRLib import geometry
from CycleINRLib.baselines import interpolate
from CycleINRLib.degrade import degrade
from CycleINRLib.evaluate import parse_case
from CycleINRLib.io import read_volume
from CycleINRLib.noise_matching import add_missing_noise

VALIDATION = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct" / "val" / "lidc-0002_chest_1.25mm.nii.gz"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__ and __doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["2:2", "5:5"])
    args = parser.parse_args()
    if not VALIDATION.is_file():
        raise SystemExit(f"{VALIDATION} is absent: this measurement needs ../shared/data")
    truth = read_volume(VALIDATION).array
    print(f"validation CT {'x'.join(map(str, truth.shape))} (slices x rows x columns), {platform.machine()}")
    print("| k:r | output slices | generated slices | seconds | generated slices/s |")
    print("|---|---|---|---|---|")
    for case in map(parse_case, args.cases):
        low = degrade(truth, case.keep_every).astype(np.float32)
        output = interpolate(low, case.factor, method="linear")
        generated = output.shape[0] - len(geometry.acquired_slice_matches(low.shape[0], case.factor))
        started = time.perf_counter()
        add_missing_noise(output, low, case.factor)
        seconds = time.perf_counter() - started
        print(f"| {case.label} | {output.shape[0]} | {generated} | {seconds:.1f} | {generated / seconds:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
