"""`cycleinr evaluate TRUTH... --output-dir DIR`: upsamplers against thin-slice truth.

Writes results.csv, results.md (a table ready for the README) and, per volume and case,
a picture of coronal and sagittal crops and one of the per-slice noise profiles. Everything
is written into a hidden staging folder first and moved into place at the end, so a failed
or cancelled run leaves no partial results.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np

from .baselines import BASELINES
from .config import DEVICE_HELP, DEVICES
from .degrade import DEGRADATIONS
from .errors import InputError
from .evaluate import DEFAULT_CASES, METHODS, evaluate_volume, make_methods, markdown_table, mean_rows, parse_case, write_csv
from .geometry import slice_axis
from .io import (FLOAT32_MAX, VOLUME_SUFFIXES, check_name_encoding, check_parent_folder, partial_name, read_volume, resolved_folder,
                 readable, volume_files)
from .metrics import CT_RANGE, lpips_availability
from .progress import Reporter

DEGRADATION_NOTES = {
    "interval": "interval: keep every k-th thin slice (the paper's protocol)",
    "thick": "thick: average over a box slice profile k thin slices wide, as a thick-slice reconstruction does",
}


def register(commands) -> None:
    parser = commands.add_parser(
        "evaluate",
        help="compare upsamplers against thin-slice ground truth (PSNR, SSIM, SNLI, pictures)",
        description="Degrade thin-slice volumes (keep every k-th slice, or average k slices around it with "
        "--degradation thick), upsample them back by r with each method, and compare with the truth on the "
        "generated slices and on all slices.",
    )
    parser.add_argument("truth", nargs="+", metavar="VOLUME",
                        help="thin-slice ground truth: volume files, DICOM series folders, or folders of volume files")
    parser.add_argument("--output-dir", "-o", required=True,
                        help="folder for results.csv, results.md and the pictures (created; or pass --overwrite)")
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), metavar="K:R",
                        help=f"keep every k-th slice, upsample by r; k/r must be whole (default: {' '.join(DEFAULT_CASES)})")
    parser.add_argument("--methods", nargs="+", default=[*BASELINES, "cycleinr"], choices=METHODS,
                        help=f"default: {' '.join([*BASELINES, 'cycleinr'])}; cycleinr and cycleinr-noise use --weights")
    parser.add_argument("--degradation", nargs="+", default=["interval"], choices=DEGRADATIONS,
                        help="how the thick-slice input is made: interval keeps every k-th slice, thick averages "
                             "a box k slices wide around it; both can be given (default: interval)")
    parser.add_argument("--axis", default="auto", choices=["auto", "0", "1", "2"],
                        help="slice axis as an image index axis (0=i, 1=j, 2=k); auto: the coarsest (k for square pixels coarser than the slices)")
    parser.add_argument("--range", dest="value_range", default="ct", metavar="ct|truth|LOW:HIGH",
                        help="clip values to this range before PSNR/SSIM, its width being the data range; "
                        "ct: -1024:3071 HU (4095, default); truth: each truth volume's min:max; a negative LOW is written "
                        "--range=LOW:HIGH")
    parser.add_argument("--weights", help="weights file for cycleinr (.safetensors); default: the bundled CT weights")
    parser.add_argument("--device", default="auto", choices=DEVICES,
                        help=f"for cycleinr; {DEVICE_HELP}")
    parser.add_argument("--flip-ensemble", action="store_true",
                        help="cycleinr methods average two passes, the second over the slice-reversed input "
                             "(as `cycleinr upsample --flip-ensemble`; twice the time)")
    parser.add_argument("--bf16", action="store_true",
                        help="cycleinr methods run in bfloat16 (as `cycleinr upsample --bf16`)")
    parser.add_argument("--json-progress", action="store_true",
                        help="one JSON object per line on stdout (progress, warnings, errors, summary)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an existing, non-empty output folder, replacing files of the same name")
    parser.set_defaults(run=run, make_reporter=lambda args: Reporter(args.json_progress, stage="evaluate"))


def run(args: argparse.Namespace, reporter: Reporter) -> int:
    # a case, method or degradation given twice is measured once, in the order first given
    cases = list(dict.fromkeys(parse_case(text) for text in args.cases))
    degradations = list(dict.fromkeys(args.degradation))
    value_range = _parse_range(args.value_range)
    paths = _truth_paths(args.truth)
    output_dir = _check_output_dir(args.output_dir, args.overwrite)
    lpips, lpips_reason = lpips_availability()
    methods = make_methods(list(dict.fromkeys(args.methods)), args.weights, args.device, args.flip_ensemble, args.bf16)
    if unused := _unused_model_options(args, methods):
        reporter.warning(unused)
    total = len(paths) * len(degradations) * len(cases) * len(methods)
    done = []

    def step(label: str) -> None:
        done.append(label)
        reporter.progress(len(done) / total, label)

    # on the file system the results go to: inside DIR when it exists (a link to scratch space,
    # a folder whose parent is read-only), beside it otherwise
    staging = (output_dir / partial_name("results") if output_dir.is_dir()
               else resolved_folder(output_dir.parent) / partial_name(output_dir.name))
    try:
        staging.mkdir()
        rows, names, ranges, truths = [], [], [], []
        for path in paths:
            reporter.progress(len(done) / total, f"reading {_display_name(path)}")
            volume = read_volume(path)
            volume_range = _volume_range(path, volume.array, value_range)
            axis = slice_axis(volume.spacing, None if args.axis == "auto" else int(args.axis))
            name = _unique_name(path, names)
            truths.append(f"{name} (slice axis {'ijk'[axis]}, {volume.spacing[axis]:g} mm)")
            warnings = _unexpected_input_warnings(path, volume.array, methods)
            if args.value_range == "ct":
                warnings += _unlike_ct_warnings(path, volume.array)
            for warning in warnings:
                reporter.warning(warning)
            ranges.append(volume_range)
            for degradation in degradations:
                for result in evaluate_volume(volume.array, 2 - axis, volume.spacing[::-1], cases, methods,
                                              degradation, volume_range, name, lpips, step):
                    rows += [{**row, "slice_axis": "ijk"[axis]} for row in result.rows]
                    _draw(result, name, staging)
        if len(paths) > 1:
            rows += mean_rows(rows)
        write_csv(rows, staging / "results.csv")
        notes = _notes(degradations, methods, truths, ranges, lpips, lpips_reason)
        table = markdown_table(rows, notes)
        (staging / "results.md").write_text(table, encoding="utf-8", errors="surrogateescape")  # a name's own bytes
        written = sorted(p.name for p in staging.iterdir())
        _publish(staging, output_dir)
    except OSError as error:  # a full disk: the staging folder goes, and nothing was published
        raise InputError(f"{output_dir}: cannot be written ({error.strerror or error})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary = {"output_dir": str(output_dir.resolve()), "rows": len(rows), "files": written}
    reporter.done(summary, f"{table}\n{len(written)} files -> {output_dir}")
    return 0


def _unused_model_options(args: argparse.Namespace, methods) -> str | None:
    """A warning naming the options for the model that were given although no method runs it."""
    given = [option for option, value in (("--weights", args.weights is not None), ("--device", args.device != "auto"),
                                          ("--flip-ensemble", args.flip_ensemble), ("--bf16", args.bf16)) if value]
    if given and not any(method.weights for method in methods):
        return (f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} for the cycleinr methods, "
                "and --methods has none: ignored")
    return None


def _unexpected_input_warnings(path: Path, truth, methods) -> list[str]:
    """What the learned methods' weights say of this truth, once per weights file."""
    return sorted({f"{_display_name(path)}: {unexpected}; {method.weights.path.name} expects CT" for method in methods
                   if method.weights and (unexpected := method.weights.config.normalization.unexpected_input(truth))})


