"""Training settings as explicit dataclasses, read from YAML; the whole config travels in
every checkpoint so a run can be resumed or reproduced from its files alone."""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from CycleINRLib.checkpoint import WeightsError, read_config
from CycleINRLib.config import DEVICES, NAMED_CONFIGS, ModelConfig, typed_setting
from CycleINRLib.degrade import DEGRADATIONS
from CycleINRLib.errors import InputError
from CycleINRLib.evaluate import parse_case

from .losses import PIXEL_LOSSES


@dataclass
class DataConfig:
    train: str = "../shared/data/ct/train"  # folder of volumes, one volume file, or a text file listing them
    val: str | None = "../shared/data/ct/val"  # null: no validation
    lr_slices: int = 6  # low-resolution slices per training patch (the HR patch has ~lr_slices * r)
    patch_size: int = 48  # in-plane rows and columns of a patch
    batch_size: int = 4  # patches per step and per process; one batch shares its scale
    scale_min: float = 2.0
    scale_max: float = 6.0  # scales are drawn with one decimal in [scale_min, scale_max] (paper)
    degradations: dict = field(default_factory=lambda: {"interval": 0.8, "thick": 0.2})
    inplane_probability: float = 0.3  # chance that a pair takes an in-plane axis as its slice axis
    max_truth_spacing_mm: float = 2.5  # an axis serves as high-resolution truth only if this thin
    min_patch_std: float = 0.01  # redraw (up to 10 times) patches flatter than this: air, padding
    batches_per_epoch: int = 1000  # a virtual epoch: patches are drawn on the fly
    workers: int = 2

    def __post_init__(self):
        if not (_finite(self.scale_min) and _finite(self.scale_max) and 1.0 < self.scale_min <= self.scale_max):
            raise ValueError(f"need finite 1 < scale_min <= scale_max, not {self.scale_min} and {self.scale_max}")
        if any(abs(scale * 10 - round(scale * 10)) > 1e-6 for scale in (self.scale_min, self.scale_max)):
            raise ValueError("scale_min and scale_max must be whole tenths (scales are drawn with one decimal, as in "
                             f"the paper), not {self.scale_min} and {self.scale_max}")
        weights = self.degradations.values()
        if (set(self.degradations) - set(DEGRADATIONS) or not all(_finite(w) and w >= 0 for w in weights)
                or not sum(weights) > 0):
            raise ValueError(f"degradations must give some of {DEGRADATIONS} weights >= 0, not all 0; got {self.degradations}")
        if self.lr_slices < 2 or self.patch_size < 4 or self.batch_size < 1:
            raise ValueError("lr_slices >= 2, patch_size >= 4 and batch_size >= 1 are needed")
        if not 0 <= self.inplane_probability <= 1:
            raise ValueError(f"inplane_probability must lie in [0, 1], not {self.inplane_probability}")
        if not (self.max_truth_spacing_mm > 0 and self.min_patch_std >= 0 and self.batches_per_epoch >= 1 and self.workers >= 0):
            raise ValueError("max_truth_spacing_mm > 0, min_patch_std >= 0, batches_per_epoch >= 1 and workers >= 0 are needed")


