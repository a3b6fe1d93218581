"""SNLI and the image-quality wrappers against volumes whose answers are known."""

import importlib.util

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from skimage.metrics import structural_similarity

from CycleINRLib import metrics

SIGMAS = np.array([2.0, 5.0, 10.0, 20.0, 40.0, 80.0])


def noisy_volume(sigmas, size=256, seed=0):
    """Slices of a smooth ramp plus Gaussian noise of the given sigma, with a flat air band
    (-1024, as clipped CT air) over a third of each slice: it holds no noise to measure."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(-200.0, 300.0, size)[None, :] * np.ones((size, 1))
    volume = np.stack([ramp + rng.normal(0.0, sigma, (size, size)) for sigma in sigmas])
    volume[:, : size // 3, :] = -1024.0
    return volume


def test_noise_levels_recover_known_sigmas_despite_flat_air():
    levels = metrics.slice_noise_levels(noisy_volume(SIGMAS), axis=0)
    np.testing.assert_allclose(levels, SIGMAS, rtol=0.04)


def test_noise_levels_follow_the_given_numpy_axis():
    volume = noisy_volume(SIGMAS[:3], size=128)
    along_i = metrics.slice_noise_levels(np.moveaxis(volume, 0, 2), axis=2)
    np.testing.assert_allclose(along_i, metrics.slice_noise_levels(volume, axis=0))


def test_flat_slice_has_level_zero():
    assert metrics.slice_noise_levels(np.full((2, 64, 64), -1024, dtype=np.int16), 0).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("scale", [1e-11, 1e-3, 1e6])
def test_noise_levels_scale_with_the_intensities(scale):
    """Float data in any unit (an MR in arbitrary units, a map scaled to 1e-11) measure alike."""
    volume = noisy_volume(SIGMAS[:3], size=128)
    np.testing.assert_allclose(metrics.slice_noise_levels(volume * scale, 0),
                               metrics.slice_noise_levels(volume, 0) * scale, rtol=1e-9)


def test_snli_is_the_population_standard_deviation_of_the_levels():
    assert metrics.snli(np.array([4.0, 6.0, 4.0, 6.0])) == pytest.approx(1.0)


def test_alternating_smooth_and_noisy_slices_score_above_uniform_noise():
    """The saw-tooth of interpolated slices: every other slice smoothed (less noise)."""
    uniform = noisy_volume([10.0] * 8, size=128, seed=1)
    alternating = uniform.copy()
    alternating[1::2] = gaussian_filter(alternating[1::2], sigma=(0, 1.0, 1.0))
    uniform_profile = metrics.noise_profile(uniform, 0)
    alternating_profile = metrics.noise_profile(alternating, 0)
    assert uniform_profile.snli < 0.5
    assert alternating_profile.snli > 5 * uniform_profile.snli
    assert alternating_profile.mean < uniform_profile.mean


def test_psnr_of_a_known_offset_and_clipping_to_the_ct_range():
    truth = np.zeros((3, 32, 32))
    assert metrics.psnr(truth, truth + 40.95) == pytest.approx(40.0)  # 20 log10(4095 / 40.95)
    truth[:, 0, 0], test = 5000.0, truth + 40.95  # above 3071 HU: both clip to 3071, no error there
    test[:, 0, 0] = 3071.0
    expected = 10 * np.log10(4095.0**2 / (40.95**2 * (truth.size - 3) / truth.size))
    assert metrics.psnr(truth, test) == pytest.approx(expected)


def test_slice_ssim_is_scikit_image_ssim_of_each_slice():
    rng = np.random.default_rng(2)
    truth = gaussian_filter(rng.normal(0, 300, (9, 48, 40)), 2)
    test = truth + rng.normal(0, 30, truth.shape)
    expected = [structural_similarity(truth[:, :, i], test[:, :, i], data_range=4095.0) for i in range(40)]
    np.testing.assert_allclose(metrics.slice_ssim(truth, test, axis=2), expected)
    np.testing.assert_allclose(metrics.slice_ssim(truth, truth, axis=0), 1.0)


@pytest.mark.parametrize("scale", [2.0**-100, 2.0**40, 2.0**100])
def test_psnr_and_ssim_are_the_same_in_any_unit(scale):
    """Bit for bit, for a unit a power of two apart; in float32, SSIM's products of four values
    overflowed from about 1e9 (NaN), and tiny units underflowed."""
    rng = np.random.default_rng(3)
    truth = gaussian_filter(rng.normal(0, 300, (3, 48, 40)), 2).astype(np.float32)
    test = truth + rng.normal(0, 30, truth.shape).astype(np.float32)
    value_range = (float(truth.min()), float(truth.max()))
    scaled_range = (value_range[0] * scale, value_range[1] * scale)
    np.testing.assert_array_equal(metrics.slice_ssim(truth * scale, test * scale, 0, scaled_range),
                                  metrics.slice_ssim(truth, test, 0, value_range))
    assert metrics.psnr(truth * scale, test * scale, scaled_range) == metrics.psnr(truth, test, value_range)


def test_lpips_is_reported_unavailable_with_the_reason_when_it_cannot_run():
    available, reason = metrics.lpips_availability()
    if importlib.util.find_spec("lpips") is None:
        assert not available and "lpips" in reason
    assert reason
