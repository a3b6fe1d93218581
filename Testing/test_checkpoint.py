"""Weights files: round trip, and one clear error for every defect."""

import json

import pytest
import torch
from safetensors.torch import save_file

from CycleINRLib.checkpoint import DEFAULT_WEIGHTS, load_model, save_model
from CycleINRLib.config import NAMED_CONFIGS, ModelConfig
from CycleINRLib.errors import WeightsError
from CycleINRLib.models import CycleINR


def test_round_trip_keeps_weights_config_and_provenance(tmp_path):
    torch.manual_seed(0)
    model = CycleINR(NAMED_CONFIGS["light"])
    path = save_model(model, tmp_path / "m.safetensors", trained=True, provenance={"steps": 12})
    loaded, info = load_model(path)
    assert info.trained and info.provenance == {"steps": 12} and info.config == model.config
    volume, positions = torch.rand(1, 1, 4, 8, 8), torch.tensor([0.0, 0.4, 2.5])
    assert torch.equal(model.eval()(volume, positions), loaded(volume, positions))


def test_settings_added_later_keep_older_files_loading_as_before():
    """A weights file written before `decoder_activation` existed was a ReLU decoder."""
    older = {k: v for k, v in NAMED_CONFIGS["light"].to_dict().items() if k != "decoder_activation"}
    assert ModelConfig.from_dict(older).decoder_activation == "relu"
    with pytest.raises(ValueError, match="decoder_activation must be one of"):
        ModelConfig.from_dict({**older, "decoder_activation": "tanh"})


def test_bundled_weights_load_trained_with_their_provenance():
    """A check of the shipped file: whatever model it holds, trained weights that beat linear
    interpolation in their own validation, with where they come from."""
    model, info = load_model()
    assert info.path == DEFAULT_WEIGHTS and isinstance(model, CycleINR)
    assert info.trained and model.decoder.output.weight.abs().sum() > 0  # the light model starts at zero there
    provenance = info.provenance
    assert provenance["training_data"] and provenance["steps"] > 0
    gains = [provenance["validation"][f"{case}/gain_over_linear_db"] for case in ("2:2", "3:3", "5:5", "5:2.5")]
    assert all(gain > 0.5 for gain in gains)
    assert "provenance" in provenance["initialised_from"]  # the stages before, nested


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_model(tmp_path / "absent.safetensors")


def test_corrupt_file(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x00\x01not a safetensors file" * 10)
    with pytest.raises(WeightsError, match="garbage.safetensors"):
        load_model(path)


def test_truncated_file(tmp_path):
    path = save_model(CycleINR(NAMED_CONFIGS["light"]), tmp_path / "cut.safetensors", trained=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="cut.safetensors"):
        load_model(path)


def test_tensors_that_do_not_match_the_config(tmp_path):
    path = save_model(CycleINR(NAMED_CONFIGS["light"]), tmp_path / "m.safetensors", trained=False)
    light = {name: tensor for name, tensor in CycleINR(NAMED_CONFIGS["light"]).state_dict().items()}
    description = {"format": 1, "config": NAMED_CONFIGS["paper"].to_dict(), "trained": False}
    save_file(light, str(path), metadata={"cycleinr": json.dumps(description)})
    with pytest.raises(WeightsError, match="do not match"):
        load_model(path)


def test_file_without_description(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(WeightsError, match="no CycleINR description"):
        load_model(path)


def test_a_written_weights_file_is_readable_by_whoever_may_read_new_files(tmp_path):
    """safetensors creates its files readable by their owner alone: a weights file exported
    onto the bundled one would then load for nobody else on a shared machine."""
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    path = save_model(CycleINR(NAMED_CONFIGS["light"]), tmp_path / "w.safetensors", trained=False)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
