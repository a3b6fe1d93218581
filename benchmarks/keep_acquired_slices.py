"""Should acquired slices be copied verbatim where output slices coincide with them?

Runs the evaluation harness on the validation CT with CycleINR twice, keeping acquired
slices and regenerating them, at the integer cases where they coincide. Prints the
Markdown table that README's choice of default rests on:

    .venv/bin/python benchmarks/keep_acquired_slices.py [--weights W] [--crop 192]
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from CycleINRLib import evaluate
from CycleINRLib.checkpoint import load_model
from CycleINRLib.engine import upsample_array
from CycleINRLib.evaluate import Method, parse_case
from CycleINRLib.io import read_volume

VALIDATION = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct" / "val" / "lidc-0002_chest_1.25mm.nii.gz"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__ and __doc__.splitlines()[0])
    parser.add_argument("--weights")
    parser.add_argument("--crop", type=int, default=192, help="central in-plane crop (voxels); 0 = whole slices")
    parser.add_argument("--cases", nargs="+", default=["2:2", "3:3", "5:5"])
    args = parser.parse_args()
    if not VALIDATION.is_file():
        raise SystemExit(f"{VALIDATION} is absent: this measurement needs ../shared/data")
    truth = read_volume(VALIDATION)
    array = truth.array
    if args.crop:
        rows, columns = ((n - args.crop) // 2 for n in array.shape[1:])
        array = array[:, rows:rows + args.crop, columns:columns + args.crop]
    model, info = load_model(args.weights)
    methods = [
        Method(f"cycleinr keep={keep}", functools.partial(_upsample, model=model, keep=keep), info.label)
        for keep in (True, False)
    ]
    results = evaluate.evaluate_volume(array, axis=0, spacing=truth.spacing[::-1],
                                       cases=[parse_case(c) for c in args.cases], methods=methods,
                                       name=f"{VALIDATION.name} crop {args.crop or 'none'}")
    print(evaluate.markdown_table([row for result in results for row in result.rows],
                                  notes=[f"weights: {info.label}", "interval degradation"]))
    return 0


def _upsample(array, factor, axis, model, keep):
    return upsample_array(array, factor, model, axis=axis, keep_acquired_slices=keep)


if __name__ == "__main__":
    sys.exit(main())
