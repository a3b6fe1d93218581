"""The evaluation harness (paper section 4.1): degrade thin-slice truth, upsample it back, compare.

A case `k:r` keeps every k-th thin slice (or averages a k-slice profile, `thick`) and
upsamples the result by r. With k / r an integer the truth exists at every output position:
low-resolution slice m is thin slice m*k and output slice j lies at thin slice j*k/r. Metrics
are computed on the generated slices (output slices that do not coincide with an input
slice) and on all slices, after clipping to a value range (CT: [-1024, 3071] HU, data range
4095); SNLI of each output is reported next to that of the truth at the same spacing.
`evaluate_volume` works on arrays, so training can call it for validation; the command
`cycleinr evaluate` adds files, tables and pictures.
"""

from __future__ import annotations

import csv
import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from . import metrics
from .baselines import BASELINES, interpolate
from .degrade import degrade
from .errors import InputError
from .geometry import acquired_slice_matches, check_factor, output_slice_count

if TYPE_CHECKING:
    from .checkpoint import WeightsInfo  # imports torch, which only the learned methods need

METHODS = BASELINES + ("cycleinr", "cycleinr-noise")
METHOD_DESCRIPTIONS = {
    "linear": "SimpleITK linear interpolation",
    "cubic": "SimpleITK cubic B-spline interpolation",
    "lanczos": "SimpleITK Lanczos-windowed sinc interpolation (radius 5)",
}
DEFAULT_CASES = ("2:2", "3:3", "5:5", "5:2.5")
VIEW_NAMES = {1: "coronal", 2: "sagittal"}  # the in-plane numpy axis a view fixes, for axial slices
ITK_AXIS_NAMES = "ijk"

Upsampler = Callable[[np.ndarray, float, int], np.ndarray]  # (array, factor, numpy axis) -> array


@dataclass(frozen=True)
class Case:
    keep_every: int  # k: thin slices per low-resolution slice
    factor: float  # r: upsampling factor

    @property
    def step(self) -> int:
        """Thin slices between two output slices: k / r."""
        return round(self.keep_every / self.factor)

    @property
    def label(self) -> str:
        return f"{self.keep_every}:{self.factor:g}"


@dataclass(frozen=True)
class Method:
    name: str
    upsample: Upsampler
    description: str
    weights: WeightsInfo | None = None  # what a learned method runs with


@dataclass
class CaseResult:
    """Rows of one case of one volume, and what the pictures need of it."""

    case: Case
    degradation: str
    rows: list[dict]  # one per method
    views: dict[str, dict[str, np.ndarray]]  # view -> column (input, methods, truth) -> 2D crop
    view_spacing: dict[str, tuple[float, float]]  # view -> (slice spacing, in-plane spacing)
    profiles: dict[str, np.ndarray] = field(default_factory=dict)  # method and "truth" -> levels


def parse_case(text: str) -> Case:
    """`k:r` -> Case; k / r must be an integer so the truth exists at every output slice.

    r is taken as k / (k / r rounded), the factor whose output slices fall exactly on thin
    slices: 4:1.3333333333 and 4:1.33333333333 are one case, labelled 4:1.33333 (r = 4/3).
    """
    try:
        keep_text, factor_text = text.split(":")
        if "_" in text:  # int() and float() take 2_0 for 20
            raise ValueError
        keep_every, factor = int(keep_text), float(factor_text)
    except ValueError:
        raise InputError(f"case {text!r} must be k:r, e.g. 5:2.5 (keep every k-th slice, upsample by r)") from None
    if keep_every < 2:
        raise InputError(f"case {text}: k must be at least 2, not {keep_every}")
    try:
        check_factor(factor)
        ratio = keep_every / factor
        if ratio < 1 - 1e-9 or not math.isclose(ratio, round(ratio), abs_tol=1e-9):
            raise InputError(f"k / r = {ratio:.10g} must be a whole number so that the truth exists at every output slice")
        factor = check_factor(keep_every / round(ratio))  # 2:1.0000000001 is r = 1
    except InputError as error:
        raise InputError(f"case {text}: {error}") from None
    return Case(keep_every, factor)


def make_methods(names: Sequence[str], weights: str | None = None, device: str = "auto",
                 flip_ensemble: bool = False, bf16: bool = False) -> list[Method]:
    """The upsamplers to compare; `cycleinr` loads its weights once (None: the bundled ones)."""
    methods = []
    for name in names:
        if name in BASELINES:
            methods.append(Method(name, functools.partial(interpolate, method=name), METHOD_DESCRIPTIONS[name]))
        elif name in ("cycleinr", "cycleinr-noise"):
            methods.append(_cycleinr_method(weights, device, name == "cycleinr-noise", flip_ensemble, bf16))
        else:
            raise InputError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return methods


