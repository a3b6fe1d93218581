"""Optional noise matching: give generated slices the noise level of the acquired ones.

A generated slice's noise cannot be predicted from its neighbours, so any upsampler that
minimises an intensity error (linear, cubic, CycleINR with L1 or MSE) makes it smoother than an
acquired slice; scrolled or resliced, the volume flickers, which is what SNLI measures (README,
section Training). This adds synthetic, zero-mean noise to each generated slice, with the
in-plane power spectrum of the acquired slices' own noise, scaled so that the slice's noise
level (SNLI's estimator) reaches the level interpolated between its acquired neighbours.
Acquired slices, and flat regions of both acquired neighbours (air clipped at -1024 HU,
padding, saturation), are left as they are, and a fixed seed makes it repeatable.

It restores the look of the noise, not information: the added values are noise, so it costs a
little PSNR (measured in README) and it is off unless asked for.
"""

from __future__ import annotations

import numpy as np
import pywt

from . import geometry, metrics

NOISE_SEED = 0
DETAIL_LEVELS = 2  # wavelet scales whose small coefficients make up the noise estimate
NOISE_CLIP = 3.0  # coefficients within +-3 noise levels count as noise; larger ones as structure
SCALE_REFINEMENTS = 3  # levels of slice and noise add only roughly in quadrature: re-measure and rescale


def add_missing_noise(output: np.ndarray, low: np.ndarray, factor: float, seed: int = NOISE_SEED) -> None:
    """Add noise, in place, to the generated slices of `output` (floating point, slices first,
    the upsampling of `low` by `factor`); acquired slices are not touched, nor are slices too
    small for a noise level (metrics.NOISE_MIN_SLICE)."""
    acquired = {out for out, _ in geometry.acquired_slice_matches(low.shape[0], factor)}
    generated = np.array([j for j in range(output.shape[0]) if j not in acquired], dtype=int)
    if generated.size == 0 or min(low.shape[1:]) < metrics.NOISE_MIN_SLICE:
        return
    input_levels = metrics.slice_noise_levels(low)
    if not input_levels.any():
        return
    # levels as written: an integer type rounds a flat region to exactly flat, which the estimator leaves out
    as_written = np.rint if np.issubdtype(low.dtype, np.integer) else np.asarray
    positions = geometry.output_positions(low.shape[0], factor)[generated]
    target = np.interp(positions, np.arange(low.shape[0]), input_levels)
    current = np.array([metrics.slice_noise_levels(as_written(output[j])[None])[0] for j in generated])
    missing = np.sqrt(np.clip(target ** 2 - current ** 2, 0.0, None))

    amplitude = noise_amplitude_spectrum(low, input_levels)
    flat = np.array([_flat(plane) for plane in low])
    rng = np.random.default_rng(seed)
    for index, position, want, have, level in zip(generated, positions, target, current, missing):
        if level > 0:
            below = min(int(position), low.shape[0] - 1)
            above = min(below + 1, low.shape[0] - 1)
            noise = shaped_noise(rng, amplitude, output.shape[1:]) * ~(flat[below] & flat[above])
            output[index] = _scaled_to_level(output[index], noise, level, want, have, as_written)


def _flat(plane: np.ndarray) -> np.ndarray:
    """Voxels in a 3 x 3 in-plane window of one value (its edges too): clipped air, padding,
    saturation, where an acquired slice has no noise either."""
    centres = np.all([neighbour == plane for neighbour in _neighbourhood(plane)], axis=0)
    return np.any(_neighbourhood(centres), axis=0)


def _neighbourhood(plane: np.ndarray) -> list[np.ndarray]:
    """The plane shifted by -1, 0 and +1 along both axes (edges repeated): its 9 neighbours' values."""
    padded = np.pad(plane, 1, mode="edge")
    rows, columns = plane.shape
    return [padded[r:r + rows, c:c + columns] for r in range(3) for c in range(3)]


def _scaled_to_level(plane: np.ndarray, noise: np.ndarray, scale: float, want: float, have: float,
                     as_written=np.asarray) -> np.ndarray:
    """plane + s * noise with s refined until the sum's noise level, measured on the values as
    written (`as_written`), is close to `want`."""
    for _ in range(SCALE_REFINEMENTS):
        noisy = (plane + scale * noise).astype(plane.dtype)
        reached = metrics.slice_noise_levels(as_written(noisy)[None])[0]
        if reached <= have:
            break
        scale *= np.sqrt((want ** 2 - have ** 2) / (reached ** 2 - have ** 2))
    return (plane + scale * noise).astype(plane.dtype)


def noise_amplitude_spectrum(low: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Square root of the mean in-plane noise power spectrum (rfft2 layout) of the slices of `low`.

    A slice's noise is what wavelet shrinkage would remove: its detail coefficients clipped to
    +-3 noise levels, reconstructed without the approximation band.
    """
    power = np.zeros((low.shape[1], low.shape[2] // 2 + 1))
    # fewer scales in a slice too small for two: coarser ones would be all boundary
    scales = min(DETAIL_LEVELS, pywt.dwt_max_level(min(low.shape[1:]), metrics.NOISE_WAVELET))
    for plane, level in zip(low, levels):  # one slice at a time: no volume-sized float64 copy
        plane = plane.astype(np.float64)
        coefficients = pywt.wavedec2(plane, metrics.NOISE_WAVELET, level=scales)
        noise_only = [np.zeros_like(coefficients[0])] + [
            tuple(np.clip(band, -NOISE_CLIP * level, NOISE_CLIP * level) for band in details)
            for details in coefficients[1:]
        ]
        residual = pywt.waverec2(noise_only, metrics.NOISE_WAVELET)[: plane.shape[0], : plane.shape[1]]
        power += np.abs(np.fft.rfft2(residual - residual.mean())) ** 2
    return np.sqrt(power / max(len(levels), 1))


def shaped_noise(rng: np.random.Generator, amplitude: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A noise field with the spectrum `amplitude`, scaled to noise level 1 (SNLI's estimator)."""
    white = rng.standard_normal(shape)
    field = np.fft.irfft2(np.fft.rfft2(white) * amplitude, s=shape)
    level = metrics.slice_noise_levels(field[None])[0]
    return field / level if level > 0 else np.zeros(shape)
