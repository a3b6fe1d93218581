"""Training: the cycle loss by hand, loss going down, exact resume, DDP on CPU, bad data."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import pywt
import SimpleITK as sitk
import torch
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file, save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from CycleINRLib.checkpoint import load_model, nonfinite_tensors, save_model  # noqa: E402
from CycleINRLib.config import NAMED_CONFIGS, Normalization  # noqa: E402
from CycleINRLib.degrade import degrade, degrade_at  # noqa: E402
from CycleINRLib.evaluate import evaluate_volume, make_methods, parse_case  # noqa: E402
from CycleINRLib.io import Volume, read_volume, write_volume  # noqa: E402
from CycleINRLib.models import CycleINR  # noqa: E402
from Training import checkpointing, data, losses  # noqa: E402
from Training.config import TrainConfig, load_config  # noqa: E402
from Training.export_weights import export  # noqa: E402
from Training.error_by_band import band_errors, markdown, windowed_method  # noqa: E402
from Training.fit_one_batch import fit_one_batch  # noqa: E402
from Training.train import TORCHRUN_VARIABLES, ResumeError, check_restorable, check_resumable, train, train_step  # noqa: E402
from conftest import DEVICES, NEEDS_CUDA, write_dicom_series  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]
SHARED_DATA = REPOSITORY.parent / "shared" / "data"
HEAD = SHARED_DATA / "ct" / "train" / "vtk-fullhead_head_1.5mm.nii.gz"
VALIDATION_CT = SHARED_DATA / "ct" / "val" / "lidc-0002_chest_1.25mm.nii.gz"


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> Path:
    """Two small crops of a real head CT in a fresh folder (never inside the repository)."""
    if not HEAD.is_file():
        pytest.skip(f"real volumes not available: {HEAD} is absent (a fresh clone has no ../shared)")
    head = read_volume(HEAD)
    folder = tmp_path_factory.mktemp("crops")
    for name, (k, j, i) in {"a": (20, 80, 80), "b": (40, 120, 100)}.items():
        crop = np.ascontiguousarray(head.array[k:k + 24, j:j + 40, i:i + 40])
        write_volume(Volume(crop, head.spacing, head.origin, head.direction), folder / f"{name}.nii.gz")
    return folder


def small_config(train_folder: Path, out_dir: Path, **optim) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": "light",
        "data": {"train": str(train_folder), "val": None, "lr_slices": 3, "patch_size": 12, "batch_size": 2,
                 "scale_min": 2.0, "scale_max": 3.0, "batches_per_epoch": 4, "workers": 0},
        "optim": {"steps": 6, "lr": 1e-3, "seed": 3, **optim},
        "run": {"out_dir": str(out_dir), "device": "cpu", "threads": 1, "checkpoint_every": 3, "log_every": 1},
    })


def test_fractional_degradation_matches_integer_one_and_interpolates():
    thin = np.random.default_rng(0).normal(size=(17, 3, 2))
    for mode in ("interval", "thick"):
        assert np.allclose(degrade_at(thin, np.arange(0, 17, 4), 4, mode=mode), degrade(thin, 4, mode=mode), atol=1e-5)
    halfway = degrade_at(thin, [2.3], 2.3, mode="interval")[0]
    assert np.allclose(halfway, 0.7 * thin[2] + 0.3 * thin[3], atol=1e-5)
    past_halfway = degrade_at(thin, [2.7], 2.7, mode="interval")[0]  # between 2 and 3, not around 3
    assert np.allclose(past_halfway, 0.3 * thin[2] + 0.7 * thin[3], atol=1e-5)
    box = degrade_at(thin, [5.0], 2.5, mode="thick")[0]  # box [3.75, 6.25]: 3/4 of slices 4 and 6, all of 5
    assert np.allclose(box, (0.75 * thin[4] + thin[5] + 0.75 * thin[6]) / 2.5, atol=1e-5)


@pytest.mark.parametrize("mode", ["interval", "thick"])
def test_training_pairs_put_every_lr_slice_at_i_times_r_also_when_flipped(crops, mode):
    """The model and the cycle loss take LR slice i to lie at HR position i*r; at fractional
    scales a pair flipped along the slice axis must keep that (interval: linear between the
    two nearest HR slices; thick: the box r slices wide around i*r, checked where the HR patch
    holds the whole box)."""
    config = small_config(crops, crops.parent / "unused").data
    config.degradations, config.scale_min, config.scale_max = {mode: 1.0}, 2.1, 2.9
    batches = data.PairBatches(data.load_volumes(crops, config, NAMED_CONFIGS["light"].normalization), config, 7)
    checked = 0
    for index in range(24):
        batch = batches[(0, index)]
        scale = batch["scale"]
        positions = np.arange(config.lr_slices) * scale
        for low, high in zip(batch["lr"][:, 0].numpy(), batch["hr"][:, 0].numpy()):
            half = scale / 2 if mode == "thick" else 0.0
            inside = (positions - half >= -0.5 if half else positions >= 0) & (positions + half <= len(high) - 1 + (0.5 if half else 0))
            expected = degrade_at(high, positions[inside], scale, mode=mode)
            np.testing.assert_allclose(low[inside], expected, atol=1e-5)
            checked += int(inside.sum())
    assert checked >= 48


def test_cycle_loss_by_hand_and_differentiable():
    # The untrained residual model is linear interpolation plus its decoder's output bias.
    model = CycleINR(NAMED_CONFIGS["light"])
    low = torch.tensor([0.2, 0.8, 0.5]).view(1, 1, 3, 1, 1).expand(1, 1, 3, 4, 4).contiguous()
    generated, reestimated = losses.CycleObjective(model)(low, 2.5, cycle=True)
    # HR positions j / 2.5 = 0, .4, .8, 1.2, 1.6, 2 -> .2, .44, .68, .74, .62, .5; LR positions in
    # HR units 0, 2.5, 5 -> .2, (.68 + .74) / 2 = .71, .5; against .2, .8, .5: mean |error| .03.
    assert torch.allclose(generated[0, 0, :, 0, 0], torch.tensor([0.2, 0.44, 0.68, 0.74, 0.62, 0.5]), atol=1e-6)
    assert losses.cycle_loss(reestimated, low).item() == pytest.approx(0.03, abs=1e-6)
    with torch.no_grad():
        model.decoder.output.bias.fill_(0.1)  # +0.1 in each pass: errors .2, .11, .2
    generated, reestimated = losses.CycleObjective(model)(low, 2.5, cycle=True)
    loss = losses.cycle_loss(reestimated, low)
    assert loss.item() == pytest.approx(0.17, abs=1e-6)
    assert losses.cycle_loss(reestimated, low, "l2").item() == pytest.approx((0.04 + 0.0121 + 0.04) / 3, abs=1e-6)
    loss.backward()
    gradients = [p.grad for p in model.parameters() if p.grad is not None]
    assert gradients and all(torch.isfinite(g).all() for g in gradients)
    assert model.decoder.output.bias.grad.abs().sum() > 0
    # r = 2.3: HR positions j / 2.3 for j = 0..4 -> .2, 10.6/23, 16.6/23, 16.3/23, 13.3/23; the last LR slice,
    # at HR position 4.6, lies beyond them and is left out; LR slice 1 at 2.3 -> (.7 * 16.6 + .3 * 16.3) / 23
    # = 16.51/23 against .8: mean |error| over the two slices (.8 - 16.51/23) / 2
    with torch.no_grad():
        model.decoder.output.bias.fill_(0.0)
    generated, reestimated = losses.CycleObjective(model)(low, 2.3, cycle=True)
    assert torch.allclose(generated[0, 0, :, 0, 0], torch.tensor([4.6, 10.6, 16.6, 16.3, 13.3]) / 23, atol=1e-6)
    assert reestimated.shape[2] == 2
    assert losses.cycle_loss(reestimated, low).item() == pytest.approx((0.8 - 16.51 / 23) / 2, abs=1e-6)


def test_noise_level_is_the_snli_estimator_with_a_trimmed_mean():
    planes = np.random.default_rng(4).normal(scale=0.1, size=(3, 64, 64))
    levels = losses.slice_noise_levels(torch.from_numpy(planes).view(1, 1, 3, 64, 64))
    assert levels.shape == (1, 3) and np.allclose(levels.numpy(), 0.1, rtol=0.1)  # white noise: its sigma
    for plane, level in zip(planes, levels[0].tolist()):  # by hand: pywt's interior coefficients
        _, (_, _, diagonal) = pywt.dwt2(plane, "db2")
        magnitudes = np.sort(np.abs(diagonal[1:-1, 1:-1]).ravel())
        assert level == pytest.approx(magnitudes[:magnitudes.size // 2].mean() / losses.GAUSSIAN_LOWER_HALF_MEAN_ABS, rel=1e-5)
    ramp = torch.arange(64.0).view(1, 1, 1, 1, 64) * 0.3 + torch.arange(64.0).view(1, 1, 1, 64, 1)
    assert losses.slice_noise_levels(ramp).abs().max() < 1e-4  # db2's two vanishing moments: no noise in a plane
    single = torch.from_numpy(planes).float().view(1, 1, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # training under AMP: still the float32 estimate
        under_amp = losses.slice_noise_levels(single)
    assert under_amp.dtype == torch.float32 and torch.equal(under_amp, losses.slice_noise_levels(single))


def test_noise_level_loss_charges_smooth_slices_and_is_differentiable():
    noisy = torch.from_numpy(np.random.default_rng(5).normal(scale=0.2, size=(2, 1, 3, 32, 32)))
    assert losses.noise_level_loss(noisy, noisy).item() == 0.0
    smooth = (0.5 * noisy).requires_grad_()  # half the noise level
    loss = losses.noise_level_loss(smooth, noisy)
    assert loss.item() == pytest.approx(0.1, rel=0.15)
    loss.backward()
    assert torch.isfinite(smooth.grad).all() and (smooth.grad != 0).float().mean() > 0.2  # not just a median element
    model = CycleINR(NAMED_CONFIGS["light"])
    low, high = noisy[:, :, ::2].float(), noisy.float()
    with_noise = losses.step_losses(losses.CycleObjective(model), low, high, 2.0, "interval", 1.0, "l2", noise_weight=0.5)
    assert with_noise.noise.item() > 0
    assert with_noise.total.item() == pytest.approx(with_noise.inr.item() + with_noise.cycle.item() + 0.5 * with_noise.noise.item())
    without = losses.step_losses(losses.CycleObjective(model), low, high, 2.0, "interval", 1.0, "l2")
    assert without.noise.item() == 0 and without.total.item() == pytest.approx(without.inr.item() + without.cycle.item())


@pytest.mark.parametrize("device, cpu_amp", [("cpu", False), pytest.param("cpu", True, id="cpu-bf16"),
                                             pytest.param("cuda", False, marks=NEEDS_CUDA)])
def test_few_steps_lower_the_loss_and_validate_on_real_crops(crops, tmp_path, device, cpu_amp):
    config = small_config(crops, tmp_path / "run", steps=30, lr=1e-3, cpu_amp=cpu_amp)
    config.run.device = device  # on CUDA: bfloat16 autocast, pinned memory
    config.model_overrides = {"predict_residual": False}  # starts far from the truth, unlike the residual model
    config.data.val = str(crops)
    config.run.val_crop, config.run.val_cases, config.run.val_every = [24, 32, 32], ["2:2", "5:2.5"], 15
    model, history = train(config)
    assert len(history) == 30 and all(np.isfinite(r["loss"]) for r in history)
    assert np.mean([r["inr"] for r in history[-5:]]) < 0.5 * np.mean([r["inr"] for r in history[:5]])
    exported, info = load_model(tmp_path / "run" / "best_model.safetensors")
    assert info.trained and info.provenance["steps"] in (15, 30)
    assert set(info.provenance["training_data"]) == {"a.nii.gz", "b.nii.gz"}
    assert "2:2/psnr_generated" in info.provenance["validation"] and np.isfinite(info.provenance["validation"]["mean_psnr"])
    validation = info.provenance["validation"]
    assert validation["mean_snli_excess"] == pytest.approx(
        np.mean([validation[f"{c}/snli"] - validation[f"{c}/snli_truth"] for c in ("2:2", "5:2.5")]))
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("device", DEVICES)
def test_fit_one_batch_gets_past_linear_interpolation_with_the_shipped_losses(crops, tmp_path, device):
    config = small_config(crops, tmp_path / "unused", lr=1e-3, pixel_loss="l2")
    config.run.device = device  # it trains where a run of the config would
    reports = fit_one_batch(config, scale=2.0, steps=40, report_every=20)
    assert [r["step"] for r in reports] == [20, 40]
    assert reports[-1]["gain_over_linear_db"] > 0.1 and reports[-1]["loss"] < reports[0]["loss"]


def test_error_by_band_adds_up_to_the_psnr_of_cycleinr_evaluate():
    """The bands partition the generated slices: their summed error gives evaluate's PSNR."""
    if not VALIDATION_CT.is_file():
        pytest.skip(f"real volumes not available: {VALIDATION_CT} is absent (a fresh clone has no ../shared)")
    full = read_volume(VALIDATION_CT).array
    k, j, i = (n // 2 for n in full.shape)
    truth = np.ascontiguousarray(full[k - 20:k + 21, j - 48:j + 48, i - 48:i + 48])  # chest: all four bands
    methods = make_methods(["linear", "cubic"])
    for case in (parse_case("3:3"), parse_case("4:2")):
        rows = band_errors(truth, case, methods)
        (result,) = evaluate_volume(truth, 0, (1.25, 0.7, 0.7), [case], methods)
        assert sum(row["voxel_share"] for row in rows) == pytest.approx(1.0)
        assert all(row["voxels"] > 0 for row in rows)
        for row in result.rows:
            squared_error = sum(band["sse"][row["method"]] for band in rows) / sum(band["voxels"] for band in rows)
            assert 10 * np.log10(4095.0 ** 2 / squared_error) == pytest.approx(row["psnr_generated"], abs=1e-3)
        gain = result.rows[1]["psnr_generated"] - result.rows[0]["psnr_generated"]  # cubic over linear, in dB
        last_row = markdown([(case.label, rows)]).splitlines()[-1]
        assert last_row.startswith(f"| {case.label} | all | 100.0 % |") and last_row.endswith(f"| {gain:+.2f} dB |")


def test_windowed_decoding_with_every_acquired_slice_is_whole_volume_decoding():
    """error_by_band.py --window: a window holding all slices is the engine's result, a narrow one is not."""
    if not VALIDATION_CT.is_file():
        pytest.skip(f"real volumes not available: {VALIDATION_CT} is absent (a fresh clone has no ../shared)")
    full = read_volume(VALIDATION_CT).array
    k, j, i = (n // 2 for n in full.shape)
    low = degrade(np.ascontiguousarray(full[k - 10:k + 11, j - 24:j + 24, i - 24:i + 24]), 5)  # 5 slices
    whole = make_methods(["cycleinr"])[0].upsample(low, 5.0, 0)
    generated = [n for n in range(len(whole)) if n % 5]
    every_slice = windowed_method(None, window=low.shape[0]).upsample(low, 5.0, 0)
    two_slices = windowed_method(None, window=2).upsample(low, 5.0, 0)
    np.testing.assert_allclose(every_slice[generated], whole[generated], atol=0.51)  # the engine rounds to int16
    assert np.abs(two_slices[generated] - whole[generated]).max() > 5.0


def _validating(config: TrainConfig, crops: Path) -> TrainConfig:
    """In-run validation every 2 steps: the uninterrupted run validates at steps 2, 4 and 6,
    the interrupted one at 2 and 3, then, resumed, at 4 and 6."""
    config.data.val = str(crops / "a.nii.gz")
    config.run.val_every, config.run.val_cases, config.run.val_crop = 2, ["2:2"], None
    return config


@pytest.mark.parametrize("accumulate, validate", [(1, False), (2, True)])
def test_resume_reproduces_the_uninterrupted_run(crops, tmp_path, accumulate, validate):
    with_validation = functools.partial(_validating, crops=crops) if validate else (lambda config: config)
    straight_config = with_validation(small_config(crops, tmp_path / "straight", accumulate=accumulate))
    straight_config.data.workers = 1  # worker processes, as in real runs
    straight, straight_history = train(straight_config)
    interrupted = with_validation(small_config(crops, tmp_path / "resumed", steps=3, accumulate=accumulate))
    _, first_half = train(interrupted)
    interrupted.optim.steps = 6
    resumed, second_half = train(interrupted)
    assert [r["step"] for r in second_half] == [4, 5, 6]
    assert [r["loss"] for r in first_half + second_half] == [r["loss"] for r in straight_history]
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    _, straight_state = checkpointing.read_checkpoint(tmp_path / "straight" / "step-0000006.json")
    _, resumed_state = checkpointing.read_checkpoint(tmp_path / "resumed" / "step-0000006.json")
    assert straight_state.keys() == resumed_state.keys()  # model, Adam moments and RNG states alike
    assert all(torch.equal(straight_state[k], resumed_state[k]) for k in straight_state)
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path / "resumed")] == ["step-0000003.json", "step-0000006.json"]
    exported, info = load_model(export(tmp_path / "resumed" / "step-0000006.json", tmp_path / "exported.safetensors"))
    assert info.trained and info.provenance["steps"] == 6 and info.provenance["training_data"] == ["a.nii.gz", "b.nii.gz"]
    assert all(torch.equal(tensor, exported.state_dict()[name]) for name, tensor in straight.state_dict().items())
    assert info.provenance["patches_seen"] == 6 * accumulate * straight_config.data.batch_size


