"""Speed and peak memory of `cycleinr upsample` beside SimpleITK B-spline resampling.

Each run is a fresh `cycleinr upsample` (or SimpleITK) process on a real CT from
../shared/data, so peak resident memory is that run's own (ru_maxrss of the child), in GB of
2^30 bytes, the unit of `--max-memory`.
Prints a Markdown table for README:

    .venv/bin/python benchmarks/upsample_bench.py                       # 256x256 crop, r = 2, 2.5, 5
    .venv/bin/python benchmarks/upsample_bench.py --size 512 --slices 80 --factors 5   # the large case
    .venv/bin/python benchmarks/upsample_bench.py --factors 2.5 --flip-ensemble          # adds its rows
    .venv/bin/python benchmarks/upsample_bench.py --bf16                                 # adds bfloat16 rows
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "data" / "ct" / "train" / "lidc-0314_chest_1.0mm.nii.gz"
BSPLINE_SCRIPT = """
import sys, SimpleITK as sitk
image = sitk.ReadImage(sys.argv[1]); factor = float(sys.argv[3])
size = list(image.GetSize()); spacing = list(image.GetSpacing())
size[2] = int((size[2] - 1) * factor + 1e-6) + 1; spacing[2] /= factor
sitk.WriteImage(sitk.Resample(image, size, sitk.Transform(), sitk.sitkBSpline, image.GetOrigin(), spacing,
                              image.GetDirection(), -1024, image.GetPixelID()), sys.argv[2])
"""


def thick_ct(source: Path, folder: Path, size: int, slices: int, keep_every: int) -> Path:
    """A thick-slice CT: every `keep_every`-th 1 mm slice of a real chest CT, cropped in-plane."""
    image = sitk.ReadImage(str(source))
    start_i = max(0, (image.GetSize()[0] - size) // 2)
    start_j = max(0, (image.GetSize()[1] - size) // 2)
    image = image[start_i:start_i + size, start_j:start_j + size, ::keep_every][:, :, :slices]
    path = folder / f"ct_{image.GetSize()[0]}x{image.GetSize()[1]}x{image.GetSize()[2]}.nrrd"
    sitk.WriteImage(image, str(path))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__ and __doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="in-plane crop (voxels)")
    parser.add_argument("--slices", type=int, default=30, help="thick slices")
    parser.add_argument("--keep-every", type=int, default=3, help="thick slice = every n-th 1 mm slice")
    parser.add_argument("--factors", type=float, nargs="+", default=[2.0, 2.5, 5.0])
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--max-memory", type=float, default=6.0)
    parser.add_argument("--flip-ensemble", action="store_true", help="also time CycleINR with --flip-ensemble")
    parser.add_argument("--bf16", action="store_true", help="also time CycleINR with --bf16")
    parser.add_argument("--source", type=Path, default=SOURCE,
                        help="a thin-slice chest CT (default: LIDC-IDRI-0314's 1 mm CT in ../shared/data)")
    args = parser.parse_args()
    if not args.source.is_file():
        raise SystemExit(f"{args.source} is absent: give --source, or put ../shared/data beside the checkout")

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        source = thick_ct(args.source, Path(folder), args.size, args.slices, args.keep_every)
        output = Path(folder) / "out.nrrd"
        for factor in args.factors:
            runs = [("SimpleITK B-spline", "cpu", [sys.executable, "-c", BSPLINE_SCRIPT, str(source), str(output), str(factor)])]
            variants = [("CycleINR", [])] + [(f"CycleINR {flag}", [flag]) for flag, on in
                                             (("--flip-ensemble", args.flip_ensemble), ("--bf16", args.bf16)) if on]
            runs += [(method, device, [sys.executable, "-m", "CycleINRLib.cli", "upsample", str(source), str(output),
                                       "--factor", str(factor), "--device", device, "--overwrite",
                                       "--max-memory", str(args.max_memory), *options])
                     for device in args.devices for method, options in variants]
            for method, device, command in runs:
                # A fresh interpreter per measurement, so each peak is that run's alone.
                probe = [sys.executable, "-c", _PROBE, json.dumps(command)]
                completed = subprocess.run(probe, capture_output=True, encoding="utf-8")
                if completed.returncode != 0:  # the failing command's own message, not a CalledProcessError
                    raise SystemExit(f"{method} {device} r={factor:g} failed: {completed.stderr.strip()}")
                result = json.loads(completed.stdout)
                voxels = sitk.ReadImage(str(output)).GetNumberOfPixels()
                rows.append((method, device, factor, voxels, result["seconds"], result["peak_gb"]))
                print(f"{method} {device} r={factor:g}: {voxels / result['seconds'] / 1e6:.3f} Mvoxel/s, "
                      f"peak {result['peak_gb']:.2f} GB", file=sys.stderr)
        size = "x".join(map(str, sitk.ReadImage(str(source)).GetSize()))

    print(f"Input: {size} voxels (real CT {args.source.name}, one in every {args.keep_every} of its slices); "
          f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}\n")
    print("| method | device | r | output voxels | seconds | output voxels/s | peak memory (GB) |")
    print("|---|---|---|---|---|---|---|")
    for method, device, factor, voxels, seconds, peak in rows:
        print(f"| {method} | {device} | {factor:g} | {voxels / 1e6:.1f} M | {seconds:.1f} | {voxels / seconds / 1e6:.3f} M | {peak:.2f} |")
    return 0


_PROBE = """
import json, resource, subprocess, sys, time
command = json.loads(sys.argv[1])
started = time.perf_counter()
completed = subprocess.run(command, capture_output=True, text=True, encoding="utf-8")
seconds = time.perf_counter() - started
if completed.returncode != 0:
    sys.exit(completed.stderr)
print(json.dumps({"seconds": seconds, "peak_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20}))
"""

if __name__ == "__main__":
    sys.exit(main())
