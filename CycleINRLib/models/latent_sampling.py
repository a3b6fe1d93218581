"""Latent codes at arbitrary slice positions: trilinear sampling (paper eq. 3) refined by
the local attention mechanism over the 3x3x3 nearest latent codes (paper eq. 4).

Only the slice axis (D of a (B, D, H, W, C) channels-last grid) is ever sampled between
grid points: in-plane, query positions coincide with the input grid. So trilinear
interpolation reduces to a lerp between two latent slices, and since W_Q is linear, the
query of a position is the lerp of per-voxel queries. Queries, keys and values are computed
once per low-resolution voxel and keys and values zero-padded once per grid; the
27-neighbourhoods of keys and values are gathered once per low-resolution slice (in
inference, per block of its pixels) and shared by every output slice nearest to it.
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

    def lerp(self, grid: torch.Tensor, dim: int) -> torch.Tensor:
        """Linear interpolation along `dim` of `grid` at every position."""
        shape = [1] * grid.dim()
        shape[dim] = -1
        weight = self.weight.to(grid.dtype).view(shape)
        return torch.lerp(grid.index_select(dim, self.below), grid.index_select(dim, self.above), weight)


class LatentGrid(NamedTuple):
    """Per-voxel latent codes, channels last: (B, D, H, W, C).

    Keys and values carry a ring of zeros, one voxel deep, around D, H and W: the
    neighbourhoods of border voxels read it (masked out), and padding once per grid instead of
    once per decoded chunk saves a copy of both grids per chunk.
    """

    latent: torch.Tensor
    query: torch.Tensor | None  # W_Q, W_K, W_V applied per voxel (None without attention)
    padded_key: torch.Tensor | None  # (B, D+2, H+2, W+2, C)
    padded_value: torch.Tensor | None

    def crop(self, rows: slice, columns: slice) -> "LatentGrid":
        """The grid of the in-plane crop, contiguous, its keys and values padded anew."""
        latent, query = (part[:, :, rows, columns].contiguous() if part is not None else None for part in self[:2])
        if query is None:
            return LatentGrid(latent, None, None, None)
        return LatentGrid(latent, query, *(_pad(_interior(part)[:, :, rows, columns]) for part in self[2:]))


def _pad(part: torch.Tensor) -> torch.Tensor:
    return F.pad(part, (0, 0, 1, 1, 1, 1, 1, 1))


def _interior(part: torch.Tensor) -> torch.Tensor:
    return part[:, 1:-1, 1:-1, 1:-1]


class LatentSampler(nn.Module):
    def __init__(self, latent_dim: int, attention: bool, residual: bool = False):
        super().__init__()
        self.attention = attention
        self.residual = residual
        self.scale = 1.0 / math.sqrt(latent_dim)
        self.qkv = nn.Linear(latent_dim, 3 * latent_dim) if attention else None
        if residual:  # W_V = 0: the attention term starts at zero, the code at the trilinear one
            nn.init.zeros_(self.qkv.weight[2 * latent_dim:])
            nn.init.zeros_(self.qkv.bias[2 * latent_dim:])

    def prepare(self, latent: torch.Tensor) -> LatentGrid:
        """(B, C, D, H, W) encoder output -> channels-last grid with queries, keys, values."""
        # Contiguous once here: index_select along D would otherwise copy the whole grid for
        # every decoded chunk.
        latent = latent.permute(0, 2, 3, 4, 1).contiguous()
        if not self.attention:
            return LatentGrid(latent, None, None, None)
        query, key, value = self.qkv(latent).chunk(3, dim=-1)
        return LatentGrid(latent, query.contiguous(), _pad(key), _pad(value))

    def sample(self, grid: LatentGrid, where: SlicePositions) -> torch.Tensor:
        """Latent codes (B, S, H, W, C) at the located slice positions, whole planes at a time
        (training; inference goes through `sample_blocks`)."""
        if not self.attention:
            return where.lerp(grid.latent, dim=1)
        attended = self._attend(where.lerp(grid.query, dim=1), grid, where.nearest)
        return where.lerp(grid.latent, dim=1) + attended if self.residual else attended

    def sample_blocks(self, grid: LatentGrid, where: SlicePositions, block_pixels: int | None = None):
        """Inference, one block of pixels at a time: yields (uses, pixels, codes), the codes
        (P, U, C) of the output slices `uses` (U,) nearest to one acquired slice, at `pixels`,
        a slice of the (B, H, W) plane flattened. Blocks that stay in a CPU's caches, decoded
        as they come, make inference several times faster than whole planes (README, Speed).
        `block_pixels` None: the whole plane."""
        latent = _planes(grid.latent)
        plane = latent.shape[1]
        query = _planes(grid.query) if self.attention else None
        neighbourhoods = _Neighbourhoods(grid) if self.attention else None
        for slice_index in torch.unique(where.nearest).tolist():
            uses = torch.nonzero(where.nearest == slice_index).flatten()
            below, above = where.below[uses], where.above[uses]
            weight = where.weight[uses].to(latent.dtype).view(-1, 1, 1)
            for start in range(0, plane, block_pixels or plane):
                pixels = slice(start, min(start + (block_pixels or plane), plane))

                def lerp(part: torch.Tensor) -> torch.Tensor:  # (P, U, C)
                    return torch.lerp(part[below, pixels], part[above, pixels], weight).transpose(0, 1)

                if not self.attention:
                    yield uses, pixels, lerp(latent)
                    continue
                attended = self._attend_slice(lerp(query), *neighbourhoods.of(slice_index, pixels))
                yield uses, pixels, lerp(latent) + attended if self.residual else attended

    def _attend(self, query, grid: LatentGrid, nearest) -> torch.Tensor:
        """Softmax over the 27 neighbours of the nearest voxel, whole planes at a time (training)."""
        batch, _, height, width, channels = query.shape
        neighbourhoods = _Neighbourhoods(grid)
        everything = slice(0, batch * height * width)
        refined = torch.empty_like(query)
        for slice_index in torch.unique(nearest).tolist():
            uses = torch.nonzero(nearest == slice_index).flatten()
            queries = query[:, uses].permute(0, 2, 3, 1, 4).reshape(batch * height * width, len(uses), channels)
            attended = self._attend_slice(queries, *neighbourhoods.of(slice_index, everything))
            refined[:, uses] = attended.view(batch, height, width, len(uses), channels).permute(0, 3, 1, 2, 4)
        return refined

    def _attend_slice(self, queries, keys, values, mask) -> torch.Tensor:
        """Attention for queries (N, U, C) nearest to one slice, given that slice's gathered
        neighbourhoods (N, 27, C) of keys and values and their validity (N, 27, 1)."""
        log_valid = mask.log().transpose(1, 2)  # (N, 1, 27): 0 inside, -inf outside
        weights = torch.softmax(torch.baddbmm(log_valid, queries, keys.transpose(1, 2), alpha=self.scale), dim=-1)
        return torch.bmm(weights, values)


def _planes(part: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W, C) -> (D, B*H*W, C); a view when B is 1, as in inference."""
    return part.transpose(0, 1).reshape(part.shape[1], -1, part.shape[-1])


