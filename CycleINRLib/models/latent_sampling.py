"""Latent codes at arbitrary slice positions: trilinear sampling (paper eq. 3) refined by
the local attention mechanism over the 3x3x3 nearest latent codes (paper eq. 4).

Only the slice axis (D of a (B, D, H, W, C) channels-last grid) is ever sampled between
grid points: in-plane, query positions coincide with the input grid. So trilinear
interpolation reduces to a lerp between two latent slices, and since W_Q is linear, the
query of a position is the lerp of per-voxel queries. Queries, keys and values are computed
once per low-resolution voxel; the 27-neighbourhoods of keys and values are gathered once per
low-resolution slice (in inference, per block of its pixels) and shared by every output slice
nearest to it. Neighbours outside the grid are read at the nearest voxel inside and masked out
of the softmax, so the grids need no padded copies.
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
    """Per-voxel latent codes, channels last: (B, D, H, W, C), and with attention W_Q, W_K and
    W_V applied per voxel, each (B, D, H, W, C) and contiguous (None without attention)."""

    latent: torch.Tensor
    query: torch.Tensor | None
    key: torch.Tensor | None
    value: torch.Tensor | None


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
        # every decoded chunk. No copy when the encoder wrote channels-last (inference on a
        # CPU) and `latent` is not an in-plane crop.
        latent = latent.permute(0, 2, 3, 4, 1).contiguous()
        if not self.attention:
            return LatentGrid(latent, None, None, None)
        # One product per part, each contiguous as it comes: no 3C-wide result to split and copy.
        parts = zip(self.qkv.weight.chunk(3), self.qkv.bias.chunk(3))
        return LatentGrid(latent, *(F.linear(latent, weight, bias) for weight, bias in parts))

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

    def _attend_slice(self, queries, keys, values, log_valid) -> torch.Tensor:
        """Attention for queries (N, U, C) nearest to one slice, given that slice's gathered
        neighbourhoods (N, 27, C) of keys and values and log_valid (N, 1, 27), 0 for the
        neighbours inside the grid and -inf for those outside (their weight becomes 0)."""
        weights = torch.softmax(torch.baddbmm(log_valid, queries, keys.transpose(1, 2), alpha=self.scale), dim=-1)
        return torch.bmm(weights, values)


def _planes(part: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W, C) -> (D, B*H*W, C); a view when B is 1, as in inference."""
    return part.transpose(0, 1).reshape(part.shape[1], -1, part.shape[-1])


class _Neighbourhoods:
    """The 27-neighbourhoods of keys and values around the voxels of one slice, and which of
    them lie inside the grid.

    Gathering rows by index (not unfolding windows) makes the backward pass a plain index_add,
    several times faster on CPU. A neighbour outside the grid is read at the nearest voxel
    inside, a row that exists, and masked out. In inference one buffer per grid is refilled for
    every block: fresh ones of a few MB each cost more in page faults than the gathering itself.
    """

    def __init__(self, grid: LatentGrid):
        batch, self.depth, height, width, _ = grid.key.shape
        self.grids = tuple(part.view(-1, part.shape[-1]) for part in (grid.key, grid.value))
        self.plane_rows = height * width
        device = grid.key.device
        # (B*H*W, 27): the in-plane part of each neighbour's row, and 0 / -inf for inside / outside
        self.in_plane_rows, in_plane_inside = _in_plane_neighbours(batch, self.depth, height, width, device)
        self.in_plane_log_valid = torch.zeros(in_plane_inside.shape, dtype=grid.key.dtype, device=device)
        self.in_plane_log_valid.masked_fill_(~in_plane_inside, -math.inf)
        self.dz = torch.arange(-1, 2, device=device).repeat_interleave(NEIGHBOURHOOD**2)  # (27,), order (dz, dy, dx)
        self.buffers = None

    def of(self, slice_index: int, pixels: slice) -> list[torch.Tensor]:
        """Keys and values (P, 27, C) around the pixels (flattened (b, y, x)) of a slice and
        their log-validity (P, 1, 27); in inference, valid until the next call."""
        z = self.dz + slice_index
        z_log_valid = torch.zeros(z.shape, dtype=self.in_plane_log_valid.dtype, device=z.device)
        z_log_valid.masked_fill_((z < 0) | (z >= self.depth), -math.inf)
        rows = (self.in_plane_rows[pixels] + z.clamp(0, self.depth - 1) * self.plane_rows).flatten()
        log_valid = (self.in_plane_log_valid[pixels] + z_log_valid).unsqueeze(1)
        if torch.is_grad_enabled():
            gathered = [part.index_select(0, rows) for part in self.grids]
        else:
            if self.buffers is None or len(self.buffers[0]) < len(rows):
                self.buffers = [part.new_empty((len(rows), part.shape[-1])) for part in self.grids]
            gathered = [torch.index_select(part, 0, rows, out=buffer[:len(rows)])
                        for part, buffer in zip(self.grids, self.buffers)]
        return [part.view(-1, NEIGHBOURHOOD**3, part.shape[-1]) for part in gathered] + [log_valid]


def _in_plane_neighbours(batch: int, depth: int, height: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """For every pixel (b, y, x) of a slice and its 27 neighbours, ordered (dz, dy, dx): the row
    of a flattened (B, D, H, W) grid at slice 0, the neighbour clamped into the plane, and
    whether it lay inside the plane; slice z adds z * H * W."""
    b, y, x = (n.reshape(-1, 1) for n in torch.meshgrid(
        *(torch.arange(n, device=device) for n in (batch, height, width)), indexing="ij"))
    _, dy, dx = (n.reshape(1, -1) - 1 for n in torch.meshgrid(
        *(torch.arange(NEIGHBOURHOOD, device=device) for _ in range(3)), indexing="ij"))
    v, u = y + dy, x + dx  # (B*H*W, 27)
    inside = (v >= 0) & (v < height) & (u >= 0) & (u < width)
    rows = (b * depth * height + v.clamp(0, height - 1)) * width + u.clamp(0, width - 1)
    return rows, inside
