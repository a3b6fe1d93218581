"""Latent codes at arbitrary slice positions: trilinear sampling (paper eq. 3) refined by
the local attention mechanism over the 3x3x3 nearest latent codes (paper eq. 4).

Only the slice axis (dimension D of a (B, C, D, H, W) grid) is ever sampled between grid
points: in-plane, query positions coincide with the input grid. So trilinear interpolation
reduces to a lerp between two latent slices, and since W_Q is linear, the query of a
position is the lerp of per-voxel queries. Queries, keys and values are therefore computed
once per low-resolution voxel, never once per output voxel.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

NEIGHBOURHOOD = 3  # 3x3x3 = 27 neighbours (the paper's N)


class SlicePositions(NamedTuple):
    """Where positions `t` (in input-slice units) fall on a grid of `depth` slices."""

    below: torch.Tensor  # (S,) index of the slice at or below t
    above: torch.Tensor  # (S,) index of the slice above t (clamped at the last slice)
    weight: torch.Tensor  # (S,) lerp weight of `above`
    nearest: torch.Tensor  # (S,) index of the nearest slice
    offset: torch.Tensor  # (S,) t - nearest, in [-0.5, 0.5]: the decoder's coordinate

    @classmethod
    def locate(cls, positions: torch.Tensor, depth: int) -> "SlicePositions":
        t = positions.clamp(0, depth - 1)
        below = t.floor().long().clamp(0, depth - 1)
        above = (below + 1).clamp(max=depth - 1)
        # floor(t + 0.5), not round(): round-half-even would depend on where a tile starts.
        nearest = (t + 0.5).floor().long().clamp(0, depth - 1)
        return cls(below, above, t - below, nearest, t - nearest)

    def lerp(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> (B, C, S, H, W), linear along D."""
        weight = self.weight.to(grid.dtype).view(1, 1, -1, 1, 1)
        return torch.lerp(grid[:, :, self.below], grid[:, :, self.above], weight)


class LatentGrid(NamedTuple):
    latent: torch.Tensor  # (B, C, D, H, W) encoder output
    query: torch.Tensor | None  # W_Q, W_K, W_V applied per voxel (None without attention)
    key: torch.Tensor | None
    value: torch.Tensor | None


class LatentSampler(nn.Module):
    def __init__(self, latent_dim: int, attention: bool):
        super().__init__()
        self.attention = attention
        self.scale = 1.0 / math.sqrt(latent_dim)
        self.qkv = nn.Conv3d(latent_dim, 3 * latent_dim, kernel_size=1) if attention else None

    def prepare(self, latent: torch.Tensor) -> LatentGrid:
        if not self.attention:
            return LatentGrid(latent, None, None, None)
        query, key, value = self.qkv(latent).chunk(3, dim=1)
        return LatentGrid(latent, query, key, value)

    def sample(self, grid: LatentGrid, where: SlicePositions) -> torch.Tensor:
        """Latent codes (B, C, S, H, W) at the located slice positions."""
        if not self.attention:
            return where.lerp(grid.latent)
        return self._attend(where.lerp(grid.query), grid.key, grid.value, where.nearest)

    def _attend(self, query, key, value, nearest) -> torch.Tensor:
        """Softmax over the 27 neighbours of the nearest voxel; outside the grid is masked."""
        height, width = key.shape[-2:]
        ones = torch.ones((1, 1) + tuple(key.shape[2:]), dtype=key.dtype, device=key.device)
        log_valid = F.pad(ones, (1, 1, 1, 1, 1, 1)).log()  # 0 inside, -inf in the padding
        key, value = F.pad(key, (1, 1, 1, 1, 1, 1)), F.pad(value, (1, 1, 1, 1, 1, 1))

        def neighbours(padded: torch.Tensor):
            for dz in range(NEIGHBOURHOOD):
                plane = padded[:, :, nearest + dz]
                for dy in range(NEIGHBOURHOOD):
                    for dx in range(NEIGHBOURHOOD):
                        yield plane[..., dy:dy + height, dx:dx + width]

        scores = torch.stack(
            [(query * k).sum(1) * self.scale + m[:, 0] for k, m in zip(neighbours(key), neighbours(log_valid))],
            dim=1,
        )  # (B, 27, S, H, W)
        weights = torch.softmax(scores, dim=1)
        refined = torch.zeros_like(query)
        for index, v in enumerate(neighbours(value)):
            refined.addcmul_(weights[:, index:index + 1], v)
        return refined
