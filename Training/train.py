"""Train CycleINR with the cycle-consistent loss (paper sections 3.2 and 4.1).

    python Training/train.py --config Training/configs/ct.yaml
    torchrun --nproc_per_node=4 Training/train.py --config Training/configs/ct.yaml
    python Training/train.py --config Training/configs/ct_cpu.yaml run.out_dir=runs/x optim.steps=100

Re-running the same command resumes from the newest checkpoint in run.out_dir exactly as if
the run had not been interrupted. Relative data paths are relative to the working directory.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from CycleINRLib.checkpoint import load_model, nonfinite_tensors, save_model
from CycleINRLib.engine import resolve_device
from CycleINRLib.errors import InputError
from CycleINRLib.models import CycleINR
from Training import checkpointing, data, losses
from Training.config import OptimConfig, TrainConfig, load_config_or_exit
from Training.validation import ValidationSet

# Rank 0 validates (whole volumes with ct.yaml) while the others wait at the next collective;
# NCCL's default of 10 minutes would end the job during a long validation.
RANKS_WAIT_FOR_VALIDATION = timedelta(hours=2)


class ResumeError(ValueError):
    """run.out_dir holds checkpoints of a run that this command's settings would not continue."""


class TrainingDiverged(RuntimeError):
    """The gradient became NaN or infinite: the step is not taken and nothing more is saved,
    so every checkpoint holds finite weights (the newest at most run.checkpoint_every steps back)."""


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def started_by_torchrun() -> bool:
    """Whether torchrun (or another launcher) set the rendezvous variables; some of them left
    in the shell alone would end in torch's traceback when the process group starts."""
    present = [name for name in TORCHRUN_VARIABLES if name in os.environ]
    if present and len(present) < len(TORCHRUN_VARIABLES):
        missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
        raise InputError(f"{', '.join(present)} set in the environment without {', '.join(missing)}: start the "
                         f"processes with torchrun, or unset {' '.join(present)} for a single-process run")
    return bool(present)


