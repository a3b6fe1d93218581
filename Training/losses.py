"""The CycleINR training objective (paper eq. 6-9) around the coordinate-based model."""

from __future__ import annotations

import math
from typing import NamedTuple

import pywt
import torch
import torch.nn.functional as F
from torch import nn

from CycleINRLib import geometry
from CycleINRLib.metrics import GAUSSIAN_MAD, NOISE_WAVELET


def hr_positions(lr_slices: int, scale: float) -> torch.Tensor:
    """Positions, in LR slice units, of the thin slices the pair's HR patch holds: j / r."""
    return torch.as_tensor(geometry.output_positions(lr_slices, scale), dtype=torch.float32)


def lr_positions(hr_slices: int, scale: float) -> torch.Tensor:
    """Positions, in HR slice units, of the LR slices the generated patch covers: i * r.

    Generally fractional (r = 2.3 puts LR slice 1 at HR position 2.3), so the cycle pass
    samples them through the coordinate-based model rather than by picking every r-th slice;
    an LR slice beyond the last HR slice (when (n - 1) * r is fractional) is left out.
    """
    count = int((hr_slices - 1) / scale + 1e-6) + 1
    return torch.arange(count, dtype=torch.float32) * scale


class CycleObjective(nn.Module):
    """Both passes of a step in one forward, so DDP sees a single forward per backward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, low: torch.Tensor, scale: float, cycle: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Generated HR (eq. 6) and, when `cycle`, the LR re-estimated from it (eq. 7)."""
        generated = self.model(low, hr_positions(low.shape[2], scale))
        if not cycle:
            return generated, None
        return generated, self.model(generated, lr_positions(generated.shape[2], scale))


PIXEL_LOSSES = {"l1": F.l1_loss, "l2": F.mse_loss}


def inr_loss(generated: torch.Tensor, high: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Eq. 8: L1 (or, with kind="l2", mean squared error) between generated and true HR intensities."""
    return PIXEL_LOSSES[kind](generated.float(), high)


def cycle_loss(reestimated: torch.Tensor, low: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Eq. 7: L1 (or L2) between the LR slices sampled from the generated HR and the LR input."""
    return PIXEL_LOSSES[kind](reestimated.float(), low[:, :, :reestimated.shape[2]])


_HIGH_PASS = torch.tensor(pywt.Wavelet(NOISE_WAVELET).dec_hi[::-1])  # flipped: conv2d correlates
DIAGONAL_DETAIL_KERNEL = (_HIGH_PASS[:, None] * _HIGH_PASS[None, :]).view(1, 1, 4, 4)
# E|x| over the smaller half of |x| for a unit Gaussian (|x| below its median q = 0.6745):
# sqrt(2/pi) (1 - exp(-q^2/2)) / 0.5; dividing by it turns the trimmed mean into a standard deviation.
GAUSSIAN_LOWER_HALF_MEAN_ABS = math.sqrt(2 / math.pi) * (1 - math.exp(-GAUSSIAN_MAD ** 2 / 2)) / 0.5


def slice_noise_levels(volume: torch.Tensor) -> torch.Tensor:
    """Differentiable noise level of every slice of (B, 1, S, H, W): (B, S), image units.

    The estimator of SNLI (CycleINRLib.metrics, Donoho-Johnstone on the finest diagonal db2
    coefficients; these are pywt.dwt2's interior ones), with the median of |coefficient|
    replaced by the mean of the smaller half: as robust to edges, but every coefficient
    below the median gets a gradient, not just the median one.
    """
    planes = volume.float().flatten(0, 2).unsqueeze(1)  # (B * S, 1, H, W)
    with torch.autocast(planes.device.type, enabled=False):  # autocast would run it in bfloat16 after all
        detail = F.conv2d(planes, DIAGONAL_DETAIL_KERNEL.to(planes), stride=2).abs().flatten(1)
    smaller_half = detail.sort(dim=1).values[:, : max(1, detail.shape[1] // 2)]
    return (smaller_half.mean(dim=1) / GAUSSIAN_LOWER_HALF_MEAN_ABS).view(volume.shape[0], volume.shape[2])


def noise_level_loss(generated: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Mean |noise level of a generated slice - that of the true slice|: what SNLI sees.

    Not in the paper. L1 and L2 both reward the noise-free value where the noise cannot be
    predicted, so generated slices come out smoother than acquired ones (README, section
    Training); this term makes a smooth slice cost what its missing noise costs SNLI.
    """
    return F.l1_loss(slice_noise_levels(generated), slice_noise_levels(high))


class StepLosses(NamedTuple):
    total: torch.Tensor
    inr: torch.Tensor
    cycle: torch.Tensor
    noise: torch.Tensor


def step_losses(objective: nn.Module, low: torch.Tensor, high: torch.Tensor, scale: float, mode: str,
                cycle_weight: float, kind: str, noise_weight: float = 0.0) -> StepLosses:
    """Eq. 9 for one batch, plus `noise_weight` times the noise-level term when it is not 0.
    The cycle term only for `interval` batches, whose LR slices are point samples as eq. 7
    assumes (a thick slice is not one)."""
    cycle = cycle_weight > 0 and mode == "interval"
    generated, reestimated = objective(low, scale, cycle)
    zero = torch.zeros((), device=low.device)
    loss_inr = inr_loss(generated, high, kind)
    loss_cycle = cycle_loss(reestimated, low, kind) if cycle else zero
    loss_noise = noise_level_loss(generated, high) if noise_weight > 0 else zero
    return StepLosses(loss_inr + cycle_weight * loss_cycle + noise_weight * loss_noise, loss_inr, loss_cycle, loss_noise)
