"""Slice-wise noise level inconsistency (SNLI, paper section 3.3, eq. 10) and image quality.

SNLI is the standard deviation, over the slices of a volume, of each slice's noise level as
estimated by the Donoho-Johnstone robust wavelet estimator. Interpolated slices are smoother
than acquired ones, so an interpolated volume's per-slice profile is a saw-tooth and its SNLI
is high; a method that keeps the noise texture from slice to slice keeps SNLI near the
ground truth's. Units are the image's (HU for CT).

PSNR and SSIM come from scikit-image. Both images are first clipped to a value range, and
that range's width is the data range: for CT, [-1024, 3071] HU and 4095 (`CT_RANGE`).
All functions take numpy axes: for an array in SimpleITK order (k, j, i), axial slices
(ITK axis k) are numpy axis 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Sequence

import numpy as np
import pywt

from .errors import InputError

CT_RANGE = (-1024.0, 3071.0)  # HU; data range 4095
NOISE_WAVELET = "db2"  # as scikit-image's estimate_sigma
GAUSSIAN_MAD = NormalDist().inv_cdf(0.75)  # 0.6745: median |x| of a unit Gaussian
FLAT_TOLERANCE = 1e-9  # relative to the slice's largest |value|: a coefficient this small is rounding
ALEXNET_CHECKPOINT = "alexnet-owt-7be5be79.pth"  # torchvision's file name, the backbone of LPIPS-alex
NOISE_MIN_SLICE = 7  # a 7x7 slice has 5x5 finest diagonal db2 coefficients to take the median of


@dataclass(frozen=True)
class NoiseProfile:
    levels: np.ndarray  # noise level of every slice
    snli: float  # standard deviation of `levels`
    mean: float  # mean of `levels`


def slice_noise_levels(array: np.ndarray, axis: int = 0) -> np.ndarray:
    """Noise standard deviation of every slice perpendicular to numpy `axis`.

    Donoho-Johnstone: median |finest diagonal (HH) db2 wavelet coefficients| / 0.6745, per slice.
    Coefficients that are zero up to floating-point rounding come from flat regions (air
    clipped at -1024 HU, zero background) that hold no noise to measure; like scikit-image's
    `estimate_sigma` they are left out, but with a tolerance, since its exact-zero test misses
    them after rounding and the median then drifts down with the body's size. A slice with
    nothing but flat regions has level 0.
    """
    slices = np.moveaxis(np.asarray(array), axis, 0)
    return np.array([_noise_level(plane) for plane in slices])


def _noise_level(plane: np.ndarray) -> float:
    plane = plane.astype(np.float64)
    _, (_, _, diagonal) = pywt.dwt2(plane, NOISE_WAVELET)
    magnitudes = np.abs(diagonal)
    informative = magnitudes[magnitudes > FLAT_TOLERANCE * np.abs(plane).max()]
    return float(np.median(informative) / GAUSSIAN_MAD) if informative.size else 0.0


def snli(levels: np.ndarray) -> float:
    """SNLI (paper eq. 10): the standard deviation (ddof 0) of per-slice noise levels."""
    return float(np.std(np.asarray(levels, dtype=np.float64)))


def noise_profile(array: np.ndarray, axis: int = 0) -> NoiseProfile:
    """Per-slice noise levels along numpy `axis`, their SNLI and their mean."""
    levels = slice_noise_levels(array, axis)
    return NoiseProfile(levels=levels, snli=snli(levels), mean=float(levels.mean()))


def significant(value: float, digits: int = 5) -> float:
    """`value` to `digits` significant digits, for JSON: fixed decimals would round an ADC map's
    noise levels of 1e-11 to 0, where a CT's of 6 HU keep theirs."""
    return float(f"{value:.{digits}g}")


def check_slice_size(shape: Sequence[int], axis: int, name: str, side: int, smallest: str) -> None:
    """InputError unless the slices across numpy `axis` are at least `side` voxels each way;
    `smallest` says what needs that many ("SSIM's 7x7 window")."""
    slice_shape = [n for a, n in enumerate(shape) if a != axis]
    if min(slice_shape) < side:
        raise InputError(f"{name}: slices of {slice_shape[1]}x{slice_shape[0]} voxels are smaller than {smallest}")


def check_noise_slices(shape: Sequence[int], axis: int, name: str) -> None:
    """InputError unless the slices across numpy `axis` are large enough for a noise level."""
    side = NOISE_MIN_SLICE
    check_slice_size(shape, axis, name, side, f"the {side}x{side} voxels a noise level is estimated from")


