"""Validation on held-out thin-slice volumes with the harness and metrics of `cycleinr evaluate`.

Cases, degradation and metrics are those of the README table, so a number logged during
training means the same as one in the table; a centred crop keeps it affordable on a CPU.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np

from CycleINRLib import evaluate
from CycleINRLib.baselines import interpolate
from CycleINRLib.config import Normalization
from CycleINRLib.engine import upsample_array
from CycleINRLib.errors import InputError

from .config import RunConfig
from .data import DataSourceError, TrainingDataWarning, read_or_skip, volume_paths

PREVIEW_CASE = "5:5"


@dataclass
class ValidationSet:
    names: list[str]
    arrays: list[np.ndarray]  # (k, j, i) crops, slice axis first
    spacings: list[tuple[float, float, float]]  # numpy order
    cases: list[evaluate.Case]
    normalization: Normalization

    @classmethod
    def load(cls, source: str, run: RunConfig, normalization: Normalization) -> "ValidationSet":
        """Volumes too thin for a case are skipped here, with a warning, rather than end the run
        at its first validation (and every resume after it)."""
        cases = [evaluate.parse_case(str(case)) for case in run.val_cases]
        names, arrays, spacings = [], [], []
        paths = volume_paths(source)
        for path in paths:
            volume = read_or_skip(path, "validation")
            if volume is None:
                continue
            array = _centre_crop(volume.array, run.val_crop)
            label = f"{path} (run.val_crop {run.val_crop})"
            try:
                if unexpected := normalization.unexpected_input(volume.array):
                    raise InputError(f"{path}: {unexpected}, and the model's intensity window is CT's")
                evaluate.check_slices_fit_ssim(array.shape, 0, label)
                if array.min() == array.max():  # nothing to restore: its PSNR is infinite for every method
                    raise InputError(f"{label}: every voxel is {array.min()}")
                for case in cases:
                    evaluate.check_case_fits(array.shape[0], case, label)
            except InputError as error:
                warnings.warn(f"skipping validation volume: {error}", TrainingDataWarning, stacklevel=2)
                continue
            names.append(path.name)
            arrays.append(array)
            spacings.append(volume.spacing[::-1])
        if not arrays:
            raise DataSourceError(f"no usable validation volume in {source} "
                                  f"({'see the warnings above' if paths else 'no volume files there'})")
        return cls(names, arrays, spacings, cases, normalization)

    def evaluate(self, model, device) -> tuple[dict[str, float], np.ndarray]:
        """Scores per case (CycleINR's PSNR/SSIM on generated slices, gain over linear, SNLI
        and the truth's), their means (SNLI as the excess over the truth's) and a coronal
        preview of the first volume: truth | linear | CycleINR."""
        methods = [
            evaluate.Method("linear", functools.partial(interpolate, method="linear"), "linear"),
            evaluate.Method("cycleinr", lambda a, f, axis: upsample_array(a, f, model, axis=axis, device=device), "training"),
        ]
        results = []
        for name, array, spacing in zip(self.names, self.arrays, self.spacings):
            results += evaluate.evaluate_volume(array, 0, spacing, self.cases, methods, name=name)
        model.train()
        scores = {}
        for row in evaluate.mean_rows([row for result in results for row in result.rows]):
            case = row["case"]
            if row["method"] == "cycleinr":
                scores.update({f"{case}/psnr_generated": row["psnr_generated"], f"{case}/ssim_generated": row["ssim_generated"],
                               f"{case}/snli": row["snli"], f"{case}/snli_truth": row["snli_truth"]})
            else:
                scores[f"{case}/linear_psnr_generated"] = row["psnr_generated"]
        labels = [case.label for case in self.cases]
        for label in labels:
            scores[f"{label}/gain_over_linear_db"] = scores[f"{label}/psnr_generated"] - scores[f"{label}/linear_psnr_generated"]
        scores["mean_psnr"] = float(np.mean([scores[f"{label}/psnr_generated"] for label in labels]))
        scores["mean_gain_over_linear_db"] = float(np.mean([scores[f"{label}/gain_over_linear_db"] for label in labels]))
        scores["mean_snli_excess"] = float(np.mean([scores[f"{label}/snli"] - scores[f"{label}/snli_truth"] for label in labels]))
        preview = next((r for r in results if r.case.label == PREVIEW_CASE), results[0]).views["coronal"]
        image = np.concatenate([preview["truth"], preview["linear"], preview["cycleinr"]], axis=1)
        low, high = self.normalization.bounds(image)
        return scores, np.clip((image - low) / (high - low), 0.0, 1.0)


def _centre_crop(array: np.ndarray, size: list | None) -> np.ndarray:
    if size is None:
        return array
    starts = [max(0, (n - s) // 2) for n, s in zip(array.shape, size)]
    return np.ascontiguousarray(array[tuple(slice(b, b + s) for b, s in zip(starts, size))])
