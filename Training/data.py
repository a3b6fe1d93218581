"""Training pairs drawn on the fly from whole thin-slice volumes.

Volumes are read once and kept in memory (worker processes share them by fork). Every
batch is a pure function of (seed, epoch, index), so a resumed run draws exactly the batches
the uninterrupted run would have, and DDP ranks draw disjoint ones through DistributedSampler.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from CycleINRLib import geometry
from CycleINRLib.config import Normalization
from CycleINRLib.degrade import degrade_at
from CycleINRLib.errors import InputError
from CycleINRLib.io import VOLUME_SUFFIXES, Volume, read_volume, volume_files

from .config import DataConfig

PATCH_TRIES = 10


class DataSourceError(ValueError):
    """data.train or data.val gives nothing to read: reported in one line before any training."""


class TrainingDataWarning(UserWarning):
    """A volume that cannot serve for training; the run goes on without it."""


@dataclass
class TrainingVolume:
    name: str
    array: np.ndarray  # numpy order (k, j, i), stored dtype
    low: float  # intensities mapping to 0 and 1
    high: float
    slice_axis: int  # numpy axis of the acquisition's slices
    truth_axes: tuple[int, ...]  # numpy axes that can serve as the slice axis of a pair


def warnings_in_one_line() -> None:
    """For the command lines: a skipped volume or checkpoint is one line, not Python's default
    of two (the message, then the source line that issued it, which tells a user nothing), and
    none of ITK's multi-line warnings (a listed folder without DICOM files): the skip says why."""
    warnings.formatwarning = lambda message, category, *_: f"{category.__name__}: {message}\n"
    sitk.ProcessObject.SetGlobalWarningDisplay(False)


def volume_paths(source: str | Path) -> list[Path]:
    """Files of a folder (known suffixes), one volume file, or the lines of a list file, relative to it."""
    source = Path(source)
    if source.is_dir():
        for link in sorted(source.iterdir()):
            if (link.is_symlink() and not link.exists() and not link.name.startswith(".")
                    and link.name.lower().endswith(VOLUME_SUFFIXES)):
                warnings.warn(f"skipping {link}: a link to {os.readlink(link)}, which is not there",
                              TrainingDataWarning, stacklevel=2)
        return volume_files(source)
    if source.is_file() and source.name.lower().endswith(VOLUME_SUFFIXES):
        return [source]
    if source.is_file():
        try:
            lines = [line.strip() for line in source.read_text(encoding="utf-8-sig").splitlines()]  # a BOM from Notepad
        except (OSError, UnicodeDecodeError):
            raise DataSourceError(f"{source}: neither a volume file ({', '.join(VOLUME_SUFFIXES)}) "
                                  "nor a text file listing volumes") from None
        listed = {}
        for line in lines:
            if line and not line.startswith("#"):
                path = source.parent / line
                real = os.path.realpath(path)  # not Path.resolve, which raises on a link that loops
                if real in listed:
                    warnings.warn(f"{source}: {line} is listed twice; reading it once", TrainingDataWarning, stacklevel=2)
                listed.setdefault(real, path)
        return list(listed.values())
    raise DataSourceError(f"{source}: no such folder, volume file or list file")


def named_source(setting: str, load, *arguments):
    """`load(*arguments)`, its DataSourceError naming the setting that gave the data (data.val)."""
    try:
        return load(*arguments)
    except DataSourceError as error:
        raise DataSourceError(f"{setting}: {error}") from None


def read_or_skip(path: Path, purpose: str) -> Volume | None:
    """The volume, or None after a warning: one bad file must not end a multi-hour run."""
    try:
        return read_volume(path)
    except InputError as error:
        warnings.warn(f"skipping {purpose} volume: {error}", TrainingDataWarning, stacklevel=3)
        return None


def max_pair_depth(config: DataConfig) -> int:
    """Thin slices a pair needs at the largest scale: the HR patch plus the thick box margin."""
    return (config.lr_slices - 1) * math.ceil(config.scale_max) + 1 + 2 * _margin(config.scale_max)


def _margin(scale: float) -> int:
    return math.ceil(scale / 2)


def load_volumes(source: str | Path, config: DataConfig, normalization: Normalization) -> list[TrainingVolume]:
    """Read every volume once; report and skip those that cannot give a training pair."""
    volumes = []
    depth = max_pair_depth(config)
    paths = volume_paths(source)
    for path in paths:
        volume = read_or_skip(path, "training")
        if volume is None:
            continue
        if volume.array.min() == volume.array.max():
            warnings.warn(f"skipping training volume {path}: every voxel is {volume.array.min()}", TrainingDataWarning,
                          stacklevel=2)
            continue
        if unexpected := normalization.unexpected_input(volume.array):
            warnings.warn(f"skipping training volume {path}: {unexpected}, and the model's intensity window is CT's",
                          TrainingDataWarning, stacklevel=2)
            continue
        spacing = volume.spacing[::-1]  # numpy axis order
        slice_axis = 2 - geometry.slice_axis(volume.spacing)
        truth_axes = tuple(
            axis for axis in range(3)
            if spacing[axis] <= config.max_truth_spacing_mm + 1e-6
            and volume.array.shape[axis] >= depth
            and min(n for a, n in enumerate(volume.array.shape) if a != axis) >= config.patch_size
        )
        if not truth_axes:
            warnings.warn(
                f"skipping training volume {path}: size {volume.array.shape[::-1]} spacing "
                f"{tuple(round(s, 3) for s in volume.spacing)} has no axis with >= {depth} slices at "
                f"<= {config.max_truth_spacing_mm} mm and a {config.patch_size}x{config.patch_size} cross-section",
                TrainingDataWarning, stacklevel=2,
            )
            continue
        array = normalization.raise_to_floor(volume.array)  # as cycleinr upsample sees it: padding is air
        low, high = normalization.bounds(array)
        volumes.append(TrainingVolume(path.name, array, low, high, slice_axis, truth_axes))
    if not volumes:
        raise DataSourceError(f"{source}: no usable training volume "
                              f"({'see the warnings above' if paths else 'no ' + ', '.join(VOLUME_SUFFIXES) + ' files there'})")
    return volumes


