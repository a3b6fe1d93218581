"""Seconds to decode one tile's output slices on the CPU, by how many pixels of a plane are
decoded at a time (`CycleINRLib.models.cycleinr.CPU_BLOCK_PIXELS`), against whole planes.

The bundled weights encode a real thick-slice CT (every 3rd 1 mm slice of LIDC-IDRI-0314,
its central 256 x 256 pixels), then decode every output slice at factor r; the encoding is
done once and not timed. Each block size's output is compared with whole planes' (largest
absolute difference, in the model's normalised units). Prints a Markdown table for README:

    .venv/bin/python benchmarks/decode_block_bench.py
    .venv/bin/python benchmarks/decode_block_bench.py --blocks 512 2048 8192 --factor 5 --bf16
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from CycleINRLib import geometry  # noqa: E402
from CycleINRLib.checkpoint import load_model  # noqa: E402
from CycleINRLib.io import read_volume  # noqa: E402
from CycleINRLib.models import cycleinr  # noqa: E402

SOURCE = REPO.parent / "shared" / "data" / "ct" / "train" / "lidc-0314_chest_1.0mm.nii.gz"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__ and __doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SOURCE, help="a thin-slice CT (default: %(default)s)")
    parser.add_argument("--size", type=int, default=256, help="central in-plane crop, pixels per side")
    parser.add_argument("--slices", type=int, default=30, help="thick slices, every --keep-every-th thin one")
    parser.add_argument("--keep-every", type=int, default=3)
    parser.add_argument("--factor", type=float, default=2.5)
    parser.add_argument("--blocks", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 32768])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per block size; the fastest counts")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast, as `cycleinr upsample --bf16`")
    args = parser.parse_args()
    if not args.source.is_file():
        raise SystemExit(f"{args.source} is absent: the benchmark needs a real CT (../shared/data)")

    array = read_volume(args.source).array
    middle = [(n - args.size) // 2 for n in array.shape[1:]]
    thick = array[::args.keep_every][:args.slices, middle[0]:middle[0] + args.size, middle[1]:middle[1] + args.size]
    model, _ = load_model()
    model.eval()
    low, high = model.config.normalization.bounds(thick)
    volume = torch.from_numpy((thick.astype(np.float32) - low) / (high - low))[None, None]
    positions = torch.as_tensor(geometry.output_positions(len(thick), args.factor), dtype=torch.float32)

    def decode(block_pixels: int | None) -> tuple[float, torch.Tensor]:
        cycleinr.CPU_BLOCK_PIXELS = block_pixels
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            output = model.decode(grid, volume, positions)
            times.append(time.perf_counter() - start)
        return min(times), output.float()

    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
        grid = model.encode(volume)
        whole_seconds, whole = decode(None)
        rows = [(f"whole planes ({args.size * args.size})", whole_seconds, 0.0)]
        for block in args.blocks:
            seconds, output = decode(block)
            rows.append((str(block), seconds, float((output - whole).abs().max())))

    voxels = len(positions) * args.size * args.size
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{'bfloat16' if args.bf16 else 'float32'}: {len(thick)} x {args.size} x {args.size} thick -> "
          f"{len(positions)} slices at r = {args.factor:g} ({voxels / 1e6:.1f} M output voxels)\n")
    print("| pixels per block | seconds | output voxels/s | largest difference from whole planes |")
    print("|---|---|---|---|")
    for name, seconds, difference in rows:
        print(f"| {name} | {seconds:.2f} | {voxels / seconds / 1e6:.3f} M | {difference:.2g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
