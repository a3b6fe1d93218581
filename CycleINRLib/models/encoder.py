"""Residual 3D CNN that turns every low-resolution voxel into a latent code (paper eq. 2)."""

from __future__ import annotations

import torch
from torch import nn


def _conv3x3(width_in: int, width_out: int) -> nn.Conv3d:
    # Replicate padding: a body cut by the volume border continues rather than meeting air.
    return nn.Conv3d(width_in, width_out, kernel_size=3, padding=1, padding_mode="replicate")


class ResidualBlock(nn.Module):
    def __init__(self, width: int, convs: int):
        super().__init__()
        layers = []
        for _ in range(convs):
            layers += [_conv3x3(width, width), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # autograd keeps the ReLU's output, which must stay as it is
            return features + self.body(features)
        return self.body(features).add_(features)  # inference: no fresh grid-sized tensor to fault in


class Encoder(nn.Module):
    """(B, 1, D, H, W) intensities -> (B, latent_dim, D, H, W) latent codes."""

    def __init__(self, width: int, blocks: int, convs_per_block: int, latent_dim: int):
        super().__init__()
        self.head = nn.Sequential(_conv3x3(1, width), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(*[ResidualBlock(width, convs_per_block) for _ in range(blocks)])
        self.project = nn.Conv3d(width, latent_dim, kernel_size=1)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return self.project(self.blocks(self.head(volume)))
