"""Baselines on the grid convention, the evaluation harness, and the snli/evaluate commands."""

import csv
import json
import os
import re
import shutil
import subprocess
import tempfile
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from CycleINRLib import metrics
from CycleINRLib.baselines import BASELINES, INTERPOLATORS, interpolate
from CycleINRLib.cli import main
from CycleINRLib.errors import InputError
from CycleINRLib.evaluate import IMAGE_UNIT_KEYS, Case, Method, evaluate_volume, in_image_units, make_methods, parse_case
from CycleINRLib.geometry import output_slice_count
from CycleINRLib.io import Volume, read_volume, write_volume
from conftest import write_dicom_series

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cli(*arguments, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "CycleINRLib.cli", *map(str, arguments)],
                          capture_output=True, cwd=cwd, timeout=300, encoding="utf-8")


@pytest.mark.parametrize("factor", [2.0, 2.5, 3.7])
@pytest.mark.parametrize("method", BASELINES)
def test_baselines_equal_simpleitk_resampling_on_the_output_grid(method, factor):
    """Same as resampling the whole 3D image with SimpleITK onto j / r, spacing s / r."""
    array = np.random.default_rng(0).normal(0, 100, (9, 12, 10)).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.7, 2.0))
    size = [10, 12, output_slice_count(9, factor)]
    expected = sitk.GetArrayFromImage(sitk.Resample(
        image, size, sitk.Transform(), INTERPOLATORS[method], image.GetOrigin(), (0.7, 0.7, 2.0 / factor),
        image.GetDirection(), 0.0, sitk.sitkFloat32))
    np.testing.assert_allclose(interpolate(array, factor, 0, method), expected, atol=1e-3)
    along_i = interpolate(np.moveaxis(array, 0, 2), factor, 2, method)
    np.testing.assert_allclose(np.moveaxis(along_i, 2, 0), expected, atol=1e-3)


def test_baselines_keep_integer_dtype_and_acquired_slices():
    array = np.random.default_rng(1).integers(-1024, 3071, (6, 8, 8)).astype(np.int16)
    for method in BASELINES:
        result = interpolate(array, 3, 0, method)
        assert result.dtype == np.int16 and result.shape == (16, 8, 8)
        np.testing.assert_array_equal(result[::3], array)
    np.testing.assert_array_equal(interpolate(array, 2, 0, "linear")[1], np.rint((array[0] + array[1].astype(float)) / 2))


def test_cases_are_parsed_and_refused_with_a_reason():
    assert parse_case("5:2.5") == Case(5, 2.5) and parse_case("5:2.5").step == 2
    assert parse_case("3:3").label == "3:3"
    for text, reason in [("5:2", "whole number"), ("5", "k:r"), ("a:2", "k:r"), ("1:1", "at least 2"), ("2_0:2", "k:r"),
                         ("4:0.5", "case 4:0.5: factor must be greater than 1"),
                         ("2:1.0000000001", "case 2:1.0000000001: factor must be greater than 1, not 1"),  # r = 2/2
                         ("4:1.3333333", "k / r = 3.000000075 must be a whole number")]:
        with pytest.raises(InputError, match=reason):
            parse_case(text)


