"""Weights files: round trip, and one clear error for every defect."""

import json

import pytest
import torch
from safetensors.torch import save_file

from CycleINRLib.checkpoint import DEFAULT_WEIGHTS, load_model, save_model
from CycleINRLib.config import NAMED_CONFIGS, ModelConfig
from CycleINRLib.errors import WeightsError
from CycleINRLib.evaluate import evaluate_volume, make_methods, parse_case
from CycleINRLib.io import read_volume
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


def test_bundled_weights_beat_linear_and_cubic_on_the_validation_ct(shared_data):
    """What README promises of the shipped file, measured here rather than read from its
    metadata: on the centre 48 x 96 x 96 of the validation CT, which no stage trained on, its
    generated slices beat linear and cubic interpolation in PSNR and SSIM (the seventh stage's
    weights: +2.01 dB over linear at 2:2, +1.54 at 5:5; an untrained model is linear interpolation)."""
    volume = read_volume(shared_data / "ct" / "val" / "lidc-0002_chest_1.25mm.nii.gz")
    size = (48, 96, 96)
    k, j, i = [(n - s) // 2 for n, s in zip(volume.array.shape, size)]
    truth = volume.array[k:k + size[0], j:j + size[1], i:i + size[2]]
    methods = make_methods(["linear", "cubic", "cycleinr"], device="cpu")
    for result in evaluate_volume(truth, 0, volume.spacing[::-1], [parse_case("2:2"), parse_case("5:5")], methods):
        linear, cubic, cycleinr = result.rows
        assert cycleinr["psnr_generated"] > linear["psnr_generated"] + 1.0, result.case.label
        assert cycleinr["psnr_generated"] > cubic["psnr_generated"], result.case.label
        assert cycleinr["ssim_generated"] > max(linear["ssim_generated"], cubic["ssim_generated"]), result.case.label


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_model(tmp_path / "absent.safetensors")


def test_a_link_that_leads_nowhere_says_so(tmp_path):
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    with pytest.raises(WeightsError, match=r"loop.safetensors: a link to .*loop.safetensors, which is not there or loops back"):
        load_model(loop)


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


def _with_description(tmp_path, name: str, tensors=None, **changes):
    """A light model's tensors (or `tensors`) under a description with `changes` (None: key dropped)."""
    description = {"format": 1, "config": NAMED_CONFIGS["light"].to_dict(), "trained": True, **changes}
    description = {key: value for key, value in description.items() if value is not None}
    tensors = tensors if tensors is not None else CycleINR(NAMED_CONFIGS["light"]).state_dict()
    path = tmp_path / f"{name}.safetensors"
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path),
              metadata={"cycleinr": json.dumps(description)})
    return path


LIGHT = NAMED_CONFIGS["light"].to_dict()


@pytest.mark.parametrize("changes, message", [
    ({"config": [1, 2]}, r"model settings must be a mapping of names to values, not \[1, 2\]"),
    ({"config": "light"}, "model settings must be a mapping of names to values, not 'light'"),
    ({"config": None}, "model configuration is missing"),
    ({"config": {**LIGHT, "normalization": "window"}}, r"model.normalization must be a mapping \(kind, low, high\), not 'window'"),
    ({"config": {**LIGHT, "normalization": {"kind": "percentile", "low": -50, "high": 500}}}, r"percentiles must lie in \[0, 100\]"),
    ({"config": {**LIGHT, "normalization": {"kind": "window", "low": -1e308, "high": 1e308}}}, "both finite in float32"),
    ({"config": {**LIGHT, "normalization": {"kind": "window", "low": 0, "high": 1e-300}}}, "too narrow to scale intensities by"),
    ({"config": {**LIGHT, "encoder_width": 10**9}}, "encoder_width 1000000000 is above 4096"),
    ({"config": {**LIGHT, "encoder_blocks": 10**8}}, "encoder_blocks 100000000 is above 64"),
    ({"config": {**LIGHT, "decoder_width": 4096}}, r"shape mismatch for decoder"),  # within bounds: refused before allocating
    ({"trained": "false"}, "'trained' in its description is 'false', not true or false"),
    ({"format": True}, "weights format True, this version reads 1"),
    ({"provenance": ["x"]}, "'provenance' in its description is not a JSON object"),
])
def test_a_description_that_does_not_describe_a_model_is_one_error(tmp_path, changes, message):
    """A few bytes of JSON must not make the loader allocate gigabytes or raise deep inside."""
    with pytest.raises(WeightsError, match=message):
        load_model(_with_description(tmp_path, "bad", **changes))


def test_json_nested_thousands_deep_is_one_error(tmp_path):
    path = tmp_path / "deep.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"cycleinr": "[" * 100000 + "]" * 100000})
    with pytest.raises(WeightsError, match="description is not valid JSON"):
        load_model(path)


@pytest.mark.parametrize("dtype, message", [
    (torch.float64, "NaN or infinite values"),  # 1e300 is finite in float64, infinite in float32
    (torch.int64, "weights must be floating point; .* holds torch.int64"),
])
def test_weights_the_model_cannot_run_in_float32_are_refused(tmp_path, dtype, message):
    tensors = {name: (tensor.double() * 1e300 + 1e300).to(dtype) if dtype.is_floating_point else tensor.to(dtype)
               for name, tensor in CycleINR(NAMED_CONFIGS["light"]).state_dict().items()}
    with pytest.raises(WeightsError, match=message):
        load_model(_with_description(tmp_path, "typed", tensors))


def test_float16_weights_load(tmp_path):
    tensors = {name: tensor.half() for name, tensor in CycleINR(NAMED_CONFIGS["light"]).state_dict().items()}
    model, _ = load_model(_with_description(tmp_path, "half", tensors))
    assert next(model.parameters()).dtype == torch.float32


def test_a_training_checkpoint_given_as_weights_points_to_the_exporter(tmp_path):
    checkpoint = tmp_path / "step-0000100.json"
    checkpoint.write_text("{}", encoding="utf-8")
    with pytest.raises(WeightsError, match="is a JSON file, not a .safetensors weights file .*Training/export_weights.py"):
        load_model(checkpoint)
    tensors = tmp_path / "step-0000100.safetensors"
    save_file({"model.w": torch.zeros(2), "optimizer.0.exp_avg": torch.zeros(2)}, str(tensors))
    with pytest.raises(WeightsError, match="no CycleINR description .*Training/export_weights.py"):
        load_model(tensors)
