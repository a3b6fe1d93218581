"""Memory-bounded, tiled CycleINR inference on the output grid of geometry.py.

Tiles overlap in all three axes and are blended with a Gaussian window (the paper's
sliding-window inference). Each tile also reads a context margin as wide as the encoder's
receptive field plus the sampling neighbourhood, so every tile computes exactly what the
whole-volume network would: the tiled result equals the untiled one to float precision.
The Gaussian windows are separable and normalised per axis, so blending needs no weight
volume: peak memory is the input and output arrays plus a per-tile workspace that the
memory budget bounds.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import geometry, noise_matching
from .config import DEVICES
from .errors import InputError, UpsampleCancelled
from .io import Volume, to_pixel_type
from .models import CycleINR
from .models.cycleinr import decode_block_pixels, inference_memory_format
from .models.latent_sampling import LatentGrid

DEFAULT_MAX_MEMORY_GB = 6.0
MAX_MEMORY_GB = 65536.0  # more than any machine has: a bound, not a limit
RUNTIME_BYTES = 500 * 2**20  # Python, torch, SimpleITK and the model (measured 345 MB), counted in the budget
MIN_CORE = 8  # smallest tile core (low-resolution voxels per axis) worth its context margin
TILE_OVERLAP = 2  # low-resolution voxels shared by neighbouring tile cores
GAUSSIAN_SIGMA_FRACTION = 1 / 8  # of the tile size, as in nnU-Net's sliding window
SAMPLING_MARGIN = 2  # the lerp's upper slice and the attention's +-1 neighbour
CHUNKS_PER_TILE = 16  # decode chunks a tile is cut into at least: progress reports and cancel checks
BF16_DEVICES = ("cpu", "cuda")  # where torch.autocast offers bfloat16 here
FILL_SHARE = 0.01  # of a volume's voxels at its lowest value, from which that value is a fill kept as it is


ProgressCallback = Callable[[float, str], None]
CancelCheck = Callable[[], bool]


def resolve_device(name: str = "auto") -> torch.device:
    """auto: CUDA, then Apple MPS, then CPU; gpu: CUDA, then Apple MPS, or an error. An
    explicit device must exist."""
    if name in ("auto", "gpu"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        if name == "gpu":
            raise InputError("device gpu requested but torch finds no CUDA or Apple MPS GPU; use cpu or auto")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda requested but no CUDA GPU is available to torch")
    if name == "mps" and not torch.backends.mps.is_available():
        raise InputError("device mps requested but Apple MPS is not available to torch")
    if name not in DEVICES:
        raise InputError(f"device must be one of {', '.join(DEVICES)}, not {name!r}")
    return torch.device(name)


@dataclass(frozen=True)
class TilePlan:
    """How a (D, H, W) low-resolution volume is cut: cores, context margin, decode chunks."""

    core: tuple[int, int, int]
    halo: int
    slices_per_chunk: int  # the most output slices the workspace holds beside the tile
    workspace_bytes: int

    def tiles(self, shape: tuple[int, int, int]) -> list[list[tuple[int, int]]]:
        return [_axis_tiles(length, core) for length, core in zip(shape, self.core)]


def _axis_tiles(length: int, core: int) -> list[tuple[int, int]]:
    """Core intervals [start, stop) covering 0..length-1, neighbours sharing TILE_OVERLAP."""
    if core >= length:
        return [(0, length)]
    starts = list(range(0, length - core, core - TILE_OVERLAP)) + [length - core]
    return [(start, start + core) for start in starts]


def _blend_weights(tiles: list[tuple[int, int]], coordinates: np.ndarray) -> list[np.ndarray]:
    """Per tile, Gaussian weights over the coordinates it covers, normalised to sum to one."""
    raw = []
    for start, stop in tiles:
        centre, sigma = (start + stop - 1) / 2, max((stop - start) * GAUSSIAN_SIGMA_FRACTION, 0.5)
        inside = (coordinates >= start) & (coordinates <= stop - 1 + 1e-9)
        raw.append(np.where(inside, np.exp(-0.5 * ((coordinates - centre) / sigma) ** 2), 0.0))
    total = np.sum(raw, axis=0)
    return [(weights / total).astype(np.float32) for weights in raw]


@dataclass(frozen=True)
class _MemoryModel:
    """Workspace bytes of what a tile holds at once, from the model's sizes.

    The model decodes the output slices nearest to one acquired slice together, a block of
    pixels at a time (`decode_block_pixels`; whole planes on a GPU): only that block's
    neighbourhoods and activations are alive, beside the tile's latent grid and the chunk's
    decoded slices. The terms count the tensors alone; MEMORY_SAFETY_FACTOR covers what they
    miss (oneDNN buffers, allocator fragmentation). benchmarks/upsample_bench.py reports
    measured peaks.
    """

    per_tile_voxel: int  # encoder activations, then the latent grid kept while decoding
    per_plane_pixel: int  # the neighbourhoods' in-plane rows and validity, made once per plane
    per_block_pixel: int  # one pixel's gathered 27-neighbourhoods of keys and values, their validity
    per_query: int  # one output voxel of a block through attention and the decoder
    per_output_voxel: int = 16  # a chunk's decoded slices, its linear base, the core's copy and its blend

    @classmethod
    def of(cls, model: CycleINR) -> "_MemoryModel":
        config = model.config
        latent = config.latent_dim
        encoding = 4 * config.encoder_width + latent  # the activations, then the latent they end in
        attention_inputs = (5 if config.attention else 2) * latent  # the latent, its cropped or reordered copy, Q, K, V
        per_tile_voxel = 4 * (max(encoding, attention_inputs) + 2)  # + the tile's intensities and their crop
        per_plane_pixel = 6 * 8 * 27 if config.attention else 0  # int64 rows and their temporaries
        per_block_pixel = 4 * (2 * 27 * latent + 2 * 27) + 8 * 27 if config.attention else 0
        per_query = 4 * ((7 * latent + 60 if config.attention else 3 * latent) + 2 * (latent + 1)
                         + (2 * latent if config.attention_residual else 0)
                         + 3 * config.decoder_width)
        return cls(per_tile_voxel, per_plane_pixel, per_block_pixel, per_query)


MEMORY_SAFETY_FACTOR = 1.2  # measured CPU peaks stayed below the tensor estimate itself


def plan_tiles(shape: tuple[int, int, int], factor: float, model: CycleINR, workspace_bytes: int,
               device: torch.device = torch.device("cpu")) -> TilePlan:
    """Largest tiles whose latent grid, one decoding block and one output slice fit the workspace."""
    halo = model.config.receptive_radius + SAMPLING_MARGIN
    memory = _MemoryModel.of(model)
    usable = workspace_bytes / MEMORY_SAFETY_FACTOR
    decoded_together = math.ceil(factor) + 1  # output slices nearest to one acquired slice, at most
    core = list(shape)
    while True:
        padded = [min(c + 2 * halo, n) for c, n in zip(core, shape)]
        pixels = min(core[1] + 2, shape[1]) * min(core[2] + 2, shape[2])
        block = min(pixels, decode_block_pixels(device) or pixels)
        tile = (memory.per_tile_voxel * math.prod(padded) + memory.per_plane_pixel * pixels
                + block * (memory.per_block_pixel + decoded_together * memory.per_query))
        one_slice = memory.per_output_voxel * pixels
        if tile + one_slice <= usable:
            break
        shrinkable = [axis for axis in range(3) if core[axis] > MIN_CORE]
        if not shrinkable:
            needed = (tile + one_slice) * MEMORY_SAFETY_FACTOR + RUNTIME_BYTES
            raise InputError(
                f"memory budget too small: even the smallest tile needs {needed / 2**30:.1f} GB "
                "beyond the input and output arrays; raise --max-memory"
            )
        largest = max(shrinkable, key=lambda axis: padded[axis])
        # half, plus the overlap: two tiles then cover what one did (a plain half needs a third)
        core[largest] = max(MIN_CORE, math.ceil((core[largest] + TILE_OVERLAP) / 2))
    chunk = int(max(1, (usable - tile) // one_slice))
    return TilePlan(tuple(core), halo, chunk, workspace_bytes)


def array_bytes(input_shape: tuple[int, int, int], output_slices: int, dtype: np.dtype, flip_ensemble: bool = False) -> int:
    """Host memory of the arrays that exist whatever the tiling: the input and its float32
    copy, the float32 accumulator (two with the flip ensemble) and the result in the input's
    pixel type."""
    itemsize = np.dtype(dtype).itemsize
    output_voxels = output_slices * input_shape[1] * input_shape[2]
    accumulators = 2 if flip_ensemble else 1
    return (4 + itemsize) * math.prod(input_shape) + (4 * accumulators + itemsize) * output_voxels


def check_memory_budget(shape: tuple[int, int, int], factor: float, dtype: np.dtype, max_memory_gb: float,
                        flip_ensemble: bool = False) -> int:
    """Refuse a budget that cannot hold the arrays; return the bytes left for tiles.

    `shape` puts the slice axis first.
    """
    output_slices = geometry.output_slice_count(shape[0], factor)
    arrays = array_bytes(shape, output_slices, dtype, flip_ensemble)
    fixed = arrays + RUNTIME_BYTES
    budget = int(max_memory_gb * 2**30)
    if fixed >= budget:
        raise InputError(
            f"{shape[0]} -> {output_slices} slices of {shape[1]}x{shape[2]} voxels need {arrays / 2**30:.2f} GB "
            f"for the input and output arrays and {RUNTIME_BYTES / 2**30:.1f} GB for Python and torch, more than "
            f"the memory budget of {max_memory_gb:g} GB; raise --max-memory"
        )
    return budget - fixed


def upsample_array(
    array: np.ndarray,
    factor: float,
    model: CycleINR,
    axis: int = 0,
    device: str | torch.device = "auto",
    keep_acquired_slices: bool = True,
    max_memory_gb: float = DEFAULT_MAX_MEMORY_GB,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    match_noise: bool = False,
    flip_ensemble: bool = False,
    bf16: bool = False,
) -> np.ndarray:
    """Upsample numpy `axis` of `array` by `factor`; same dtype, output grid of geometry.py.

    `match_noise` adds synthetic noise to the generated slices up to the acquired slices'
    noise level (noise_matching.py; off by default). `flip_ensemble` averages the prediction
    with that of a second pass over the slice-reversed volume (twice the time; see
    README). `bf16` runs the network under bfloat16 autocast: 1.7 to 1.9 times faster on a CPU with
    AMX, PSNR within 0.01 dB of float32 (README, "Speed and memory"). Raises InputError when the
    budget cannot hold the arrays, UpsampleCancelled when `should_cancel()` turns true
    (checked before every tile and decode chunk).
    """
    factor = geometry.check_factor(factor)
    device = device if isinstance(device, torch.device) else resolve_device(device)
    if bf16 and device.type not in BF16_DEVICES:
        raise InputError(f"bfloat16 runs on {' or '.join(BF16_DEVICES)}, not {device.type}")
    slices_first = np.moveaxis(array, axis, 0)
    shape = slices_first.shape
    positions = geometry.output_positions(shape[0], factor)
    workspace = check_memory_budget(shape, factor, array.dtype, max_memory_gb, flip_ensemble)
    plan = plan_tiles(shape, factor, model, _device_workspace(device, workspace), device)

    normalization = model.config.normalization
    low, high = normalization.bounds(slices_first)
    # in place from here: no volume-sized temporaries (but a copy where CT padding is raised)
    normalized = normalization.raise_to_floor(slices_first).astype(np.float32)
    normalized -= low
    normalized /= high - low
    decoded = np.ones(len(positions), dtype=bool)
    if keep_acquired_slices:  # copied from the input below: decoding them is wasted work (half of it at r = 2)
        decoded[[out_index for out_index, _ in geometry.acquired_slice_matches(shape[0], factor)]] = False
    if flip_ensemble:
        result = _run_tiles(normalized, positions, decoded, model, plan, device, _pass_progress(progress, 0),
                            should_cancel, bf16)
        # The reversed volume's slice i is slice D-1-i: it is sampled at D-1-j/r, the same places.
        result += _run_tiles(normalized[::-1], (shape[0] - 1) - positions, decoded, model, plan, device,
                             _pass_progress(progress, 1), should_cancel, bf16)
        result *= 0.5
    else:
        result = _run_tiles(normalized, positions, decoded, model, plan, device, progress, should_cancel, bf16)
    del normalized
    result *= high - low
    result += low
    if not all(np.isfinite(output_slice).all() for output_slice in result):  # slice by slice: no volume-sized mask
        raise InputError(f"the result holds NaN or infinite values: input intensities from {slices_first.min():g} to "
                         f"{slices_first.max():g} are beyond what float32 arithmetic in the model holds")
    _keep_background(result, slices_first, positions, normalization.floor)
    if match_noise:
        noise_matching.add_missing_noise(result, slices_first, factor)
    output = to_pixel_type(result, array.dtype)
    if keep_acquired_slices:  # after the cast, verbatim: float32 does not hold every int32 or float64 value
        for out_index, in_index in geometry.acquired_slice_matches(shape[0], factor):
            output[out_index] = slices_first[in_index]
    return np.moveaxis(output, 0, axis)


def _keep_background(result: np.ndarray, slices: np.ndarray, positions: np.ndarray, floor: float | None) -> None:
    """Give output voxels between two acquired background voxels their linear interpolation.

    Background is padding below `floor` outside a CT's field of view (README, "Upsampling your
    own volume"), which the network saw as air, or else the volume's lowest value where it fills
    at least FILL_SHARE of it (an MR's zero fill, which the CT weights would turn into -1 and -2;
    not the one darkest voxel of continuous data, nor a CT's air at the floor): the output keeps
    it as it was.
    """
    lowest = slices.min()
    if floor is not None and lowest < floor:
        padding = True
    elif (floor is None or lowest > floor) and \
            sum(np.count_nonzero(plane == lowest) for plane in slices) >= FILL_SHARE * slices.size:
        padding = False
    else:
        return

    def background(plane: np.ndarray) -> np.ndarray:
        return plane < floor if padding else plane == lowest

    lower = np.minimum(np.floor(positions).astype(int), len(slices) - 1)
    upper = np.minimum(lower + 1, len(slices) - 1)
    for out_slice, below, above, weight in zip(result, lower, upper, positions - lower):
        # on an acquired slice (--no-keep-acquired-slices) its own background is enough
        if weight < geometry.COINCIDENCE_TOLERANCE:
            outside, weight = background(slices[below]), 0.0
        elif weight > 1 - geometry.COINCIDENCE_TOLERANCE:
            outside, weight = background(slices[above]), 1.0
        else:
            outside = background(slices[below]) & background(slices[above])
        if outside.any():
            out_slice[outside] = (1 - weight) * slices[below][outside] + weight * slices[above][outside]


def _pass_progress(progress: ProgressCallback | None, index: int) -> ProgressCallback | None:
    """Progress of one of the flip ensemble's two passes as a share of the whole."""
    if progress is None:
        return None
    return lambda fraction, text: progress((index + fraction) / 2, f"pass {index + 1}/2, {text}")


def _device_workspace(device: torch.device, host_workspace: int) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return min(host_workspace, int(0.8 * free))
    return host_workspace


def _run_tiles(volume, positions, decoded, model, plan, device, progress, should_cancel, bf16) -> np.ndarray:
    """Blend every tile's exact prediction of the output slices where `decoded` (M,) is true
    into a float32 (M, H, W) accumulator (the others stay 0)."""
    shape = volume.shape
    depth_tiles, row_tiles, column_tiles = plan.tiles(shape)
    depth_weights = _blend_weights(depth_tiles, positions)
    row_weights = _blend_weights(row_tiles, np.arange(shape[1], dtype=float))
    column_weights = _blend_weights(column_tiles, np.arange(shape[2], dtype=float))
    result = np.zeros((len(positions),) + shape[1:], dtype=np.float32)

    jobs = [(d, r, c) for d in range(len(depth_tiles)) for r in range(len(row_tiles)) for c in range(len(column_tiles))]
    model = model.to(device).eval()
    with _inference_layout(model, device), torch.inference_mode(), \
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for done, (d, r, c) in enumerate(jobs):
            _check_cancel(should_cancel)
            slices = np.flatnonzero((depth_weights[d] > 0) & decoded)
            if not len(slices):
                continue
            cores = (depth_tiles[d], row_tiles[r], column_tiles[c])
            weights = (depth_weights[d], row_weights[r][cores[1][0]:cores[1][1]], column_weights[c][cores[2][0]:cores[2][1]])
            tile = None  # free the previous tile's latent grid before encoding the next
            tile = _encode_tile(volume, cores, plan.halo, model, device)
            # at most slices_per_chunk (memory), at least CHUNKS_PER_TILE chunks (progress, cancel)
            chunks = np.array_split(slices, max(math.ceil(len(slices) / plan.slices_per_chunk),
                                                min(CHUNKS_PER_TILE, len(slices))))
            for chunk_done, chunk in enumerate(chunks, start=1):
                _check_cancel(should_cancel)
                _decode_chunk(tile, chunk, positions, cores, weights, model, result)
                if progress:
                    progress((done + chunk_done / len(chunks)) / len(jobs), f"tile {done + 1}/{len(jobs)}")
    return result


@contextlib.contextmanager
def _inference_layout(model: CycleINR, device: torch.device):
    """The encoder's weights in the layout inference runs fastest with on `device`, for the
    run only: a training run validates with its own model, and its next steps must see the
    layout a resumed run starts from, or resuming would not reproduce the run."""
    memory_format = inference_memory_format(device)
    model.to(memory_format=memory_format)
    try:
        yield
    finally:
        if memory_format != torch.contiguous_format:
            model.to(memory_format=torch.contiguous_format)


def _check_cancel(should_cancel: CancelCheck | None) -> None:
    if should_cancel is not None and should_cancel():
        raise UpsampleCancelled("upsampling cancelled")


@dataclass
class _EncodedTile:
    grid: LatentGrid  # cropped in-plane to the core plus one voxel of neighbours
    volume: torch.Tensor  # the intensities under the same crop
    origin: tuple[int, int, int]  # low-resolution index of the crop's first voxel


def _encode_tile(volume, cores, halo, model, device) -> _EncodedTile:
    """Encode the core plus its context margin, then keep what the core's decoding reads."""
    read = [(max(start - halo, 0), min(stop + halo, length)) for (start, stop), length in zip(cores, volume.shape)]
    block = torch.from_numpy(np.ascontiguousarray(volume[tuple(slice(a, b) for a, b in read)])).to(device)
    block = block[None, None]
    keep = [(max(start - 1, a), min(stop + 1, b)) for (start, stop), (a, b) in zip(cores[1:], read[1:])]
    rows, columns = (slice(low - a, high - a) for (low, high), (a, _) in zip(keep, read[1:]))
    return _EncodedTile(model.encode(block, rows, columns), block[..., rows, columns], (read[0][0], keep[0][0], keep[1][0]))


def _decode_chunk(tile: _EncodedTile, chunk, positions, cores, weights, model, result) -> None:
    local = torch.as_tensor(positions[chunk] - tile.origin[0], dtype=torch.float32)
    predicted = model.decode(tile.grid, tile.volume, local)[0, 0]
    (_, _), (row_start, row_stop), (column_start, column_stop) = cores
    rows = slice(row_start - tile.origin[1], row_stop - tile.origin[1])
    columns = slice(column_start - tile.origin[2], column_stop - tile.origin[2])
    core = predicted[:, rows, columns].float().cpu().numpy()
    depth_weights, row_weights, column_weights = weights
    blend = depth_weights[chunk, None, None] * row_weights[None, :, None] * column_weights[None, None, :]
    result[chunk, row_start:row_stop, column_start:column_stop] += core * blend


def upsample_volume(
    volume: Volume,
    model: CycleINR,
    factor: float | None = None,
    target_spacing: float | None = None,
    axis: int | None = None,
    **options,
) -> Volume:
    """Upsample a Volume along ITK axis `axis` (auto: the coarsest) by a factor or to a spacing.

    `options` are those of upsample_array (device, keep_acquired_slices, max_memory_gb,
    progress, should_cancel, match_noise, flip_ensemble, bf16). Origin and direction are kept; see geometry.py.
    """
    if (factor is None) == (target_spacing is None):
        raise InputError("give exactly one of a factor or a target slice spacing")
    axis = geometry.slice_axis(volume.spacing, axis)
    if factor is None:
        factor = geometry.factor_for_spacing(volume.spacing[axis], target_spacing)
    factor = geometry.check_factor(factor)
    array = upsample_array(volume.array, factor, model, axis=2 - axis, **options)
    _, spacing = geometry.output_size_and_spacing(volume.size, volume.spacing, axis, factor)
    return Volume(array, spacing, volume.origin, volume.direction)
