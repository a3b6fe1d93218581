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


CHECKPOINT_HINT = "a training checkpoint? make a weights file of it with Training/export_weights.py"


def read_description(path: Path) -> dict:
    """The JSON description of a weights file, with a one-line error for any defect."""
    if path.is_dir():
        raise WeightsError(f"{path}: is a folder; give a .safetensors file")
    if not path.is_file():
        if path.is_symlink():  # moved, or a link that leads back to itself
            raise WeightsError(f"{path}: a link to {os.readlink(path)}, which is not there or loops back")
        if path.exists():  # a pipe or a device
            raise WeightsError(f"{path}: neither a file nor a folder (a pipe or a device); give a .safetensors file")
        raise WeightsError(f"{path}: weights file not found")
    if not os.access(path, os.R_OK):
        raise WeightsError(f"{path}: permission denied")
    if path.suffix.lower() == ".json":
        raise WeightsError(f"{path}: is a JSON file, not a .safetensors weights file ({CHECKPOINT_HINT})")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            checkpoint = any(name.startswith("optimizer.") for name in handle.keys())
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsError(f"{path}: not a readable safetensors file, corrupt or truncated ({error})") from None
    if METADATA_KEY not in metadata:
        hint = f" ({CHECKPOINT_HINT})" if checkpoint else ""
        raise WeightsError(f"{path}: safetensors file has no CycleINR description (metadata '{METADATA_KEY}'){hint}")
    try:
        description = json.loads(metadata[METADATA_KEY])
    except (json.JSONDecodeError, RecursionError) as error:  # RecursionError: JSON nested thousands deep
        raise WeightsError(f"{path}: CycleINR description is not valid JSON ({error})") from None
    if not isinstance(description, dict):
        raise WeightsError(f"{path}: CycleINR description is not a JSON object")
    if type(description.get("format")) is not int or description["format"] != FORMAT_VERSION:  # true == 1 in Python
        raise WeightsError(f"{path}: weights format {description.get('format')!r}, this version reads {FORMAT_VERSION}")
    if not isinstance(description.get("trained", False), bool):
        raise WeightsError(f"{path}: 'trained' in its description is {description['trained']!r}, not true or false")
    if not isinstance(description.get("provenance", {}), dict):
        raise WeightsError(f"{path}: 'provenance' in its description is not a JSON object")
    return description


def read_config(path: Path) -> tuple[ModelConfig, dict]:
    """(model config, description) of a weights file; WeightsError for any defect."""
    description = read_description(path)
    if "config" not in description:
        raise WeightsError(f"{path}: model configuration is missing from its description")
    try:
        return ModelConfig.from_dict(description["config"]), description
    except (TypeError, ValueError) as error:
        raise WeightsError(f"{path}: model configuration is invalid ({error})") from None


def load_model(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> tuple[CycleINR, WeightsInfo]:
    """Build the model its file describes and load the weights; default: the bundled ones."""
    if path is not None and not os.fspath(path).strip():  # Path("") would be the working folder
        raise WeightsError("the weights path is empty: give a .safetensors file, or no path for the bundled CT weights")
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    config, description = read_config(path)
    with torch.device("meta"):  # shapes only: the description's sizes allocate nothing before they match the file's
        expected = {name: tuple(tensor.shape) for name, tensor in CycleINR(config).state_dict().items()}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            problems = _shape_problems(expected, {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()})
            tensors = {} if problems else {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsError(f"{path}: tensors cannot be read, file corrupt or truncated ({error})") from None
    if problems:
        raise WeightsError(f"{path}: weights do not match their configuration: " + "; ".join(problems))
    if not_float := [name for name, tensor in tensors.items() if not tensor.is_floating_point()]:
        raise WeightsError(f"{path}: weights must be floating point; {not_float[0]} holds {tensors[not_float[0]].dtype}")
    if damaged := nonfinite_tensors(tensors):  # they would upsample to NaN, or to zeros once cast to an integer pixel type
        raise WeightsError(f"{path}: weights hold {damaged}")
    model = CycleINR(config)
    model.load_state_dict(tensors)
    model.eval().to(device)
    info = WeightsInfo(path, config, bool(description.get("trained")), description.get("provenance", {}))
    return model, info


def _shape_problems(expected: dict, shapes: dict) -> list[str]:
    """How the tensor shapes of a file differ from the model's (both: name -> shape tuple)."""
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [name for name in expected if name in shapes and shapes[name] != expected[name]]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
    if wrong:
        name = wrong[0]
        problems.append(f"shape mismatch for {name}: file {shapes[name]}, model {expected[name]}")
    return problems


def nonfinite_tensors(tensors: dict) -> str:
    """'NaN or infinite values (N tensors, e.g. NAME)', or '' when every float tensor is finite
    in float32, the precision the model runs in (float64 weights of 1e300 are infinite there)."""
    damaged = [name for name, tensor in tensors.items()
               if tensor.is_floating_point() and not torch.isfinite(tensor.float()).all()]
    return f"NaN or infinite values ({len(damaged)} tensors, e.g. {damaged[0]})" if damaged else ""
