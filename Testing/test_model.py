"""The local attention mechanism (paper eq. 4) against a direct, voxel-by-voxel reading of it."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from CycleINRLib.models.latent_sampling import LatentSampler, SlicePositions  # noqa: E402
from conftest import DEVICES, NEEDS_CUDA  # noqa: E402


def attention_by_definition(grid, where: SlicePositions) -> torch.Tensor:
    """softmax(W_Q z_hat . W_K z_i / sqrt(C)) W_V z_i over the 3x3x3 codes around the nearest
    acquired voxel that lie inside the grid, one query at a time."""
    key, value = grid.key, grid.value
    batch, depth, height, width, channels = key.shape
    result = torch.zeros(batch, len(where.nearest), height, width, channels, dtype=torch.float64)
    for b in range(batch):
        for s, (below, above, weight, nearest) in enumerate(zip(where.below, where.above, where.weight, where.nearest)):
            for y in range(height):
                for x in range(width):
                    query = torch.lerp(grid.query[b, below, y, x], grid.query[b, above, y, x], weight).double()
                    neighbours = [(z, v, u) for z in range(nearest - 1, nearest + 2) for v in range(y - 1, y + 2)
                                  for u in range(x - 1, x + 2) if 0 <= z < depth and 0 <= v < height and 0 <= u < width]
                    keys = torch.stack([key[b, z, v, u] for z, v, u in neighbours]).double()
                    values = torch.stack([value[b, z, v, u] for z, v, u in neighbours]).double()
                    weights = torch.softmax(keys @ query / math.sqrt(channels), dim=0)
                    result[b, s, y, x] = weights @ values
    return result


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_local_attention_matches_its_definition_at_fractional_positions(grad):
    torch.manual_seed(0)
    sampler = LatentSampler(latent_dim=8, attention=True)
    latent = torch.randn(2, 8, 4, 5, 3, requires_grad=grad)  # (B, C, D, H, W), borders on every side
    where = SlicePositions.locate(torch.arange(0.0, 3.01, 0.43), depth=4)  # r = 1 / 0.43: no query on the grid
    with torch.set_grad_enabled(grad):
        grid = sampler.prepare(latent)
        sampled = sampler.sample(grid, where)
    expected = attention_by_definition(grid, where)
    assert torch.allclose(sampled.double(), expected, atol=1e-5)
    if grad:  # the gathered neighbourhoods pass gradients back to every code they came from
        sampled.square().sum().backward(retain_graph=True)
        assert latent.grad is not None and (latent.grad != 0).all()
        expected_grad, = torch.autograd.grad(expected.square().sum(), latent)
        assert torch.allclose(latent.grad.double(), expected_grad.double(), atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_recomputed_decoding_gives_the_same_values_and_gradients(device):
    """run.recompute_slices trades memory for time; the step must not change."""
    from CycleINRLib.config import NAMED_CONFIGS
    from CycleINRLib.models import CycleINR

    torch.manual_seed(0)
    model = CycleINR(NAMED_CONFIGS["light"])
    torch.nn.init.normal_(model.decoder.output.weight, std=0.1)  # the zero start would stop gradients
    model = model.to(device)
    low = torch.rand(2, 1, 4, 10, 9).to(device)
    positions = torch.arange(0.0, 3.01, 0.4).to(device)  # 8 slices: chunks of 3, 3 and 2
    # cuDNN may pick other convolution algorithms (TF32) for the recomputed pass
    tolerance = {"atol": 1e-6, "rtol": 1e-5} if device == "cpu" else {"atol": 1e-4, "rtol": 1e-3}

    def step(recompute_slices: int):
        model.recompute_slices = recompute_slices
        model.zero_grad()
        output = model(low, positions)
        (output ** 2).mean().backward()
        return output.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    (plain, plain_grads), (chunked, chunked_grads) = step(0), step(3)
    assert torch.allclose(plain, chunked, **tolerance)
    assert all(plain_grads[name].abs().sum() > 0 for name in plain_grads)
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, chunked_grads[name], **tolerance), name


@pytest.mark.parametrize("config", ["light", "light-residual", "light-without-lam"])
@pytest.mark.parametrize("block_pixels", [7, 90, None])
def test_inference_in_blocks_gives_the_training_path_values(config, block_pixels, monkeypatch):
    """Inference decodes a few pixels of a plane at a time (blocks that straddle rows and the
    two volumes of a batch, or whole planes); training decodes whole planes under autograd."""
    from CycleINRLib.config import NAMED_CONFIGS, ModelConfig
    from CycleINRLib.models import CycleINR, cycleinr

    overrides = {"light-residual": {"attention_residual": True}, "light-without-lam": {"attention": False}}
    torch.manual_seed(0)
    model = CycleINR(ModelConfig.from_dict({**NAMED_CONFIGS["light"].to_dict(), **overrides.get(config, {})}))
    for parameter in model.parameters():  # trained-looking weights: no zero start anywhere
        torch.nn.init.normal_(parameter, std=0.1)
    low = torch.rand(2, 1, 5, 10, 9)
    positions = torch.arange(0.0, 4.01, 0.37)
    expected = model(low, positions).detach()
    monkeypatch.setattr(cycleinr, "CPU_BLOCK_PIXELS", block_pixels)
    with torch.no_grad():
        assert torch.allclose(model(low, positions), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grad", [True, False], ids=["training", "inference"])
def test_intensities_leave_the_decoder_in_float32_under_bfloat16_autocast(grad):
    """bfloat16 would round the paper model's intensities (a 4095 HU window) to steps of 8-16 HU
    before the L1 loss sees them; the output layer runs in float32 (CPU autocast rounds as CUDA's)."""
    from CycleINRLib.config import NAMED_CONFIGS
    from CycleINRLib.models import CycleINR

    torch.manual_seed(0)
    model = CycleINR(NAMED_CONFIGS["paper"])
    torch.nn.init.normal_(model.decoder.output.weight, std=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
        output = model(torch.rand(1, 1, 5, 16, 16), torch.arange(0.0, 4.01, 0.5))
    assert output.dtype == torch.float32
    assert (output != output.bfloat16().float()).float().mean() > 0.9  # not bfloat16 values widened


@NEEDS_CUDA
def test_bfloat16_autocast_on_cuda_keeps_the_float32_values():
    """Training's mixed precision on GPUs: the paper model in bfloat16 stays near float32, gradients finite."""
    from CycleINRLib.config import NAMED_CONFIGS
    from CycleINRLib.models import CycleINR

    torch.manual_seed(0)
    model = CycleINR(NAMED_CONFIGS["paper"])
    torch.nn.init.normal_(model.decoder.output.weight, std=0.05)
    low = torch.rand(2, 1, 5, 24, 24)
    positions = torch.arange(0.0, 4.01, 0.5)
    reference = model(low, positions).detach()
    model = model.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        output = model(low.cuda(), positions.cuda())
    error = (output.float().cpu() - reference).abs()
    assert error.mean() < 0.01 * reference.abs().mean() and error.max() < 0.05 * reference.abs().max()
    output.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_residual_attention_starts_as_trilinear_sampling_and_adds_eq_4():
    """attention_residual: code = trilinear code + eq. 4's term, whose values start at zero."""
    from CycleINRLib.config import NAMED_CONFIGS, ModelConfig

    torch.manual_seed(0)
    latent = torch.randn(2, 8, 4, 5, 3)
    where = SlicePositions.locate(torch.arange(0.0, 3.01, 0.43), depth=4)
    sampler = LatentSampler(latent_dim=8, attention=True, residual=True)
    grid = sampler.prepare(latent)
    trilinear = where.lerp(grid.latent, dim=1)
    assert torch.equal(sampler.sample(grid, where), trilinear)  # an untrained residual LAM is no LAM
    torch.nn.init.normal_(sampler.qkv.weight)  # trained values: the attention term adds to the code
    grid = sampler.prepare(latent)
    expected = trilinear.double() + attention_by_definition(grid, where)
    assert torch.allclose(sampler.sample(grid, where).double(), expected, atol=1e-5)
    with pytest.raises(ValueError, match="attention_residual needs attention"):
        ModelConfig.from_dict({**NAMED_CONFIGS["light"].to_dict(), "attention": False, "attention_residual": True})