@dataclass
class OptimConfig:
    steps: int = 200_000
    # Batches per optimizer step (gradient accumulation): a step sees accumulate x
    # data.batch_size patches per process, each batch at its own scale, in the memory of one.
    accumulate: int = 1
    lr: float = 1e-4
    lr_halve_every: int = 40_000  # steps; the paper halves every 200 of its 3000 epochs (ct.yaml: 20k of 300k)
    grad_clip: float = 1.0
    cycle_weight: float = 1.0  # lambda of eq. 9; 0 trains without the cycle-consistent loss
    pixel_loss: str = "l1"  # of both terms: "l1" (paper eq. 7-8) or "l2" (see README, section Training)
    noise_weight: float = 0.0  # weight of the noise-level term (not in the paper; README, section Training); 0: off
    amp: bool = True  # bfloat16 autocast on CUDA
    # bfloat16 autocast on the CPU too: 1.7 times faster steps on a CPU with AMX (README,
    # section Speed), slower on one that emulates bfloat16.
    cpu_amp: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.lr_halve_every < 1 or self.accumulate < 1:
            raise ValueError("optim.steps, optim.lr_halve_every and optim.accumulate must be at least 1")
        # A negative clip norm would flip the gradient's sign; inf or nan would end in nan weights.
        if not (_finite(self.lr) and self.lr >= 0 and _finite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"optim.lr must be finite and >= 0, optim.grad_clip finite and > 0, not {self.lr} and {self.grad_clip}")
        for name in ("cycle_weight", "noise_weight"):
            if not (_finite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be finite and >= 0, not {getattr(self, name)}")
        if self.pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"pixel_loss must be one of {sorted(PIXEL_LOSSES)}, not {self.pixel_loss!r}")
        if not 0 <= self.seed < MAX_SEED:  # it and seed + epoch seed numpy and torch generators
            raise ValueError(f"seed must be a whole number in [0, 2^32), not {self.seed}")

    def autocast(self, device_type: str) -> bool:
        """Whether steps on `device_type` run under bfloat16 autocast."""
        return self.amp and (device_type == "cuda" or (device_type == "cpu" and self.cpu_amp))


@dataclass
class RunConfig:
    out_dir: str = "runs/ct"
    device: str = "auto"
    threads: int = 0  # torch CPU threads per process; 0 keeps torch's default
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 20
    val_every: int = 2000
    val_crop: list | None = field(default_factory=lambda: [96, 160, 160])  # slices, rows, cols; null: whole volume
    val_cases: list = field(default_factory=lambda: ["2:2", "3:3", "5:5", "5:2.5"])  # keep-every:factor
    init_weights: str | None = None  # start from this weights file (fine-tuning) instead of random; unused on resume
    recompute_slices: int = 0  # decode HR slices this many at a time, recomputed in backward (less memory); 0: off

    def __post_init__(self):
        if min(self.checkpoint_every, self.keep_checkpoints, self.log_every, self.val_every) < 1:
            raise ValueError("run.checkpoint_every, run.keep_checkpoints, run.log_every and run.val_every must be at least 1")
        if self.recompute_slices < 0 or self.threads < 0:
            raise ValueError(f"recompute_slices and threads must be >= 0, not {self.recompute_slices} and {self.threads}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {self.device!r}")
        if self.val_crop is not None and (len(self.val_crop) != 3 or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= MIN_VAL_CROP for n in self.val_crop)):
            raise ValueError(f"val_crop must be null or 3 whole numbers >= {MIN_VAL_CROP} (slices, rows, columns), "
                             f"not {self.val_crop}")
        if not self.val_cases:
            raise ValueError('val_cases must name at least one case, e.g. ["2:2"]')
        for case in self.val_cases:
            if isinstance(case, int):  # YAML 1.1 reads an unquoted 5:5 as the base-60 number 305
                raise ValueError(f'val_cases: write each case in quotes, e.g. "5:5" (YAML reads one unquoted as the '
                                 f"number {case})")
            try:
                parse_case(str(case))
            except InputError as error:
                raise ValueError(f"val_cases: {error}") from None


MIN_VAL_CROP = 8  # SSIM's 7 x 7 window needs that much in-plane; fewer slices fail a case's own check
MAX_SEED = 2**32


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# What a resumed run may change in data and optim without becoming another run: its length, the
# arithmetic's precision, loading, and where the data lie (the volumes themselves are compared by
# name); run (device, validation, bookkeeping) is free. Anything else changes the batches or the
# updates, and an optimizer or schedule change would be overwritten by the checkpoint's.
RESUMABLE_CHANGES = {"optim.steps", "optim.amp", "optim.cpu_amp", "data.workers", "data.train", "data.val"}


