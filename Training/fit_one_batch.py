"""Can a training config fit one batch? A two-minute check before a multi-hour run.

    python Training/fit_one_batch.py --config Training/configs/ct_cpu.yaml
    python Training/fit_one_batch.py --config Training/configs/ct_cpu.yaml optim.pixel_loss=l1

Draws one `interval` batch at --scale from data.train and trains on it alone with the config's
model, learning rate and losses. Every 25 steps it prints the loss and the PSNR gain over linear
interpolation on that batch's generated slices. A model that cannot beat linear interpolation
on a batch it has seen 150 times will not learn from new ones (README, section Training).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from CycleINRLib import geometry
from CycleINRLib.engine import resolve_device
from CycleINRLib.models import CycleINR
from CycleINRLib.models.latent_sampling import SlicePositions
from Training import data, losses
from Training.config import TrainConfig, load_config_or_exit


def fit_one_batch(config: TrainConfig, scale: float, steps: int, report_every: int = 25) -> list[dict]:
    """Train on one fixed batch, on `run.device`; the gain over linear after every `report_every` steps."""
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    device = resolve_device(config.run.device)
    torch.manual_seed(config.optim.seed)
    model_config = config.model_config()
    pinned = dataclasses.replace(config.data, scale_min=scale, scale_max=scale, degradations={"interval": 1.0})
    volumes = data.load_volumes(pinned.train, pinned, model_config.normalization)
    batch = data.PairBatches(volumes, pinned, config.optim.seed)[(0, 0)]
    low, high = batch["lr"], batch["hr"]
    positions = losses.hr_positions(low.shape[2], scale)
    generated_slices = torch.ones(len(positions), dtype=torch.bool)
    generated_slices[[out for out, _ in geometry.acquired_slice_matches(low.shape[2], scale)]] = False
    linear = SlicePositions.locate(positions, low.shape[2]).lerp(low, dim=2)
    linear_error = ((linear - high)[:, :, generated_slices] ** 2).mean().item()
    low, high, generated_slices = low.to(device), high.to(device), generated_slices.to(device)

    model = CycleINR(model_config).to(device)
    objective = losses.CycleObjective(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.optim.lr)
    reports = []
    for step in range(1, steps + 1):
        loss = losses.step_losses(objective, low, high, scale, "interval", config.optim.cycle_weight,
                                  config.optim.pixel_loss, config.optim.noise_weight).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimizer.step()
        if step % report_every == 0 or step == steps:
            with torch.no_grad():
                error = ((model(low, positions) - high)[:, :, generated_slices] ** 2).mean().item()
            reports.append({"step": step, "loss": round(loss.item(), 6),
                            "gain_over_linear_db": round(float(10 * np.log10(linear_error / error)), 3)})
            print(json.dumps(reports[-1]), flush=True)
    return reports


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file (see Training/configs)")
    parser.add_argument("--scale", type=float, default=3.0, help="upsampling scale of the batch (default 3)")
    parser.add_argument("--steps", type=int, default=150, help="steps on the one batch (default 150)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.pixel_loss=l1")
    args = parser.parse_intermixed_args(argv)
    data.warnings_in_one_line()
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, not {args.steps}")
    config = load_config_or_exit(parser, args.config, args.overrides)
    try:
        fit_one_batch(config, args.scale, args.steps)
    except ValueError as error:  # the data (DataSourceError), --scale, run.device (InputError)
        parser.exit(2, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":
    main()
