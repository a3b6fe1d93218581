"""Resumable training checkpoints without pickle.

step-NNNNNNN.safetensors holds the model, the Adam moments and the torch RNG states;
step-NNNNNNN.json holds the config, step, metrics, optimizer hyper-parameters and the
scheduler state. The JSON is written last, so a checkpoint counts only once complete.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from CycleINRLib.checkpoint import write_safetensors
from CycleINRLib.io import atomic_output

PATTERN = re.compile(r"^step-(\d+)\.json$")  # not the hidden partial files of an interrupted write
DESCRIPTION_TYPES = {"step": int, "config": dict, "metrics": dict, "optimizer": dict, "scheduler": dict}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or resumed from; the message names the file."""


class CheckpointWarning(UserWarning):
    """An unreadable checkpoint skipped in favour of an older one."""


def save_checkpoint(directory: Path, step: int, model, optimizer, scheduler, config: dict, metrics: dict, keep: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{name}": value.detach().cpu().contiguous() for name, value in model.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    scalars = {}
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for device, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{device}"] = state
    stem = directory / f"step-{step:07d}"
    write_safetensors(tensors, stem.with_suffix(".safetensors"))
    description = {
        "step": step,
        "config": config,
        "metrics": metrics,
        "optimizer": {"param_groups": optimizer_state["param_groups"], "scalars": scalars},
        "scheduler": scheduler.state_dict(),
    }
    with atomic_output(stem.with_suffix(".json")) as temporary:
        temporary.write_text(json.dumps(description, indent=1), encoding="utf-8")
    # Only those this run has passed: a newer one is left from an attempt whose resume skipped it
    # as unreadable, and counting it could prune the checkpoint just written.
    passed = [old for old in list_checkpoints(directory) if checkpoint_step(old) <= step]
    for old in passed[:-keep]:
        old.with_suffix(".safetensors").unlink(missing_ok=True)
        old.unlink()
    return stem.with_suffix(".json")


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints (their JSON files), oldest first."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if PATTERN.search(p.name)), key=checkpoint_step)


def checkpoint_step(json_path: Path) -> int:
    """The step a checkpoint's file name says."""
    return int(PATTERN.search(json_path.name).group(1))


def read_description(json_path: Path) -> dict:
    """A checkpoint's JSON part: config, step, metrics, optimizer and scheduler state."""
    return json.loads(Path(json_path).read_text(encoding="utf-8"))


def read_checkpoint(json_path: Path) -> tuple[dict, dict]:
    """(description, tensors) of a checkpoint; CheckpointError when either part does not read."""
    if Path(json_path).suffix.lower() != ".json":
        raise CheckpointError(f"{json_path}: give the checkpoint's .json file (step-NNNNNNN.json), which names its weights")
    try:
        description = read_description(json_path)
        tensors = load_file(str(Path(json_path).with_suffix(".safetensors")))
    except (OSError, ValueError, SafetensorError, RecursionError) as error:  # RecursionError: JSON nested thousands deep
        raise CheckpointError(f"{json_path}: not a readable checkpoint ({error})") from None
    fields = description if isinstance(description, dict) else {}
    missing = [key for key, kind in DESCRIPTION_TYPES.items() if not isinstance(fields.get(key), kind)]
    if missing or "rng.torch" not in tensors:
        raise CheckpointError(f"{json_path}: not a readable checkpoint (no valid {', '.join(missing or ['rng.torch'])})")
    return description, tensors


def newest_readable(directory: Path, check=None) -> tuple[Path, dict, dict] | None:
    """(json path, description, tensors) of the newest checkpoint that reads, and passes
    `check(json_path, description, tensors)` (which raises CheckpointError otherwise); None when
    there is none. A damaged newer one (a disk error, a hand edit) is skipped with a warning, so
    that a resume loses one more checkpoint interval rather than the run. CheckpointError when
    checkpoints exist and none of them reads: starting afresh would overwrite them."""
    found = list_checkpoints(directory)
    for json_path in reversed(found):
        try:
            description, tensors = read_checkpoint(json_path)
            if check is not None:
                check(json_path, description, tensors)
            return json_path, description, tensors
        except CheckpointError as error:
            warnings.warn(f"skipping {error}", CheckpointWarning, stacklevel=2)
    if found:
        raise CheckpointError(f"{directory}: none of its {len(found)} checkpoints reads (see the warnings above); "
                              "move them away to start a new run there")
    return None


def model_tensors(tensors: dict) -> dict:
    """The model's state dict within a checkpoint's tensors."""
    return {key[len("model."):]: value for key, value in tensors.items() if key.startswith("model.")}


def restore(description: dict, tensors: dict, model, optimizer, scheduler) -> None:
    """Load a checkpoint's model, optimizer, scheduler and RNG states in place."""
    model.load_state_dict(model_tensors(tensors))
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in description["optimizer"]["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": description["optimizer"]["param_groups"]})
    scheduler.load_state_dict(description["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda_keys = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    cuda_states = [tensors[k] for k in cuda_keys]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
