"""Tiled inference: exactness, cancellation, progress, memory budget, intensities."""

import copy
import warnings

import numpy as np
import pytest
import torch

from CycleINRLib import engine
from CycleINRLib.config import NAMED_CONFIGS
from CycleINRLib.errors import InputError, UpsampleCancelled
from CycleINRLib.models import CycleINR
from conftest import DEVICES, NEEDS_CUDA


@pytest.fixture(scope="module", params=["light", "paper"])
def model(request):
    """A randomly initialised model whose output is not a plain interpolation."""
    torch.manual_seed(3)
    net = CycleINR(NAMED_CONFIGS[request.param]).eval()
    torch.nn.init.normal_(net.decoder.output.weight, std=0.05)
    return net


def _ct_like(shape, seed=0):
    """Noise in HU, clipped at -1024 as CT reconstructions are (below lies padding)."""
    rng = np.random.default_rng(seed)
    return np.maximum(rng.normal(0, 300, shape) - 200, -1024).astype(np.int16)


def _workspace_forcing_tiles(shape, factor, model, axes):
    """The largest workspace (bytes) whose plan cuts every one of `axes` into several tiles."""
    workspace = 8 * 2**30
    while True:
        tiles = engine.plan_tiles(shape, factor, model, workspace).tiles(shape)
        if all(len(tiles[axis]) > 1 for axis in axes):
            return workspace
        workspace = int(workspace * 0.8)


def _budget_for(shape, factor, workspace_bytes):
    out_slices = len(engine.geometry.output_positions(shape[0], factor))
    fixed = engine.array_bytes(shape, out_slices, np.float32) + engine.RUNTIME_BYTES
    return (fixed + workspace_bytes) / 2**30


@pytest.mark.parametrize(
    "config, shape, factor, axes",
    [
        ("light", (14, 40, 36), 2.5, (1, 2)),  # in-plane tiles
        ("light", (60, 12, 12), 3.0, (0,)),  # slice-axis tiles: blended output slices
        ("paper", (6, 20, 44), 2.5, (2,)),  # the paper's receptive field (context margin 21)
    ],
)
def test_tiled_equals_untiled(config, shape, factor, axes):
    torch.manual_seed(3)
    net = CycleINR(NAMED_CONFIGS[config]).eval()
    torch.nn.init.normal_(net.decoder.output.weight, std=0.05)
    volume = _ct_like(shape).astype(np.float32)
    assert engine.plan_tiles(volume.shape, factor, net, 8 * 2**30).core == volume.shape
    workspace = _workspace_forcing_tiles(volume.shape, factor, net, axes)

    untiled = engine.upsample_array(volume, factor, net, keep_acquired_slices=False, max_memory_gb=8)
    tiled = engine.upsample_array(volume, factor, net, keep_acquired_slices=False,
                                  max_memory_gb=_budget_for(volume.shape, factor, workspace))
    assert np.abs(untiled - tiled).max() <= 1e-5 * np.abs(untiled).max()


@pytest.mark.parametrize("config", ["light", "paper"])
def test_a_tile_decodes_exactly_what_the_whole_volume_does(config):
    """Blending gives a tile's border voxels weights near e^-8, which would hide a context margin
    too narrow by a voxel or two; a tile's own, unblended decode of its core must already equal
    the whole volume's. The encoder's weights are scaled up so that a voxel at its receptive
    radius still counts: at the default initialisation a margin one voxel short of the radius
    changes the result by less than float rounding does, with these weights by 4e-4 (light)."""
    torch.manual_seed(3)
    net = CycleINR(NAMED_CONFIGS[config]).eval()
    torch.nn.init.normal_(net.decoder.output.weight, std=0.05)
    with torch.no_grad():
        for convolution in net.encoder.modules():
            if isinstance(convolution, torch.nn.Conv3d):
                convolution.weight *= 2.5
    radius = net.config.receptive_radius
    size = 2 * radius + 16
    volume = (_ct_like((size,) * 3).astype(np.float32) + 200) / 400
    factor, cpu = 2.5, torch.device("cpu")
    positions = engine.geometry.output_positions(size, factor)
    halo = engine.plan_tiles(volume.shape, factor, net, 8 * 2**30).halo
    start, stop = radius + 4, size - radius - 4  # every side of the core has context to cut
    inside = np.flatnonzero((positions >= start) & (positions <= stop - 1))

    def decode(cores):
        tile = engine._encode_tile(volume, cores, halo, net, cpu)
        local = torch.as_tensor(positions[inside] - tile.origin[0], dtype=torch.float32)
        rows, columns = (slice(start - origin, stop - origin) for origin in tile.origin[1:])
        return net.decode(tile.grid, tile.volume, local)[0, 0][:, rows, columns]

    with torch.inference_mode():
        whole = decode(((0, size),) * 3)
        tiled = decode(((start, stop),) * 3)
    assert (tiled - whole).abs().max() <= 5e-6 * whole.abs().max()  # float rounding (convolutions of other sizes)