def test_a_resumed_run_logs_each_step_once(crops, tmp_path):
    """Steps logged after the last checkpoint by the interrupted run are replaced, not doubled."""
    config = small_config(crops, tmp_path / "run", steps=5)  # checkpoints at steps 3 and 5
    train(config)
    for path in (tmp_path / "run").glob("step-0000005.*"):  # as if stopped after step 5's log line
        path.unlink()
    config.optim.steps = 6
    _, resumed = train(config)
    accumulator = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    accumulator.Reload()
    logged = accumulator.Scalars("train/loss")
    assert [event.step for event in logged] == [1, 2, 3, 4, 5, 6]
    assert [event.value for event in logged[3:]] == pytest.approx([record["loss"] for record in resumed])


def test_resume_with_other_settings_is_refused_in_one_line(crops, tmp_path):
    """A changed batch stream, schedule or process count would not continue the run: the script
    says so in one line and leaves the checkpoints alone; length, device and folder may change."""
    run = tmp_path / "run"
    first = small_config(crops, run, steps=3)
    start = save_model(CycleINR(first.model_config()), tmp_path / "start.safetensors", trained=False)
    first.run.init_weights = str(start)
    train(first)
    start.unlink()  # unused on resume: its absence does not stop one
    checkpoints = {path.name: path.read_bytes() for path in run.glob("step-*")}
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(small_config(crops, run).to_dict()), encoding="utf-8")
    refused = subprocess.run([sys.executable, str(REPOSITORY / "Training" / "train.py"), "--config", str(config_file),
                              "optim.accumulate=2", "optim.lr=0.002"], capture_output=True, cwd=tmp_path,
                             timeout=300, encoding="utf-8")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines() == [
        f"train.py: error: {run} holds a run that these settings would not continue (optim.accumulate: 1 -> 2; "
        "optim.lr: 0.001 -> 0.002): resume it with its own settings, or give a new run another run.out_dir"]
    assert {path.name: path.read_bytes() for path in run.glob("step-*")} == checkpoints
    description = checkpointing.read_description(run / "step-0000003.json")
    with pytest.raises(ResumeError, match=r"\(processes: 1 -> 2\)"):
        check_resumable(small_config(crops, run), description, world_size=2)
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    (fewer / "a.nii.gz").write_bytes((crops / "a.nii.gz").read_bytes())
    with pytest.raises(ResumeError, match="trained on a.nii.gz, b.nii.gz; .* gives a.nii.gz$"):
        train(small_config(fewer, run))
    renamed = tmp_path / "renamed"  # another volume under the same name
    renamed.mkdir()
    other = read_volume(crops / "b.nii.gz")
    write_volume(Volume(np.ascontiguousarray(other.array[:, :, :36]), other.spacing, other.origin, other.direction),
                 renamed / "a.nii.gz")
    (renamed / "b.nii.gz").write_bytes((crops / "b.nii.gz").read_bytes())
    with pytest.raises(ResumeError, match=r"of these names but of other sizes \(\[\[24, 40, 40\], \[24, 40, 40\]\] "
                                          r"voxels, .* gives \[\[24, 40, 36\], \[24, 40, 40\]\]\)"):
        train(small_config(renamed, run))
    moved = tmp_path / "moved"
    moved.mkdir()
    for crop in crops.iterdir():
        (moved / crop.name).write_bytes(crop.read_bytes())
    longer = small_config(moved, run, steps=4)
    longer.run.threads, longer.run.checkpoint_every = 2, 1
    _, history = train(longer)
    assert [record["step"] for record in history] == [4]


