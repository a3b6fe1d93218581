"""The output grid convention, kept in one place so every entry point agrees.

Only the slice axis is upsampled. With input spacing s and N slices along it, and factor r:
output origin = input origin, output spacing = s / r, output slice count
M = floor((N - 1) * r + 1e-6) + 1, and output slice j lies at input slice coordinate j / r
(the last one at most N - 1, which the 1e-6 could pass by 1e-7). No slice is extrapolated
past the last acquired one; the other axes and the direction
matrix are unchanged. With integer r, output slices j = k * r coincide with acquired slices.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .errors import InputError

MAX_FACTOR = 20.0
COINCIDENCE_TOLERANCE = 1e-6  # in input-slice units
FACTOR_ROUNDING = 1e-6  # relative: a spacing stored as float32 may turn a factor of 20 into 20.0000004
# relative: a target spacing this close to a whole division of the slice spacing gets the whole
# factor (7.000524 mm slices to 1 mm is 7, not 7.0005, whose grid keeps 1 acquired slice in 20)
WHOLE_FACTOR_TOLERANCE = 1e-3


def slice_axis(spacing: tuple[float, ...], axis: int | None = None) -> int:
    """The ITK index axis (0=i, 1=j, 2=k) to upsample: the coarsest one unless given.

    Ties go to the highest axis, so an isotropic volume is upsampled along k, except that
    square pixels coarser than the slices (a thin-slice CT: 0.7 mm pixels, 0.625 mm slices)
    leave k the slice axis: i and j are the rows and columns of the acquired slices.
    """
    if axis is None:
        largest = max(spacing)
        coarsest = [a for a, s in enumerate(spacing) if math.isclose(s, largest, rel_tol=1e-6)]
        return 2 if coarsest == [0, 1] else coarsest[-1]
    if axis not in (0, 1, 2):
        raise InputError(f"slice axis must be auto, 0, 1 or 2, not {axis}")
    return axis


def factor_for_spacing(input_spacing: float, target_spacing: float) -> float:
    """The factor that turns slice spacing `input_spacing` into `target_spacing`, a whole one
    where that is within WHOLE_FACTOR_TOLERANCE: then every acquired slice is kept as it is."""
    if not target_spacing > 0:
        raise InputError(f"target spacing must be positive, not {target_spacing} mm")
    if target_spacing >= input_spacing:
        raise InputError(
            f"target spacing {target_spacing:g} mm is not smaller than the input's "
            f"slice spacing {input_spacing:g} mm; nothing to upsample"
        )
    factor = input_spacing / target_spacing
    if factor > MAX_FACTOR * (1 + FACTOR_ROUNDING):
        raise InputError(
            f"target spacing {target_spacing:g} mm is {factor:.3g} times finer than the input's slice spacing "
            f"{input_spacing:g} mm; the largest supported factor is {MAX_FACTOR:g} ({input_spacing / MAX_FACTOR:.3g} mm)"
        )
    whole = round(factor)
    if whole >= 2 and abs(factor - whole) <= WHOLE_FACTOR_TOLERANCE * whole:
        return float(min(whole, MAX_FACTOR))  # 4.9 mm, stored as 4.900000095 in NIfTI, to 0.245 mm is 20
    return min(factor, MAX_FACTOR)


def check_factor(factor: float) -> float:
    if not (isinstance(factor, numbers.Real) and not isinstance(factor, bool) and math.isfinite(factor)):
        raise InputError(f"factor must be a number, not {factor!r}")
    if factor <= 1:
        raise InputError(f"factor must be greater than 1, not {factor:g}")
    if factor > MAX_FACTOR:
        raise InputError(f"factor {factor:.10g} is larger than the supported maximum {MAX_FACTOR:g}")
    return float(factor)


def output_slice_count(input_slices: int, factor: float) -> int:
    return int(math.floor((input_slices - 1) * factor + 1e-6)) + 1


def output_positions(input_slices: int, factor: float) -> np.ndarray:
    """Input slice coordinate of every output slice: j / r (the last one no further than the last
    input slice, which a factor a hair below a whole number, 2.99999998 from a NIfTI's float32
    spacing, would pass by 1e-7)."""
    return np.minimum(np.arange(output_slice_count(input_slices, factor), dtype=np.float64) / factor, input_slices - 1)


def acquired_slice_matches(input_slices: int, factor: float) -> list[tuple[int, int]]:
    """(output slice, input slice) pairs whose positions coincide."""
    positions = output_positions(input_slices, factor)
    nearest = np.rint(positions)
    hits = np.abs(positions - nearest) < COINCIDENCE_TOLERANCE
    return [(int(j), int(k)) for j, k in zip(np.flatnonzero(hits), nearest[hits])]


def output_size_and_spacing(
    size: tuple[int, int, int], spacing: tuple[float, float, float], axis: int, factor: float
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Output size and spacing in ITK order; origin and direction are the input's."""
    out_size = list(size)
    out_spacing = list(spacing)
    out_size[axis] = output_slice_count(size[axis], factor)
    out_spacing[axis] = spacing[axis] / factor
    return tuple(out_size), tuple(out_spacing)