def test_cancel_stops_within_a_tile_and_returns_nothing(model):
    volume = _ct_like((10, 30, 30))
    reports = []
    with pytest.raises(UpsampleCancelled):
        engine.upsample_array(volume, 2.0, model, progress=lambda f, m: reports.append(f),
                              should_cancel=lambda: len(reports) >= 1,
                              max_memory_gb=_budget_for(volume.shape, 2.0, _workspace_forcing_tiles(volume.shape, 2.0, model, (1,))))
    assert len(reports) == 1


@pytest.mark.parametrize("flip_ensemble", [False, True])
def test_progress_rises_to_one(model, flip_ensemble):
    reports, messages = [], []
    engine.upsample_array(_ct_like((6, 16, 16)), 3.0, model, flip_ensemble=flip_ensemble,
                          progress=lambda f, m: (reports.append(f), messages.append(m)))
    assert reports == sorted(reports) and reports[-1] == pytest.approx(1.0)
    if flip_ensemble:  # the first pass ends half-way
        assert pytest.approx(0.5) in reports and messages[-1].startswith("pass 2/2")


def test_a_volume_in_one_tile_reports_progress_while_it_decodes(model):
    """The panel's progress bar and the cancel checks need more than one step per tile."""
    volume = _ct_like((12, 16, 16))
    assert engine.plan_tiles(volume.shape, 3.0, model, 8 * 2**30).core == volume.shape
    reports = []
    engine.upsample_array(volume, 3.0, model, progress=lambda fraction, message: reports.append(fraction))
    assert len(set(reports)) >= 10  # 22 of the 34 output slices decoded (12 are copied), in CHUNKS_PER_TILE = 16 chunks


def test_flip_ensemble_averages_the_pass_over_the_reversed_volume():
    """At a fractional factor, across slice-axis tiles: the mean of the model's prediction at
    j / r and its prediction on the reversed volume at D - 1 - j / r."""
    torch.manual_seed(3)
    net = CycleINR(NAMED_CONFIGS["light"]).eval()
    torch.nn.init.normal_(net.decoder.output.weight, std=0.05)
    volume = _ct_like((40, 12, 12)).astype(np.float32)
    factor = 2.5
    positions = torch.as_tensor(engine.geometry.output_positions(volume.shape[0], factor), dtype=torch.float32)
    low, high = net.config.normalization.bounds(volume)
    normalized = torch.from_numpy((volume - low) / (high - low))[None, None]
    with torch.inference_mode():
        forward = net(normalized, positions)[0, 0]
        backward = net(normalized.flip(2), (volume.shape[0] - 1) - positions)[0, 0]
    expected = ((forward + backward) / 2).numpy() * (high - low) + low

    budget = _budget_for(volume.shape, factor, _workspace_forcing_tiles(volume.shape, factor, net, (0,)))
    ensemble = engine.upsample_array(volume, factor, net, keep_acquired_slices=False, flip_ensemble=True,
                                     max_memory_gb=budget + 4 * expected.size / 2**30)
    single = engine.upsample_array(volume, factor, net, keep_acquired_slices=False, max_memory_gb=budget)
    assert np.abs(ensemble - expected).max() <= 1e-4 * np.abs(expected).max()
    assert np.abs(single - ensemble).max() > 100 * np.abs(ensemble - expected).max()


def test_output_keeps_pixel_type_and_acquired_slices(model):
    volume = _ct_like((5, 12, 10))
    volume[0, 0, 0] = 32767  # rounding and clipping must stay within int16
    result = engine.upsample_array(volume, 2.0, model, axis=0, keep_acquired_slices=True)
    assert result.dtype == np.int16 and result.shape == (9, 12, 10)
    assert np.array_equal(result[::2], volume)
    generated = engine.upsample_array(volume, 2.0, model, axis=0, keep_acquired_slices=False)
    assert not np.array_equal(generated[::2], volume)
    assert np.abs(result[1::2].astype(int) - generated[1::2]).max() <= 1  # float rounding at most