def test_a_damaged_checkpoint_is_skipped_and_none_readable_is_refused(crops, tmp_path):
    """A newest checkpoint that no longer reads costs one interval, not the run; when none reads
    the script says so in one line and leaves them for the user, never starting over on them."""
    run = tmp_path / "run"
    config = small_config(crops, run)  # checkpoints at steps 3 and 6
    _, history = train(config)
    intact = json.loads((run / "step-0000006.json").read_text(encoding="utf-8"))
    groups = intact["optimizer"]["param_groups"]
    hand_edits = [("not a readable checkpoint", '{"step": 6, "config": {'),  # not JSON any more
                  ("does not restore", json.dumps({**intact, "optimizer": {"param_groups": []}})),  # JSON, wrong state
                  (r"does not restore \(step 4 is not the 6 of its file name\)", json.dumps({**intact, "step": 4})),
                  (r"does not restore \(step True is not the 6", json.dumps({**intact, "step": True})),
                  (r"does not restore \(metrics.wall_seconds is not a finite number\)",
                   json.dumps({**intact, "metrics": {**intact["metrics"], "wall_seconds": "x"}})),
                  (r"does not restore \(metrics.wall_seconds is not a finite number\)",
                   json.dumps({**intact, "metrics": {**intact["metrics"], "wall_seconds": float("nan")}})),
                  (r"does not restore \(optimizer.param_groups\[0\].lr is not a finite number\)",
                   json.dumps({**intact, "optimizer": {**intact["optimizer"], "param_groups": [{**groups[0], "lr": "abc"}]}})),
                  (r"does not restore \(scheduler state lacks base_lrs and \d+ more\)", json.dumps({**intact, "scheduler": {}}))]
    tensors = load_file(str(run / "step-0000006.safetensors"))
    moment = tensors["optimizer.0.exp_avg"]
    tensor_edits = [  # without Adam's state a resume would restart Adam, quietly; a wrong shape fails at the first step
        (r"does not restore \(optimizer state of parameter 0 is missing",
         {key: value for key, value in tensors.items() if not key.startswith("optimizer.")}),
        (r"does not restore \(optimizer state of parameter 0 is not shaped like the parameter\)",
         {**tensors, "optimizer.0.exp_avg": moment.reshape(-1)[:-1].clone()})]
    edits = [(message, text, tensors) for message, text in hand_edits]
    edits += [(message, json.dumps(intact), edited) for message, edited in tensor_edits]
    for message, text, edited in edits:
        (run / "step-0000006.json").write_text(text, encoding="utf-8")
        save_file(edited, str(run / "step-0000006.safetensors"))
        with pytest.warns(checkpointing.CheckpointWarning, match=rf"step-0000006\.json: {message}"):
            _, redone = train(config)
        assert [record["loss"] for record in redone] == [record["loss"] for record in history[3:]]
        assert checkpointing.read_checkpoint(run / "step-0000006.json")[0]["step"] == 6  # written again
    for weights in run.glob("step-*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    damaged = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()), encoding="utf-8")
    refused = subprocess.run([sys.executable, str(REPOSITORY / "Training" / "train.py"), "--config", str(config_file),
                              "optim.steps=9"], capture_output=True, cwd=tmp_path, timeout=300, encoding="utf-8")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    *warned, error = refused.stderr.strip().splitlines()
    assert error == (f"train.py: error: {run}: none of its 2 checkpoints reads (see the warnings above); "
                     "move them away to start a new run there")
    assert len(warned) == 2 and all(line.startswith("CheckpointWarning: ") for line in warned), warned  # a line each
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()} == damaged


