"""The output grid convention, checked end to end in physical space."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from CycleINRLib import geometry
from CycleINRLib.config import NAMED_CONFIGS
from CycleINRLib.engine import upsample_volume
from CycleINRLib.errors import InputError
from CycleINRLib.io import Volume
from CycleINRLib.models import CycleINR

# An untrained residual model reproduces linear interpolation exactly: intensities that are
# linear in the slice index tell where every output slice was sampled.
LINEAR_MODEL = CycleINR(NAMED_CONFIGS["light"]).eval()


# The same 40 cases every run (a red CI reproduces here), and no example database in the checkout.
@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(
    spacing=st.tuples(*[st.floats(0.3, 8.0)] * 3),
    origin=st.tuples(*[st.floats(-300, 300)] * 3),
    rotation=st.integers(0, 2**31 - 1),
    factor=st.floats(1.05, 6.0),
    axis=st.sampled_from([None, 0, 1, 2]),
    slices=st.integers(2, 7),
)
def test_output_slices_lie_where_the_convention_says(spacing, origin, rotation, factor, axis, slices):
    direction = Rotation.random(random_state=rotation).as_matrix().flatten()
    size = [5, 4, 6]
    chosen = geometry.slice_axis(spacing, axis)
    size[chosen] = slices
    index = np.indices(size[::-1], dtype=np.float32)[2 - chosen]  # slice index along the chosen axis
    volume = Volume((100.0 * index + 7.0).astype(np.float32), spacing, origin, tuple(direction))

    result = upsample_volume(volume, LINEAR_MODEL, factor=factor, axis=axis, device="cpu")

    expected_count = int(np.floor((slices - 1) * factor + 1e-6)) + 1
    assert result.size[chosen] == expected_count
    assert np.allclose(result.direction, volume.direction) and np.allclose(result.origin, volume.origin)
    assert np.isclose(result.spacing[chosen], spacing[chosen] / factor)
    for other in {0, 1, 2} - {chosen}:
        assert result.size[other] == volume.size[other] and result.spacing[other] == spacing[other]
    j = np.arange(expected_count)
    out_index = np.zeros((expected_count, 3))
    out_index[:, chosen] = j
    in_index = np.zeros((expected_count, 3))
    in_index[:, chosen] = j / factor
    assert np.allclose(result.index_to_physical(out_index), volume.index_to_physical(in_index), atol=1e-6)
    assert j[-1] / factor <= slices - 1 + 1e-9  # never past the last acquired slice
    sampled = np.moveaxis(result.array, 2 - chosen, 0)[:, 0, 0]
    assert np.allclose(sampled, 100.0 * j / factor + 7.0, atol=1e-3)


def test_integer_factor_output_coincides_with_acquired_slices():
    assert geometry.acquired_slice_matches(4, 3.0) == [(0, 0), (3, 1), (6, 2), (9, 3)]
    assert geometry.acquired_slice_matches(5, 2.5) == [(0, 0), (5, 2), (10, 4)]


def test_slice_axis_defaults_to_coarsest_spacing():
    assert geometry.slice_axis((0.7, 5.0, 0.7)) == 1
    assert geometry.slice_axis((1.0, 1.0, 1.0)) == 2
    assert geometry.slice_axis((0.5, 0.8, 0.8)) == 2


def test_square_pixels_coarser_than_the_slices_leave_k_the_slice_axis():
    """A thin-slice CT (0.68 mm pixels, 0.625 mm slices) is measured and upsampled along its slices."""
    assert geometry.slice_axis((0.68, 0.68, 0.625)) == 2


def test_the_largest_factor_survives_the_float32_spacing_of_nifti():
    stored = float(np.float32(4.9))  # 4.900000095...
    assert geometry.factor_for_spacing(stored, 0.245) == geometry.MAX_FACTOR
    with pytest.raises(InputError, match="largest supported factor is 20"):
        geometry.factor_for_spacing(stored, 0.2449)


@pytest.mark.parametrize("factor", [1.0, 0.5, 20.5, float("nan")])
def test_factor_out_of_range_is_refused(factor):
    with pytest.raises(InputError):
        geometry.check_factor(factor)


@pytest.mark.parametrize("slice_spacing, target, factor", [
    (7.000524, 1.0, 7.0),  # a real MR's spacing: 7.0005 would regenerate 19 of its 20 acquired slices
    (4.997, 1.0, 5.0), (2.0, 0.9995, 2.0), (2.5, 1.0, 2.5), (6.5, 1.0, 6.5), (7.01, 1.0, 7.01),
])
def test_a_spacing_within_a_thousandth_of_a_whole_factor_gets_it(slice_spacing, target, factor):
    assert geometry.factor_for_spacing(slice_spacing, target) == pytest.approx(factor, rel=1e-12)
    kept = geometry.acquired_slice_matches(20, geometry.factor_for_spacing(slice_spacing, target))
    if factor == round(factor):
        assert len(kept) == 20


def test_target_spacing_must_be_finer_than_input():
    assert geometry.factor_for_spacing(5.0, 2.0) == 2.5
    with pytest.raises(InputError, match="not smaller"):
        geometry.factor_for_spacing(5.0, 6.0)
