"""Turn a training checkpoint into a weights file for `cycleinr` (by default the bundled one).

    python Training/export_weights.py runs/ct_cpu/step-0001000.json
    python Training/export_weights.py runs/ct_cpu/step-0001000.json --output my_weights.safetensors
    python Training/export_weights.py CHECKPOINT --data-note "data.train held 256 x 256 crops of ..."
    python Training/export_weights.py CHECKPOINT --overwrite   # replace the bundled weights
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from CycleINRLib.checkpoint import DEFAULT_WEIGHTS, nonfinite_tensors, save_model
from CycleINRLib.io import check_output_path
from CycleINRLib.models import CycleINR
from Training.checkpointing import model_tensors, read_checkpoint
from Training.config import TrainConfig
from Training.train import provenance


def model_from_checkpoint(checkpoint: Path) -> tuple[CycleINR, TrainConfig, dict]:
    """The model of a training checkpoint, its run's config and the checkpoint's description;
    ValueError, naming the file, when it is not a readable checkpoint."""
    description, tensors = read_checkpoint(checkpoint)  # CheckpointError (a ValueError) names the file
    try:
        config = TrainConfig.of_checkpoint(description["config"])
        model = CycleINR(config.model_config())
        model.load_state_dict(model_tensors(tensors))
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        raise ValueError(f"{checkpoint}: not a readable training checkpoint ({error})") from None
    if damaged := nonfinite_tensors(model_tensors(tensors)):  # a diverged run's: `cycleinr` would refuse the file
        raise ValueError(f"{checkpoint}: its weights hold {damaged}; take an earlier checkpoint")
    return model, config, description


def export(checkpoint: Path, output: Path, data_note: str | None = None) -> Path:
    """`data_note`, kept in the provenance, says what the run's data paths held where their
    names do not (crops made for a GPU machine, say)."""
    model, config, description = model_from_checkpoint(checkpoint)
    try:
        origin = provenance(config, description["step"], description["metrics"])
    except (KeyError, TypeError) as error:  # a hand-edited description; resuming does not need these
        raise ValueError(f"{checkpoint}: its metrics lack {error}, which the weights file's provenance records") from None
    except ValueError as error:  # a wall time of NaN
        raise ValueError(f"{checkpoint}: its metrics hold a value the provenance cannot record ({error})") from None
    if data_note:
        origin["data_note"] = data_note
    return save_model(model, output, trained=True, provenance=origin)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a step-NNNNNNN.json file of a training run")
    parser.add_argument("--output", type=Path, default=DEFAULT_WEIGHTS, help=f"default: {DEFAULT_WEIGHTS}")
    parser.add_argument("--data-note", help="what the run's data paths held, kept in the provenance")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    args = parser.parse_args(argv)
    try:
        # before "pass --overwrite"; realpath, since Path.resolve raises on a link that loops
        if os.path.realpath(args.output) == os.path.realpath(args.checkpoint.with_suffix(".safetensors")):
            raise ValueError(f"{args.output}: holds the checkpoint's own tensors; write the weights to another file")
        output = check_output_path(args.output, args.overwrite, suffixes=(".safetensors",))
        print(f"wrote {export(args.checkpoint, output, args.data_note)}")
    except (ValueError, OSError) as error:  # OSError: --output cannot be written
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog}: cancelled; nothing was written\n")


if __name__ == "__main__":
    main()