def train(config: TrainConfig) -> tuple[CycleINR, list[dict]]:
    """Run (or resume) training; returns the bare model and this process's per-step losses."""
    # ---------------------------------------------------------------- processes, devices
    distributed = started_by_torchrun()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    out_dir = Path(config.run.out_dir)
    resume = checkpointing.newest_readable(out_dir, check=check_restorable)
    resumed_from = resume[1] if resume else None
    if resumed_from:
        check_resumable(config, resumed_from, world_size)
    device = resolve_device(config.run.device)
    if distributed:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=RANKS_WAIT_FOR_VALIDATION)
    master = rank == 0
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    amp = config.optim.autocast(device.type)

    # ---------------------------------------------------------------- data
    model_config = config.model_config()
    try:
        with warnings.catch_warnings():
            if not master:  # every process reads the same folder: its skips are said once, by rank 0
                warnings.simplefilter("ignore", data.TrainingDataWarning)
            volumes = data.named_source("data.train", data.load_volumes, config.data.train, config.data,
                                        model_config.normalization)
        validation = data.named_source("data.val", ValidationSet.load, config.data.val, config.run,
                                       model_config.normalization) if master and config.data.val else None
        unreadable = None
    except data.DataSourceError as error:
        if not distributed:
            raise
        volumes, validation, unreadable = [], None, str(error)
    if distributed:  # the others would wait for a process that stopped: every process stops with it
        read = [None] * world_size
        dist.all_gather_object(read, (unreadable, [volume.name for volume in volumes], _sizes(volumes)))
        if failed := [rank for rank, (error, *_) in enumerate(read) if error]:
            raise data.DataSourceError(f"process {failed[0]}: {read[failed[0]][0]}")
        # node-local copies of the data may differ: the ranks would train on other batches
        if differing := [rank for rank, volumes_read in enumerate(read) if volumes_read != read[0]]:
            raise data.DataSourceError(f"process {differing[0]} read other training volumes than process 0 "
                                       f"({read[differing[0]][1:]} against {read[0][1:]}): give every process the same data")
    trained_on = resumed_from["metrics"].get("training_data") if resumed_from else None
    if trained_on and trained_on != [volume.name for volume in volumes]:
        raise ResumeError(f"{out_dir} holds a run trained on {', '.join(trained_on)}; "
                          f"{config.data.train} gives {', '.join(volume.name for volume in volumes)}")
    sizes_then = resumed_from["metrics"].get("training_sizes") if resumed_from else None  # runs since 2026-11-27
    if sizes_then and sizes_then != _sizes(volumes):
        raise ResumeError(f"{out_dir} holds a run trained on volumes of these names but of other sizes "
                          f"({sizes_then} voxels, {config.data.train} gives {_sizes(volumes)}): other volumes")
    dataset = data.PairBatches(volumes, config.data, config.optim.seed)

    # ---------------------------------------------------------------- model, optimizer, schedule
    torch.manual_seed(config.optim.seed)
    model = CycleINR(model_config).to(device)
    model.recompute_slices = config.run.recompute_slices
    optimizer = torch.optim.Adam(model.parameters(), lr=config.optim.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.optim.lr_halve_every, gamma=0.5)
    step, wall_before, best_psnr, metrics = 0, 0.0, float("-inf"), {}
    if resume:
        checkpoint_path, description, tensors = resume
        checkpointing.restore(description, tensors, model, optimizer, scheduler)
        step, metrics = description["step"], description["metrics"]
        wall_before, best_psnr = metrics.get("wall_seconds", 0.0), metrics.get("best_val_psnr", float("-inf"))
        if master:
            print(f"resuming from {checkpoint_path} at step {step}")
            if step >= config.optim.steps:
                print(f"the run has reached optim.steps={config.optim.steps}; raise it to train on")
    elif config.run.init_weights:
        start, start_info = load_model(config.run.init_weights)
        model.load_state_dict(start.state_dict())
        metrics["initialised_from"] = {"weights": str(start_info.path), "provenance": start_info.provenance}
    metrics.update(training_data=[volume.name for volume in volumes], training_sizes=_sizes(volumes),
                   machine=machine_description(), world_size=world_size)
    objective = losses.CycleObjective(model)
    if distributed:
        objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    batches = data.batch_stream(dataset, rank, world_size, step * config.optim.accumulate, config.data.workers,
                                device.type == "cuda")

    # ---------------------------------------------------------------- loop
    # purge_step: a resumed run drops what the interrupted one logged after this checkpoint, not doubling it
    writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=step + 1) if master and step < config.optim.steps else None
    history: list[dict] = []
    started = time.time()
    bar = tqdm(total=config.optim.steps, initial=step, disable=not master, dynamic_ncols=True)
    while step < config.optim.steps:
        step_batches = [next(batches) for _ in range(config.optim.accumulate)]
        try:
            terms, grad_norm = train_step(objective, model, optimizer, step_batches, config.optim, device, amp)
        except TrainingDiverged as diverged:
            # not a newer one that this run's resume skipped as unreadable
            passed = [path for path in checkpointing.list_checkpoints(out_dir) if checkpointing.checkpoint_step(path) <= step]
            kept = f"{passed[-1]} holds the last saved weights" if passed else "no checkpoint was written"
            raise TrainingDiverged(f"{diverged} at step {step + 1} (optim.lr {config.optim.lr:g}); {kept}: train "
                                   "again with a lower optim.lr in a new run.out_dir") from None
        scheduler.step()
        step += 1
        # "scale": the step's r, or the mean r of its accumulated batches
        record = {"step": step, "loss": terms.total.item(), "inr": terms.inr.item(), "cycle": terms.cycle.item(),
                  "noise": terms.noise.item(), "scale": sum(b["scale"] for b in step_batches) / len(step_batches)}
        history.append(record)
        bar.update(1)
        if master and (step % config.run.log_every == 0 or step == config.optim.steps):
            bar.set_postfix(loss=f"{record['loss']:.4f}", scale=record["scale"])
            for key in ("loss", "inr", "cycle", "noise"):
                writer.add_scalar(f"train/{key}", record[key], step)
            writer.add_scalar("train/grad_norm", grad_norm.item(), step)
            writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)

        # ------------------------------------------------------------ validation, checkpoints
        metrics.update(last_loss=record["loss"], wall_seconds=wall_before + time.time() - started)
        if validation is not None and (step % config.run.val_every == 0 or step == config.optim.steps):
            results, preview = validation.evaluate(model, device)
            for key, value in results.items():
                writer.add_scalar(f"val/{key}", value, step)
            writer.add_image("val/coronal_truth_linear_cycleinr", preview, step, dataformats="HW")
            metrics.update(val=results, val_step=step)
            if results["mean_psnr"] > best_psnr:
                best_psnr = metrics["best_val_psnr"] = results["mean_psnr"]
                save_model(model, out_dir / "best_model.safetensors", trained=True,
                           provenance=provenance(config, step, metrics))
        if step % config.run.checkpoint_every == 0 or step == config.optim.steps:
            if master:
                checkpointing.save_checkpoint(out_dir, step, model, optimizer, scheduler, config.to_dict(), metrics,
                                              config.run.keep_checkpoints)
            if distributed:
                dist.barrier()
    bar.close()
    if writer is not None:
        writer.close()
        best = "; best in-run validation in best_model.safetensors" if math.isfinite(best_psnr) else ""
        print(f"finished at step {step}: checkpoints in {out_dir}{best}; "
              "Training/export_weights.py makes a weights file of one")
    if distributed:
        dist.destroy_process_group()
    return model, history