class _Neighbourhoods:
    """The 27-neighbourhoods of keys, values and their validity around the voxels of one slice.

    Gathering rows by index (not unfolding windows) makes the backward pass a plain index_add,
    several times faster on CPU. In inference one buffer per grid is refilled for every block:
    fresh ones of a few MB each cost more in page faults than the gathering itself.
    """

    def __init__(self, grid: LatentGrid):
        batch, depth, height, width = (n - 2 if axis else n for axis, n in enumerate(grid.padded_key.shape[:4]))
        valid = _pad(grid.padded_key.new_ones((batch, depth, height, width, 1)))
        self.grids = tuple(part.view(-1, part.shape[-1]) for part in (grid.padded_key, grid.padded_value, valid))
        self.first_slice = _neighbourhood_rows(batch, depth, height, width, grid.padded_key.device)
        self.plane_rows = (height + 2) * (width + 2)
        self.buffers = None

    def of(self, slice_index: int, pixels: slice) -> list[torch.Tensor]:
        """(P, 27, C) keys, values and validity of the pixels (flattened (b, y, x)) of a slice;
        in inference, valid until the next call."""
        rows = self.first_slice[pixels.start * NEIGHBOURHOOD**3:pixels.stop * NEIGHBOURHOOD**3] + slice_index * self.plane_rows
        if torch.is_grad_enabled():
            gathered = [part.index_select(0, rows) for part in self.grids]
        else:
            if self.buffers is None or len(self.buffers[0]) < len(rows):
                self.buffers = [part.new_empty((len(rows), part.shape[-1])) for part in self.grids]
            gathered = [torch.index_select(part, 0, rows, out=buffer[:len(rows)])
                        for part, buffer in zip(self.grids, self.buffers)]
        return [part.view(-1, NEIGHBOURHOOD**3, part.shape[-1]) for part in gathered]


def _neighbourhood_rows(batch: int, depth: int, height: int, width: int, device) -> torch.Tensor:
    """Rows of a flattened (B, D+2, H+2, W+2) zero-padded grid holding the 27 neighbours of
    every voxel of slice 0, ordered (b, y, x, dz, dy, dx); slice s adds s * (H+2) * (W+2)."""
    padded = (depth + 2, height + 2, width + 2)
    b, y, x = torch.meshgrid(*(torch.arange(n, device=device) for n in (batch, height, width)), indexing="ij")
    dz, dy, dx = torch.meshgrid(*(torch.arange(NEIGHBOURHOOD, device=device) for _ in range(3)), indexing="ij")
    centre = ((b * padded[0]) * padded[1] + y) * padded[2] + x  # (B, H, W): the window's corner
    shift = (dz * padded[1] + dy) * padded[2] + dx  # (3, 3, 3)
    return (centre[..., None, None, None] + shift).flatten()