def test_accumulated_batches_make_the_step_of_the_batch_they_split(crops):
    """optim.accumulate: two halves of a batch, one after the other, step as the whole batch does."""
    config = small_config(crops, Path("unused"), pixel_loss="l2")
    config.data.batch_size = 4
    config.data.degradations = {"interval": 1.0}  # with the cycle term
    model_config = config.model_config()
    batches = data.PairBatches(data.load_volumes(crops, config.data, model_config.normalization), config.data, 3)
    wholes = [batches[(0, index)] for index in range(3)]
    halves = [[{**batch, "lr": batch["lr"][part], "hr": batch["hr"][part]} for part in (slice(0, 2), slice(2, 4))]
              for batch in wholes]

    def three_steps(step_batches: list[list[dict]]) -> tuple[CycleINR, list]:
        torch.manual_seed(0)
        model = CycleINR(model_config)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        objective = losses.CycleObjective(model)
        return model, [train_step(objective, model, optimizer, b, config.optim, torch.device("cpu"), False)
                       for b in step_batches]

    whole_model, whole_steps = three_steps([[batch] for batch in wholes])
    split_model, split_steps = three_steps(halves)
    for (whole_terms, whole_norm), (split_terms, split_norm) in zip(whole_steps, split_steps):
        assert split_terms.cycle.item() > 0
        for whole_term, split_term in zip(whole_terms, split_terms):
            assert split_term.item() == pytest.approx(whole_term.item(), rel=1e-5, abs=1e-9)
        assert split_norm.item() == pytest.approx(whole_norm.item(), rel=1e-4)
    torch.manual_seed(0)
    initial = CycleINR(model_config).state_dict()
    for name, tensor in whole_model.state_dict().items():
        torch.testing.assert_close(split_model.state_dict()[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    assert not torch.equal(whole_model.state_dict()["encoder.head.0.weight"], initial["encoder.head.0.weight"])


def test_weights_trained_with_percentiles_take_an_mr_without_the_ct_warning(crops, shared_data, tmp_path):
    """README's route to MR weights: train with the percentile normalization, export, then
    `cycleinr upsample --weights`; the bundled CT weights warn on the same MR."""
    config = small_config(crops, tmp_path / "run", steps=3)
    config.model_overrides = {"normalization": {"kind": "percentile", "low": 0.5, "high": 99.5}}
    train(config)
    weights = export(tmp_path / "run" / "step-0000003.json", tmp_path / "mr.safetensors")
    mr = tmp_path / "mr.nii.gz"
    source = sitk.ReadImage(str(shared_data / "demo" / "pgbm-001_brain_mr_t1post_6.5mm.nii.gz"))[100:164, 120:184, 6:12]
    sitk.WriteImage(source, str(mr))
    for chosen, warned in ((["--weights", str(weights)], False), ([], True)):
        output = tmp_path / f"out{len(chosen)}.nii.gz"
        result = subprocess.run([sys.executable, "-m", "CycleINRLib.cli", "upsample", str(mr), str(output), "--factor", "2",
                                 "--device", "cpu", *chosen], capture_output=True, cwd=REPOSITORY, timeout=300, encoding="utf-8")
        assert result.returncode == 0, result.stderr
        assert ("does not look like CT" in result.stderr) == warned, result.stderr
        upsampled = sitk.GetArrayFromImage(sitk.ReadImage(str(output)))
        assert upsampled.shape[0] == 11 and np.array_equal(upsampled[::2], sitk.GetArrayFromImage(source))


def test_score_weights_repeats_the_validation_the_run_logged(crops, tmp_path):
    config = small_config(crops, tmp_path / "run", steps=3)
    config.data.val = str(crops)
    config.run.val_crop, config.run.val_cases, config.run.val_every = [24, 32, 32], ["2:2", "5:2.5"], 3
    train(config)
    checkpoint = tmp_path / "run" / "step-0000003.json"
    logged = checkpointing.read_checkpoint(checkpoint)[0]["metrics"]["val"]
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()), encoding="utf-8")
    exported = export(checkpoint, tmp_path / "exported.safetensors")
    script = [sys.executable, str(REPOSITORY / "Training" / "score_weights.py")]
    result = subprocess.run(script + [str(checkpoint), str(exported), "--config", str(config_file)],
                            capture_output=True, timeout=300, encoding="utf-8")
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines()[2:]]
    assert [row[0].strip() for row in rows] == [str(checkpoint), str(exported)]
    for row in rows:  # checkpoint and exported file score what the run logged at that step
        assert [float(cell) for cell in row[1:3]] == pytest.approx(
            [logged[f"{case}/gain_over_linear_db"] for case in ("2:2", "5:2.5")], abs=1e-4)
        assert float(row[-1]) == pytest.approx(logged["mean_psnr"], abs=1e-4)
    (tmp_path / "step-0000009.json").write_text("{}", encoding="utf-8")  # its tensors never written
    for bad in (tmp_path / "absent.safetensors", tmp_path / "step-0000009.json", tmp_path / "run"):
        refused = subprocess.run(script + [str(bad), "--config", str(config_file)], capture_output=True, timeout=300,
                                 encoding="utf-8")
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert str(bad) in refused.stderr
    assert "is a folder; give its step-NNNNNNN.json or .safetensors files" in refused.stderr

    # export_weights.py: the checkpoint's weights half instead of its description; a description
    # whose metrics lost what the provenance records (resuming does not need them)
    description = json.loads(checkpoint.read_text(encoding="utf-8"))
    del description["metrics"]["machine"]
    (tmp_path / "step-0000010.json").write_text(json.dumps(description), encoding="utf-8")
    (tmp_path / "step-0000010.safetensors").write_bytes(checkpoint.with_suffix(".safetensors").read_bytes())
    exporter = [sys.executable, str(REPOSITORY / "Training" / "export_weights.py")]
    for bad, message in ((checkpoint.with_suffix(".safetensors"), "give the checkpoint's .json file"),
                         (tmp_path / "step-0000010.json", "its metrics lack 'machine'")):
        refused = subprocess.run(exporter + [str(bad), "--output", str(tmp_path / "x.safetensors")],
                                 capture_output=True, timeout=300, encoding="utf-8")
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert message in refused.stderr and not (tmp_path / "x.safetensors").exists()

    # an existing --output (by default the bundled weights) is replaced only with --overwrite
    written = exported.read_bytes()
    for output, message in ((exported, "output exists; pass --overwrite to replace it"),
                            (tmp_path / "x.pt", "output must end in .safetensors")):
        refused = subprocess.run(exporter + [str(checkpoint), "--output", str(output)], capture_output=True, timeout=300,
                                 encoding="utf-8")
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert message in refused.stderr
    assert exported.read_bytes() == written and not (tmp_path / "x.pt").exists()
    tensors = checkpoint.with_suffix(".safetensors")
    for overwrite in ([], ["--overwrite"]):  # not "pass --overwrite", which would be refused all the same
        refused = subprocess.run(exporter + [str(checkpoint), "--output", str(tensors), *overwrite], capture_output=True,
                                 timeout=300, encoding="utf-8")
        assert refused.returncode == 2 and "holds the checkpoint's own tensors" in refused.stderr
    assert checkpointing.read_checkpoint(checkpoint)  # still a checkpoint
    replaced = subprocess.run(exporter + [str(checkpoint), "--output", str(exported), "--overwrite", "--data-note", "again"],
                              capture_output=True, timeout=300, encoding="utf-8")
    assert replaced.returncode == 0, replaced.stderr
    assert load_model(exported)[1].provenance["data_note"] == "again"