def _cycleinr_method(weights: str | None, device: str, match_noise: bool, flip_ensemble: bool, bf16: bool) -> Method:
    from .checkpoint import load_model
    from .engine import resolve_device, upsample_array

    device = resolve_device(device)
    model, info = load_model(weights, device)

    def upsample(array: np.ndarray, factor: float, axis: int) -> np.ndarray:
        return upsample_array(array, factor, model, axis=axis, device=device, match_noise=match_noise,
                              flip_ensemble=flip_ensemble, bf16=bf16)

    flags = (("--match-noise", match_noise), ("--flip-ensemble", flip_ensemble), ("--bf16", bf16))
    options = [flag for flag, on in flags if on]
    described = "CycleINR" + (" with " + " and ".join(options) if options else "")
    return Method("cycleinr-noise" if match_noise else "cycleinr", upsample, f"{described}, weights {info.label}, {device}",
                  info)


def check_case_fits(slices: int, case: Case, name: str) -> None:
    """InputError unless `slices` thin slices leave `case` at least 2 acquired ones (both
    degradations keep slices 0, k, 2k, ...)."""
    if len(range(0, slices, case.keep_every)) < 2:
        raise InputError(f"{name}: {slices} slices are too few for case {case.label}")


def check_slices_fit_ssim(shape: Sequence[int], axis: int, name: str) -> None:
    """InputError unless the slices across numpy `axis` hold SSIM's window."""
    window = metrics.SSIM_WINDOW
    metrics.check_slice_size(shape, axis, name, window, f"SSIM's {window}x{window} window")


def evaluate_volume(
    truth: np.ndarray,
    axis: int,
    spacing: Sequence[float],
    cases: Sequence[Case],
    methods: Sequence[Method],
    degradation: str = "interval",
    value_range: tuple[float, float] = metrics.CT_RANGE,
    name: str = "volume",
    lpips: bool = False,
    on_step: Callable[[str], None] | None = None,
) -> list[CaseResult]:
    """Degrade `truth` along numpy `axis` for every case, upsample with every method, compare.

    `spacing` is in numpy order (that of `truth`'s axes). `on_step` is called after each
    method of each case with a label. Metrics: PSNR over the voxels of the slices
    concerned, mean per-slice 2D SSIM, LPIPS (mean per slice) when `lpips`, and SNLI.
    """
    check_slices_fit_ssim(truth.shape, axis, name)
    results = []
    for case in cases:
        check_case_fits(truth.shape[axis], case, name)
        low_resolution = degrade(truth, case.keep_every, axis, degradation)
        input_slices = low_resolution.shape[axis]
        output_slices = output_slice_count(input_slices, case.factor)
        reference = np.take(truth, np.arange(output_slices) * case.step, axis=axis)
        acquired = {out for out, _ in acquired_slice_matches(input_slices, case.factor)}
        generated = np.array([j for j in range(output_slices) if j not in acquired])
        truth_profile = metrics.noise_profile(reference, axis)
        nearest_input = np.rint(np.arange(output_slices) / case.factor).astype(int)
        views = _views(np.take(low_resolution, nearest_input, axis=axis), axis)
        view_spacing = {view: (spacing[axis] * case.step, spacing[in_plane])
                        for view, _, in_plane in _view_axes(axis, truth.shape)}
        result = CaseResult(case, degradation, [], {view: {"input": crop} for view, crop in views.items()},
                            view_spacing, {"truth": truth_profile.levels})
        for method in methods:
            started = time.perf_counter()
            output = method.upsample(low_resolution, case.factor, axis)
            seconds = time.perf_counter() - started
            if output.shape != reference.shape:
                raise RuntimeError(f"{method.name} returned shape {output.shape}, the grid convention needs {reference.shape}")
            profile = metrics.noise_profile(output, axis)
            ssim = metrics.slice_ssim(reference, output, axis, value_range)
            row = {
                "volume": name, "degradation": degradation, "case": case.label, "method": method.name,
                "output_slices": output_slices, "generated_slices": len(generated),
                "psnr_generated": metrics.psnr(np.take(reference, generated, axis=axis),
                                               np.take(output, generated, axis=axis), value_range),
                "ssim_generated": float(ssim[generated].mean()),
                "psnr_all": metrics.psnr(reference, output, value_range),
                "ssim_all": float(ssim.mean()),
            }
            if lpips:
                scores = metrics.slice_lpips(reference, output, axis, value_range)
                row.update(lpips_generated=float(scores[generated].mean()), lpips_all=float(scores.mean()))
            row.update(snli=profile.snli, snli_truth=truth_profile.snli, noise_mean=profile.mean,
                       noise_mean_truth=truth_profile.mean, seconds=seconds)
            result.rows.append(row)
            result.profiles[method.name] = profile.levels
            for view, crop in _views(output, axis).items():
                result.views[view][method.name] = crop
            if on_step:
                on_step(f"{name} {degradation} {case.label} {method.name}")
        for view, crop in _views(reference, axis).items():
            result.views[view]["truth"] = crop
        results.append(result)
    return results


