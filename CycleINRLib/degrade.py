"""Thin-slice to thick-slice degradation, shared by training and evaluation.

`interval` keeps every k-th slice (the paper's protocol). `thick` averages each kept slice
over a box slice profile of thickness k slices centred on it, as a thick-slice
reconstruction does; slices beyond the volume are not invented (the profile is truncated).
Both return slices at the same positions 0, k, 2k, ... so the ground truth exists at every
output position of an upsampling by r = k (or any r with k / r an integer).
"""

from __future__ import annotations

import numpy as np

DEGRADATIONS = ("interval", "thick")


def degrade(array: np.ndarray, keep_every: int, axis: int = 0, mode: str = "interval") -> np.ndarray:
    """Simulate a thick-slice acquisition along numpy `axis` of a thin-slice `array`."""
    if mode not in DEGRADATIONS:
        raise ValueError(f"degradation must be one of {DEGRADATIONS}, not {mode!r}")
    if keep_every < 1 or int(keep_every) != keep_every:
        raise ValueError(f"keep_every must be a positive integer, not {keep_every}")
    keep_every = int(keep_every)
    moved = np.moveaxis(array, axis, 0)
    centres = np.arange(0, moved.shape[0], keep_every)
    if mode == "interval":
        low = moved[centres]
    else:
        low = np.stack([_box_average(moved, c, keep_every) for c in centres])
        if np.issubdtype(array.dtype, np.integer):
            info = np.iinfo(array.dtype)
            low = np.clip(np.rint(low), info.min, info.max)
        low = low.astype(array.dtype)
    return np.moveaxis(low, 0, axis)


def _box_average(slices: np.ndarray, centre: int, thickness: int) -> np.ndarray:
    """Mean over a box of `thickness` slices around `centre`; half weights at even-width ends."""
    half = thickness / 2.0
    offsets = np.arange(-int(np.floor(half)), int(np.floor(half)) + 1)
    weights = np.where(np.abs(offsets) == half, 0.5, 1.0)
    inside = (centre + offsets >= 0) & (centre + offsets < slices.shape[0])
    offsets, weights = offsets[inside], weights[inside]
    stack = slices[centre + offsets].astype(np.float64)
    return np.tensordot(weights / weights.sum(), stack, axes=1)
