"""Model weights as one safetensors file whose metadata carries the JSON description.

The JSON (metadata key "cycleinr") holds the model config, the intensity normalization,
whether the weights were trained, and their provenance (data, steps, metrics). Loading
never unpickles anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .errors import WeightsError
from .io import atomic_output
from .models import CycleINR

FORMAT_VERSION = 1
METADATA_KEY = "cycleinr"
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "cycleinr_ct.safetensors"


@dataclass
class WeightsInfo:
    path: Path
    config: ModelConfig
    trained: bool
    provenance: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        state = "trained" if self.trained else "UNTRAINED initialisation"
        return f"{self.path.name} ({state})"


def save_model(model: CycleINR, path: str | os.PathLike, trained: bool, provenance: dict | None = None) -> Path:
    """Write weights + description atomically (a temporary file renamed when complete)."""
    path = Path(path)
    description = {
        "format": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "trained": bool(trained),
        "provenance": provenance or {},
    }
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    write_safetensors(tensors, path, metadata={METADATA_KEY: json.dumps(description)})
    return path


def write_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """Written whole or not at all; OSError naming the file when it cannot be (safetensors
    reports a write error in its own exception type)."""
    try:
        with atomic_output(path) as temporary:
            save_file(tensors, str(temporary), metadata=metadata)
    except SafetensorError as error:
        raise OSError(f"{path}: cannot be written ({error})") from None


def read_description(path: Path) -> dict:
    """The JSON description of a weights file, with a one-line error for any defect."""
    if path.is_dir():
        raise WeightsError(f"{path}: is a folder; give a .safetensors file")
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if not os.access(path, os.R_OK):
        raise WeightsError(f"{path}: permission denied")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsError(f"{path}: not a readable safetensors file, corrupt or truncated ({error})") from None
    if METADATA_KEY not in metadata:
        raise WeightsError(f"{path}: safetensors file has no CycleINR description (metadata '{METADATA_KEY}')")
    try:
        description = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise WeightsError(f"{path}: CycleINR description is not valid JSON ({error})") from None
    if not isinstance(description, dict):
        raise WeightsError(f"{path}: CycleINR description is not a JSON object")
    if description.get("format") != FORMAT_VERSION:
        raise WeightsError(f"{path}: weights format {description.get('format')!r}, this version reads {FORMAT_VERSION}")
    return description


def load_model(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> tuple[CycleINR, WeightsInfo]:
    """Build the model its file describes and load the weights; default: the bundled ones."""
    if path is not None and not os.fspath(path).strip():  # Path("") would be the working folder
        raise WeightsError("the weights path is empty: give a .safetensors file, or no path for the bundled CT weights")
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    description = read_description(path)
    try:
        config = ModelConfig.from_dict(description["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise WeightsError(f"{path}: model configuration is invalid ({error})") from None
    model = CycleINR(config)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsError(f"{path}: tensors cannot be read, file corrupt or truncated ({error})") from None
    _check_tensors(path, model, tensors)
    model.load_state_dict(tensors)
    model.eval().to(device)
    info = WeightsInfo(path, config, bool(description.get("trained")), description.get("provenance", {}))
    return model, info


def _check_tensors(path: Path, model: CycleINR, tensors: dict) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [name for name in expected if name in tensors and tensors[name].shape != expected[name].shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
    if wrong:
        name = wrong[0]
        problems.append(f"shape mismatch for {name}: file {tuple(tensors[name].shape)}, model {tuple(expected[name].shape)}")
    if problems:
        raise WeightsError(f"{path}: weights do not match their configuration: " + "; ".join(problems))
    if damaged := nonfinite_tensors(tensors):  # they would upsample to NaN, or to zeros once cast to an integer pixel type
        raise WeightsError(f"{path}: weights hold {damaged}")


def nonfinite_tensors(tensors: dict) -> str:
    """'NaN or infinite values (N tensors, e.g. NAME)', or '' when every float tensor is finite."""
    damaged = [name for name, tensor in tensors.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    return f"NaN or infinite values ({len(damaged)} tensors, e.g. {damaged[0]})" if damaged else ""