def _view_axes(axis: int, shape: Sequence[int]):
    """(name, fixed numpy axis, in-plane numpy axis) of the two central planes containing `axis`."""
    for fixed in (a for a in range(3) if a != axis):
        name = VIEW_NAMES[fixed] if axis == 0 else f"{ITK_AXIS_NAMES[2 - fixed]}={shape[fixed] // 2}"
        yield name, fixed, next(a for a in range(3) if a not in (axis, fixed))


def _views(array: np.ndarray, axis: int) -> dict[str, np.ndarray]:
    """Central crops (half of each extent) of the central planes containing the slice axis,
    with the slice axis first."""
    views = {}
    for name, fixed, _ in _view_axes(axis, array.shape):
        plane = np.take(array, array.shape[fixed] // 2, axis=fixed)
        plane = np.moveaxis(plane, axis if axis < fixed else axis - 1, 0)
        rows, columns = plane.shape
        views[name] = plane[rows // 4: rows // 4 + max(2, rows // 2),
                            columns // 4: columns // 4 + max(2, columns // 2)].astype(np.float32)
    return views


DECIMALS = {
    "psnr_generated": 2, "ssim_generated": 4, "psnr_all": 2, "ssim_all": 4, "lpips_generated": 4, "lpips_all": 4,
    "snli": 3, "snli_truth": 3, "noise_mean": 2, "noise_mean_truth": 2, "seconds": 2,
}
IMAGE_UNIT_KEYS = ("snli", "snli_truth", "noise_mean", "noise_mean_truth")  # in HU for CT, m^2/s for an ADC map
SLICE_COUNT_KEYS = ("output_slices", "generated_slices")


def in_image_units(value: float, decimals: int) -> str:
    """`decimals` fixed decimals, as a CT's HU read, where they show 3 significant digits or more
    and stay short; 4 significant digits otherwise (an ADC map's 1e-11 m^2/s, a volume in 1e9s)."""
    if value == 0 or 10.0 ** (2 - decimals) <= abs(value) < 1e6:
        return f"{value:.{decimals}f}"
    return f"{value:.4g}"


def formatted(key: str, value) -> str:
    """A cell of the CSV file or the Markdown table."""
    if key in SLICE_COUNT_KEYS:
        return f"{round(value, 2):g}"  # whole, but fractional in a mean over volumes
    if key in IMAGE_UNIT_KEYS:
        return in_image_units(value, DECIMALS[key])
    if key in DECIMALS:
        return f"{value:.{DECIMALS[key]}f}"
    return str(value)


def mean_rows(rows: Sequence[dict]) -> list[dict]:
    """One row per degradation, case and method: the mean of each metric over the volumes."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["degradation"], row["case"], row["method"]), []).append(row)
    means = []
    for (degradation, case, method), members in groups.items():
        mean = {"volume": f"mean of {len(members)}", "degradation": degradation, "case": case, "method": method}
        for key, value in members[0].items():
            if key not in mean and not isinstance(value, str):  # the metrics; not labels such as the slice axis
                mean[key] = float(np.mean([member[key] for member in members]))
        means.append(mean)
    return means


def write_csv(rows: Sequence[dict], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:  # a name's own bytes
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({key: formatted(key, value) for key, value in row.items()})


def markdown_table(rows: Sequence[dict], notes: Sequence[str] = ()) -> str:
    """A GitHub table of the rows (metrics on generated slices first), then `notes` as a list."""
    with_lpips = "lpips_generated" in rows[0]
    header = ["volume", "degradation", "k:r", "method", "PSNR gen (dB)", "SSIM gen"]
    header += ["LPIPS gen"] if with_lpips else []
    header += ["PSNR all (dB)", "SSIM all", "SNLI (truth)", "mean noise (truth)", "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cell = {key: formatted(key, value) for key, value in row.items()}
        cells = [cell["volume"], cell["degradation"], cell["case"], cell["method"], cell["psnr_generated"],
                 cell["ssim_generated"]]
        cells += [cell["lpips_generated"]] if with_lpips else []
        cells += [cell["psnr_all"], cell["ssim_all"], f"{cell['snli']} ({cell['snli_truth']})",
                  f"{cell['noise_mean']} ({cell['noise_mean_truth']})", cell["seconds"]]
        lines.append("| " + " | ".join(_table_cell(cell) for cell in cells) + " |")
    return "\n".join(lines + [""] + [f"- {note}" for note in notes]) + "\n"


def _table_cell(text: str) -> str:
    """A volume's name may hold `|` or a line break, which would split the table's row."""
    return " ".join(text.splitlines()).replace("|", "\\|")