def check_restorable(json_path: Path, description: dict, tensors: dict) -> None:
    """CheckpointError unless the checkpoint's config reads and its states load into the model,
    optimizer and schedule that config builds: what a hand edit or a partial write breaks."""
    try:
        saved = TrainConfig.from_dict({**description["config"], "run": {}})  # run is free (its init_weights may be gone)
        model = CycleINR(saved.model_config())
        optimizer = torch.optim.Adam(model.parameters(), lr=saved.optim.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=saved.optim.lr_halve_every, gamma=0.5)
        rng_state = torch.get_rng_state()
        expected_schedule = set(scheduler.state_dict())
        checkpointing.restore(description, tensors, model, optimizer, scheduler)
        torch.set_rng_state(rng_state)
        # Adam's moments for every parameter, shaped like it: without them a resume would quietly
        # restart Adam, and a wrong shape would fail only at the first step
        for index, parameter in enumerate(model.parameters()):
            state = optimizer.state.get(parameter, {})
            if not {"step", "exp_avg", "exp_avg_sq"} <= set(state):
                raise ValueError(f"optimizer state of parameter {index} is missing (Adam's step and moments)")
            if any(state[name].shape != parameter.shape for name in ("exp_avg", "exp_avg_sq")):
                raise ValueError(f"optimizer state of parameter {index} is not shaped like the parameter")
        if missing := sorted(expected_schedule - set(description["scheduler"]), key=lambda key: (key.startswith("_"), key)):
            raise ValueError(f"scheduler state lacks {missing[0]}" + (f" and {len(missing) - 1} more" if missing[1:] else ""))
        named = checkpointing.checkpoint_step(json_path)
        if isinstance(description["step"], bool) or description["step"] != named:
            raise ValueError(f"step {description['step']!r} is not the {named} of its file name")
        metrics = description["metrics"]
        names = metrics.get("training_data", [])
        if not (isinstance(names, list) and all(isinstance(name, str) for name in names)):
            raise ValueError("metrics.training_data is not a list of file names")
        numbers = {"metrics.wall_seconds": metrics.get("wall_seconds", 0.0),
                   "metrics.best_val_psnr": metrics.get("best_val_psnr", 0.0),
                   **{f"optimizer.param_groups[{index}].lr": group.get("lr")
                      for index, group in enumerate(description["optimizer"]["param_groups"])}}
        if wrong := [name for name, value in numbers.items()
                     if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)]:
            raise ValueError(f"{wrong[0]} is not a finite number")
        world_size = metrics.get("world_size", 1)
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"metrics.world_size {world_size!r} is not a number of processes")
        if damaged := nonfinite_tensors(checkpointing.model_tensors(tensors)):  # a run that diverged before 2026-11-27
            raise ValueError(f"its weights hold {damaged}")
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as error:
        reason = f"no {error}" if isinstance(error, KeyError) else " ".join(str(error).split())[:300]  # one line
        raise checkpointing.CheckpointError(f"{json_path}: does not restore ({reason})") from None


