"""The CycleINR training objective (paper eq. 6-9) around the coordinate-based model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from CycleINRLib import geometry


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


def step_losses(objective: nn.Module, low: torch.Tensor, high: torch.Tensor, scale: float, mode: str,
                cycle_weight: float, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 9 for one batch: (total, L_INR, L_Cycle). The cycle term only for `interval` batches,
    whose LR slices are point samples as eq. 7 assumes (a thick slice is not one)."""
    cycle = cycle_weight > 0 and mode == "interval"
    generated, reestimated = objective(low, scale, cycle)
    loss_inr = inr_loss(generated, high, kind)
    loss_cycle = cycle_loss(reestimated, low, kind) if cycle else torch.zeros((), device=low.device)
    return loss_inr + cycle_weight * loss_cycle, loss_inr, loss_cycle