def clip_to_range(array: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """float32 copy clipped to `value_range`: values outside it are not compared."""
    low, high = value_range
    if not high > low:
        raise ValueError(f"value range must have high > low, not {value_range}")
    return np.clip(np.asarray(array, dtype=np.float32), low, high)


def _comparable(truth: np.ndarray, test: np.ndarray, value_range: tuple[float, float]):
    """Both clipped to `value_range`, and the range, scaled by the power of two that brings the
    range's largest magnitude into [0.5, 1): (truth, test, (low, high)).

    PSNR, SSIM and LPIPS do not change when images and range are scaled alike, and a power of
    two scales float32 exactly, so the scores are those of the unscaled values bit for bit; but
    SSIM's products of four values, which overflow float32 from about 1e9, and PSNR's squared
    differences stay near 1 for a volume in any unit.
    """
    low, high = value_range
    scale = 2.0 ** -math.frexp(max(abs(low), abs(high)))[1]

    def scaled(array: np.ndarray) -> np.ndarray:
        clipped = clip_to_range(array, value_range)
        clipped *= scale  # in place: no third volume-sized array
        return clipped

    return scaled(truth), scaled(test), (low * scale, high * scale)


def psnr(truth: np.ndarray, test: np.ndarray, value_range: tuple[float, float] = CT_RANGE) -> float:
    """PSNR in dB over all voxels, both clipped to `value_range`, data range its width."""
    from skimage.metrics import peak_signal_noise_ratio  # here: it loads scipy.stats, 0.6 s of every upsample's start

    truth, test, (low, high) = _comparable(truth, test, value_range)
    with np.errstate(divide="ignore"):  # identical volumes: inf dB, which is the answer, not a warning
        return float(peak_signal_noise_ratio(truth, test, data_range=high - low))


SSIM_WINDOW = 7  # scikit-image's default: a slice must be at least this many voxels each way


def slice_ssim(truth: np.ndarray, test: np.ndarray, axis: int = 0,
               value_range: tuple[float, float] = CT_RANGE) -> np.ndarray:
    """2D SSIM (scikit-image defaults: SSIM_WINDOW x SSIM_WINDOW) of every slice perpendicular to numpy `axis`.

    Per slice rather than 3D so that any subset of slices (e.g. only the generated ones)
    can be averaged.
    """
    from skimage.metrics import structural_similarity  # here, as in psnr

    pairs, (low, high) = _comparable_slices(truth, test, axis, value_range)
    return np.array([structural_similarity(a, b, win_size=SSIM_WINDOW, data_range=high - low) for a, b in pairs])


def _comparable_slices(truth, test, axis, value_range):
    """(truth slice, test slice) pairs perpendicular to numpy `axis`, and the range, as `_comparable` makes them."""
    truth, test, scaled_range = _comparable(truth, test, value_range)
    return zip(np.moveaxis(truth, axis, 0), np.moveaxis(test, axis, 0)), scaled_range


def lpips_availability() -> tuple[bool, str]:
    """Whether LPIPS (AlexNet backbone) can be computed here, and if not, why.

    It needs the `lpips` package and torchvision's pretrained AlexNet in the torch hub
    cache; nothing is downloaded.
    """
    try:
        import lpips  # noqa: F401
        import torch
    except ImportError as error:
        return False, f"the {error.name} package is not installed"
    checkpoint = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_CHECKPOINT
    if not checkpoint.is_file():
        return False, f"AlexNet backbone weights are not on this machine ({checkpoint}); they are not downloaded"
    return True, "AlexNet backbone, mean over slices"


def slice_lpips(truth: np.ndarray, test: np.ndarray, axis: int = 0,
                value_range: tuple[float, float] = CT_RANGE) -> np.ndarray:
    """LPIPS-alex of every slice perpendicular to numpy `axis`; call only when available.

    Slices are scaled from `value_range` to [-1, 1] and repeated to three channels.
    """
    import lpips
    import torch

    pairs, (low, high) = _comparable_slices(truth, test, axis, value_range)
    network = lpips.LPIPS(net="alex", verbose=False).eval()

    def scaled(plane: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(2 * (plane - low) / (high - low) - 1).expand(1, 3, *plane.shape)

    with torch.no_grad():
        return np.array([float(network(scaled(a), scaled(b))) for a, b in pairs])