def test_a_run_that_diverges_stops_in_one_line_and_keeps_its_finite_checkpoints(crops, tmp_path):
    """A NaN gradient would make every later checkpoint NaN and prune the good ones, and an
    export of them a weights file that `cycleinr` refuses."""
    run = tmp_path / "run"
    config = small_config(crops, run, lr=1e30)
    config.run.checkpoint_every = 1
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()), encoding="utf-8")
    result = subprocess.run([sys.executable, str(REPOSITORY / "Training" / "train.py"), "--config", str(config_file)],
                            capture_output=True, cwd=tmp_path, timeout=300, encoding="utf-8")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    stopped = re.search(r"^train\.py: error: the gradient norm became (nan|inf) at step (\d+) \(optim\.lr 1e\+30\); "
                        r"(.+) holds the last saved weights: train again with a lower optim\.lr in a new run\.out_dir$",
                        result.stderr, re.M)
    assert stopped, result.stderr
    checkpoints = checkpointing.list_checkpoints(run)
    assert stopped.group(3) == str(checkpoints[-1]) and checkpointing.checkpoint_step(checkpoints[-1]) == int(stopped.group(2)) - 1
    for path in checkpoints:
        assert not nonfinite_tensors(checkpointing.model_tensors(checkpointing.read_checkpoint(path)[1]))

    # a checkpoint with NaN weights (a run that diverged before the stop): neither exported nor resumed from
    description, tensors = checkpointing.read_checkpoint(checkpoints[-1])
    damaged = run / "step-0000099.json"
    save_file({**tensors, "model.decoder.output.bias": torch.full_like(tensors["model.decoder.output.bias"], float("nan"))},
              str(damaged.with_suffix(".safetensors")))
    damaged.write_text(json.dumps({**description, "step": 99}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"step-0000099\.json: its weights hold NaN or infinite values \(1 tensors"):
        export(damaged, tmp_path / "nan.safetensors")
    with pytest.raises(checkpointing.CheckpointError, match="does not restore \\(its weights hold NaN"):
        check_restorable(damaged, *checkpointing.read_checkpoint(damaged))


def test_fine_tuning_starts_from_a_weights_file_of_the_same_model(crops, tmp_path):
    train(small_config(crops, tmp_path / "base", steps=3))
    start = export(tmp_path / "base" / "step-0000003.json", tmp_path / "start.safetensors", data_note="two head crops")
    tuned = small_config(crops, tmp_path / "tuned", steps=1, lr=0.0)  # Adam with lr 0 leaves the start as it is
    tuned.run.init_weights = str(start)
    tuned.__post_init__()
    model, _ = train(tuned)
    start_model, _ = load_model(start)
    assert all(torch.equal(tensor, model.state_dict()[name]) for name, tensor in start_model.state_dict().items())
    start.rename(tmp_path / "moved.safetensors")  # exporting later, elsewhere: the start need not be there
    _, info = load_model(export(tmp_path / "tuned" / "step-0000001.json", tmp_path / "tuned.safetensors"))
    parent = info.provenance["initialised_from"]["provenance"]
    assert info.provenance["train_config"]["run"]["init_weights"] == str(start)
    assert info.provenance["steps"] == 1 and parent["steps"] == 3
    assert parent["data_note"] == "two head crops" and "data_note" not in info.provenance
    (tmp_path / "moved.safetensors").rename(start)
    other = small_config(crops, tmp_path / "other")
    other.model_overrides, other.run.init_weights = {"attention": False}, str(start)
    with pytest.raises(ValueError, match="holds a different model"):
        other.__post_init__()
    other.model_overrides, other.run.init_weights = {}, str(tmp_path / "base" / "step-0000003.json")
    with pytest.raises(ValueError, match=r"a training checkpoint\? make a weights file of it with Training/export_weights.py"):
        other.__post_init__()


@pytest.mark.parametrize("override, message", [
    ("run.init_weights={missing}", "run.init_weights: {missing}: weights file not found"),
    ("optim.steps", "optim.steps: an override is section.key=value, e.g. optim.steps=1000"),
])
def test_train_script_rejects_a_bad_config_in_one_line(tmp_path, override, message):
    missing = tmp_path / "missing.safetensors"
    config, override = REPOSITORY / "Training" / "configs" / "ct_cpu.yaml", override.format(missing=missing)
    result = subprocess.run([sys.executable, str(REPOSITORY / "Training" / "train.py"), "--config", str(config), override],
                            capture_output=True, cwd=tmp_path, timeout=300, encoding="utf-8")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"train.py: error: {config} with {override}: {message.format(missing=missing)}"]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("source, message", [
    ("missing", "no such folder, volume file or list file"),
    ("image.png", "neither a volume file (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd) nor a text file listing volumes"),
    ("empty", "no usable training volume (no .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd files there)"),
])
def test_train_script_reports_unreadable_data_in_one_line(tmp_path, source, message):
    (tmp_path / "image.png").write_bytes((REPOSITORY / "CycleINR.png").read_bytes())
    (tmp_path / "empty").mkdir()
    result = subprocess.run([sys.executable, str(REPOSITORY / "Training" / "train.py"), "--config",
                             str(REPOSITORY / "Training" / "configs" / "ct_cpu.yaml"), f"data.train={tmp_path / source}",
                             f"run.out_dir={tmp_path / 'run'}"], capture_output=True, cwd=tmp_path, timeout=300, encoding="utf-8")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"train.py: error: data.train: {tmp_path / source}: {message}"]
    assert not (tmp_path / "run").exists()


