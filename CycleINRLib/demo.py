"""`make demo`: a CT phantom, a simulated thick-slice scan, CycleINR against interpolation.

Writes into --output-dir: the thin-slice truth, the thick-slice input and the CycleINR
outputs without and with --match-noise (NIfTI, with geometry), a coronal/sagittal picture
(input, linear, cubic, CycleINR, CycleINR with noise matching, truth, errors), the per-slice
noise profiles, and a metrics table (metrics.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import evaluate, figures
from .checkpoint import load_model
from .degrade import degrade
from .errors import InputError
from .evaluate import Case, Method
from .io import Volume, write_volume
from .phantom import chest_phantom

KEEP_EVERY = 5  # 1 mm phantom -> 5 mm thick slices, upsampled back by 5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m CycleINRLib.demo", description=__doc__ and __doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="demo_output", type=Path)
    parser.add_argument("--weights", help="weights file (default: the bundled CT weights)")
    args = parser.parse_args(argv)
    try:
        return run(args.output_dir, args.weights)
    except InputError as error:  # a weights file that does not load, an output that cannot be written
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except OSError as error:  # a read-only checkout, a full disk
        parser.exit(2, f"{parser.prog}: error: {error.filename or args.output_dir}: {error.strerror or error}\n")


def run(folder: Path, weights_path: str | None) -> int:
    """The demo into `folder` (made if missing) with the weights at `weights_path` (None: the bundled ones)."""
    folder.mkdir(parents=True, exist_ok=True)
    _, weights = load_model(weights_path)
    print(f"weights: {weights.label}")
    if not weights.trained:
        print("warning: untrained weights reproduce linear interpolation; train them (README, Training)")
    truth = chest_phantom()
    thick = degrade(truth.array, KEEP_EVERY, axis=0, mode="thick")
    thick_spacing = truth.spacing[:2] + (truth.spacing[2] * KEEP_EVERY,)
    print(f"phantom: {'x'.join(map(str, truth.size))} voxels at {truth.spacing} mm; "
          f"thick-slice input: {thick.shape[0]} slices of {thick_spacing[2]:g} mm")

    outputs = {}
    methods = evaluate.make_methods(["linear", "cubic", "cycleinr", "cycleinr-noise"], weights=weights_path)
    methods = [_recording(method, outputs) for method in methods]
    (result,) = evaluate.evaluate_volume(
        truth.array, axis=0, spacing=truth.spacing[::-1], cases=[Case(KEEP_EVERY, KEEP_EVERY)],
        methods=methods, degradation="thick", name="phantom", on_step=lambda label: print(f"  done: {label}"),
    )

    write_volume(truth, folder / "phantom_truth_1mm.nii.gz", overwrite=True)
    write_volume(Volume(thick, thick_spacing, truth.origin, truth.direction), folder / "phantom_thick_5mm.nii.gz",
                 overwrite=True)
    for name in ("cycleinr", "cycleinr-noise"):
        write_volume(Volume(outputs[name], truth.spacing, truth.origin, truth.direction),
                     folder / f"phantom_{name.replace('-', '_')}_1mm.nii.gz", overwrite=True)
    figures.save_figure(figures.views_figure(result, "5 mm -> 1 mm: coronal and sagittal"), folder / "phantom_views.png")
    figures.save_figure(
        figures.profile_figure(result.profiles, truth.spacing[2], "per-slice noise level (HU)"),
        folder / "phantom_noise_profile.png",
    )
    table = evaluate.markdown_table(result.rows, notes=[
        "phantom of CycleINRLib/phantom.py; thick degradation (5-slice box profile), upsampled by 5",
        f"CycleINR weights: {weights.label}",
        "PSNR/SSIM on HU clipped to [-1024, 3071], data range 4095; SNLI in HU, truth's in brackets",
    ])
    (folder / "metrics.md").write_text(table, encoding="utf-8")
    print(table)
    print(f"written to {folder.resolve()}: volumes (.nii.gz), phantom_views.png, phantom_noise_profile.png, metrics.md")
    return 0


def _recording(method: Method, outputs: dict) -> Method:
    """The same method, keeping its output so the demo can write the CycleINR volume."""

    def upsample(array, factor, axis):
        outputs[method.name] = method.upsample(array, factor, axis)
        return outputs[method.name]

    return Method(method.name, upsample, method.description)


if __name__ == "__main__":
    sys.exit(main())
