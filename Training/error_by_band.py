"""Where do the generated slices' errors sit? Squared error by the truth's CT intensity band.

    python Training/error_by_band.py VOLUME [--cases 2:2 5:5] [--weights W] [--methods linear cycleinr] [--window 5]

Degrades VOLUME as `cycleinr evaluate` does, upsamples it with each method and splits the
squared error on the generated slices (both clipped to the CT range, as PSNR is) by the true
voxel's band: air, lung, soft tissue, bone. For each band: its share of the voxels, each
method's RMSE, the band's share of the first method's error and each other method's gain over
it in dB; a last row per case, "all", is the whole of the generated slices (its gain is PSNR's).
A model that gains little in a band holding much of the error shows where training should go
(README, section "The target").

`--window N` adds CycleINR decoded interval by interval from only the N acquired slices around
each interval. A training patch holds `data.lr_slices` acquired slices (5 in ct_cpu.yaml), fewer
than the encoder's receptive field spans along the slice axis (15 for `light`), so the encoder is
trained on replicate padding where inference shows it real slices; if windowed decoding is ahead
of whole-volume decoding, that mismatch costs the difference and training patches should be deeper.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from CycleINRLib import metrics
from CycleINRLib.checkpoint import load_model
from CycleINRLib.degrade import degrade
from CycleINRLib.engine import resolve_device
from CycleINRLib.errors import InputError
from CycleINRLib.evaluate import Method, make_methods, parse_case
from CycleINRLib.geometry import acquired_slice_matches, output_positions, output_slice_count
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


def windowed_method(weights: str | None, window: int, device: str = "cpu") -> Method:
    """CycleINR that decodes each interval [i, i + 1] from `window` acquired slices around it."""
    device = resolve_device(device)
    model, info = load_model(weights, device)
    model.eval()

    @torch.no_grad()
    def upsample(array: np.ndarray, factor: float, axis: int) -> np.ndarray:
        if axis != 0 or array.shape[0] < window:
            raise InputError(f"windowed decoding needs the slice axis first and >= {window} slices")
        low, high = model.config.normalization.bounds(array)
        normalized = (array.astype(np.float32) - low) / (high - low)
        positions = output_positions(array.shape[0], factor)
        result = np.empty((len(positions),) + array.shape[1:], dtype=np.float32)
        interval = np.minimum(np.floor(positions), array.shape[0] - 2).astype(int)
        for i in np.unique(interval):
            start = int(np.clip(i - (window - 2) // 2, 0, array.shape[0] - window))
            chosen = interval == i
            part = torch.from_numpy(normalized[start:start + window])[None, None].to(device)
            decoded = model(part, torch.from_numpy(positions[chosen] - start).float())
            result[chosen] = decoded[0, 0].float().cpu().numpy()
        return result * (high - low) + low

    return Method(f"cycleinr-window{window}", upsample, f"CycleINR decoded in {window}-slice windows, {info.label}")


def markdown(tables: list[tuple[str, list[dict]]]) -> str:
    """One table for all cases: (case label, band_errors rows) pairs, same methods in each."""
    methods = list(tables[0][1][0]["sse"])
    first = methods[0]
    header = ["case", "band", "voxels"] + [f"{m} RMSE (HU)" for m in methods] + [f"share of {first}'s error"]
    header += [f"{m} gain over {first}" for m in methods[1:]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, rows in tables:
        total = sum(row["sse"][first] for row in rows)
        overall = {"band": "all", "voxels": sum(row["voxels"] for row in rows), "voxel_share": 1.0,
                   "sse": {m: sum(row["sse"][m] for row in rows) for m in methods}}
        for row in rows + [overall]:
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
    parser = argparse.ArgumentParser(description=__doc__ and __doc__.splitlines()[0])
    parser.add_argument("volume", type=Path, help="thin-slice CT; its third (k, slice) axis is the one degraded")
    parser.add_argument("--cases", nargs="+", default=["2:2", "5:5"], help="k:r cases as in cycleinr evaluate (default: 2:2 5:5)")
    parser.add_argument("--methods", nargs="+", default=["linear", "cycleinr"], help="the first is the reference (default: linear cycleinr)")
    parser.add_argument("--weights", help="CycleINR weights (default: the bundled CT weights)")
    parser.add_argument("--degradation", default="interval", choices=("interval", "thick"), help="default: interval")
    parser.add_argument("--device", default="auto", help="for cycleinr (default: auto)")
    parser.add_argument("--window", type=int, help="also CycleINR decoded from this many acquired slices per interval")
    args = parser.parse_args(argv)
    if args.window is not None and args.window < 2:
        parser.error(f"--window must be at least 2, not {args.window}")
    try:
        cases = [parse_case(text) for text in args.cases]
        volume = read_volume(args.volume)
        methods = make_methods(args.methods, args.weights, args.device)
        if args.window is not None:
            methods.append(windowed_method(args.weights, args.window, args.device))
        tables = [(case.label, band_errors(volume.array, case, methods, args.degradation)) for case in cases]
    except (InputError, OSError) as error:
        parser.error(str(error))
    print(markdown(tables))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