def test_train_script_reports_an_out_dir_it_cannot_write_in_one_line(crops, tmp_path):
    (tmp_path / "a_file").write_text("not a folder", encoding="utf-8")
    out_dir = tmp_path / "a_file" / "run"
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(small_config(crops, out_dir).to_dict()), encoding="utf-8")
    result = subprocess.run([sys.executable, str(REPOSITORY / "Training" / "train.py"), "--config", str(config_file)],
                            capture_output=True, cwd=tmp_path, timeout=300, encoding="utf-8")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"train.py: error: {out_dir}: Not a directory"


def _ddp_worker(rank: int, config: TrainConfig, out: Path, rank1_data: str | None = None,
                record_errors: bool = False) -> None:
    """One rank of a two-process run. With `record_errors`, each rank writes the error it ended
    with to rankN_error.txt (mp.spawn would end the other rank at the first one's error), and a
    collective that waits over 60 s fails instead of after train.py's two hours."""
    # torchrun's variables (train.py checks them); the ranks meet through a file, not a port
    # that another process could take between picking and binding it
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    if rank == 1 and rank1_data:  # node-local data that differs from rank 0's
        config.data.train = rank1_data
    start_group = torch.distributed.init_process_group

    def recording_timeout(*args, **kwargs):  # how long the other ranks may wait for rank 0's validation
        (out / f"rank{rank}_timeout.txt").write_text(str(kwargs.get("timeout")), encoding="utf-8")
        if record_errors:
            kwargs["timeout"] = timedelta(seconds=60)
        return start_group(*args, **kwargs, init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=2)

    torch.distributed.init_process_group = recording_timeout
    try:
        model, _ = train(config)
    except Exception as error:
        if not record_errors:
            raise
        (out / f"rank{rank}_error.txt").write_text(f"{type(error).__name__}: {error}", encoding="utf-8")
        return
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"rank{rank}.safetensors"))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_two_process_ddp_on_cpu_keeps_ranks_identical(crops, tmp_path, accumulate):
    config = small_config(crops, tmp_path / "ddp", steps=4, accumulate=accumulate)
    mp.spawn(_ddp_worker, args=(config, tmp_path), nprocs=2, join=True)
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    initial = CycleINR(config.model_config()).state_dict()
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert not torch.equal(rank0["decoder.output.weight"], initial["decoder.output.weight"])  # it did train
    assert checkpointing.list_checkpoints(tmp_path / "ddp")[-1].name == "step-0000004.json"
    timeouts = [(tmp_path / f"rank{r}_timeout.txt").read_text(encoding="utf-8") for r in (0, 1)]
    assert timeouts == ["2:00:00"] * 2  # NCCL's default: 10 min


def test_ddp_processes_that_read_other_volumes_are_stopped(crops, tmp_path):
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    (fewer / "a.nii.gz").write_bytes((crops / "a.nii.gz").read_bytes())
    config = small_config(crops, tmp_path / "ddp", steps=2)
    with pytest.raises(mp.ProcessRaisedException, match="process 1 read other training volumes than process 0"):
        mp.spawn(_ddp_worker, args=(config, tmp_path, str(fewer)), nprocs=2, join=True)
    assert not checkpointing.list_checkpoints(tmp_path / "ddp")


def test_validation_data_rank_0_cannot_read_stops_every_process(crops, tmp_path):
    """Only rank 0 reads data.val: its failure must reach the others, not leave them waiting
    in the first collective until the process group's timeout."""
    config = small_config(crops, tmp_path / "ddp", steps=2)
    config.data.val = str(tmp_path / "no_such_folder")
    mp.spawn(_ddp_worker, args=(config, tmp_path, None, True), nprocs=2, join=True)
    errors = [(tmp_path / f"rank{r}_error.txt").read_text(encoding="utf-8") for r in (0, 1)]
    assert errors == [f"DataSourceError: process 0: data.val: {tmp_path / 'no_such_folder'}: "
                      "no such folder, volume file or list file"] * 2
    assert not (tmp_path / "ddp").exists()


@pytest.mark.parametrize("device, processes", [("cpu", 2), pytest.param("cuda", torch.cuda.device_count(), marks=NEEDS_CUDA)])
def test_torchrun_launches_the_training_script(crops, tmp_path, device, processes):
    """The documented multi-GPU command: torchrun itself, not a stand-in; gloo on CPUs, NCCL on every GPU.
    A bad file in the data is reported once, not by every process."""
    folder = tmp_path / "data"
    shutil.copytree(crops, folder)
    (folder / "broken.nii.gz").write_bytes(b"not an image at all")
    config = _validating(small_config(folder, tmp_path / "run", steps=4), crops)  # rank 0 validates at steps 2 and 4
    config.run.device = device
    config_file = tmp_path / "processes.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()), encoding="utf-8")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(REPOSITORY / "Training" / "train.py"), "--config", str(config_file)]
    # tqdm draws its bar in Unicode, whatever the locale: decode it as such.
    result = subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "strides" not in result.stderr  # validation leaves rank 0's layout as DDP's buckets expect
    assert result.stderr.count("skipping training volume") == 1, result.stderr[-2000:]
    last = checkpointing.list_checkpoints(tmp_path / "run")[-1]
    assert last.name == "step-0000004.json"
    _, info = load_model(export(last, tmp_path / "exported.safetensors"))
    # Exported by one process, it still counts every rank's patches.
    assert info.provenance["processes"] == processes and info.provenance["patches_seen"] == 4 * 2 * processes


