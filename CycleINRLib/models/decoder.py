"""MLP that maps (relative coordinate, refined latent code) to an intensity (paper eq. 5)."""

from __future__ import annotations

import torch
from torch import nn


class Decoder(nn.Module):
    """`layers` fully connected layers, each followed by `activation`; the input is concatenated
    again before layer `skip_layer` (the skip connection of the paper's decoder, as in ArSSR)."""

    def __init__(self, input_dim: int, width: int, layers: int, skip_layer: int, activation: str = "relu"):
        super().__init__()
        self.skip_layer = skip_layer
        self.activation = {"relu": nn.ReLU(), "gelu": nn.GELU()}[activation]
        self.hidden = nn.ModuleList()
        for index in range(layers):
            width_in = input_dim if index == 0 else width
            if index == skip_layer:
                width_in += input_dim
            self.hidden.append(nn.Linear(width_in, width))
        self.output = nn.Linear(width, 1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """(M, input_dim) -> (M,)"""
        features = inputs
        for index, layer in enumerate(self.hidden):
            if index == self.skip_layer:
                features = torch.cat([features, inputs], dim=-1)
            features = self.activation(layer(features))
        # In float32 under autocast: bfloat16 would round intensities over the paper window's
        # 4095 HU to steps of 8-16 HU, below which an L1 gradient has no reliable direction.
        with torch.autocast(features.device.type, enabled=False):
            return self.output(features.to(self.output.weight.dtype)).squeeze(-1)