NOT_CT_SHARE = 0.01  # of the voxels above 3071 HU, or of the range's width spanned: clearly no CT in HU


def _unlike_ct_warnings(path: Path, truth) -> list[str]:
    """Why `--range ct` would clip or inflate this truth's scores, if it clearly is no CT in HU.
    Voxels below -1024 HU do not count: scanners write -2048 or -3024 outside the field of view."""
    low, high = CT_RANGE
    above = np.count_nonzero(truth > high) / truth.size
    if above > NOT_CT_SHARE:
        return [f"{_display_name(path)}: {above:.0%} of its voxels lie above {high:g}, the top of --range ct (CT in HU), "
                "and are clipped before PSNR and SSIM; give --range truth for a volume that is not CT"]
    span = float(truth.max()) - float(truth.min())
    if span < NOT_CT_SHARE * (high - low):
        return [f"{_display_name(path)}: its values span only {span:g}, against {high - low:g} for --range ct (CT in HU), "
                "which inflates PSNR and SSIM; give --range truth for a volume that is not CT"]
    return []


def _volume_range(path: Path, truth, value_range: tuple[float, float] | None) -> tuple[float, float]:
    """The range this truth is scored in (`value_range`, or its own for None), refused where the
    scores would say nothing."""
    lowest, highest = float(truth.min()), float(truth.max())
    if value_range:
        if not (lowest < value_range[1] and highest > value_range[0]):
            raise InputError(f"{path}: its values {lowest:g} to {highest:g} lie outside --range "
                             f"{value_range[0]:g}:{value_range[1]:g}, where every method would score perfectly")
        return value_range
    if not highest > lowest:
        raise InputError(f"{path}: every voxel is {lowest:g}; --range truth needs a truth with "
                         "more than one value (give --range LOW:HIGH)")
    if not _resolvable(lowest, highest):
        raise InputError(f"{path}: its values span only {lowest:g} to {highest:g}, too narrow "
                         "for the metrics' single precision; rescale the volume")
    return lowest, highest