def test_bad_files_are_skipped_with_a_warning(crops, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.nii.gz").write_bytes((crops / "a.nii.gz").read_bytes())
    (folder / "broken.nii.gz").write_bytes(b"not an image at all" * 10)
    sitk.WriteImage(sitk.Image(40, 40, sitk.sitkInt16), str(folder / "flat2d.nrrd"))
    whole = (crops / "b.nii.gz").read_bytes()
    (folder / "truncated.nii.gz").write_bytes(whole[:len(whole) // 2])  # a copy cut short: ITK alone reads zeros
    thin = read_volume(crops / "a.nii.gz").array[:3]
    write_volume(Volume(thin, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)), folder / "thin.mha")
    head = read_volume(crops / "b.nii.gz")
    shifted = (head.array.astype(np.int32) + 1024).astype(np.uint16)  # HU + 1024: not what a CT window expects
    write_volume(Volume(shifted, head.spacing, head.origin, head.direction), folder / "shifted.nii.gz")
    narrow = np.ascontiguousarray(head.array[:, :, :5])  # slices narrower than SSIM's window
    write_volume(Volume(narrow, head.spacing, head.origin, head.direction), folder / "narrow.nii.gz")
    air = np.full_like(head.array, -1000)  # nothing to learn, nothing to measure (PSNR inf for every method)
    write_volume(Volume(air, head.spacing, head.origin, head.direction), folder / "air.nii.gz")
    config = small_config(folder, tmp_path / "run", steps=2)
    # The same folder validates too: thin.mha is too thin for case 5:5, which would otherwise
    # end the run at its first validation, and every resume after it.
    config.data.val, config.run.val_crop, config.run.val_cases = str(folder), [24, 32, 32], ["5:5"]
    with pytest.warns(data.TrainingDataWarning) as caught:
        _, history = train(config)
    messages = " | ".join(str(w.message) for w in caught)
    for name in ("broken.nii.gz", "flat2d.nrrd", "thin.mha", "truncated.nii.gz", "shifted.nii.gz", "narrow.nii.gz",
                 "air.nii.gz"):
        assert f"skipping training volume {folder / name}" in messages or f"skipping training volume: {folder / name}" in messages
    assert "truncated.nii.gz: file is damaged or truncated" in messages
    assert f"skipping validation volume: {folder / 'thin.mha'} (run.val_crop [24, 32, 32]): 3 slices are too few for case 5:5" \
        in messages
    assert f"skipping validation volume: {folder / 'narrow.nii.gz'} (run.val_crop [24, 32, 32]): slices of 5x32 voxels" \
        in messages
    assert f"skipping validation volume: {folder / 'shifted.nii.gz'}: the input's lowest value is {shifted.min()}, so it " \
        "does not look like CT in HU" in messages
    assert f"skipping training volume {folder / 'air.nii.gz'}: every voxel is -1000" in messages
    assert f"skipping validation volume: {folder / 'air.nii.gz'} (run.val_crop [24, 32, 32]): every voxel is -1000" in messages
    assert "good.nii.gz" not in messages and len(history) == 2
    assert checkpointing.read_checkpoint(tmp_path / "run" / "step-0000002.json")[0]["metrics"]["val"]["5:5/psnr_generated"] > 0


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "Training" / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_config(path)
    assert config.model_config().normalization.kind == "window"  # CT configs: HU window
    with pytest.raises(ValueError, match="unknown settings in optim"):
        load_config(path, ["optim.stepz=3"])
    with pytest.raises(ValueError, match="pixel_loss must be one of"):
        load_config(path, ["optim.pixel_loss=l3"])


def test_bfloat16_autocast_is_on_for_cuda_and_opt_in_for_the_cpu():
    from Training.config import OptimConfig

    assert [OptimConfig(cpu_amp=cpu_amp).autocast(device) for cpu_amp in (False, True) for device in ("cpu", "cuda")] \
        == [False, True, True, True]
    assert not any(OptimConfig(amp=False, cpu_amp=True).autocast(device) for device in ("cpu", "cuda", "mps"))


def test_overrides_are_read_as_their_setting_s_type():
    config = load_config(REPOSITORY / "Training" / "configs" / "ct_cpu.yaml", ["optim.lr=5e-5", "optim.steps=1e3"])
    assert config.optim.lr == 5e-5 and isinstance(config.optim.lr, float)  # YAML alone reads "5e-5" as text
    assert config.optim.steps == 1000 and isinstance(config.optim.steps, int)
    for override, message in [("optim.steps=1.5", "optim.steps must be a whole number, not 1.5"),
                              ("optim.lr=fast", "optim.lr must be a number, not 'fast'"),
                              ("optim.amp=1", "optim.amp must be true or false, not 1"),
                              ("run.val_crop=48", "run.val_crop must be a list, not 48"),
                              ("model_overrides={attention: 'no'}", "model.attention must be true or false, not 'no'"),
                              ("run.checkpoint_every=0", "run.checkpoint_every, run.keep_checkpoints, run.log_every and "
                                                         "run.val_every must be at least 1"),
                              ("optim.lr=-1e-4", "optim.lr must be finite and >= 0"),
                              ("optim.lr=.inf", "optim.lr must be finite and >= 0"),
                              ("optim.grad_clip=-1", "optim.grad_clip finite and > 0"),
                              ("optim.cycle_weight=-1", "cycle_weight must be finite and >= 0"),
                              ("data.inplane_probability=-3", "inplane_probability must lie in [0, 1]"),
                              ("data.degradations={interval: abc}", "degradations must give some of"),
                              ("data.degradations={interval: 0, thick: 0}", "degradations must give some of"),
                              ("data.workers=-1", "workers >= 0 are needed"),
                              ("data.batches_per_epoch=0", "batches_per_epoch >= 1"),
                              ("run.device=foo", "device must be one of auto, cpu, cuda, mps, gpu, not 'foo'"),
                              ("run.val_cases=[]", 'val_cases must name at least one case, e.g. ["2:2"]'),
                              ("data.train=2024", "data.train must be text, not 2024 (YAML reads it so: write the value in quotes)"),
                              ("optim.seed=-1", "seed must be a whole number in [0, 2^32), not -1"),
                              ("optim.seed=4294967296", "seed must be a whole number in [0, 2^32)"),
                              ("data.scale_max=.inf", "need finite 1 < scale_min <= scale_max, not 2.0 and inf"),
                              ("data.scale_min=2.05", "scale_min and scale_max must be whole tenths"),
                              ("data.degradations.thick=0.5", "data.degradations.thick=0.5: set a mapping whole, "
                                                              "e.g. data.degradations={thick: 0.5, ...}"),
                              ("run.threads=-1", "threads must be >= 0"),
                              ("run.val_cases=[abc]", "val_cases: case 'abc' must be k:r"),
                              ("run.val_cases=[5:5]", 'val_cases: write each case in quotes, e.g. "5:5" (YAML reads '
                                                      "one unquoted as the number 305)"),
                              ("run.val_crop=[a, b, c]", "val_crop must be null or 3 whole numbers"),
                              ("optim=3", "optim must be a section of settings"),
                              ("data.train.x=1", "data.train.x=1: train is a setting, not a section"),
                              ("model_overrides=5", "model_overrides must be a mapping, not 5"),
                              ("optim.lr=[1", "optim.lr=[1: not valid YAML")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            load_config(REPOSITORY / "Training" / "configs" / "ct_cpu.yaml", [override])


def test_a_list_file_can_name_a_dicom_series_folder(crops, tmp_path):
    """Training data straight from a scanner export: a listed folder is read as a DICOM series."""
    crop = sitk.ReadImage(str(crops / "b.nii.gz"))
    write_dicom_series(crop, tmp_path / "series", "1.2.826.0.1.3680043.2.1125.9.1", "HEAD 1.5mm")
    listing = tmp_path / "listing.txt"
    listing.write_text("series\n", encoding="utf-8")
    [volume] = data.load_volumes(listing, small_config(crops, tmp_path).data, NAMED_CONFIGS["light"].normalization)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(crop))


def test_one_volume_file_is_a_training_set(crops, tmp_path):
    assert data.volume_paths(crops / "a.nii.gz") == [crops / "a.nii.gz"]
    listing, relative = tmp_path / "listing.txt", os.path.relpath(crops, tmp_path)  # names relative to the list
    listing.write_text(f"{relative}/a.nii.gz\n# a comment\n", encoding="utf-8")
    assert data.volume_paths(listing) == [tmp_path / relative / "a.nii.gz"]
    listing.write_text(f"{relative}/a.nii.gz\r\n", encoding="utf-8-sig")  # Notepad's BOM and line ends
    assert data.volume_paths(listing) == [tmp_path / relative / "a.nii.gz"]


def test_a_detached_nrrd_in_a_folder_is_a_volume(crops, tmp_path):
    """Slicer and 3D tools write NRRD as a .nhdr header beside its data file: the header is the volume."""
    folder = tmp_path / "detached"
    folder.mkdir()
    sitk.WriteImage(sitk.ReadImage(str(crops / "a.nii.gz")), str(folder / "a.nhdr"))
    assert data.volume_paths(folder) == [folder / "a.nhdr"]  # not its data file
    [volume] = data.load_volumes(folder, small_config(crops, tmp_path).data, NAMED_CONFIGS["light"].normalization)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(sitk.ReadImage(str(crops / "a.nii.gz"))))


def test_a_broken_link_or_a_volume_listed_twice_is_said(crops, tmp_path):
    """Never silently: a link to a volume that has moved, a list that names one volume twice."""
    folder = tmp_path / "linked"
    folder.mkdir()
    (folder / "a.nii.gz").symlink_to(crops / "a.nii.gz")
    (folder / "moved.nii.gz").symlink_to(tmp_path / "elsewhere.nii.gz")
    with pytest.warns(data.TrainingDataWarning, match=r"moved\.nii\.gz: a link to .*elsewhere\.nii\.gz, which is not there"):
        assert data.volume_paths(folder) == [folder / "a.nii.gz"]
    listing, relative = tmp_path / "twice.txt", os.path.relpath(crops, tmp_path)
    listing.write_text(f"{relative}/a.nii.gz\n{relative}/b.nii.gz\n{relative}/./a.nii.gz\n", encoding="utf-8")
    with pytest.warns(data.TrainingDataWarning, match=re.escape(f"{relative}/./a.nii.gz is listed twice; reading it once")):
        assert data.volume_paths(listing) == [tmp_path / relative / "a.nii.gz", tmp_path / relative / "b.nii.gz"]
    loop = tmp_path / "loop.nii.gz"
    loop.symlink_to(loop)
    listing.write_text(f"{loop}\n{relative}/a.nii.gz\n", encoding="utf-8")  # the loop is skipped when read, like a missing file
    assert data.volume_paths(listing) == [loop, tmp_path / relative / "a.nii.gz"]


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="a GPU is there")
def test_a_device_that_is_not_there_is_one_line(crops, tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(small_config(crops, tmp_path / "run").to_dict()), encoding="utf-8")
    message = "device gpu requested but torch finds no CUDA or Apple MPS GPU; use cpu or auto"
    for script, items in (("train.py", []), ("score_weights.py", [str(REPOSITORY / "CycleINRLib" / "weights" / "cycleinr_ct.safetensors"),
                                                                  "data.val=unused"])):
        result = subprocess.run([sys.executable, str(REPOSITORY / "Training" / script), "--config", str(config_file),
                                 *items, "run.device=gpu"], capture_output=True, cwd=tmp_path, timeout=300, encoding="utf-8")
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [f"{script}: error: {message}"], result.stderr
    assert not (tmp_path / "run").exists()


