"""Where do the generated slices' errors sit? Squared error by the truth's CT intensity band.

    python Training/error_by_band.py VOLUME [--cases 2:2 5:5] [--weights W] [--methods linear cycleinr]

Degrades VOLUME as `cycleinr evaluate` does, upsamples it with each method and splits the
squared error on the generated slices (both clipped to the CT range, as PSNR is) by the true
voxel's band: air, lung, soft tissue, bone. For each band: its share of the voxels, each
method's RMSE, the band's share of the first method's error and each other method's gain over
it in dB. A model that gains little in a band holding much of the error shows where training
should go (README, section "The target").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from CycleINRLib import metrics
from CycleINRLib.degrade import degrade
from CycleINRLib.errors import InputError
from CycleINRLib.evaluate import make_methods, parse_case
from CycleINRLib.geometry import acquired_slice_matches, output_slice_count
from CycleINRLib.io import read_volume

BANDS = {  # name -> [low, high) in HU of the true voxel
    "air": (-np.inf, -900.0),
    "lung": (-900.0, -200.0),
    "soft tissue": (-200.0, 200.0),
    "bone": (200.0, np.inf),
}


def band_errors(truth: np.ndarray, case, methods, degradation: str = "interval") -> list[dict]:
    """One row per band: voxel share and, per method, the summed squared error (slice axis 0)."""
    low_resolution = degrade(truth, case.keep_every, 0, degradation)
    if low_resolution.shape[0] < 2:
        raise InputError(f"{truth.shape[0]} slices are too few for case {case.label}")
    output_slices = output_slice_count(low_resolution.shape[0], case.factor)
    acquired = {out for out, _ in acquired_slice_matches(low_resolution.shape[0], case.factor)}
    generated = [j for j in range(output_slices) if j not in acquired]
    reference = metrics.clip_to_range(truth[np.arange(output_slices) * case.step][generated], metrics.CT_RANGE)
    errors = {}
    for method in methods:
        output = method.upsample(low_resolution, case.factor, 0)[generated]
        errors[method.name] = (metrics.clip_to_range(output, metrics.CT_RANGE) - reference) ** 2
    rows = []
    for name, (low, high) in BANDS.items():
        inside = (reference >= low) & (reference < high)
        rows.append({"band": name, "voxels": int(inside.sum()), "voxel_share": float(inside.mean()),
                     "sse": {method: float(error[inside].sum()) for method, error in errors.items()}})
    return rows


def markdown(tables: list[tuple[str, list[dict]]]) -> str:
    """One table for all cases: (case label, band_errors rows) pairs, same methods in each."""
    methods = list(tables[0][1][0]["sse"])
    first = methods[0]
    header = ["case", "band", "voxels"] + [f"{m} RMSE (HU)" for m in methods] + [f"share of {first}'s error"]
    header += [f"{m} gain over {first}" for m in methods[1:]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, rows in tables:
        total = sum(row["sse"][first] for row in rows)
        for row in rows:
            cells = [label, row["band"], f"{100 * row['voxel_share']:.1f} %"]
            cells += [f"{np.sqrt(row['sse'][m] / max(row['voxels'], 1)):.1f}" for m in methods]
            cells.append(f"{100 * row['sse'][first] / total:.1f} %" if total > 0 else "-")
            cells += [_gain(row["sse"][first], row["sse"][m]) for m in methods[1:]]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _gain(reference_error: float, error: float) -> str:
    """Gain in dB; "-" where a band has no error to compare (no voxels, or exact)."""
    if reference_error <= 0 or error <= 0:
        return "-"
    return f"{10 * np.log10(reference_error / error):+.2f} dB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("volume", type=Path, help="thin-slice CT; its third (k, slice) axis is the one degraded")
    parser.add_argument("--cases", nargs="+", default=["2:2", "5:5"], help="k:r cases as in cycleinr evaluate")
    parser.add_argument("--methods", nargs="+", default=["linear", "cycleinr"], help="the first is the reference")
    parser.add_argument("--weights", help="CycleINR weights (default: the bundled CT weights)")
    parser.add_argument("--degradation", default="interval", choices=("interval", "thick"))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    try:
        cases = [parse_case(text) for text in args.cases]
        volume = read_volume(args.volume)
        methods = make_methods(args.methods, args.weights, args.device)
        tables = [(case.label, band_errors(volume.array, case, methods, args.degradation)) for case in cases]
    except (InputError, OSError) as error:
        parser.error(str(error))
    print(markdown(tables))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
