"""The CycleINR network, one small file per part: encoder, latent sampling, decoder."""

from .cycleinr import CycleINR

__all__ = ["CycleINR"]