def test_a_rank_left_in_the_shell_is_one_line_not_a_distributed_run(crops, tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(small_config(crops, tmp_path / "run").to_dict()), encoding="utf-8")
    environment = {name: value for name, value in os.environ.items() if name not in TORCHRUN_VARIABLES}
    result = subprocess.run([sys.executable, str(REPOSITORY / "Training" / "train.py"), "--config", str(config_file)],
                            capture_output=True, cwd=tmp_path, timeout=300, encoding="utf-8", env=dict(environment, RANK="0"))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "train.py: error: RANK set in the environment without WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT: start "
        "the processes with torchrun, or unset RANK for a single-process run"], result.stderr
    assert not (tmp_path / "run").exists()


def test_padding_outside_the_field_of_view_trains_as_air(crops, tmp_path):
    """Training sees a CT's -3024 HU padding at the floor, as `cycleinr upsample` does."""
    head = read_volume(crops / "a.nii.gz")
    padded = head.array.copy()
    padded[:, :, :6] = -3024
    write_volume(Volume(padded, head.spacing, head.origin, head.direction), tmp_path / "padded.nii.gz")
    for kind, lowest in (("window", -1024), ("percentile", -3024)):
        normalization = NAMED_CONFIGS["light"].normalization if kind == "window" else Normalization("percentile", 0.5, 99.5)
        [volume] = data.load_volumes(tmp_path / "padded.nii.gz", small_config(crops, tmp_path).data, normalization)
        assert volume.array.min() == lowest and volume.array.dtype == padded.dtype
        np.testing.assert_array_equal(volume.array[:, :, 6:], padded[:, :, 6:])


def test_a_volume_with_thick_slices_trains_on_its_thin_in_plane_axes(crops, tmp_path):
    """Spacing is ITK's (x, y, z), the array numpy's (z, y, x): a 3 mm slice axis is no truth."""
    head = read_volume(crops / "b.nii.gz")
    write_volume(Volume(head.array, (0.7, 0.7, 3.0), head.origin, head.direction), tmp_path / "thick.nii.gz")
    [volume] = data.load_volumes(tmp_path / "thick.nii.gz", small_config(crops, tmp_path).data,
                                 NAMED_CONFIGS["light"].normalization)
    assert (volume.slice_axis, volume.truth_axes) == (0, (1, 2))


def test_pruning_keeps_the_checkpoint_just_written_beside_a_newer_leftover(tmp_path):
    """A resume that skipped an unreadable newer checkpoint: that leftover must not count
    among the kept ones, or keeping one would delete the checkpoint just written."""
    model = CycleINR(NAMED_CONFIGS["light"])
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 10, 0.5)
    (tmp_path / "step-0000030.json").write_text("{", encoding="utf-8")  # damaged, from before the resume
    for step in (10, 20):
        checkpointing.save_checkpoint(tmp_path, step, model, optimizer, scheduler, {}, {}, keep=1)
    assert [path.name for path in checkpointing.list_checkpoints(tmp_path)] == ["step-0000020.json", "step-0000030.json"]
    assert (tmp_path / "step-0000020.safetensors").is_file() and not (tmp_path / "step-0000010.safetensors").exists()


def test_a_restored_checkpoint_brings_back_torch_s_random_state(tmp_path):
    """What a resumed run draws from torch (dropout, torch-side augmentation) must repeat too."""
    model = CycleINR(NAMED_CONFIGS["light"])
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 10, 0.5)
    torch.manual_seed(5)
    torch.rand(7)
    state = torch.get_rng_state()
    checkpoint = checkpointing.save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {}, {}, keep=1)
    torch.manual_seed(0)
    checkpointing.restore(*checkpointing.read_checkpoint(checkpoint), model, optimizer, scheduler)
    assert torch.equal(torch.get_rng_state(), state)