class PairBatches(Dataset):
    """Item (epoch, index) -> one batch of LR/HR pairs sharing a scale and a degradation.

    A batch shares its scale because the model's query positions are shared by the batch.
    """

    def __init__(self, volumes: list[TrainingVolume], config: DataConfig, seed: int):
        self.volumes, self.config, self.seed = volumes, config, seed
        self.modes = sorted(config.degradations)
        weights = np.array([config.degradations[m] for m in self.modes], dtype=float)
        self.mode_weights = weights / weights.sum()

    def __len__(self) -> int:
        return self.config.batches_per_epoch

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        rng = np.random.default_rng([self.seed, epoch, index])
        config = self.config
        tenths = rng.integers(round(config.scale_min * 10), round(config.scale_max * 10) + 1)
        scale = float(tenths) / 10.0
        mode = self.modes[rng.choice(len(self.modes), p=self.mode_weights)]
        pairs = [self._pair(rng, scale, mode) for _ in range(config.batch_size)]
        low, high = (torch.from_numpy(np.stack(part)[:, None]) for part in zip(*pairs))
        return {"lr": low, "hr": high, "scale": scale, "mode": mode}

    def _pair(self, rng: np.random.Generator, scale: float, mode: str) -> tuple[np.ndarray, np.ndarray]:
        """A normalized (LR, HR) pair, slice axis first, flipped and transposed at random."""
        config = self.config
        hr_slices = geometry.output_slice_count(config.lr_slices, scale)
        margin = _margin(scale)
        for _ in range(PATCH_TRIES):
            volume = self.volumes[rng.integers(len(self.volumes))]
            inplane = [a for a in volume.truth_axes if a != volume.slice_axis]
            use_inplane = bool(inplane) and (volume.slice_axis not in volume.truth_axes or rng.random() < config.inplane_probability)
            axis = int(rng.choice(inplane)) if use_inplane else volume.slice_axis
            block = _random_block(rng, volume.array, axis, hr_slices + 2 * margin, config.patch_size)
            block = (block.astype(np.float32) - volume.low) / (volume.high - volume.low)
            if block[margin:margin + hr_slices].std() >= config.min_patch_std:
                break
        # The block is flipped, margins and all, before the pair is cut from it: flipping the
        # cut LR and HR patches instead would put a reversed LR slice i at i*r - frac((n-1)r),
        # not at the i*r the model is told (up to 0.9 HR slices off at fractional scales).
        for dim in range(3):
            if rng.random() < 0.5:
                block = np.flip(block, dim)
        if rng.random() < 0.5:
            block = block.transpose(0, 2, 1)
        high = block[margin:margin + hr_slices]
        low = degrade_at(block, margin + np.arange(config.lr_slices) * scale, scale, axis=0, mode=mode)
        return np.ascontiguousarray(low), np.ascontiguousarray(high)


def _random_block(rng: np.random.Generator, array: np.ndarray, axis: int, depth: int, size: int) -> np.ndarray:
    """A (depth, size, size) block with numpy `axis` moved first, at a random place."""
    moved = np.moveaxis(array, axis, 0)
    starts = [rng.integers(n - extent + 1) for n, extent in zip(moved.shape, (depth, size, size))]
    return moved[starts[0]:starts[0] + depth, starts[1]:starts[1] + size, starts[2]:starts[2] + size]


def batch_stream(dataset: PairBatches, rank: int, world_size: int, start_step: int, workers: int, pin_memory: bool):
    """Endless batches from step `start_step` on, the same ones an uninterrupted run draws."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=dataset.seed, drop_last=True)
    epoch, skip = divmod(start_step, len(sampler))
    while True:
        sampler.set_epoch(epoch)
        keys = [(epoch, index) for index in list(sampler)[skip:]]
        # Its own generator: worker seeds must not consume the global torch RNG, which a
        # resumed run would otherwise find in another state (one draw per loader created).
        loader = DataLoader(dataset, batch_size=None, sampler=keys, num_workers=workers, pin_memory=pin_memory,
                            generator=torch.Generator().manual_seed(dataset.seed + epoch))
        yield from loader
        epoch, skip = epoch + 1, 0