def _draw(result, name: str, folder: Path) -> None:
    from .figures import profile_figure, save_figure, views_figure  # matplotlib: not at every command's start

    stem = _picture_stem(name, f"_{result.degradation}_{result.case.label.replace(':', '-')}")
    title = f"{readable(name)}, {result.degradation} {result.case.label}"
    save_figure(views_figure(result, title), folder / f"{stem}_views.png")
    methods = {row["method"]: result.profiles[row["method"]] for row in result.rows}
    slice_spacing = next(iter(result.view_spacing.values()))[0]
    save_figure(profile_figure(methods, slice_spacing, f"{title}: per-slice noise level",
                               reference=result.profiles["truth"]), folder / f"{stem}_noise.png")


def _picture_stem(name: str, tail: str) -> str:
    """`name` + `tail`, short enough for "_views.png" to end a file name of at most 255 bytes:
    a long name keeps its start and gains a hash of the whole, so that pictures stay apart."""
    longest = 255 - len(os.fsencode(f"{tail}_views.png"))
    if len(os.fsencode(name)) > longest:
        digest = hashlib.sha1(os.fsencode(name)).hexdigest()[:8]
        while len(os.fsencode(name)) > longest - len(digest) - 1:
            name = name[:-1]
        name = f"{name}~{digest}"
    return name + tail


MIN_RELATIVE_RANGE_WIDTH = 1e-6
MIN_RANGE_WIDTH = float(np.finfo(np.float32).tiny)  # 1.2e-38: below, float32 holds fewer digits (subnormals)


def _parse_range(text: str) -> tuple[float, float] | None:
    """`ct`, `truth` (None: each volume's own) or `LOW:HIGH`."""
    if text == "ct":
        return CT_RANGE
    if text == "truth":
        return None
    try:
        low, high = (float(value) for value in text.split(":"))
    except ValueError:
        raise InputError(f"--range {text!r} must be ct, truth or LOW:HIGH") from None
    if not max(abs(low), abs(high)) <= FLOAT32_MAX:  # also inf and nan; before the order, which nan has not
        raise InputError(f"--range {text}: LOW and HIGH must be finite and within -{FLOAT32_MAX:.3g} to "
                         f"{FLOAT32_MAX:.3g}, single precision, in which the metrics compute")
    if not high > low:
        raise InputError(f"--range {text}: HIGH must be greater than LOW")
    if not _resolvable(low, high):
        raise InputError(f"--range {text}: too narrow for the metrics' single precision; rescale the volumes")
    return low, high


def _resolvable(low: float, high: float) -> bool:
    """Whether metrics in float32 (epsilon 1.2e-7, smallest normal number 1.2e-38) tell values
    across [low, high] apart."""
    return high - low >= max(MIN_RANGE_WIDTH, MIN_RELATIVE_RANGE_WIDTH * max(abs(low), abs(high)))