@pytest.mark.parametrize("dtype", [np.int32, np.uint32, np.int64, np.float64])
def test_wide_pixel_types_keep_acquired_slices_verbatim_and_clip_at_their_top(dtype):
    """float32 holds neither every int32 value (19999925 came back 19999924) nor its maximum
    (rounded up to 2**31, which wrapped to -2**31 in the cast)."""
    linear = CycleINR(NAMED_CONFIGS["light"]).eval()  # untrained: exactly linear interpolation
    volume = (_ct_like((4, 12, 12)) + 2000).astype(dtype)
    top = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 1e6
    volume[:, 4:8, 4:8] = top
    volume[:, 0, 0] = 19999925 if np.issubdtype(dtype, np.integer) else 1000.123456789012
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflowing cast warns "invalid value encountered in cast"
        result = engine.upsample_array(volume, 2.0, linear, device="cpu")
    assert result.dtype == dtype and np.array_equal(result[::2], volume)
    assert (result[1::2, 4:8, 4:8] >= top * (1 - 1e-6)).all()  # between two maxima: at the top, not wrapped


def test_a_factor_a_hair_below_a_whole_number_decodes_its_last_slice(model):
    """A NIfTI stores 3.3 mm as 3.29999995: a factor of 2.99999998 put the last output slice 1e-7
    past the last input slice, outside every tile, where it stayed undecoded (the normalization's
    low value) with a warning of 0/0."""
    volume = _ct_like((6, 12, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        near = engine.upsample_array(volume, 2.99999998, model, device="cpu", keep_acquired_slices=False)
    exact = engine.upsample_array(volume, 3.0, model, device="cpu", keep_acquired_slices=False)
    assert near.shape == exact.shape and np.abs(near.astype(int) - exact).max() <= 1


def test_integer_outputs_are_clipped_to_the_pixel_type_not_wrapped():
    """A prediction just below 0 on an unsigned MR's zero background must stay 0, not wrap to 65535."""
    from dataclasses import replace

    from CycleINRLib.config import Normalization
    from CycleINRLib.io import to_pixel_type

    assert to_pixel_type(np.array([-0.7, -3.0, 70000.4, 7.5], np.float32), np.uint16).tolist() == [0, 0, 65535, 8]
    assert to_pixel_type(np.array([-40000.0, 40000.0], np.float32), np.int16).tolist() == [-32768, 32767]
    config = replace(NAMED_CONFIGS["light"], normalization=Normalization("percentile", 0.5, 99.5))
    darker = CycleINR(config)
    with torch.no_grad():
        darker.decoder.output.bias.fill_(-0.5)  # half the intensity window below linear interpolation
    mr = np.random.default_rng(5).gamma(4.0, 150.0, (6, 20, 20)).astype(np.uint16)
    mr[:, :, :5] = 0  # background
    result = engine.upsample_array(mr, 2.0, darker)
    assert (result[1::2, :, :5] == 0).all() and result.max() <= mr.max()


def test_intensities_beyond_float32_arithmetic_are_refused_not_written_as_nan(model):
    volume = _ct_like((5, 12, 10)).astype(np.float32) * np.float32(1e25)  # finite, but squares overflow
    with pytest.raises(InputError, match="the result holds NaN or infinite values"):
        engine.upsample_array(volume, 2.0, model)


def test_acquired_slices_that_are_kept_are_not_decoded(model, monkeypatch):
    """At r = 2 half the output slices are copies of the input: decoding them would be wasted."""
    decoded = []
    decode = model.decode
    monkeypatch.setattr(model, "decode", lambda grid, volume, positions: decoded.append(len(positions))
                        or decode(grid, volume, positions))
    for keep in (True, False):
        decoded.clear()
        engine.upsample_array(_ct_like((5, 12, 10)), 2.0, model, keep_acquired_slices=keep)
        assert sum(decoded) == (4 if keep else 9)


def test_other_axis_is_upsampled_in_place(model):
    volume = _ct_like((8, 5, 9))
    result = engine.upsample_array(volume, 2.0, model, axis=1)
    assert result.shape == (8, 9, 9)
    assert np.array_equal(result[:, ::2], volume)


def test_budget_smaller_than_the_arrays_is_refused(model):
    with pytest.raises(InputError, match="memory budget"):
        engine.upsample_array(_ct_like((10, 64, 64)), 4.0, model, max_memory_gb=0.5)


@NEEDS_CUDA
def test_cuda_upsampling_equals_cpu_upsampling(model):
    volume = _ct_like((8, 40, 36))
    on_cpu = engine.upsample_array(volume, 2.5, model, device="cpu")
    on_gpu = engine.upsample_array(volume, 2.5, copy.deepcopy(model), device="cuda")  # the fixture stays on the CPU
    assert on_gpu.dtype == on_cpu.dtype and on_gpu.shape == on_cpu.shape
    assert np.abs(on_gpu.astype(np.int32) - on_cpu).max() <= 2  # HU: rounding, TF32 convolutions


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_stays_within_a_few_hu_of_float32(model, device):
    volume = _ct_like((8, 40, 36))
    exact = engine.upsample_array(volume, 2.5, model, device="cpu")
    fast = engine.upsample_array(volume, 2.5, copy.deepcopy(model), device=device, bf16=True)
    assert fast.dtype == exact.dtype and fast.shape == exact.shape
    assert np.array_equal(fast[::5], exact[::5])  # acquired slices, verbatim
    difference = np.abs(fast.astype(np.int32) - exact)
    assert 0 < difference.max() <= 5 and difference.mean() < 0.5  # HU: bfloat16 did run, and stays close


def test_bf16_is_refused_where_autocast_offers_no_bfloat16(model):
    with pytest.raises(InputError, match="bfloat16 runs on cpu or cuda, not mps"):
        engine.upsample_array(_ct_like((6, 16, 16)), 2.0, model, device=torch.device("mps"), bf16=True)


def test_unavailable_device_is_refused():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(InputError, match="cuda"):
        engine.resolve_device("cuda")


def test_gpu_means_a_gpu_or_an_error():
    """`gpu` (the Slicer panel's choice) never falls back to the CPU as `auto` does."""
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        assert engine.resolve_device("gpu").type in ("cuda", "mps")
        return
    assert engine.resolve_device("auto").type == "cpu"
    with pytest.raises(InputError, match="device gpu requested but torch finds no CUDA or Apple MPS GPU"):
        engine.resolve_device("gpu")


def test_padding_is_kept_where_it_lies_on_both_sides_of_a_new_slice(model):
    """Out-of-field padding (-3024 HU) in the first three slices of one corner, where the
    field of view changes from slice to slice: new slices between two padded voxels keep the
    padding, the others get the model's prediction on the padding seen as air."""
    volume = _ct_like((6, 12, 10))
    padded = volume.copy()
    padded[:3, :4, :4] = -3024
    air = volume.copy()
    air[:3, :4, :4] = -1024
    on_padding = engine.upsample_array(padded, 2.0, model)
    on_air = engine.upsample_array(air, 2.0, model)
    assert (on_padding[:5, :4, :4] == -3024).all()  # output slices 0-4 lie between input slices 0-2
    np.testing.assert_array_equal(on_padding[5:], on_air[5:])
    np.testing.assert_array_equal(on_padding[:, 4:], on_air[:, 4:])
    padded[1, :4, :4] = -2048  # another scanner's padding value: interpolated, each side by its distance
    quarters = engine.upsample_array(padded, 4.0, model)[1:4, :4, :4]
    assert [np.unique(plane).tolist() for plane in quarters] == [[-2780], [-2536], [-2292]]
    # regenerated acquired slices keep their own padding, also where a neighbour has none (slice 3;
    # the first slice too, which the flip ensemble makes the last)
    padded[0, :4, 4:8] = padded[3, :4, :4] = -3024
    regenerated = engine.upsample_array(padded, 2.0, model, keep_acquired_slices=False)
    assert (regenerated[0, :4, 4:8] == -3024).all() and (regenerated[6, :4, :4] == -3024).all()
    flipped = engine.upsample_array(padded, 2.0, model, keep_acquired_slices=False, flip_ensemble=True)
    assert (flipped[0, :4, 4:8] == -3024).all() and (flipped[6, :4, :4] == -3024).all()


def test_percentile_normalization_follows_the_input_and_is_undone():
    """MR weights normalise by the input's own percentiles; the output is back in its units."""
    from dataclasses import replace

    from CycleINRLib.config import Normalization

    config = replace(NAMED_CONFIGS["light"], normalization=Normalization("percentile", 0.5, 99.5))
    mr = np.random.default_rng(5).gamma(4.0, 150.0, (6, 20, 20)).astype(np.uint16)
    low, high = config.normalization.bounds(mr)
    assert (low, high) == tuple(np.percentile(mr, [0.5, 99.5]))
    # An untrained residual model is linear interpolation in any normalisation.
    result = engine.upsample_array(mr, 2.0, CycleINR(config), keep_acquired_slices=False)
    expected = (mr[:-1].astype(np.float64) + mr[1:]) / 2
    assert result.dtype == np.uint16
    assert np.abs(result[1::2].astype(np.float64) - expected).max() <= 0.5 + 1e-3


def test_an_int8_input_is_judged_without_overflow():
    """int8's span of 255 wrapped to -1: a numpy warning, and the wrong answer to "is this CT?"."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert NAMED_CONFIGS["light"].normalization.unexpected_input(np.array([-128, 0, 127], np.int8)) is None
