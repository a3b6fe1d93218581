"""Seconds per training step (both loss passes, backward, clipping, Adam) of a training config,
and the peak memory of the process (CPU: resident size; CUDA: tensors allocated on the GPU).

Draws the config's own batches from its real training volumes, so scales, degradations and
patch sizes are those of a real run; the first steps warm up and are not counted. Batches are
drawn in this process between the timed steps (`data.workers` is not used), and the CPU peak
includes the loaded volumes: the resident size before the first step is printed below the
table. Prints one Markdown table row for README:

    .venv/bin/python benchmarks/train_step_bench.py                                  # Training/configs/ct_cpu.yaml
    .venv/bin/python benchmarks/train_step_bench.py --config Training/configs/ct.yaml --steps 20 run.device=cuda
    .venv/bin/python benchmarks/train_step_bench.py --config Training/configs/ct.yaml --warm-up 0 --steps 1 \
        run.device=cpu data.workers=0 data.scale_min=6 data.scale_max=6 run.recompute_slices=4   # memory at r = 6
    .venv/bin/python benchmarks/train_step_bench.py --steps 5 --profile 25   # and where a step's time goes
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from CycleINRLib.engine import resolve_device  # noqa: E402
from CycleINRLib.models import CycleINR  # noqa: E402
from Training import data, losses  # noqa: E402
from Training.config import load_config  # noqa: E402
from Training.train import train_step  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__ and __doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "Training" / "configs" / "ct_cpu.yaml"))
    parser.add_argument("--steps", type=int, default=40, help="timed steps after the warm-up")
    parser.add_argument("--warm-up", type=int, default=3, help="steps run first and not timed")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="then profile --steps more steps (torch.profiler) and print the ROWS operators that took longest")
    parser.add_argument("overrides", nargs="*", help="section.key=value, as for Training/train.py")
    args = parser.parse_intermixed_args()
    if args.steps < 1 or args.warm_up < 0:
        parser.error("--steps must be at least 1 and --warm-up at least 0")
    config = load_config(args.config, args.overrides)
    if not Path(config.data.train).exists():
        raise SystemExit(f"{config.data.train} is absent: the benchmark needs the training volumes (../shared/data)")
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    device = resolve_device(config.run.device)
    torch.manual_seed(config.optim.seed)
    model_config = config.model_config()
    batches = data.PairBatches(data.load_volumes(config.data.train, config.data, model_config.normalization),
                               config.data, config.optim.seed)
    model = CycleINR(model_config).to(device)
    model.recompute_slices = config.run.recompute_slices
    objective = losses.CycleObjective(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.optim.lr)
    amp = config.optim.autocast(device.type)
    accumulate = config.optim.accumulate

    def step_batches(step: int) -> list[dict]:
        return [batches[(0, step * accumulate + index)] for index in range(accumulate)]

    before_first_step_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    seconds = []
    for step in range(args.warm_up + args.steps):
        drawn = step_batches(step)
        started = time.perf_counter()
        train_step(objective, model, optimizer, drawn, config.optim, device, amp)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    timed = seconds[args.warm_up:]
    if device.type == "cuda":
        where, peak_gb = torch.cuda.get_device_name(device), torch.cuda.max_memory_allocated(device) / 2**30
    else:
        where = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("| config | device | steps | mean s/step | median s/step | patches/s | peak memory (GiB) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {Path(args.config).name} {' '.join(args.overrides)} | {where} | {len(timed)} | {statistics.mean(timed):.3f} | "
          f"{statistics.median(timed):.3f} | {accumulate * config.data.batch_size / statistics.mean(timed):.1f} | {peak_gb:.2f} |")
    if device.type != "cuda":
        print(f"\nresident before the first step (volumes, model, interpreter): {before_first_step_gb:.2f} GiB")
    if args.profile:  # after the timed steps, so that the profiler's overhead stays out of them
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as profiler:
            for step in range(args.warm_up + args.steps, args.warm_up + 2 * args.steps):
                train_step(objective, model, optimizer, step_batches(step), config.optim, device, amp)
            if device.type == "cuda":
                torch.cuda.synchronize()
        sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(profiler.key_averages().table(sort_by=sort_by, row_limit=args.profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
