"""`cycleinr upsample INPUT OUTPUT (--factor R | --spacing MM)`"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from . import engine, geometry, metrics
from .checkpoint import load_model
from .config import DEVICE_HELP, DEVICES
from .errors import InputError
from .io import INPUT_HELP, check_output_can_hold, check_output_path, read_volume, write_volume
from .progress import Reporter


def register(commands) -> None:
    parser = commands.add_parser(
        "upsample",
        help="upsample the slice axis of a volume by a factor or to a slice spacing",
        description="Upsample the slice axis of a CT or MR volume with CycleINR. "
        "Output slice j lies at input slice coordinate j/r; origin and direction are kept.",
    )
    parser.add_argument("input", help=INPUT_HELP)
    parser.add_argument("output", help="output file (.nii, .nii.gz, .nrrd or .mha)")
    amount = parser.add_mutually_exclusive_group(required=True)
    amount.add_argument("--factor", type=float, help=f"upsampling factor r, 1 < r <= {geometry.MAX_FACTOR:g}, may be fractional (2.5)")
    amount.add_argument("--spacing", type=float, help="target slice spacing in mm (smaller than the input's; within 0.1%% of a whole division of it, that division)")
    parser.add_argument("--axis", default="auto", choices=["auto", "0", "1", "2"],
                        help="slice axis as an image index axis (0=i, 1=j, 2=k); auto: the coarsest (k for square pixels coarser than the slices)")
    parser.add_argument("--device", default="auto", choices=DEVICES,
                        help=DEVICE_HELP)
    parser.add_argument("--weights", help="weights file (.safetensors); default: the bundled CT weights")
    parser.add_argument("--keep-acquired-slices", action=argparse.BooleanOptionalAction, default=True,
                        help="copy acquired slices verbatim where output slices coincide with them (default: on)")
    parser.add_argument("--match-noise", action="store_true",
                        help="add synthetic noise to generated slices up to the acquired slices' noise level, "
                             "so that the volume does not flicker from slice to slice (default: off)")
    parser.add_argument("--flip-ensemble", action="store_true",
                        help="average with a second pass over the slice-reversed volume: closer to the truth "
                             "(+0.04 to +0.14 dB PSNR on the validation CT) for twice the time (default: off)")
    parser.add_argument("--bf16", action="store_true",
                        help="bfloat16 arithmetic: 1.7 to 1.9 times faster on a CPU with AMX, PSNR within 0.01 dB of the default float32; slower where bfloat16 is emulated (default: off)")
    parser.add_argument("--max-memory", type=float, default=engine.DEFAULT_MAX_MEMORY_GB, metavar="GB",
                        help=f"memory budget in GB for arrays and tiles, about 0.5 GB for Python and torch included "
                             f"(default {engine.DEFAULT_MAX_MEMORY_GB:g})")
    parser.add_argument("--noise-report", action="store_true",
                        help="also measure each slice's noise level in input and output and report their SNLI "
                             "(with --json-progress: the per-slice levels too; a few milliseconds per slice)")
    parser.add_argument("--json-progress", action="store_true",
                        help="one JSON object per line on stdout (progress, warnings, errors, summary)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    parser.set_defaults(run=run, make_reporter=lambda args: Reporter(args.json_progress))


def run(args: argparse.Namespace, reporter: Reporter) -> int:
    started = time.perf_counter()
    if not 0 < args.max_memory <= engine.MAX_MEMORY_GB:
        raise InputError(f"--max-memory must be a number of GB above 0 and at most {engine.MAX_MEMORY_GB:g}, "
                         f"not {args.max_memory:g}")
    output = check_output_path(args.output, args.overwrite)
    if output.exists() and Path(args.input).exists() and os.path.samefile(output, args.input):
        raise InputError(f"{output}: is the input; write the upsampled volume to another file")
    device = engine.resolve_device(args.device)
    model, weights = load_model(args.weights, device)

    reporter.set_stage("read")
    reporter.progress(0.0, f"reading {Path(args.input).name}")
    volume = read_volume(args.input)
    check_output_can_hold(volume, output)
    axis = geometry.slice_axis(volume.spacing, None if args.axis == "auto" else int(args.axis))
    factor = args.factor if args.factor is not None else geometry.factor_for_spacing(volume.spacing[axis], args.spacing)
    factor = geometry.check_factor(factor)
    slices_first = (volume.size[axis],) + tuple(n for a, n in enumerate(volume.size) if a != axis)
    engine.check_memory_budget(slices_first, factor, volume.array.dtype, args.max_memory, args.flip_ensemble)
    if not weights.trained:
        reporter.warning(f"using {weights.label}: the result is not a trained super-resolution")
    if unexpected := weights.config.normalization.unexpected_input(volume.array):
        reporter.warning(f"{unexpected}; {weights.path.name} expects CT")

    try:  # noise matching and the noise report need slices a noise level can be estimated from
        metrics.check_noise_slices(volume.array.shape, 2 - axis, args.input)
        too_small = None
    except InputError as error:
        too_small = str(error)
    for option, given in (("noise matching", args.match_noise), ("noise report", args.noise_report)):
        if given and too_small:
            reporter.warning(f"{too_small}: no {option}")
    match_noise = args.match_noise and not too_small

    reporter.set_stage("upsample")
    result = engine.upsample_volume(
        volume, model, factor=factor, axis=axis, device=device,
        keep_acquired_slices=args.keep_acquired_slices, max_memory_gb=args.max_memory, progress=reporter.progress,
        match_noise=match_noise, flip_ensemble=args.flip_ensemble, bf16=args.bf16,
    )
    noise = None
    if args.noise_report and not too_small:  # before the output is written: a cancel meanwhile leaves no file
        reporter.progress(1.0, "measuring the noise of every slice")
        noise = _noise_report(volume, result, axis)
    reporter.set_stage("write")
    reporter.progress(1.0, f"writing {output.name}")
    write_volume(result, output, overwrite=args.overwrite)

    seconds = time.perf_counter() - started
    summary = {
        "output": str(output.resolve()),
        "input_size": list(volume.size), "input_spacing": list(volume.spacing),
        "size": list(result.size), "spacing": list(result.spacing),
        "origin": list(result.origin), "direction": list(result.direction),
        "axis": axis, "factor": factor, "device": str(device), "weights": str(weights.path),
        "trained": weights.trained, "keep_acquired_slices": args.keep_acquired_slices, "match_noise": match_noise,
        "flip_ensemble": args.flip_ensemble, "bf16": args.bf16, "seconds": round(seconds, 2),
    }
    if noise is not None:
        summary["noise"] = noise
    reporter.done(summary, _summary_text(summary))
    return 0


def _noise_report(volume, result, axis: int) -> dict:
    """Per-slice noise levels along the upsampled axis, their SNLI and mean, of input and output."""
    report = {}
    for role, array in (("input", volume.array), ("output", result.array)):
        profile = metrics.noise_profile(array, 2 - axis)  # numpy (k, j, i): axis 2 - ITK axis
        report[role] = {"levels": [metrics.significant(level, 7) for level in profile.levels],
                        "snli": profile.snli, "mean": profile.mean}
    return report


def _summary_text(summary: dict) -> str:
    def size(values):
        return "x".join(str(v) for v in values)

    def spacing(values):
        return ", ".join(f"{v:.4g}" for v in values)

    text = (
        f"input:  {size(summary['input_size'])} voxels, spacing {spacing(summary['input_spacing'])} mm\n"
        f"output: {size(summary['size'])} voxels, spacing {spacing(summary['spacing'])} mm "
        f"(axis {summary['axis']}, factor {summary['factor']:.4g})\n"
        f"device: {summary['device']}, {summary['seconds']:.1f} s -> {summary['output']}"
    )
    if "noise" in summary:
        noise = summary["noise"]
        text += (f"\nSNLI: input {noise['input']['snli']:.4g}, output {noise['output']['snli']:.4g}; mean noise level: "
                 f"input {noise['input']['mean']:.4g}, output {noise['output']['mean']:.4g}")
    return text
