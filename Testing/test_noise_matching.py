"""Noise matching (--match-noise): generated slices get the acquired slices' noise level."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from CycleINRLib import geometry, metrics
from CycleINRLib.baselines import interpolate
from CycleINRLib.degrade import degrade
from CycleINRLib.io import read_volume
from CycleINRLib.noise_matching import add_missing_noise

VALIDATION_CT = "ct/val/lidc-0002_chest_1.25mm.nii.gz"
PADDING_HU = -2048


@pytest.fixture(scope="module")
def thin_ct():
    """A 40 x 96 x 96 crop of the real 1.25 mm validation chest CT, air-only corner set to padding."""
    from conftest import SHARED_DATA

    source = SHARED_DATA / VALIDATION_CT
    if not source.is_file():
        pytest.skip(f"real volumes not available: {source} is absent (a fresh clone has no ../shared)")
    array = read_volume(source).array
    k, j, i = [(n - s) // 2 for n, s in zip(array.shape, (40, 96, 96))]
    crop = array[k:k + 40, j:j + 96, i:i + 96].astype(np.float32)
    crop[:, :12, :12] = PADDING_HU  # outside a scanner's field of view: no noise there
    return crop


@pytest.mark.parametrize("keep_every, factor", [(2, 2.0), (4, 4.0), (4, 2.0)])
def test_generated_slices_reach_the_acquired_noise_level(thin_ct, keep_every, factor):
    low = degrade(thin_ct, keep_every)
    linear = interpolate(low, factor, method="linear")
    matched = linear.copy()
    add_missing_noise(matched, low, factor)

    acquired = [out for out, _ in geometry.acquired_slice_matches(low.shape[0], factor)]
    generated = np.setdiff1d(np.arange(linear.shape[0]), acquired)
    assert np.array_equal(matched[acquired], linear[acquired])
    assert np.array_equal(matched[:, :12, :12], linear[:, :12, :12])  # padding stays padding
    target = np.interp(generated / factor, np.arange(low.shape[0]), metrics.slice_noise_levels(low))
    before, after = metrics.slice_noise_levels(linear[generated]), metrics.slice_noise_levels(matched[generated])
    assert np.mean(np.abs(before - target) / target) > 0.1  # linear interpolation is visibly smoother
    assert np.allclose(after, target, rtol=0.05)
    assert metrics.noise_profile(matched).snli < 0.6 * metrics.noise_profile(linear).snli
    cubic_snli = metrics.noise_profile(interpolate(low, factor, method="cubic")).snli
    assert metrics.noise_profile(matched).snli < cubic_snli
    truth = thin_ct[::keep_every // int(factor)][: linear.shape[0]]
    cost = metrics.psnr(truth[generated], linear[generated]) - metrics.psnr(truth[generated], matched[generated])
    assert 0 < cost < 0.5  # noise is not information: it costs a little PSNR, not much


def test_flat_regions_of_both_neighbours_get_no_noise_whatever_their_value(thin_ct):
    """Air clipped at -1024 HU and saturation lie above the volume's lowest value (the padding at
    -2048): the acquired slices hold no noise there, so generated ones may not, or the volume flickers."""
    volume = thin_ct.copy()
    volume[:, 30:96, :50] = -1024  # clipped air
    volume[:, :20, 70:] = 3071  # saturated
    low = degrade(volume, 2)
    linear = interpolate(low, 2.0, method="linear")
    matched = linear.copy()
    add_missing_noise(matched, low, 2.0)
    for region in (np.s_[:, 30:96, :50], np.s_[:, :20, 70:], np.s_[:, :12, :12]):
        assert np.array_equal(matched[region], linear[region])
    assert not np.array_equal(matched, linear)


def test_an_integer_volume_reaches_the_level_as_written(thin_ct):
    """Rounded to int16, the model's near-flat air (-1023.6, -1024.2) becomes flat, which the noise
    estimator leaves out: the level is matched on the values as written, not overshot."""
    volume = thin_ct.copy()
    volume[:, 30:96, :50] = -1024
    low = degrade(volume, 4).astype(np.int16)
    model_like = interpolate(low.astype(np.float32), 4.0, method="linear")
    model_like += np.random.default_rng(3).normal(0, 0.3, model_like.shape).astype(np.float32)  # not quite flat
    add_missing_noise(model_like, low, 4.0)
    acquired = [out for out, _ in geometry.acquired_slice_matches(low.shape[0], 4.0)]
    generated = np.setdiff1d(np.arange(model_like.shape[0]), acquired)
    target = np.interp(generated / 4.0, np.arange(low.shape[0]), metrics.slice_noise_levels(low))
    written = metrics.slice_noise_levels(np.rint(model_like[generated]))
    assert np.allclose(written, target, rtol=0.08), np.round(written / target, 3)


def test_same_seed_same_noise_and_nothing_added_to_noise_free_slices(thin_ct):
    low = degrade(thin_ct, 2)
    first, second, other = (interpolate(low, 2.0, method="linear") for _ in range(3))
    add_missing_noise(first, low, 2.0)
    add_missing_noise(second, low, 2.0)
    add_missing_noise(other, low, 2.0, seed=1)
    assert np.array_equal(first, second) and not np.array_equal(first, other)

    ramp = np.broadcast_to(np.linspace(-100, 100, 48, dtype=np.float32), (6, 48, 48)).copy()  # db2 sees no noise
    upsampled = interpolate(ramp, 2.0, method="linear")
    untouched = upsampled.copy()
    add_missing_noise(upsampled, ramp, 2.0)
    assert np.array_equal(upsampled, untouched)


@pytest.mark.parametrize("side", [8, 3])
def test_slices_too_small_for_two_wavelet_scales_without_warnings(thin_ct, side):
    """A few-voxel-wide input (a thumbnail, a cropped test case) must not make PyWavelets warn;
    one wavelet scale (8 x 8) still measures and shapes noise."""
    low = degrade(thin_ct, 2)[:, 40:40 + side, 40:40 + side].copy()
    linear = interpolate(low, 2.0, method="linear")
    matched = linear.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        add_missing_noise(matched, low, 2.0)
    assert np.isfinite(matched).all()
    assert np.array_equal(matched[::2], linear[::2])
    assert (not np.array_equal(matched, linear)) == (side == 8)
