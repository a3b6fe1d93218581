"""Thin-slice to thick-slice degradation, shared by training and evaluation.

`interval` keeps every k-th slice (the paper's protocol). `thick` averages each kept slice
over a box slice profile of thickness k slices centred on it, as a thick-slice
reconstruction does; slices beyond the volume are not invented (the profile is truncated).
Both return slices at the same positions 0, k, 2k, ... so the ground truth exists at every
output position of an upsampling by r = k (or any r with k / r an integer).
"""

from __future__ import annotations

import numpy as np

from .io import to_pixel_type

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
        low = to_pixel_type(np.stack([_box_average(moved, c, keep_every) for c in centres]), array.dtype)
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


def degrade_at(array: np.ndarray, positions: np.ndarray, thickness: float, axis: int = 0, mode: str = "interval") -> np.ndarray:
    """Thick-slice acquisition at arbitrary (fractional) slice `positions`, as float32.

    Training draws scales like 2.3, whose low-resolution slices fall between thin slices,
    so `degrade` (integer keep-every-k) cannot build the pair. `interval` samples the thin
    slices linearly at each position; `thick` averages a box profile `thickness` slices
    wide centred on it, each thin slice weighted by the overlap of its own extent
    [k - 1/2, k + 1/2] with the box, truncated at the volume's ends. At integer positions
    and thickness this gives exactly the weights of `degrade` (before its integer rounding).
    """
    if mode not in DEGRADATIONS:
        raise ValueError(f"degradation must be one of {DEGRADATIONS}, not {mode!r}")
    moved = np.moveaxis(array, axis, 0)
    count = moved.shape[0]
    positions = np.asarray(positions, dtype=np.float64)
    if positions.size and (positions.min() < 0 or positions.max() > count - 1):
        raise ValueError(f"positions must lie within the {count} slices")
    weights = np.zeros((positions.size, count))
    if mode == "interval":
        below = np.minimum(np.floor(positions).astype(int), count - 1)
        above = np.minimum(below + 1, count - 1)
        fraction = positions - below
        rows = np.arange(positions.size)
        np.add.at(weights, (rows, below), 1.0 - fraction)
        np.add.at(weights, (rows, above), fraction)
    else:
        if not thickness > 0:
            raise ValueError(f"thickness must be positive, not {thickness}")
        edges = np.arange(count, dtype=np.float64)
        low = np.maximum(edges[None, :] - 0.5, positions[:, None] - thickness / 2)
        high = np.minimum(edges[None, :] + 0.5, positions[:, None] + thickness / 2)
        weights = np.clip(high - low, 0.0, None)
        weights /= weights.sum(axis=1, keepdims=True)
    low_resolution = np.tensordot(weights, moved.astype(np.float32), axes=1).astype(np.float32)
    return np.moveaxis(low_resolution, 0, axis)