def _sizes(volumes) -> list[list[int]]:
    """Voxel counts (numpy order) of the training volumes: with their names, what tells a resumed
    run that its folder still holds the same volumes."""
    return [list(volume.array.shape) for volume in volumes]


def check_resumable(config: TrainConfig, checkpoint: dict, world_size: int) -> None:
    """Refuse to resume a run with settings that would make it another run (README, section Training)."""
    changes = config.resume_conflicts(checkpoint["config"])  # check_restorable has read that config
    trained_by = checkpoint["metrics"].get("world_size", 1)
    if trained_by != world_size:
        changes.append(f"processes: {trained_by} -> {world_size}")
    if changes:
        raise ResumeError(f"{config.run.out_dir} holds a run that these settings would not continue "
                          f"({'; '.join(changes)}): resume it with its own settings, or give a new run "
                          "another run.out_dir")


def train_step(objective, model, optimizer, batches: list[dict], optim: OptimConfig, device: torch.device, amp: bool):
    """One optimizer step on the mean loss (eq. 9) of equal-sized `batches`, their gradients
    accumulated one batch at a time; returns the mean loss terms and the gradient norm.

    Under DDP only the last backward all-reduces: the gradients summed before it are local.
    """
    optimizer.zero_grad(set_to_none=True)
    step_terms = []
    for index, batch in enumerate(batches):
        low, high = batch["lr"].to(device, non_blocking=True), batch["hr"].to(device, non_blocking=True)
        last = index == len(batches) - 1
        with objective.no_sync() if hasattr(objective, "no_sync") and not last else contextlib.nullcontext():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                terms = losses.step_losses(objective, low, high, batch["scale"], batch["mode"],
                                           optim.cycle_weight, optim.pixel_loss, optim.noise_weight)
            (terms.total / len(batches)).backward()
        step_terms.append(losses.StepLosses(*(term.detach() for term in terms)))
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
    if not torch.isfinite(grad_norm):  # the same on every process: the gradients are all-reduced
        raise TrainingDiverged(f"the gradient norm became {grad_norm.item()}")
    optimizer.step()
    return losses.StepLosses(*(torch.stack(values).mean() for values in zip(*step_terms))), grad_norm


def machine_description() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    return f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, {device}, torch {torch.__version__}"


def provenance(config: TrainConfig, step: int, metrics: dict) -> dict:
    """What a shipped weights file says about its origin (also when exported by one process
    from a checkpoint that several wrote, hence the world size from the run's metrics)."""
    world_size = metrics.get("world_size", 1)
    return {
        "training_data": metrics["training_data"],
        "validation_data": config.data.val,
        "validation_crop": config.run.val_crop,
        "steps": step,
        "patches_seen": step * config.optim.accumulate * config.data.batch_size * world_size,
        "processes": world_size,
        "wall_seconds": round(metrics["wall_seconds"]),
        "machine": metrics["machine"],
        "validation": metrics.get("val", {}),
        "validation_step": metrics.get("val_step"),
        "train_config": config.to_dict(),
        "initialised_from": metrics.get("initialised_from"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file (see Training/configs)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.steps=1000")
    args = parser.parse_intermixed_args(argv)
    data.warnings_in_one_line()
    config = load_config_or_exit(parser, args.config, args.overrides)
    try:
        train(config)
    # OSError: run.out_dir not writable, a full disk (checkpoints are written whole or not at all)
    except OSError as error:  # "PATH: reason" rather than Python's "[Errno N] reason: 'PATH'"
        reason = f"{error.filename}: {error.strerror}" if error.filename and error.strerror else error
        parser.exit(2, f"{parser.prog}: error: {reason}\n")
    except (data.DataSourceError, ResumeError, checkpointing.CheckpointError, InputError) as error:  # InputError: run.device
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except TrainingDiverged as error:  # on a line of its own, after the progress bar's
        parser.exit(1, f"\n{parser.prog}: error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"\n{parser.prog}: interrupted; the same command resumes from the newest checkpoint in "
                         f"{config.run.out_dir}\n")


if __name__ == "__main__":
    main()
