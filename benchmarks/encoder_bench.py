"""Time the shipped model's encoder in inference on one CPU tile, and check that the in-place
residual sum of inference gives the latent grid of the out-of-place sum that training uses.

    .venv/bin/python benchmarks/encoder_bench.py            # a 28 x 258 x 258 tile, 5 runs, 2 threads
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from CycleINRLib.checkpoint import load_model  # noqa: E402
from CycleINRLib.models.cycleinr import inference_memory_format  # noqa: E402


def out_of_place(encoder, volume: torch.Tensor) -> torch.Tensor:
    """The encoder with `features + body(features)` in every block, as under autograd."""
    features = encoder.head(volume)
    for block in encoder.blocks:
        features = features + block.body(features)
    return encoder.project(features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__ and __doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[28, 258, 258], metavar=("D", "H", "W"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    model, _ = load_model(None, device)
    model = model.to(memory_format=inference_memory_format(device)).eval()
    volume = torch.rand(1, 1, *args.shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = out_of_place(model.encoder, volume)
        seconds = []
        for _ in range(args.runs):
            started = time.perf_counter()
            latent = model.encoder(volume)
            seconds.append(time.perf_counter() - started)
    print(f"encoder on {'x'.join(map(str, args.shape))}, {args.threads} threads: "
          f"{' / '.join(f'{s:.2f}' for s in sorted(seconds))} s; "
          f"equal to the out-of-place sum: {torch.equal(latent, reference)}")


if __name__ == "__main__":
    main()
