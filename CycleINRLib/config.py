"""Model and intensity-normalization settings; they travel inside every checkpoint.

`paper` follows the CycleINR paper's implementation details; `light` is a smaller network
for CPU users and CPU training. Both are the same architecture with other sizes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np

DEVICES = ("auto", "cpu", "cuda", "mps", "gpu")  # what `--device`, `run.device` and the Slicer logic accept
DEVICE_HELP = "auto: CUDA, then Apple MPS, then the CPU; gpu: CUDA, then Apple MPS, else an error (default: auto)"
# Below it a CT holds no tissue but the padding outside the scanner's field of view (-2000,
# -2048, -3024 HU, vendor by vendor); reconstructions and our training data stop at -1024.
CT_FLOOR_HU = -1024.0
CT_AIR_CEILING_HU = -500  # a CT in HU has air near -1000; an input whose minimum lies above this
HU_SPAN_FLOOR = 100  # and whose values span less than this (z-scored MR), or hold none below 0, is not one
MIN_WINDOW = 1e-30  # the narrowest normalization window: its inverse still holds in float32
MAX_WINDOW_BOUND = 1e38  # its bounds, and their difference, too (float32 ends at 3.4e38)


@dataclass(frozen=True)
class Normalization:
    """Maps stored intensities to the network's range and back.

    kind "window": a fixed interval [low, high] (CT in HU) maps to [0, 1].
    kind "percentile": the input's own low/high percentiles (MR) map to [0, 1].
    For CT the network sees values below CT_FLOOR_HU at the floor (`raise_to_floor`).
    """

    kind: str = "window"
    low: float = -1024.0
    high: float = 3071.0

    def __post_init__(self):
        if self.kind not in ("window", "percentile"):
            raise ValueError(f"normalization kind must be window or percentile, not {self.kind!r}")
        if not (abs(self.low) <= MAX_WINDOW_BOUND and abs(self.high) <= MAX_WINDOW_BOUND and self.high > self.low):
            raise ValueError(f"normalization needs low < high, both finite in float32, got {self.low}, {self.high}")
        if self.kind == "percentile" and not 0 <= self.low < self.high <= 100:
            raise ValueError(f"normalization percentiles must lie in [0, 100], got {self.low}, {self.high}")
        # 1 / (high - low) scales every input: it must hold in float32, and the window must be
        # wider than float32 can tell apart at its values
        if self.high - self.low < max(MIN_WINDOW, 1e-6 * max(abs(self.low), abs(self.high))):
            raise ValueError(f"normalization window {self.low:g}..{self.high:g} is too narrow to scale intensities by")

    def bounds(self, array: np.ndarray) -> tuple[float, float]:
        """The (low, high) intensities that map to 0 and 1 for this input."""
        if self.kind == "window":
            return float(self.low), float(self.high)
        low, high = np.percentile(array, [self.low, self.high])
        return float(low), float(max(high, low + 1e-6))

    @property
    def floor(self) -> float | None:
        """The lowest value that can be tissue (CT), None where any value can be (MR)."""
        return CT_FLOOR_HU if self.kind == "window" else None

    def unexpected_input(self, array: np.ndarray) -> str | None:
        """Why `array` does not look like what weights with this normalization expect, or None."""
        lowest = float(array.min())  # a Python float: int8's span 255 does not wrap
        # A crop of soft tissue has no air but has fat, below 0 HU; MR and CT stored as HU + 1024 have nothing below 0.
        if self.kind == "window" and lowest > CT_AIR_CEILING_HU and (lowest >= 0 or array.max() - lowest < HU_SPAN_FLOOR):
            return f"the input's lowest value is {lowest:g}, so it does not look like CT in HU (air is about -1000)"
        return None

    def raise_to_floor(self, array: np.ndarray) -> np.ndarray:
        """`array` with values below the floor set to it (a copy, same dtype), or `array` itself.

        Out-of-field padding at -3024 HU is an edge of 2000 HU that no training volume shows:
        the network would ring along the field-of-view border. At the floor it is air.
        """
        if self.floor is None or array.min() >= self.floor:
            return array
        return np.maximum(array, np.asarray(self.floor, dtype=array.dtype))


DECODER_ACTIVATIONS = ("relu", "gelu")
# Far above both named configs (`paper`: 64 channels, 3 x 6 convolutions, 8 layers of 256), far
# below what a weights file's few bytes of JSON could otherwise make the loader allocate.
MAX_WIDTH = 4096  # channels, latent length, decoder units
MAX_DEPTH = 64  # residual blocks, convolutions per block, decoder layers


@dataclass(frozen=True)
class ModelConfig:
    encoder_width: int = 64  # feature channels of the residual CNN
    encoder_blocks: int = 3  # residual blocks
    convs_per_block: int = 6  # Conv3d + ReLU layers per block
    latent_dim: int = 128  # |z|, latent code length per low-resolution voxel
    attention: bool = True  # local attention mechanism (LAM) over the 3x3x3 neighbourhood
    # Not in the paper: add the attention term to the trilinear code instead of replacing it,
    # its values starting at zero, so training starts from the model without LAM (README, ablation).
    attention_residual: bool = False
    decoder_width: int = 256
    decoder_layers: int = 8  # fully connected layers, each followed by the activation
    decoder_skip_layer: int = 4  # the decoder input is concatenated before this layer
    decoder_activation: str = "relu"  # "relu" (paper) or "gelu", whose units cannot die
    predict_residual: bool = False  # decode a correction to linear interpolation
    normalization: Normalization = field(default_factory=Normalization)

    def __post_init__(self):
        if not 0 < self.decoder_skip_layer < self.decoder_layers:
            raise ValueError("decoder_skip_layer must lie strictly inside the decoder")
        if self.attention_residual and not self.attention:
            raise ValueError("attention_residual needs attention")
        if self.decoder_activation not in DECODER_ACTIVATIONS:
            raise ValueError(f"decoder_activation must be one of {DECODER_ACTIVATIONS}, not {self.decoder_activation!r}")
        if min(self.encoder_width, self.encoder_blocks, self.convs_per_block, self.latent_dim,
               self.decoder_width, self.decoder_layers) < 1:
            raise ValueError("model sizes must be positive")
        widths = {"encoder_width": self.encoder_width, "latent_dim": self.latent_dim, "decoder_width": self.decoder_width}
        depths = {"encoder_blocks": self.encoder_blocks, "convs_per_block": self.convs_per_block,
                  "decoder_layers": self.decoder_layers}
        for sizes, largest in ((widths, MAX_WIDTH), (depths, MAX_DEPTH)):
            if too_large := [f"{name} {size}" for name, size in sizes.items() if size > largest]:
                raise ValueError(f"{too_large[0]} is above {largest}, more than any model this code is meant for")

    @property
    def receptive_radius(self) -> int:
        """Low-resolution voxels on each side that can change one latent code."""
        return 1 + self.encoder_blocks * self.convs_per_block

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        if not isinstance(values, dict):
            raise ValueError(f"the model settings must be a mapping of names to values, not {_kind_of(values)}")
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model settings: {', '.join(sorted(unknown))}")
        values = {key: value if key == "normalization" else typed_setting(f"model.{key}", cls.__annotations__[key], value)
                  for key, value in values.items()}
        if "normalization" in values and not isinstance(values["normalization"], (dict, Normalization)):
            raise ValueError(f"model.normalization must be a mapping (kind, low, high), not {_kind_of(values['normalization'])}")
        if isinstance(values.get("normalization"), dict):
            given = values["normalization"]
            unknown = set(given) - set(Normalization.__annotations__)
            if unknown:
                raise ValueError(f"unknown normalization settings: {', '.join(sorted(unknown))}")
            values["normalization"] = Normalization(**{
                key: typed_setting(f"model.normalization.{key}", Normalization.__annotations__[key], value)
                for key, value in given.items()})
        return cls(**values)


def typed_setting(name: str, annotation: str, value):
    """`value` as the setting's declared type, or a ValueError naming the setting.

    YAML reads 5e-5 (no dot) as a string, and hours of training must not end at the first
    optimizer step over it, so numbers written that way are accepted; anything else of the
    wrong type is refused when the config is read. `annotation` is the dataclass field's
    annotation as text (these modules use postponed annotations).
    """
    kinds = annotation.replace(" ", "").split("|")
    if value is None and "None" in kinds:
        return None
    kind = kinds[0]
    number = value
    if isinstance(value, str) and kind in ("int", "float"):
        try:
            number = float(value)
        except ValueError:
            pass
    if kind == "float" and isinstance(number, (int, float)) and not isinstance(number, bool):
        return float(number)
    if kind == "int" and isinstance(number, (int, float)) and not isinstance(number, bool) and float(number).is_integer():
        return int(number)
    if kind in ("str", "bool", "dict", "list") and type(value).__name__ == kind:
        return value
    # a folder named 2024, an out_dir named on: YAML reads them as a number or true
    quote = " (YAML reads it so: write the value in quotes)" if kind == "str" and not isinstance(value, (dict, list)) else ""
    raise ValueError(f"{name} must be {_KIND_WORDS[kind]}, not {value!r}{quote}")


def _kind_of(value) -> str:
    """A short description of a wrong value: its text when short, its type otherwise."""
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__}"


_KIND_WORDS = {"int": "a whole number", "float": "a number", "str": "text", "bool": "true or false",
               "dict": "a mapping", "list": "a list"}


NAMED_CONFIGS = {
    "paper": ModelConfig(),
    "light": ModelConfig(
        encoder_width=32,
        encoder_blocks=2,
        convs_per_block=3,
        latent_dim=64,
        decoder_width=128,
        decoder_layers=4,
        decoder_skip_layer=2,
        decoder_activation="gelu",
        predict_residual=True,
        # Soft tissue at unit scale: with the 4095 HU window a 40 HU edge is 0.01 at the input and
        # the network learned nothing on CPU budgets (README, section Training). No clipping.
        normalization=Normalization("window", -200.0, 200.0),
    ),
}
DEFAULT_CONFIG = "paper"