def noisy_truth(slices=41, size=48, seed=3):
    """A smooth phantom along all axes with noise: something interpolation gets partly right."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*(np.linspace(0, 3 * np.pi, n) for n in (slices, size, size)), indexing="ij")
    return (400 * np.sin(k) * np.cos(j) + 200 * np.sin(i) + rng.normal(0, 20, k.shape)).astype(np.int16)


def test_harness_compares_each_output_slice_with_the_truth_at_its_position():
    """An upsampler that returns the truth at j * k / r plus 409.5 HU scores exactly 20 dB
    everywhere; any misalignment between outputs and truth would cost far more."""
    truth = noisy_truth()
    case = Case(5, 2.5)

    def truth_plus_offset(low_resolution, factor, axis):
        count = output_slice_count(low_resolution.shape[axis], factor)
        return np.take(truth, np.arange(count) * case.step, axis=axis) + 409.5

    oracle = Method("oracle", truth_plus_offset, "truth + 409.5")
    (result,) = evaluate_volume(truth, 0, (1.25, 0.7, 0.7), [case], [oracle, *make_methods(["linear"])])
    oracle_row, linear_row = result.rows
    assert (oracle_row["output_slices"], oracle_row["generated_slices"]) == (21, 16)  # 9 inputs, j = 0, 5, .. acquired
    assert oracle_row["psnr_generated"] == pytest.approx(20.0) and oracle_row["psnr_all"] == pytest.approx(20.0)
    assert oracle_row["snli"] == pytest.approx(oracle_row["snli_truth"], rel=1e-3)
    assert linear_row["psnr_generated"] < linear_row["psnr_all"]  # its acquired slices are exact
    # SSIM per slice: the 5 acquired slices score 1, so "all" is the generated mean diluted by them
    assert linear_row["ssim_generated"] < 0.99
    assert linear_row["ssim_all"] == pytest.approx((16 * linear_row["ssim_generated"] + 5) / 21, abs=1e-9)
    assert linear_row["noise_mean"] < linear_row["noise_mean_truth"]  # interpolation smooths the noise
    assert set(result.views["coronal"]) == {"input", "oracle", "linear", "truth"}
    assert result.view_spacing["coronal"] == (2.5, 0.7)


def test_thick_degradation_is_used_and_reported():
    truth = noisy_truth(slices=31, size=32)
    linear = make_methods(["linear"])
    interval, = evaluate_volume(truth, 0, (1, 1, 1), [Case(3, 3)], linear, "interval")
    thick, = evaluate_volume(truth, 0, (1, 1, 1), [Case(3, 3)], linear, "thick")
    assert thick.rows[0]["degradation"] == "thick"
    assert thick.rows[0]["psnr_all"] != interval.rows[0]["psnr_all"]
    assert thick.rows[0]["noise_mean"] < interval.rows[0]["noise_mean"]  # averaging slices lowers noise


def test_snli_command_prints_one_json_object_and_plots(tmp_path):
    array = np.stack([np.random.default_rng(s).normal(0, sigma, (64, 64)) for s, sigma in enumerate([5, 50] * 4)])
    path = write_volume(Volume(array.astype(np.float32), (0.5, 0.5, 3.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
                        tmp_path / "sawtooth.nii.gz")
    done = cli("snli", path, "--json", "--plot", tmp_path / "profile.png")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)  # one object, nothing else on stdout
    assert summary["axis"] == 2 and summary["slices"] == 8
    assert summary["snli"] == pytest.approx(metrics.snli(metrics.slice_noise_levels(array, 0)), abs=1e-3)
    assert summary["snli"] == pytest.approx(22.5, rel=0.1)
    assert (tmp_path / "profile.png").read_bytes().startswith(PNG_MAGIC)
    text = cli("snli", path, "--axis", "0")
    assert text.returncode == 0 and text.stdout.startswith("SNLI ") and "along axis 0" in text.stdout


def _link_to_itself(path: Path) -> Path:
    path.symlink_to(path.name)
    return path


def test_commands_refuse_bad_input_in_one_line_and_write_nothing(tmp_path, capsys):
    volume, constant = tmp_path / "v.nii.gz", tmp_path / "constant.nii.gz"
    identity = (1, 0, 0, 0, 1, 0, 0, 0, 1)
    write_volume(Volume(noisy_truth(slices=11, size=16), (1.0, 1.0, 2.0), (0, 0, 0), identity), volume)
    write_volume(Volume(np.zeros((11, 16, 16), np.int16), (1.0, 1.0, 2.0), (0, 0, 0), identity), constant)
    narrow = write_volume(Volume(noisy_truth(slices=11, size=16)[:, :, :4].copy(), (1.0, 1.0, 2.0), (0, 0, 0), identity),
                          tmp_path / "narrow.nii.gz")
    faint = write_volume(Volume(1000 + noisy_truth(slices=11, size=16).astype(np.float32) * 1e-7, (1.0, 1.0, 2.0), (0, 0, 0),
                                identity), tmp_path / "faint.mha")  # float32 keeps 1000 and 1000.00006
    huge = write_volume(Volume(noisy_truth(slices=11, size=16) * 1e300, (1.0, 1.0, 2.0), (0, 0, 0), identity),
                        tmp_path / "huge.mha")  # float64; float32 metrics overflow, and SNLI squares it to inf
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "afile").write_text("not a folder", encoding="utf-8")
    highest = read_volume(volume).array.max()
    for arguments, reason in [
        (("evaluate", volume, "-o", tmp_path / "out", "--cases", "5:2"), "whole number"),
        (("evaluate", tmp_path / "missing.nii.gz", "-o", tmp_path / "out"), "no such file"),
        (("evaluate", volume, "-o", tmp_path / "out", "--range", "9:3"), "greater than LOW"),
        (("evaluate", volume, "-o", tmp_path / "out", "--range", "-1000:1000"),
         "argument --range: expected one argument (a value that starts with '-' is written --range=VALUE)"),
        (("evaluate", volume, "-o", tmp_path / "out", "--range", "0:inf"), "finite and within -3.4e+38 to 3.4e+38"),
        (("evaluate", volume, "-o", tmp_path / "out", "--range", "0:1e39"), "finite and within -3.4e+38 to 3.4e+38"),
        (("evaluate", volume, "-o", tmp_path / "out", "--range", "nan:1"), "finite and within -3.4e+38 to 3.4e+38"),
        (("evaluate", huge, "-o", tmp_path / "out", "--methods", "linear"),
         "its values reach 6.24e+302, beyond 3.4e+38, the largest magnitude of single precision"),
        (("snli", huge), "its values reach 6.24e+302, beyond 3.4e+38"),
        (("upsample", huge, tmp_path / "up.mha", "--factor", "2", "--device", "cpu"), "its values reach 6.24e+302"),
        (("evaluate", volume, "-o", tmp_path / "out", "--range=1e-300:2e-300"), "too narrow for the metrics' single precision"),
        (("evaluate", volume, "-o", tmp_path / "out", "--range", "1000:1000.0001"), "; rescale the volumes"),
        (("evaluate", faint, "-o", tmp_path / "out", "--range", "truth", "--methods", "linear"),
         "its values span only 1000 to 1000, too narrow for the metrics' single precision; rescale the volume"),
        (("evaluate", constant, "-o", tmp_path / "out", "--range", "truth", "--methods", "linear"),
         "every voxel is 0; --range truth needs a truth with more than one value"),
        (("evaluate", volume, "-o", tmp_path / "out", "--cases", "20:2"), "too few"),
        (("evaluate", volume, "-o", tmp_path / "out", "--range", "5000:6000", "--methods", "linear"),
         "lie outside --range 5000:6000, where every method would score perfectly"),
        (("evaluate", volume, "-o", tmp_path / "out", f"--range={highest:g}:{highest + 1000:g}", "--methods", "linear"),
         "where every method would score perfectly"),  # only the brightest voxel on its edge: one value after clipping
        (("evaluate", volume, "-o", "", "--methods", "linear"), "-o/--output-dir needs a folder name"),
        (("evaluate", volume, "-o", tmp_path / "afile" / "out", "--methods", "linear"), f"{tmp_path / 'afile'} is not a folder"),
        (("evaluate", volume, "-o", _link_to_itself(tmp_path / "loop"), "--methods", "linear"), "is a link that leads nowhere"),
        (("evaluate", narrow, "-o", tmp_path / "out", "--methods", "linear"), "slices of 4x16 voxels are smaller than SSIM's 7x7"),
        (("snli", narrow), "slices of 4x16 voxels are smaller than the 7x7 voxels a noise level is estimated from"),
        (("snli", volume, "--plot", tmp_path / "p.jpg"), "must end in .png"),
        (("snli", volume, "--plot", ""), "--plot needs a PNG file name"),
        (("snli", volume, "--plot", tmp_path / "afile" / "p.png"), f"{tmp_path / 'afile'} is not a folder"),
        (("snli", volume, "--plot", tmp_path / "folder.png", "--overwrite"), "is a folder"),
    ]:
        assert main([str(a) for a in arguments]) == 2, arguments
        stderr = capsys.readouterr().err
        assert reason in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "constant.nii.gz", "faint.mha", "folder.png", "huge.mha",
                                                          "loop", "narrow.nii.gz", "v.nii.gz"]


def test_evaluate_replaces_nothing_when_a_folder_stands_where_it_writes_a_file(tmp_path, capsys):
    volume, out = tmp_path / "v.nii.gz", tmp_path / "out"
    write_volume(Volume(noisy_truth(slices=11, size=16), (1.0, 1.0, 2.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)), volume)
    (out / "results.md").mkdir(parents=True)
    (out / "results.csv").write_text("an earlier result\n", encoding="utf-8")
    arguments = ["evaluate", str(volume), "-o", str(out), "--methods", "linear", "--cases", "2:2", "--overwrite"]
    assert main(arguments) == 2
    stderr = capsys.readouterr().err
    assert "holds folders where evaluate writes files (results.md)" in stderr and len(stderr.strip().splitlines()) == 1
    assert (out / "results.csv").read_text(encoding="utf-8") == "an earlier result\n"
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "v.nii.gz"]  # no staging folder left


@pytest.mark.parametrize("interruption", [PermissionError(1, "Operation not permitted"), KeyboardInterrupt()])
def test_evaluate_puts_an_existing_folder_back_when_replacing_its_files_stops_halfway(tmp_path, capsys, monkeypatch,
                                                                                    interruption):
    """Results go into an existing folder file by file: a file that cannot be replaced (an
    immutable one) or a Ctrl-C after some are in must leave the earlier results whole, not a
    CSV of this run beside a table of the last."""
    volume, out = tmp_path / "v.nii.gz", tmp_path / "out"
    write_volume(Volume(noisy_truth(slices=11, size=16), (1.0, 1.0, 2.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)), volume)
    arguments = ["evaluate", str(volume), "-o", str(out), "--methods", "linear", "--cases", "2:2", "--overwrite"]
    assert main(arguments) == 0
    earlier = {path.name: path.read_bytes() for path in out.iterdir()}
    assert len(earlier) >= 3
    for path in out.iterdir():
        path.write_bytes(b"earlier " + path.name.encode())  # every file told apart from this run's
    earlier = {path.name: path.read_bytes() for path in out.iterdir()}
    capsys.readouterr()
    replace, published, stopped = os.replace, [], []

    def stops_at_the_third_file(source, target):  # once: putting the folder back uses os.replace too
        if ".partial-" in str(source) and Path(target).parent == out and not stopped:
            if len(published) == 2:
                stopped.append(Path(target).name)
                raise interruption
            published.append(Path(target).name)
        return replace(source, target)

    monkeypatch.setattr(os, "replace", stops_at_the_third_file)
    if isinstance(interruption, KeyboardInterrupt):
        assert main(arguments) == 130
    else:
        assert main(arguments) == 2
        stderr = capsys.readouterr().err.strip().splitlines()
        assert len(stderr) == 1 and "cannot be replaced (Operation not permitted)" in stderr[0]
        assert f"{out} is left as it was" in stderr[0]
    assert len(published) == 2 and stopped  # two of this run's files had gone in before the stop
    assert {path.name: path.read_bytes() for path in out.iterdir()} == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "v.nii.gz"]


def test_a_pipe_given_as_the_volume_is_refused_not_waited_on(tmp_path):
    """ITK would open a named pipe and wait for a writer forever, deaf to Ctrl-C."""
    pipe = tmp_path / "scan.nii"
    os.mkfifo(pipe)
    for command in (["evaluate", pipe, "-o", tmp_path / "out", "--methods", "linear"], ["snli", pipe],
                    ["upsample", pipe, tmp_path / "o.nii.gz", "--factor", "2"]):
        result = cli(*command)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [f"cycleinr: error: {pipe}: neither a file nor a folder (a pipe or a "
                                                       "device); give a volume file or a DICOM folder"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.nii"]
    volume = write_volume(Volume(noisy_truth(slices=5, size=16), (1.0, 1.0, 2.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
                          tmp_path / "v.nii.gz")
    result = cli("upsample", volume, tmp_path / "o.nii.gz", "--factor", "2", "--weights", pipe)
    assert result.returncode == 2 and result.stderr.strip().endswith(
        f"{pipe}: neither a file nor a folder (a pipe or a device); give a .safetensors file"), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.nii", "v.nii.gz"]
    loop = tmp_path / "loop.nii.gz"
    loop.symlink_to(loop)
    result = cli("snli", loop)
    assert result.returncode == 2 and result.stderr.strip() == f"cycleinr: error: {loop}: a link that loops or points to nothing"


def test_odd_volume_names_give_whole_tables_and_pictures_that_fit_a_file_name(tmp_path):
    """A name of 240 characters would make picture names past the 255 bytes a file name may
    have; `|` or a line break in a name would split the Markdown table's row."""
    folder = tmp_path / "volumes"
    folder.mkdir()
    truth = Volume(noisy_truth(slices=11, size=16), (1.0, 1.0, 2.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    names = ["v" * 240 + "a", "v" * 240 + "b", "a|b", "new\nline"]  # the first two differ only at the end
    for name in names:
        write_volume(truth, folder / f"{name}.nii.gz")
    result = cli("evaluate", folder, "-o", tmp_path / "out", "--methods", "linear", "--cases", "2:2")
    assert result.returncode == 0, result.stderr
    pictures = [path.name for path in (tmp_path / "out").glob("*.png")]
    assert len(pictures) == 2 * len(names) and all(len(os.fsencode(name)) <= 255 for name in pictures)
    rows = [line for line in (tmp_path / "out" / "results.md").read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    assert len(rows) == 2 + len(names) + 1  # header, rule, one row a volume, their mean
    assert len({line.replace("\\|", "").count("|") for line in rows}) == 1
    assert any(line.startswith("| a\\|b |") for line in rows) and any(line.startswith("| new line |") for line in rows)


def test_values_near_float32s_largest_draw_their_pictures_without_warnings(tmp_path):
    truth = noisy_truth(slices=11, size=16).astype(np.float32)
    extreme = np.where(truth > np.median(truth), 3.3e38, -3.3e38).astype(np.float32)
    volume = write_volume(Volume(extreme, (1.0, 1.0, 2.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)), tmp_path / "v.mha")
    result = cli("evaluate", volume, "-o", tmp_path / "out", "--range", "truth", "--methods", "linear", "cubic",
                 "--cases", "2:2")
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr
    assert len(list((tmp_path / "out").glob("*.png"))) == 2


SCALES = (1.0, 2.0**-40, 2.0**30, 2.0**100)  # powers of two: the same numbers in another unit, exactly


def test_a_volume_scores_the_same_in_any_unit(tmp_path, capsys):
    """A diffusion ADC map in m^2/s spans 0 to 3e-9 (here values of 1e-12 or so), and its noise
    levels of 1e-11 must not print as 0; a volume in units of 1e9 or 1e30 must not overflow
    SSIM's float32 products (NaN). PSNR and SSIM come out the same, SNLI and noise levels scale
    with the unit."""
    identity = (1, 0, 0, 0, 1, 0, 0, 0, 1)
    scores, profiles = {}, {}
    for scale in SCALES:
        truth = write_volume(Volume(noisy_truth(slices=11, size=16).astype(np.float32) * scale, (1.0, 1.0, 2.0), (0, 0, 0),
                                    identity), tmp_path / f"map_{scale:g}.mha")
        output = tmp_path / f"out_{scale:g}"
        assert main(["evaluate", str(truth), "-o", str(output), "--range", "truth", "--methods", "linear", "cubic",
                     "--cases", "2:2"]) == 0, capsys.readouterr().err
        with open(output / "results.csv", encoding="utf-8") as table:
            scores[scale] = [[float(row[key]) for key in ("psnr_generated", "ssim_generated", "psnr_all", "ssim_all")]
                             + [float(row[key]) / scale for key in IMAGE_UNIT_KEYS] for row in csv.DictReader(table)]
        assert "0.000" not in (output / "results.md").read_text(encoding="utf-8")
        capsys.readouterr()
        assert main(["snli", str(truth), "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        profiles[scale] = np.array([summary["snli"], summary["mean_noise"], *summary["levels"]]) / scale
    for scale in SCALES[1:]:
        np.testing.assert_allclose(scores[scale], scores[1.0], rtol=2e-3, err_msg=f"scale {scale:g}")
        np.testing.assert_allclose(profiles[scale], profiles[1.0], rtol=1e-4, err_msg=f"scale {scale:g}")


def test_noise_levels_keep_ct_decimals_and_small_units_their_digits():
    """HU read best with fixed decimals (0.859, not 0.8590 or 8.59e-01); an ADC map's 9.3e-12
    m^2/s would be 0.000 with them, a volume in units of 1e7 a long row of digits."""
    assert [in_image_units(value, 3) for value in (0.859, 1.428, 12.5, 0.0999, 9.3357e-12, 0.0)] == [
        "0.859", "1.428", "12.500", "0.0999", "9.336e-12", "0.000"]
    assert [in_image_units(value, 2) for value in (5.57, 6.389, 0.5, 2.004e-11, 5.719e7)] == [
        "5.57", "6.39", "0.5", "2.004e-11", "5.719e+07"]


def test_evaluate_reads_a_folder_s_volumes_and_names_each_once(tmp_path, capsys):
    """Hidden files are no volumes (a partial write, macOS's ._ files); a-3.nii.gz, a.nii.gz and
    a.nii.gz again are a-3, a and a-2 (not a second a-3)."""
    truths = tmp_path / "truths"
    truths.mkdir()
    identity = (1, 0, 0, 0, 1, 0, 0, 0, 1)
    for name, seed in (("a.nii.gz", 1), ("a-3.nii.gz", 2)):
        write_volume(Volume(noisy_truth(slices=11, size=16, seed=seed), (1.0, 1.0, 2.0), (0, 0, 0), identity), truths / name)
    (truths / "._a.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (truths / ".partial-0123abcd-b.nii.gz").write_bytes(b"\x1f\x8b cut short")
    assert main(["evaluate", str(truths), str(truths / "a.nii.gz"), "-o", str(tmp_path / "out"), "--methods", "linear",
                 "--cases", "2:2"]) == 0, capsys.readouterr().err
    with open(tmp_path / "out" / "results.csv", encoding="utf-8") as table:
        assert [row["volume"] for row in csv.DictReader(table)] == ["a-3", "a", "a-2", "mean of 3"]


def test_mean_rows_give_slice_counts_as_the_rows_do(tmp_path, capsys):
    """Volumes of 11, 11 and 13 slices: 2:2 makes 11, 11 and 13 output slices, a mean of 11.67."""
    identity = (1, 0, 0, 0, 1, 0, 0, 0, 1)
    paths = [write_volume(Volume(noisy_truth(slices=slices, size=16, seed=seed), (1.0, 1.0, 2.0), (0, 0, 0), identity),
                          tmp_path / f"v{seed}.nii.gz") for seed, slices in enumerate((11, 11, 13))]
    assert main(["evaluate", *map(str, paths), "-o", str(tmp_path / "out"), "--methods", "linear", "--cases", "2:2"]) == 0, \
        capsys.readouterr().err
    with open(tmp_path / "out" / "results.csv", encoding="utf-8") as table:
        rows = list(csv.DictReader(table))
    assert [(row["output_slices"], row["generated_slices"]) for row in rows] == [
        ("11", "5"), ("11", "5"), ("13", "6"), ("11.67", "5.33")]


def test_a_method_degradation_or_case_given_twice_is_measured_once(tmp_path, capsys):
    """In the order first given; 4:1.3333333333 and 4:1.33333333333 are both 4:4/3, one case."""
    volume = write_volume(Volume(noisy_truth(slices=13, size=16), (1.0, 1.0, 2.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
                          tmp_path / "v.nii.gz")
    assert main(["evaluate", str(volume), "-o", str(tmp_path / "out"), "--methods", "linear", "linear", "cubic", "linear",
                 "--degradation", "thick", "thick", "--cases", "4:1.3333333333", "2:2", "4:1.33333333333"]) == 0, \
        capsys.readouterr().err
    with open(tmp_path / "out" / "results.csv", encoding="utf-8") as table:
        assert [(row["degradation"], row["case"], row["method"]) for row in csv.DictReader(table)] == [
            ("thick", case, method) for case in ("4:1.33333", "2:2") for method in ("linear", "cubic")]
    assert parse_case("4:1.3333333333") == parse_case("4:1.33333333333") == Case(4, 4 / 3)


def test_options_for_the_model_without_a_model_method_are_reported_unused(tmp_path, capsys):
    volume = write_volume(Volume(noisy_truth(slices=11, size=16), (1.0, 1.0, 2.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
                          tmp_path / "v.nii.gz")
    (tmp_path / "notes.txt").write_text("not weights", encoding="utf-8")
    assert main(["evaluate", str(volume), "-o", str(tmp_path / "out"), "--methods", "linear", "--cases", "2:2",
                 "--weights", str(tmp_path / "notes.txt"), "--bf16"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "warning: --weights and --bf16 are for the cycleinr methods, and --methods has none: ignored"]


def test_a_dicom_folder_given_as_dot_is_named_after_the_folder(tmp_path, monkeypatch, capsys):
    """`cycleinr evaluate .` from inside a DICOM series folder: rows and pictures are named
    `series`, not `` (hidden `_interval_2-2_views.png`)."""
    image = sitk.GetImageFromArray(noisy_truth(slices=11, size=16))
    image.SetSpacing((1.0, 1.0, 2.0))
    series = write_dicom_series(image, tmp_path / "series", "1.2.826.0.1.3680043.2.1125.7.9", "THIN")
    monkeypatch.chdir(series)
    assert main(["evaluate", ".", "-o", str(tmp_path / "out"), "--methods", "linear", "--cases", "2:2"]) == 0, \
        capsys.readouterr().err
    with open(tmp_path / "out" / "results.csv", encoding="utf-8") as table:
        assert [row["volume"] for row in csv.DictReader(table)] == ["series"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["series_interval_2-2_noise.png",
                                                                       "series_interval_2-2_views.png"]


def test_evaluate_warns_when_range_ct_does_not_fit_the_truth(shared_data, tmp_path):
    """A real brain MR crop in units ten times larger (71 % of voxels above 3071) and scaled to
    0..1 (a span of 1 in the 4095 of --range ct): one warning each, naming it; the validation CT
    gets none (end-to-end test)."""
    mr = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / "demo/pgbm-001_brain_mr_t1post_6.5mm.nii.gz")))
    crop = mr[:, 128:192, 98:162].astype(np.float32)  # 24 slices of 64x64, 6.5 mm
    paths = [write_volume(Volume(array, (0.69, 0.69, 6.5), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)), tmp_path / name)
             for name, array in (("mr_x10.nii.gz", crop * 10), ("mr_unit.nii.gz", crop / crop.max()))]
    done = cli("evaluate", *paths, "-o", tmp_path / "out", "--methods", "linear", "--cases", "2:2", "--json-progress")
    assert done.returncode == 0, done.stderr
    warnings = [e["message"] for e in map(json.loads, done.stdout.splitlines()) if e["event"] == "warning"]
    above = np.count_nonzero(crop * 10 > 3071) / crop.size
    assert warnings == [
        f"mr_x10.nii.gz: {above:.0%} of its voxels lie above 3071, the top of --range ct (CT in HU), and are clipped "
        "before PSNR and SSIM; give --range truth for a volume that is not CT",
        "mr_unit.nii.gz: its values span only 1, against 4095 for --range ct (CT in HU), which inflates PSNR and SSIM; "
        "give --range truth for a volume that is not CT"]
    assert above > 0.5 and done.stderr.count("warning: ") == 2


def test_a_staging_folder_left_by_a_killed_run_does_not_block_the_next(tmp_path, capsys):
    volume, out = tmp_path / "v.nii.gz", tmp_path / "out"
    write_volume(Volume(noisy_truth(slices=11, size=16), (1.0, 1.0, 2.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)), volume)
    (out / ".partial-0123abcd-results").mkdir(parents=True)  # SIGKILL or a power cut: no clean-up ran
    assert main(["evaluate", str(volume), "-o", str(out), "--methods", "linear", "--cases", "2:2"]) == 0, \
        capsys.readouterr().err
    assert (out / "results.csv").is_file()


def test_evaluate_writes_through_a_link_to_another_file_system(tmp_path, capsys):
    """A results folder linked to scratch space: the files are staged where they will stay."""
    scratch = Path("/dev/shm")
    if not scratch.is_dir() or not os.access(scratch, os.W_OK) or os.stat(scratch).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second writable file system (/dev/shm) on this machine")
    volume = tmp_path / "v.nii.gz"
    write_volume(Volume(noisy_truth(slices=11, size=16), (1.0, 1.0, 2.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)), volume)
    target = Path(tempfile.mkdtemp(dir=scratch))
    try:
        (tmp_path / "linked").symlink_to(target)
        (tmp_path / "parent").symlink_to(target)
        for output in (tmp_path / "linked", tmp_path / "parent" / "new"):  # the link itself; a new folder in it
            assert main(["evaluate", str(volume), "-o", str(output), "--methods", "linear", "--cases", "2:2"]) == 0, \
                capsys.readouterr().err
            assert (output / "results.csv").is_file()
        assert sorted(p.name for p in target.iterdir() if p.name.startswith(".")) == []  # no staging left
    finally:
        shutil.rmtree(target)


def test_evaluate_end_to_end_on_a_crop_of_real_ct(shared_data, tmp_path):
    """The real command on a 40-slice, 64x64 crop of the validation CT, linear and cubic,
    both degradations: CSV, Markdown and pictures, progress to 1.0, nothing left behind."""
    (source,) = sorted((shared_data / "ct" / "val").glob("lidc-0002_*.nii.gz"))
    full = read_volume(source)
    k, j, i = (n // 2 for n in full.array.shape)
    crop = full.array[k - 20:k + 20, j - 32:j + 32, i - 32:i + 32]
    volume = write_volume(Volume(np.ascontiguousarray(crop), full.spacing, full.origin, full.direction),
                          tmp_path / "crop.nii.gz")
    output = tmp_path / "results"
    done = cli("evaluate", volume, "-o", output, "--cases", "2:2", "5:2.5", "2:2", "--methods", "linear", "cubic",
               "--degradation", "interval", "thick", "--json-progress")
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    fractions = [e["fraction"] for e in events if e["event"] == "progress"]
    assert fractions == sorted(fractions) and events[-1]["event"] == "done" and events[-1]["fraction"] == 1.0
    assert [e for e in events if e["event"] == "warning"] == []  # real CT, clipped to [-1024, 3071]: range ct fits

    with open(output / "results.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["slice_axis"] for r in rows} == {"k"}
    assert [(r["degradation"], r["case"], r["method"]) for r in rows] == [
        (d, c, m) for d in ("interval", "thick") for c in ("2:2", "5:2.5") for m in ("linear", "cubic")]
    for row in rows:
        assert 20 < float(row["psnr_generated"]) < 60 and 0 < float(row["ssim_generated"]) <= 1
        assert float(row["snli_truth"]) > 0 and float(row["seconds"]) >= 0  # interpolation can round to 0.00
        if row["degradation"] == "interval":
            assert float(row["psnr_generated"]) < float(row["psnr_all"])  # acquired slices are exact
    table = (output / "results.md").read_text(encoding="utf-8")
    assert table.startswith("| volume | degradation | k:r | method |") and "LPIPS" in table
    lines = table.splitlines()
    header = [cell.strip("| ") for cell in lines[0].split(" | ")]
    for line in lines[2:2 + len(rows)]:  # in HU: SNLI with 3 decimals, mean noise with 2, as in the README
        cells = dict(zip(header, (cell.strip("| ") for cell in line.split(" | "))))
        assert re.fullmatch(r"\d+\.\d{3} \(\d+\.\d{3}\)", cells["SNLI (truth)"]), line
        assert re.fullmatch(r"\d+\.\d{2} \(\d+\.\d{2}\)", cells["mean noise (truth)"]), line
    assert f"ground truth: crop (slice axis k, {full.spacing[2]:g} mm)" in table
    pictures = sorted(p.name for p in output.glob("*.png"))
    assert len(pictures) == 8 and "crop_thick_5-2.5_views.png" in pictures
    assert all((output / name).read_bytes().startswith(PNG_MAGIC) for name in pictures)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crop.nii.gz", "results"]

    again = cli("evaluate", volume, "-o", output, "--cases", "2:2", "--methods", "linear")
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_evaluate_warns_when_the_truth_does_not_look_like_what_the_weights_expect(shared_data, tmp_path):
    """A CT stored as HU + 1024 (unsigned) gets the warning `cycleinr upsample` gives, once."""
    full = read_volume(shared_data / "ct" / "val" / "lidc-0002_chest_1.25mm.nii.gz")
    k, j, i = (n // 2 for n in full.array.shape)
    crop = full.array[k - 6:k + 6, j - 16:j + 16, i - 16:i + 16]
    for name, array in (("hu", crop), ("shifted", (crop.astype(np.int32) + 1024).astype(np.uint16))):
        write_volume(Volume(np.ascontiguousarray(array), full.spacing, full.origin, full.direction), tmp_path / f"{name}.nii.gz")
        done = cli("evaluate", tmp_path / f"{name}.nii.gz", "-o", tmp_path / name, "--cases", "2:2",
                   "--methods", "cycleinr", "cycleinr-noise", "--json-progress")
        assert done.returncode == 0, done.stderr
        warnings = [e["message"] for e in map(json.loads, done.stdout.splitlines()) if e["event"] == "warning"]
        assert warnings == ([f"shifted.nii.gz: the input's lowest value is {array.min()}, so it does not look like CT "
                             "in HU (air is about -1000); cycleinr_ct.safetensors expects CT"] if name == "shifted" else [])
