"""Score weights files and training checkpoints with a config's in-run validation (its
validation volumes, `run.val_crop` and `run.val_cases`), so that they rank on the same figures
a run logs, without training.

    python Training/score_weights.py CycleINRLib/weights/cycleinr_ct.safetensors runs/ct_cpu/step-0001000.json
    python Training/score_weights.py my.safetensors --config Training/configs/ct_cpu.yaml run.val_crop=null
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from CycleINRLib.checkpoint import load_model
from CycleINRLib.engine import resolve_device
from CycleINRLib.errors import InputError
from CycleINRLib.models import CycleINR
from Training.config import load_config_or_exit
from Training.data import DataSourceError, warnings_in_one_line
from Training.export_weights import model_from_checkpoint
from Training.validation import ValidationSet

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "ct_cpu.yaml"
OVERRIDE = re.compile(r"^\w+(\.\w+)?=")  # section.key=value or model_overrides={...}, as for train.py


def load_weights(path: Path) -> CycleINR:
    """A weights file (.safetensors) or a training checkpoint (step-NNNNNNN.json)."""
    if path.suffix.lower() == ".json":
        return model_from_checkpoint(path)[0]
    return load_model(path)[0]


def markdown(rows: dict[str, dict[str, float]], cases: list[str]) -> str:
    lines = ["| weights | " + " | ".join(f"{case} gain (dB)" for case in cases) + " | mean gain (dB) | mean PSNR gen (dB) |",
             "|---" * (len(cases) + 3) + "|"]
    for name, scores in rows.items():
        gains = " | ".join(f"{scores[f'{case}/gain_over_linear_db']:+.4f}" for case in cases)
        lines.append(f"| {name} | {gains} | {scores['mean_gain_over_linear_db']:+.4f} | {scores['mean_psnr']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("items", nargs="+", metavar="WEIGHTS_OR_CHECKPOINT_OR_OVERRIDE",
                        help=".safetensors weights files or step-NNNNNNN.json checkpoints, and section.key=value "
                             "overrides of the config, e.g. run.val_crop=[64,192,192]")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help=f"whose validation to use (default {DEFAULT_CONFIG.name})")
    args = parser.parse_intermixed_args(argv)
    warnings_in_one_line()
    overrides = [item for item in args.items if OVERRIDE.match(item)]
    weights = [Path(item) for item in args.items if not OVERRIDE.match(item)]
    missing = [f"{path}: {'is a folder; give its step-NNNNNNN.json or .safetensors files' if path.is_dir() else 'no such file'}"
               for path in weights if not path.is_file()]
    if missing or not weights:
        parser.exit(2, f"{parser.prog}: error: {'; '.join(missing) if missing else 'no weights given'}\n")
    config = load_config_or_exit(parser, args.config, overrides)
    if not config.data.val:
        parser.exit(2, f"{parser.prog}: error: {args.config} names no validation data (data.val)\n")
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    try:
        device = resolve_device(config.run.device)
    except InputError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    rows, validation_sets = {}, {}  # the validation volumes are read once per normalization
    for path in weights:
        try:
            model = load_weights(path).to(device)
            normalization = model.config.normalization
            if normalization not in validation_sets:
                validation_sets[normalization] = ValidationSet.load(config.data.val, config.run, normalization)
            rows[str(path)] = validation_sets[normalization].evaluate(model, device)[0]
        except (OSError, ValueError, InputError, DataSourceError) as error:
            parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(markdown(rows, config.run.val_cases))


if __name__ == "__main__":
    main()