def _truth_paths(arguments: list[str]) -> list[Path]:
    """Files as given; a folder's volume files, or the folder itself as a DICOM series."""
    paths = []
    for argument in arguments:
        path = Path(argument)
        if not check_name_encoding(path).exists():  # refused now, not after the volumes before it
            raise InputError(f"{path}: no such file or folder")
        if path.is_dir():
            files = volume_files(path)
            paths += files or [path]
        else:
            paths.append(path)
    return paths


def _unique_name(path: Path, names: list[str]) -> str:
    """The file name without its volume suffix, numbered if an earlier volume has it; appended to `names`."""
    name = _display_name(path)
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    stem, number = name, 1
    while name in names:  # a.nii.gz, a-2.nii.gz, a.nii.gz: the third is a-3, not a second a-2
        number += 1
        name = f"{stem}-{number}"
    names.append(name)
    return name


def _display_name(path: Path) -> str:
    """The name of the file or folder, also where it is given as `.` or `..` (a DICOM series folder)."""
    return Path(os.path.abspath(path)).name


def _check_output_dir(name: str, overwrite: bool) -> Path:
    if not name.strip():
        raise InputError("-o/--output-dir needs a folder name")
    path = check_name_encoding(name)
    if path.is_symlink() and not path.exists():
        raise InputError(f"{path}: is a link that leads nowhere (or back to itself)")
    check_parent_folder(path, "parent folder")
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: exists and is not a folder")
    # a run killed outright (power cut, SIGKILL) leaves its hidden staging folder: not a result
    if path.is_dir() and any(not item.name.startswith(".partial-") for item in path.iterdir()) and not overwrite:
        raise InputError(f"{path}: folder is not empty; pass --overwrite to replace the files evaluate writes there")
    writable = path if path.is_dir() else path.parent
    if not os.access(writable, os.W_OK | os.X_OK):
        raise InputError(f"{path}: {writable} is not writable")
    return path


def _publish(staging: Path, output_dir: Path) -> None:
    """Move the finished files into place: the whole folder at once when it is new; into an
    existing one file by file, keeping the files they replace aside until all are in, so that
    a failure or a cancel on the way puts the folder back as it was, not half old, half new."""
    if not output_dir.exists():
        os.replace(staging, output_dir)
        return
    names = sorted(item.name for item in staging.iterdir())
    folders = [name for name in names if (output_dir / name).is_dir()]
    if folders:  # refused before anything is replaced: no half-published results
        raise InputError(f"{output_dir}: holds folders where evaluate writes files ({', '.join(folders)}); "
                         "move them or choose another output folder")
    previous = staging / partial_name("previous")  # staging lies inside output_dir: renames, not copies
    previous.mkdir()
    started = []
    try:
        for name in names:
            started.append(name)
            if os.path.lexists(output_dir / name):
                os.replace(output_dir / name, previous / name)
            os.replace(staging / name, output_dir / name)
    except BaseException as error:
        for name in reversed(started):
            with contextlib.suppress(OSError):
                if not (staging / name).exists():  # the new file went in: take it out again
                    os.replace(output_dir / name, staging / name)
                if os.path.lexists(previous / name):
                    os.replace(previous / name, output_dir / name)
        if isinstance(error, OSError):
            raise InputError(f"{output_dir / started[-1]}: cannot be replaced ({error.strerror or error}); "
                             f"{output_dir} is left as it was") from None
        raise


def _notes(degradations, methods, truths, ranges, lpips: bool, lpips_reason: str) -> list[str]:
    spans = sorted({f"[{low:g}, {high:g}] (data range {high - low:g})" for low, high in ranges})
    return [
        f"ground truth: {', '.join(truths)}",
        "degradation " + "; ".join(DEGRADATION_NOTES[d] for d in degradations),
        "methods: " + "; ".join(f"{m.name} = {m.description}" for m in methods),
        "gen: generated slices only (output slices that coincide with no input slice); all: every output slice",
        f"values clipped to {', '.join(spans)} before PSNR (scikit-image, over the voxels) and SSIM "
        "(scikit-image, 2D 7x7 window per slice, mean over slices)",
        "SNLI and mean noise: std and mean of the per-slice Donoho-Johnstone noise levels of the output; "
        "in parentheses the truth's at the output spacing",
        f"LPIPS: {lpips_reason}" if lpips else f"LPIPS: not computed, {lpips_reason}",
        "seconds: time the method took to upsample, per volume and case",
    ]
