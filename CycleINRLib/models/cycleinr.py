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
# Inference on a CPU decodes this many pixels of a plane at a time: their neighbourhoods and
# decoder activations stay in cache (benchmarks/decode_block_bench.py). A GPU takes whole planes.
CPU_BLOCK_PIXELS = 1024


def decode_block_pixels(device: torch.device) -> int | None:
    """Pixels of a plane that inference decodes at a time on `device`; None: whole planes."""
    return CPU_BLOCK_PIXELS if device.type == "cpu" else None


def inference_memory_format(device: torch.device) -> torch.memory_format:
    """How inference lays out the encoder's weights on `device`: channels-last on a CPU, where
    oneDNN's 3D convolutions then run faster and write the latent grid in the order the
    attention reads it, so it needs no reordered copy (README, Speed). GPUs: not measured."""
    return torch.channels_last_3d if device.type == "cpu" else torch.contiguous_format


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

    def encode(self, volume: torch.Tensor, rows: slice = slice(None), columns: slice = slice(None)) -> LatentGrid:
        """(B, 1, D, H, W) normalized intensities -> per-voxel latent, query, key, value, kept
        for the in-plane crop `rows`, `columns` alone (a tile drops its context margin here,
        before its queries, keys and values are made)."""
        return self.sampler.prepare(self.encoder(volume)[..., rows, columns])

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
        if torch.is_grad_enabled():
            latent = self.sampler.sample(grid, where)  # (B, S, H, W, C)
            intensity = self._intensities(latent, where.offset.view(1, -1, 1, 1)).unsqueeze(1)
        else:
            intensity = self._decode_blocks(grid, where, decode_block_pixels(volume.device))
        if self.config.predict_residual:
            intensity = intensity + where.lerp(volume, dim=2)
        return intensity

    def _decode_blocks(self, grid: LatentGrid, where: SlicePositions, block_pixels: int | None) -> torch.Tensor:
        """Inference: (B, 1, S, H, W), each block of codes decoded as soon as it is sampled."""
        batch, _, height, width, _ = grid.latent.shape
        intensity = grid.latent.new_empty((len(where.nearest), batch * height * width), dtype=torch.float32)
        for uses, pixels, codes in self.sampler.sample_blocks(grid, where, block_pixels):
            intensity[uses, pixels] = self._intensities(codes, where.offset[uses].view(1, -1)).transpose(0, 1)
        return intensity.view(-1, batch, height, width).transpose(0, 1).unsqueeze(1)

    def _intensities(self, codes: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """The decoder's output for latent codes (..., C) at slice offsets broadcastable to (...)."""
        offset = (2.0 * offset).to(codes.dtype).expand(codes.shape[:-1]).unsqueeze(-1)
        features = torch.cat([offset, codes], dim=-1)
        return self.decoder(features.view(-1, features.shape[-1])).view(codes.shape[:-1])

    def forward(self, volume: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(volume), volume, positions)
