"""A CT-like digital chest phantom, so the demo needs no patient scan.

Thin-slice ground truth in HU: air, a body with a fat layer and soft tissue, two lungs with
oblique branching vessels, a spine and ribs that cross slices at an angle (the structures
thick slices blur), and CT-like noise: Gaussian, correlated in-plane by a small kernel,
independent from slice to slice, the texture CycleINR is meant to keep.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .io import Volume

AIR, FAT, SOFT_TISSUE, LUNG, VESSEL, BONE, MARROW = -1000, -100, 40, -850, 60, 900, 250


def chest_phantom(
    size: tuple[int, int, int] = (160, 128, 120),
    spacing: tuple[float, float, float] = (0.9, 0.9, 1.0),
    noise_hu: float = 25.0,
    seed: int = 0,
) -> Volume:
    """A (i, j, k) = `size` phantom at `spacing` mm, as an int16 HU Volume."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*(np.arange(n) * s for n, s in zip(size[::-1], spacing[::-1])), indexing="ij")
    centre_i, centre_j, depth = size[0] * spacing[0] / 2, size[1] * spacing[1] / 2, size[2] * spacing[2]
    x, y, z = i - centre_i, j - centre_j, k / depth  # mm, mm, 0..1 from head to feet

    body_a, body_b = 0.44 * size[0] * spacing[0], 0.36 * size[1] * spacing[1]
    radius = (x / body_a) ** 2 + (y / body_b) ** 2
    hu = np.full(x.shape, AIR, np.float32)
    hu[radius < 1.0] = FAT
    hu[radius < 0.8] = SOFT_TISSUE

    lung_a, lung_b = 0.17 * size[0] * spacing[0] * (0.8 + 0.3 * np.sin(np.pi * z)), 0.24 * size[1] * spacing[1]
    for side in (-1, 1):
        lung = ((x - side * 0.21 * size[0] * spacing[0]) / lung_a) ** 2 + ((y + 0.02 * size[1]) / lung_b) ** 2 < 1
        hu[lung] = LUNG
        hu[lung & _vessel_tree(x, y, k, side, rng)] = VESSEL

    spine = (x / 9.0) ** 2 + ((y - 0.26 * size[1] * spacing[1]) / 9.0) ** 2
    hu[spine < 1.0] = BONE
    hu[spine < 0.5] = MARROW
    rib_phase = np.mod(k * spacing[2] + 0.25 * y, 14.0)  # ribs run obliquely through the slices
    hu[(radius > 0.82) & (radius < 0.92) & (rib_phase < 4.0)] = BONE

    texture = ndimage.gaussian_filter(rng.normal(0, 1, x.shape), sigma=(0, 0.5, 0.5))
    texture *= noise_hu / texture.std()
    hu = np.where(radius < 1.0, hu + texture, hu + 0.2 * texture)
    array = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return Volume(array, tuple(float(s) for s in spacing), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def _vessel_tree(x, y, k, side, rng) -> np.ndarray:
    """Tubes of 1-3 mm radius along random oblique lines through one lung."""
    vessels = np.zeros(x.shape, bool)
    for _ in range(16):
        start = np.array([side * rng.uniform(20, 45), rng.uniform(-30, 30), rng.uniform(0, k.max())])
        direction = rng.normal(size=3)
        direction[2] *= 2.5  # mostly head-to-feet, so thick slices cut them obliquely
        direction /= np.linalg.norm(direction)
        offset = np.stack([x - start[0], y - start[1], k - start[2]], axis=-1)
        along = offset @ direction
        distance = np.linalg.norm(offset - along[..., None] * direction, axis=-1)
        vessels |= distance < rng.uniform(1.0, 3.0)
    return vessels