@dataclass
class TrainConfig:
    model: str = "paper"  # a name from CycleINRLib.config.NAMED_CONFIGS
    model_overrides: dict = field(default_factory=dict)  # e.g. {attention: false} for the LAM ablation
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        if self.model not in NAMED_CONFIGS:
            raise ValueError(f"model must be one of {sorted(NAMED_CONFIGS)}, not {self.model!r}")
        model_config = self.model_config()  # unknown or invalid overrides fail at load time, not after hours
        if self.run.init_weights:
            try:
                start, _ = read_config(Path(self.run.init_weights))
            except WeightsError as error:
                raise ValueError(f"run.init_weights: {error}") from None
            if start != model_config:
                raise ValueError(f"run.init_weights {self.run.init_weights} holds a different model than this run's "
                                 f"{self.model!r} with {self.model_overrides or 'no overrides'}")

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict({**NAMED_CONFIGS[self.model].to_dict(), **self.model_overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    def resume_conflicts(self, saved: dict) -> list[str]:
        """The settings of a checkpoint's run (`saved`, its config) that this config changes and
        a resumed run cannot, as "section.key: old -> new"."""
        before, after = TrainConfig.from_dict({**saved, "run": {}}), self  # run is free (its init_weights may be gone)
        conflicts = []
        if before.model_config() != after.model_config():
            conflicts.append(f"model: {before.model!r} with {before.model_overrides} -> {after.model!r} with {after.model_overrides}")
        for section in ("data", "optim"):
            old, new = asdict(getattr(before, section)), asdict(getattr(after, section))
            conflicts += [f"{section}.{key}: {old[key]!r} -> {new[key]!r}" for key in old
                          if old[key] != new[key] and f"{section}.{key}" not in RESUMABLE_CHANGES]
        return conflicts

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        sections = {"data": DataConfig, "optim": OptimConfig, "run": RunConfig}
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown config sections: {', '.join(sorted(unknown))}")
        built = dict(values)
        built["model"] = typed_setting("model", "str", built.get("model", TrainConfig.model))
        built["model_overrides"] = typed_setting("model_overrides", "dict", built.get("model_overrides") or {})
        for name, section in sections.items():
            part = built.get(name) or {}
            if not isinstance(part, dict):
                raise ValueError(f"{name} must be a section of settings (key: value), not {part!r}")
            wrong = set(part) - {f.name for f in fields(section)}
            if wrong:
                raise ValueError(f"unknown settings in {name}: {', '.join(sorted(wrong))}")
            built[name] = section(**{key: typed_setting(f"{name}.{key}", section.__annotations__[key], value)
                                     for key, value in part.items()})
        return cls(**built)

    @classmethod
    def of_checkpoint(cls, saved: dict) -> "TrainConfig":
        """The config a checkpoint recorded, its run.init_weights kept as written but not read
        again: the run started from it, and the file may since have moved or gone."""
        run = saved.get("run") or {}
        config = cls.from_dict({**saved, "run": {**run, "init_weights": None}} if isinstance(run, dict) else saved)
        config.run.init_weights = run.get("init_weights")
        return config


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """YAML file plus `section.key=value` overrides (values parsed as YAML)."""
    values = _yaml(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(values, dict):
        raise ValueError("a config is a mapping of sections (model, model_overrides, data, optim, run), "
                         f"not {type(values).__name__}")
    for item in overrides:
        key, equals, raw = item.partition("=")
        if not equals:
            raise ValueError(f"{item}: an override is section.key=value, e.g. optim.steps=1000")
        *parents, leaf = key.split(".")
        target = values
        for parent in parents:
            if target.get(parent) is None:
                target[parent] = {}
            target = target[parent]
            if not isinstance(target, dict):
                raise ValueError(f"{item}: {parent} is a setting, not a section")
        if len(parents) > 1:  # data.degradations.thick=0.5 would replace the whole mapping, defaults and all
            raise ValueError(f"{item}: set a mapping whole, e.g. {'.'.join(parents)}={{{leaf}: {raw}, ...}}")
        target[leaf] = _yaml(raw, item)
    return TrainConfig.from_dict(values)


def load_config_or_exit(parser: argparse.ArgumentParser, path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """load_config for a command line: a config that does not load is one line naming the file
    and the overrides, and exit status 2."""
    try:
        return load_config(path, overrides)
    except (OSError, ValueError) as error:
        given = f"{path} with {' '.join(overrides)}" if overrides else str(path)
        parser.exit(2, f"{parser.prog}: error: {given}: {error}\n")


def _yaml(text: str, origin: str = "") -> object:
    """Parsed YAML; a syntax error as a one-line ValueError (YAML's own message spans lines)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"{origin + ': ' if origin else ''}not valid YAML ({' '.join(str(error).split())})") from None
