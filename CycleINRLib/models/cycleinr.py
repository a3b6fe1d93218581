"""The CycleINR model G: a volume and slice positions in, intensities at those positions out.

Positions are in units of the input's slice index along dimension D, so the same model
upsamples (positions j / r on a low-resolution input) and, in the cycle-consistent loss,
samples a generated high-resolution volume back at the low-resolution positions (i * r).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from .decoder import Decoder
from .encoder import Encoder
from .latent_sampling import LatentGrid, LatentSampler, SlicePositions

COORDINATE_DIM = 1  # the slice-axis offset; in-plane offsets are always zero (queries lie on the grid)


class CycleINR(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # Training only, not part of the model: decode this many slices at a time and recompute
        # their activations in the backward pass instead of keeping them (0: keep everything).
        self.recompute_slices = 0
        self.encoder = Encoder(config.encoder_width, config.encoder_blocks, config.convs_per_block, config.latent_dim)
        self.sampler = LatentSampler(config.latent_dim, config.attention, config.attention_residual)
        self.decoder = Decoder(
            COORDINATE_DIM + config.latent_dim, config.decoder_width, config.decoder_layers, config.decoder_skip_layer,
            config.decoder_activation,
        )
        if config.predict_residual:
            # An untrained residual model reproduces linear interpolation exactly.
            nn.init.zeros_(self.decoder.output.weight)
            nn.init.zeros_(self.decoder.output.bias)

    def encode(self, volume: torch.Tensor) -> LatentGrid:
        """(B, 1, D, H, W) normalized intensities -> per-voxel latent, query, key, value."""
        return self.sampler.prepare(self.encoder(volume))

    def decode(self, grid: LatentGrid, volume: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Intensities (B, 1, S, H, W) at slice positions (S,) of the encoded `volume`.

        With `recompute_slices` set and gradients on, the sampled neighbourhoods and decoder
        activations of only one chunk of slices are alive at a time (torch.utils.checkpoint):
        they dominate a training step's memory, which then grows with the chunk, not with S.
        """
        if self.recompute_slices and torch.is_grad_enabled() and len(positions) > self.recompute_slices:
            chunks = positions.split(self.recompute_slices)
            return torch.cat([checkpoint(self._decode, grid, volume, chunk, use_reentrant=False) for chunk in chunks], dim=2)
        return self._decode(grid, volume, positions)

    def _decode(self, grid: LatentGrid, volume: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        where = SlicePositions.locate(positions.to(volume.device), volume.shape[2])
        latent = self.sampler.sample(grid, where)  # (B, S, H, W, C)
        offset = (2.0 * where.offset).to(latent.dtype).view(1, -1, 1, 1, 1).expand(*latent.shape[:4], 1)
        features = torch.cat([offset, latent], dim=-1)
        intensity = self.decoder(features.view(-1, features.shape[-1])).view(latent.shape[0], 1, *latent.shape[1:4])
        if self.config.predict_residual:
            intensity = intensity + where.lerp(volume, dim=2)
        return intensity

    def forward(self, volume: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(volume), volume, positions)
