"""`cycleinr upsample` as a user runs it: a real subprocess on a real CT crop."""

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from CycleINRLib.checkpoint import load_model, save_model  # noqa: E402
from conftest import write_dicom_series  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
THICK_SLICE_CT = "demo/lung-pet-ct-dx-a0002_chest_ct_8mm.nii.gz"


def cycleinr(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "CycleINRLib.cli", *map(str, args)],
                          capture_output=True, timeout=timeout, cwd=REPO, encoding="utf-8")


@pytest.fixture(scope="module")
def ct_crop(tmp_path_factory):
    """A 96x80x12 crop of the real 8 mm chest CT, geometry kept (origin moved to the crop)."""
    from conftest import SHARED_DATA

    source = SHARED_DATA / THICK_SLICE_CT
    if not source.is_file():
        pytest.skip(f"real volumes not available: {source} is absent (a fresh clone has no ../shared)")
    image = sitk.ReadImage(str(source))
    crop = image[200:296, 180:260, 8:20]
    path = tmp_path_factory.mktemp("ct") / "chest_crop.nrrd"
    sitk.WriteImage(crop, str(path))
    return path


def assert_refused(result, output: Path, fragment: str):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert fragment in lines[0], lines[0]
    assert not output.exists()
    if output.parent.exists():
        assert not [p for p in output.parent.iterdir() if p.name.startswith(".")]


def test_upsample_real_ct_with_json_progress(ct_crop, tmp_path):
    output = tmp_path / "up.nii.gz"
    result = cycleinr("upsample", ct_crop, output, "--factor", "2.5", "--json-progress", "--noise-report")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    progress = [e["fraction"] for e in events if e["event"] == "progress"]
    assert progress and progress == sorted(progress)
    done = events[-1]
    assert done["event"] == "done" and done["output"] == str(output.resolve())

    source, upsampled = sitk.ReadImage(str(ct_crop)), sitk.ReadImage(str(output))
    assert upsampled.GetSize() == (96, 80, 28) and list(upsampled.GetSize()) == done["size"]
    assert np.allclose(upsampled.GetSpacing(), (source.GetSpacing()[0], source.GetSpacing()[1], 8.0 / 2.5))
    assert np.allclose(upsampled.GetOrigin(), source.GetOrigin())
    assert upsampled.GetPixelID() == source.GetPixelID()
    acquired = sitk.GetArrayFromImage(source)
    assert np.array_equal(sitk.GetArrayFromImage(upsampled)[::5], acquired[::2])  # kept verbatim

    from CycleINRLib.metrics import noise_profile  # the levels a GUI charts: those of the files, slice by slice

    for role, image in (("input", source), ("output", upsampled)):
        expected = noise_profile(sitk.GetArrayFromImage(image), 0)
        np.testing.assert_allclose(done["noise"][role]["levels"], expected.levels, atol=1e-6)
        assert done["noise"][role]["snli"] == pytest.approx(expected.snli)


def test_target_spacing_and_terminal_summary(ct_crop, tmp_path):
    output = tmp_path / "up.mha"
    result = cycleinr("upsample", ct_crop, output, "--spacing", "2", "--axis", "2", "--noise-report")
    assert result.returncode == 0, result.stderr
    assert "output: 96x80x45 voxels" in result.stdout and "factor 4" in result.stdout
    assert re.search(r"^SNLI: input [\d.]+, output [\d.]+; mean noise level: input [\d.]+, output [\d.]+$",
                     result.stdout, re.M), result.stdout
    assert sitk.ReadImage(str(output)).GetSpacing()[2] == pytest.approx(2.0)


def test_a_target_spacing_a_hair_off_a_whole_division_keeps_every_acquired_slice(ct_crop, tmp_path):
    """A real MR's 7.000524 mm slices to 1 mm: factor 7.0005 would regenerate all but the first."""
    image = sitk.ReadImage(str(ct_crop))
    image.SetSpacing(image.GetSpacing()[:2] + (7.000524,))
    source, output = tmp_path / "mr_like.nrrd", tmp_path / "up.nrrd"
    sitk.WriteImage(image, str(source))
    result = cycleinr("upsample", source, output, "--spacing", "1")
    assert result.returncode == 0, result.stderr
    assert "factor 7)" in result.stdout, result.stdout
    upsampled = sitk.ReadImage(str(output))
    assert upsampled.GetSpacing()[2] == pytest.approx(7.000524 / 7)
    assert np.array_equal(sitk.GetArrayFromImage(upsampled)[::7], sitk.GetArrayFromImage(image))


def _upsample_with_and_without(option, ct_crop, tmp_path):
    """(array, JSON summary) of `cycleinr upsample --factor 2.5` with `option`, then without it."""
    runs = []
    for options in ([option], []):
        output = tmp_path / f"{'with' if options else 'without'}.nrrd"
        result = cycleinr("upsample", ct_crop, output, "--factor", "2.5", "--json-progress", *options)
        assert result.returncode == 0, result.stderr
        runs.append((sitk.GetArrayFromImage(sitk.ReadImage(str(output))), json.loads(result.stdout.splitlines()[-1])))
    return runs


def test_noise_options_on_slices_too_small_for_a_noise_level_are_a_warning_not_a_failure(tmp_path):
    """The volume itself upsamples; only noise matching and the noise report, which need a noise
    level per slice (`cycleinr snli` refuses such slices), are left out, each with a warning."""
    narrow = _write(tmp_path, "narrow.nii.gz", np.arange(6 * 5 * 40, dtype=np.int16).reshape(6, 5, 40), (1.0, 1.0, 5.0))
    plain = tmp_path / "plain.nii.gz"
    assert cycleinr("upsample", narrow, plain, "--factor", "2", "--device", "cpu").returncode == 0
    result = cycleinr("upsample", narrow, tmp_path / "up.nii.gz", "--factor", "2", "--device", "cpu", "--noise-report",
                      "--match-noise", "--json-progress")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    too_small = f"{narrow}: slices of 40x5 voxels are smaller than the 7x7 voxels a noise level is estimated from"
    assert [e["message"] for e in events if e["event"] == "warning" and "noise" in e["message"]] == [
        f"{too_small}: no noise matching", f"{too_small}: no noise report"]
    assert events[-1]["event"] == "done" and "noise" not in events[-1] and events[-1]["match_noise"] is False
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "up.nii.gz"))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(plain))))


def test_match_noise_adds_noise_to_generated_slices_only(ct_crop, tmp_path):
    from CycleINRLib.metrics import noise_profile

    (matched, with_option), (plain, without) = _upsample_with_and_without("--match-noise", ct_crop, tmp_path)
    assert with_option["match_noise"] is True and without["match_noise"] is False
    assert np.array_equal(matched[::5], plain[::5])  # acquired slices, verbatim in both
    assert all(not np.array_equal(matched[j], plain[j]) for j in range(matched.shape[0]) if j % 5)
    assert noise_profile(matched).snli < 0.7 * noise_profile(plain).snli


def test_flip_ensemble_changes_generated_slices_only(ct_crop, tmp_path):
    (ensemble, with_option), (plain, without) = _upsample_with_and_without("--flip-ensemble", ct_crop, tmp_path)
    assert with_option["flip_ensemble"] is True and without["flip_ensemble"] is False
    assert np.array_equal(ensemble[::5], plain[::5])  # acquired slices, verbatim in both
    difference = np.abs(ensemble.astype(np.int32) - plain)
    assert all(difference[j].max() > 0 for j in range(ensemble.shape[0]) if j % 5)
    assert np.median(difference[[j for j in range(ensemble.shape[0]) if j % 5]]) < 10  # HU: a correction, not another image


def test_bf16_stays_within_a_few_hu_of_float32(ct_crop, tmp_path):
    (fast, with_option), (plain, without) = _upsample_with_and_without("--bf16", ct_crop, tmp_path)
    assert with_option["bf16"] is True and without["bf16"] is False
    assert np.array_equal(fast[::5], plain[::5])  # acquired slices, verbatim in both
    generated = [j for j in range(fast.shape[0]) if j % 5]
    difference = np.abs(fast[generated].astype(np.int32) - plain[generated])
    assert difference.max() > 0  # bfloat16 did run
    assert difference.mean() < 1.0 and np.percentile(difference, 99.9) <= 5  # HU


def test_untrained_weights_are_announced(ct_crop, tmp_path):
    from CycleINRLib.checkpoint import save_model
    from CycleINRLib.config import NAMED_CONFIGS
    from CycleINRLib.models import CycleINR

    untrained = save_model(CycleINR(NAMED_CONFIGS["light"]), tmp_path / "untrained.safetensors", trained=False)
    result = cycleinr("upsample", ct_crop, tmp_path / "o.nrrd", "--factor", "2", "--weights", untrained)
    assert result.returncode == 0 and (tmp_path / "o.nrrd").is_file()
    assert "UNTRAINED" in result.stderr and "not a trained super-resolution" in result.stderr
    shipped = cycleinr("upsample", ct_crop, tmp_path / "p.nrrd", "--factor", "2")  # trained: no such warning
    assert shipped.returncode == 0 and "UNTRAINED" not in shipped.stderr


def test_input_that_is_not_ct_is_announced(ct_crop, shared_data, tmp_path):
    """The shipped weights expect HU; a volume with no air and nothing below 0 (CT stored as HU +
    1500, MR) gets a warning, a soft-tissue crop of a real CT (fat, no air) does not."""
    shifted = sitk.ReadImage(str(ct_crop)) + 1500
    sitk.WriteImage(shifted, str(tmp_path / "shifted.nrrd"))
    soft_tissue = sitk.ReadImage(str(shared_data / THICK_SLICE_CT))[176:240, 32:96, 0:8]  # -182..229 HU
    sitk.WriteImage(soft_tissue, str(tmp_path / "soft_tissue.nrrd"))
    mr = sitk.ReadImage(str(shared_data / "demo/pgbm-001_brain_mr_t1post_6.5mm.nii.gz"))[100:164, 130:186, 8:16]
    sitk.WriteImage(mr, str(tmp_path / "mr.nrrd"))
    for source, expected in ((ct_crop, False), (tmp_path / "shifted.nrrd", True), (tmp_path / "soft_tissue.nrrd", False),
                             (tmp_path / "mr.nrrd", True)):
        result = cycleinr("upsample", source, tmp_path / f"{Path(source).stem}_up.nrrd", "--factor", "2")
        assert result.returncode == 0, result.stderr
        assert ("does not look like CT" in result.stderr) == expected, (source, result.stderr)


def test_an_mr_s_zero_fill_stays_zero(shared_data, tmp_path):
    """The PD MR's zero-filled columns: the CT weights would make -1 and -2 of most of them
    (negative MR intensities break log transforms, bias correction, "> 0" masks)."""
    image = sitk.ReadImage(str(shared_data / "demo/ge_brain_mr_pd_7mm.nii.gz"))[0:64, 96:160, :]
    source, output = tmp_path / "pd.nii.gz", tmp_path / "up.nii.gz"
    sitk.WriteImage(image, str(source))
    result = cycleinr("upsample", source, output, "--factor", "3")
    assert result.returncode == 0, result.stderr
    acquired, upsampled = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(sitk.ReadImage(str(output)))
    zero_fill = (acquired == 0).all(axis=0)
    assert zero_fill.mean() > 0.3  # the crop holds the fill
    assert (upsampled[:, zero_fill] == 0).all()
    assert (upsampled[:, ~zero_fill] != np.repeat(acquired, 3, axis=0)[:len(upsampled), ~zero_fill]).any()  # the model ran


def test_padding_outside_the_field_of_view_stays_padding(shared_data, tmp_path):
    """A CT padded with -3024 HU outside its round field of view is upsampled as if it held air.

    The corner of the real 8 mm CT, cut by a field-of-view circle: with the padding the model
    gives the voxels inside the circle exactly what it gives when the padding is air at -1024,
    and the padding stays -3024 (without the floor, the border rang by hundreds of HU).
    """
    image = sitk.ReadImage(str(shared_data / THICK_SLICE_CT))
    corner = image[32:128, 24:104, 8:20]
    rows, columns = np.mgrid[24:104, 32:128]
    outside = (rows - image.GetHeight() / 2 + 0.5) ** 2 + (columns - image.GetWidth() / 2 + 0.5) ** 2 > 250 ** 2
    assert 0.2 < outside.mean() < 0.8  # the circle crosses the crop
    outputs = {}
    for padding in (-1024, -3024):
        array = sitk.GetArrayFromImage(corner)
        array[:, outside] = padding
        source = sitk.GetImageFromArray(array)
        source.CopyInformation(corner)
        sitk.WriteImage(source, str(tmp_path / f"in{padding}.nrrd"))
        result = cycleinr("upsample", tmp_path / f"in{padding}.nrrd", tmp_path / f"out{padding}.nrrd", "--factor", "2.5")
        assert result.returncode == 0, result.stderr
        outputs[padding] = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"out{padding}.nrrd")))
    np.testing.assert_array_equal(outputs[-3024][:, ~outside], outputs[-1024][:, ~outside])
    assert (outputs[-3024][:, outside] == -3024).all()


def test_sheared_directions_are_kept_in_nrrd_and_refused_for_nifti(ct_crop, tmp_path):
    """NIfTI's writer would square a sheared grid up without a word, moving the slices by mm."""
    sheared = sitk.ReadImage(str(ct_crop))
    sheared.SetDirection((1, 0, 0, 0, 1, 0.2, 0, 0, 1))
    sitk.WriteImage(sheared, str(tmp_path / "sheared.nrrd"))
    assert_refused(cycleinr("upsample", tmp_path / "sheared.nrrd", tmp_path / "out.nii.gz", "--factor", "2"),
                   tmp_path / "out.nii.gz", "NIfTI cannot hold the input's sheared (non-orthogonal) directions")
    result = cycleinr("upsample", tmp_path / "sheared.nrrd", tmp_path / "out.nrrd", "--factor", "2")
    assert result.returncode == 0, result.stderr
    output = sitk.ReadImage(str(tmp_path / "out.nrrd"))  # NRRD stores unit columns and longer steps: the same grid
    steps = np.reshape(output.GetDirection(), (3, 3)) * output.GetSpacing()
    expected = np.reshape(sheared.GetDirection(), (3, 3)) * (np.array(sheared.GetSpacing()) / [1, 1, 2])
    np.testing.assert_allclose(steps, expected, atol=1e-6)


def test_a_plain_nifti_file_named_nii_gz_is_read(ct_crop, tmp_path):
    """ITK goes by the content; so does the check of the voxel data that runs after it."""
    sitk.WriteImage(sitk.ReadImage(str(ct_crop)), str(tmp_path / "plain.nii"))
    (tmp_path / "plain.nii").rename(tmp_path / "misnamed.nii.gz")
    result = cycleinr("upsample", tmp_path / "misnamed.nii.gz", tmp_path / "out.nrrd", "--factor", "2")
    assert result.returncode == 0, result.stderr


def _write(tmp_path, name, array, spacing=None):
    image = sitk.GetImageFromArray(array, isVector=array.shape[-1] == 3)
    if spacing:
        image.SetSpacing(spacing)
    path = tmp_path / name
    sitk.WriteImage(image, str(path))
    return path


def _garbage(path: Path) -> Path:
    path.write_bytes(b"not an image at all")
    return path


def _time_series(path: Path) -> Path:
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((3, 8, 8), np.int16))] * 2), str(path))
    return path


def _dicom_series_at(folder: Path, positions) -> Path:
    """A 4-slice DICOM series with its slices at `positions` (axial orientation)."""
    image = sitk.GetImageFromArray(np.repeat(np.arange(4, dtype=np.int16), 64).reshape(4, 8, 8))
    return write_dicom_series(image, folder, "1.2.3.4", "ODD GEOMETRY", positions=positions)


def _oblique_mr_crop(shared_data: Path) -> sitk.Image:
    """A 64x56x8 crop of the real oblique brain MR (6.5 mm slices, tilted direction matrix)."""
    return sitk.ReadImage(str(shared_data / "demo/pgbm-001_brain_mr_t1post_6.5mm.nii.gz"))[100:164, 130:186, 8:16]


def test_a_dicom_series_upsamples_as_the_same_volume_in_nrrd(shared_data, tmp_path):
    crop = _oblique_mr_crop(shared_data)
    sitk.WriteImage(crop, str(tmp_path / "crop.nrrd"))
    series = write_dicom_series(crop, tmp_path / "series", "1.2.826.0.1.3680043.2.1125.7.1", "T1 POST AX")
    outputs = []
    for source in (tmp_path / "crop.nrrd", series, series / "1-004.dcm"):  # a folder, or any file of the series
        output = tmp_path / f"out{len(outputs)}.nrrd"
        result = cycleinr("upsample", source, output, "--factor", "2.5")
        assert result.returncode == 0, result.stderr
        outputs.append(sitk.ReadImage(str(output)))
    reference = outputs[0]
    assert reference.GetSize() == (64, 56, 18)
    for output in outputs[1:]:
        np.testing.assert_array_equal(sitk.GetArrayFromImage(output), sitk.GetArrayFromImage(reference))
        np.testing.assert_allclose(output.GetSpacing(), reference.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(output.GetOrigin(), reference.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(output.GetDirection(), reference.GetDirection(), atol=1e-6)


def test_a_file_picks_its_series_from_a_folder_of_several(shared_data, tmp_path):
    """A folder with two series is refused in one line that tells them apart; one file of a
    series reads that series."""
    crop = _oblique_mr_crop(shared_data)
    folder = write_dicom_series(crop, tmp_path / "study", "1.2.826.0.1.3680043.2.1125.7.1", "T1 POST AX")
    write_dicom_series(crop[:, :, :3], folder, "1.2.826.0.1.3680043.2.1125.7.2", "LOCALIZER")
    output = tmp_path / "out.nrrd"
    result = cycleinr("upsample", folder, output, "--factor", "2")
    assert_refused(result, output, 'holds 2 DICOM series: "T1 POST AX" (8 files, e.g. 1-001.dcm), '
                                   '"LOCALIZER" (3 files, e.g. 2-001.dcm); give one file of the series')
    for name, slices in (("1-002.dcm", 15), ("2-003.dcm", 5)):
        result = cycleinr("upsample", folder / name, output, "--factor", "2", "--overwrite")
        assert result.returncode == 0, result.stderr
        assert sitk.ReadImage(str(output)).GetSize()[2] == slices


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


def _nan_weights(path: Path) -> Path:
    model, _ = load_model()
    with torch.no_grad():
        model.decoder.output.weight.fill_(float("nan"))
    return save_model(model, path, trained=True)


def _without_data_file(header: Path) -> Path:
    """A MetaImage header whose .raw/.zraw beside it was not copied."""
    for data in header.parent.glob(header.stem + ".*raw"):
        data.unlink()
    return header


def _copy(source: Path, target: Path) -> Path:
    target.write_bytes(source.read_bytes())
    return target


def _link_to_itself(path: Path) -> Path:
    path.symlink_to(path.name)
    return path


def _cut_short(path: Path) -> Path:
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) * 2 // 3])
    return path


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("missing", "no such file"),
        ("unreadable", "cannot be read"),
        ("truncated_nifti", "file is damaged or truncated"),
        ("truncated_plain_nifti", "file is truncated: "),
        ("mhd_without_data", "Cannot open data file"),  # MetaIO's own message, not its stale errno
        ("truncated_mha", "data not read completely"),
        ("two_d", "a 3D volume is needed"),
        ("four_d", "a 3D volume is needed"),
        ("rgb", "vector/RGB"),
        ("nan", "NaN"),
        ("nan_nifti", "NaN"),
        ("output_upper_case", "(lower case)"),
        ("output_is_folder", "is a folder"),
        ("output_is_input", "is the input"),
        ("empty_folder", "folder holds no DICOM series"),
        ("max_memory_inf", "--max-memory must be a number of GB above 0 and at most 65536"),
        ("max_memory_huge", "--max-memory must be a number of GB above 0 and at most 65536"),
        ("input_name_not_utf8", "the name is not valid UTF-8, which ITK cannot open; rename it"),  # aborted silently
        ("output_name_not_utf8", "the name is not valid UTF-8"),
        ("output_folder_loops", "cannot be followed"),
        ("weights_folder", "is a folder; give a .safetensors file"),
        ("weights_empty", "the weights path is empty: give a .safetensors file, or no path for the bundled CT weights"),
        ("weights_nan", "weights hold NaN or infinite values"),
        ("factor_one", "greater than 1"),
        ("factor_absurd", "maximum"),
        ("spacing_too_large", "not smaller"),
        ("spacing_too_fine", "target spacing 0.2 mm is 25 times finer"),
        ("too_large_for_budget", "4 -> 7 slices of 8x8 voxels need 0.00 GB for the input and output arrays and 0.5 GB"),
        ("dicom_non_uniform", "non-uniform slice spacing"),
        ("dicom_gantry_tilt", "DICOM slices are stacked 15.0 degrees off their normal (a gantry tilt)"),
        ("output_exists", "--overwrite"),
        ("output_folder_missing", "does not exist"),
        ("bad_weights", "safetensors"),
    ],
)
def test_bad_input_gets_one_line_and_exit_2(case, fragment, tmp_path):
    volume = np.zeros((4, 8, 8), np.int16)
    good = _write(tmp_path, "good.nii.gz", volume, (1.0, 1.0, 5.0))
    noise = np.random.default_rng(0).integers(-1000, 1000, (4, 32, 32), dtype=np.int16)  # its gzip keeps the header
    output = tmp_path / "out.nii.gz"
    arguments = {
        "missing": lambda: [tmp_path / "absent.nii.gz", output, "--factor", 2],
        "unreadable": lambda: [_garbage(tmp_path / "broken.nii.gz"), output, "--factor", 2],
        # ITK alone reads a NIfTI file cut short (a copy interrupted) with zeros for the missing voxels.
        "truncated_nifti": lambda: [_cut_short(_write(tmp_path, "cut.nii.gz", noise, (1.0, 1.0, 5.0))), output, "--factor", 2],
        "truncated_plain_nifti": lambda: [_cut_short(_write(tmp_path, "cut.nii", noise, (1.0, 1.0, 5.0))), output, "--factor", 2],
        "mhd_without_data": lambda: [_without_data_file(_write(tmp_path, "header.mhd", volume, (1.0, 1.0, 5.0))), output,
                                     "--factor", 2],
        "truncated_mha": lambda: [_cut_short(_write(tmp_path, "cut.mha", noise, (1.0, 1.0, 5.0))), output, "--factor", 2],
        "two_d": lambda: [_write(tmp_path, "flat.nii.gz", np.zeros((8, 8), np.int16)), output, "--factor", 2],
        "four_d": lambda: [_time_series(tmp_path / "time.nii.gz"), output, "--factor", 2],
        "rgb": lambda: [_write(tmp_path, "rgb.mha", np.zeros((4, 8, 8, 3), np.uint8)), output, "--factor", 2],
        "nan": lambda: [_write(tmp_path, "nan.mha", np.full((4, 8, 8), np.nan, np.float32)), output, "--factor", 2],
        # ITK alone reads NaN voxels of a NIfTI file as zeros.
        "nan_nifti": lambda: [_write(tmp_path, "nan.nii.gz", np.where(volume == 0, np.nan, 1).astype(np.float32)), output,
                              "--factor", 2],
        "output_upper_case": lambda: [good, tmp_path / "out.MHA", "--factor", 2],
        "output_is_folder": lambda: [good, _folder(tmp_path / "folder.nii.gz"), "--factor", 2, "--overwrite"],
        "output_is_input": lambda: [good, good, "--factor", 2, "--overwrite"],
        "empty_folder": lambda: [_folder(tmp_path / "empty"), output, "--factor", 2],  # ITK warns in 3 lines: silenced
        "max_memory_inf": lambda: [good, output, "--factor", 2, "--max-memory", "inf"],
        "max_memory_huge": lambda: [good, output, "--factor", 2, "--max-memory", "1e300"],
        "input_name_not_utf8": lambda: [_copy(good, tmp_path / os.fsdecode(b"caf\xe9.nii.gz")), output, "--factor", 2],
        "output_name_not_utf8": lambda: [good, tmp_path / os.fsdecode(b"caf\xe9.nii.gz"), "--factor", 2],
        "output_folder_loops": lambda: [good, _link_to_itself(tmp_path / "loop") / "out.nii.gz", "--factor", 2],
        "weights_folder": lambda: [good, output, "--factor", 2, "--weights", tmp_path],
        "weights_empty": lambda: [good, output, "--factor", 2, "--weights", ""],  # was ".: is a folder"
        "weights_nan": lambda: [good, output, "--factor", 2, "--weights", _nan_weights(tmp_path / "nan.safetensors")],
        "factor_one": lambda: [good, output, "--factor", 1],
        "factor_absurd": lambda: [good, output, "--factor", 25],
        "spacing_too_large": lambda: [good, output, "--spacing", 6],
        "spacing_too_fine": lambda: [good, output, "--spacing", 0.2],
        "too_large_for_budget": lambda: [good, output, "--factor", 2, "--max-memory", 0.1],
        "dicom_non_uniform": lambda: [_dicom_series_at(tmp_path / "series", [(0, 0, z) for z in (0.0, 5.0, 10.0, 17.5)]),
                                      output, "--factor", 2],
        # 5 mm slices shifted 1.34 mm along y each: a 15 degree gantry tilt, which ITK reads as 5.18 mm axial slices
        "dicom_gantry_tilt": lambda: [_dicom_series_at(tmp_path / "series", [(0, 1.34 * k, 5.0 * k) for k in range(4)]),
                                      output, "--factor", 2],
        "output_exists": lambda: [good, good, "--factor", 2],
        "output_folder_missing": lambda: [good, tmp_path / "nowhere" / "out.nii.gz", "--factor", 2],
        "bad_weights": lambda: [good, output, "--factor", 2, "--weights", good],
    }[case]()
    result = cycleinr("upsample", *arguments)
    if case in ("output_exists", "output_is_folder", "output_is_input"):
        assert result.returncode == 2 and fragment in result.stderr and "Traceback" not in result.stderr
        return
    assert_refused(result, Path(arguments[1]), fragment)


@pytest.mark.parametrize("command, options", [
    ("upsample", ["--json-progress", "in.nii.gz"]),  # the output missing
    ("upsample", ["in.nii.gz", "out.nii.gz", "--json-progress", "--bogus"]),  # refused by the top-level parser
    ("evaluate", ["--json", "in.nii.gz", "-o", "out", "--device", "tpu"]),  # a prefix of it
    ("snli", ["in.nii.gz", "--json", "--axis", "7"]),  # as its other errors under --json: an error event
])
def test_a_usage_error_reaches_a_gui_as_a_json_error_event(command, options, tmp_path):
    result = cycleinr(command, *options)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [event["event"] for event in events] == ["error"]
    assert events[0]["message"] == result.stderr.strip()


def test_an_output_name_of_255_bytes_is_written(tmp_path):
    """The hidden temporary name beside it must not exceed the file-name limit."""
    good = _write(tmp_path, "good.nii.gz", np.arange(4 * 8 * 8, dtype=np.int16).reshape(4, 8, 8), (1.0, 1.0, 5.0))
    output = tmp_path / ("a" * (255 - len(".nii.gz")) + ".nii.gz")
    result = cycleinr("upsample", good, output, "--factor", 2, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert sitk.ReadImage(str(output)).GetSize() == (8, 8, 7)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([good.name, output.name])


def test_upsample_leaves_plotting_and_statistics_unloaded(tmp_path):
    """Every Apply in Slicer starts `cycleinr upsample`; matplotlib, scipy.stats and
    scipy.sparse (figures, SSIM, the evaluation's baselines) would add a second to its start."""
    good = _write(tmp_path, "good.nii.gz", np.arange(4 * 8 * 8, dtype=np.int16).reshape(4, 8, 8), (1.0, 1.0, 5.0))
    script = ("import json, sys; from CycleINRLib.cli import main; "
              f"code = main(['upsample', {str(good)!r}, {str(tmp_path / 'out.nii.gz')!r}, '--factor', '2', '--device', 'cpu']); "
              "print(json.dumps([code, sorted(m for m in ('matplotlib', 'scipy.stats', 'scipy.sparse') if m in sys.modules)]))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300, cwd=REPO, encoding="utf-8")
    assert json.loads(result.stdout.splitlines()[-1]) == [0, []], result.stderr


def _signals_as_from_a_terminal() -> None:
    """What a GUI or a terminal starts the command with, whatever this suite inherited
    (`nohup make test` ignores SIGHUP, a CI runner may ignore SIGINT)."""
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_DFL)


def _upsampling_process(ct_crop, output: Path) -> subprocess.Popen:
    """A GUI-style run of several tiles, returned once it reports its first upsampling step."""
    process = subprocess.Popen(
        [sys.executable, "-m", "CycleINRLib.cli", "upsample", str(ct_crop), str(output), "--factor", "6",
         "--json-progress", "--max-memory", "0.65"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", cwd=REPO, preexec_fn=_signals_as_from_a_terminal)
    for line in process.stdout:
        if json.loads(line).get("stage") == "upsample":
            break
    return process


def _file_size_limit(limit_bytes: int):
    """A child whose files cannot grow past `limit_bytes`: its writes fail (EFBIG) as on a full disk.
    Start it with `python -B`: Python writes the bytecode cache in one call, unchecked, and would
    leave a module's cut-off .pyc, which every later import of that module fails on."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return limit


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_an_output_that_cannot_be_written_whole_is_one_line_and_no_file(ct_crop, tmp_path, suffix):
    """NIfTI's writer reports a short write on stderr only and carries on: the command must not say done."""
    output = tmp_path / f"up{suffix}"
    result = subprocess.run([sys.executable, "-B", "-m", "CycleINRLib.cli", "upsample", str(ct_crop), str(output),
                             "--factor", "4", "--json-progress"], capture_output=True, timeout=300,
                            cwd=REPO, preexec_fn=_file_size_limit(64 * 1024), encoding="utf-8")
    assert result.returncode == 2, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[-1]["event"] == "error" and "cannot be written" in events[-1]["message"]
    assert not any(event["event"] == "done" for event in events)
    assert sorted(tmp_path.iterdir()) == []


def test_an_snli_plot_that_cannot_be_written_whole_is_one_line_naming_it(ct_crop, tmp_path):
    plot = tmp_path / "profile.png"
    result = subprocess.run([sys.executable, "-B", "-m", "CycleINRLib.cli", "snli", str(ct_crop), "--plot", str(plot)],
                            capture_output=True, timeout=300, cwd=REPO, preexec_fn=_file_size_limit(8 * 1024), encoding="utf-8")
    assert_refused(result, plot, f"{plot}: cannot be written (File too large)")


@pytest.mark.parametrize("signal_number, repeated", [(signal.SIGTERM, False), (signal.SIGHUP, False), (signal.SIGTERM, True)],
                         ids=["SIGTERM", "SIGHUP (a closed terminal)", "SIGTERM until it ends (an impatient GUI)"])
def test_sigterm_cancels_without_leaving_files(ct_crop, tmp_path, signal_number, repeated):
    process = _upsampling_process(ct_crop, tmp_path / "cancelled.nii.gz")
    process.send_signal(signal_number)
    deadline = time.monotonic() + 10
    while repeated and process.poll() is None and time.monotonic() < deadline:  # some land during the clean-up
        process.send_signal(signal_number)
        time.sleep(0.001)
    remaining, errors = process.communicate(timeout=120)
    assert process.returncode == 130, errors
    assert json.loads(remaining.strip().splitlines()[-1])["event"] == "error"
    assert "Traceback" not in errors
    assert list(tmp_path.iterdir()) == []


def test_closed_or_full_standard_streams_do_not_fail_a_finished_run(ct_crop, tmp_path):
    """`| true`, `> /dev/full`, `2>&-`: the volume is written, so the exit status says so."""
    command = [sys.executable, "-m", "CycleINRLib.cli", "upsample", str(ct_crop)]
    piped = subprocess.Popen(command + [str(tmp_path / "piped.nii.gz"), "--factor", "2"], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    piped.stdout.close()  # the reader of `| true` has gone before the summary
    assert piped.wait(timeout=300) == 0 and b"Traceback" not in piped.stderr.read()
    with open("/dev/full", "w", encoding="utf-8") as full:
        assert subprocess.run(command + [str(tmp_path / "full.nii.gz"), "--factor", "2"], cwd=REPO, stdout=full,
                              timeout=300).returncode == 0
    closed = subprocess.run(command + [str(tmp_path / "closed.nii.gz"), "--factor", "2"], cwd=REPO,
                            capture_output=True, timeout=300, preexec_fn=lambda: os.close(2))
    assert closed.returncode == 0
    (tmp_path / "in").mkdir()
    not_ct = _write(tmp_path / "in", "mr.nii.gz", np.arange(4 * 16 * 16, dtype=np.uint16).reshape(4, 16, 16), (1.0, 1.0, 4.0))
    with open("/dev/full", "w", encoding="utf-8") as full:  # its "does not look like CT" warning goes nowhere
        assert subprocess.run([sys.executable, "-m", "CycleINRLib.cli", "upsample", str(not_ct),
                               str(tmp_path / "warned.nii.gz"), "--factor", "2"], cwd=REPO, stderr=full,
                              timeout=300).returncode == 0
    assert sorted(path.name for path in tmp_path.glob("*.nii.gz")) == [
        "closed.nii.gz", "full.nii.gz", "piped.nii.gz", "warned.nii.gz"]


def test_json_lines_to_a_full_disk_are_one_line_on_stderr(ct_crop, tmp_path):
    """`--json > file` on a full disk: stdout failed, so stderr says so, once."""
    for command in (["snli", str(ct_crop), "--json"],
                    ["upsample", str(ct_crop), str(tmp_path / "up.nii.gz"), "--factor", "2", "--json-progress"]):
        with open("/dev/full", "w", encoding="utf-8") as full:
            result = subprocess.run([sys.executable, "-m", "CycleINRLib.cli", *command], cwd=REPO, stdout=full,
                                    stderr=subprocess.PIPE, timeout=300, encoding="utf-8")
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == ["cycleinr: error: standard output: No space left on device"]
    assert list(tmp_path.iterdir()) == []


def _without_locale(**variables) -> dict:
    """This environment less what sets Python's text encoding, plus `variables`."""
    unset = ("LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "PYTHONUTF8", "PYTHONIOENCODING")
    return dict({name: value for name, value in os.environ.items() if name not in unset}, **variables)


def test_utf8_names_work_under_an_ascii_locale(ct_crop, tmp_path):
    """Under `LC_ALL=C` without UTF-8 mode (CI runners, cron) Python holds "é" as escaped bytes,
    which SimpleITK, matplotlib and the CSV writer cannot take as they are."""
    folder = os.fsencode(tmp_path) + "cas é 名".encode()  # bytes: this suite may itself run under such a locale
    os.mkdir(folder)
    source, output, plot, results = (folder + name.encode() for name in ("/in é.nrrd", "/out é.nii.gz", "/p é.png", "/ev é"))
    with open(ct_crop, "rb") as original, open(source, "wb") as copy:
        copy.write(original.read())
    ascii_locale = _without_locale(LC_ALL="C", PYTHONUTF8="0")
    commands = ([b"upsample", source, output, b"--factor", b"2"], [b"snli", output, b"--plot", plot],
                [b"evaluate", source, b"-o", results, b"--methods", b"linear", b"--cases", b"2:2"])
    for command in commands:
        result = subprocess.run([sys.executable, "-m", "CycleINRLib.cli", *command], capture_output=True, cwd=REPO,
                                timeout=300, env=ascii_locale)
        assert result.returncode == 0 and b"Traceback" not in result.stderr and not result.stderr.strip(), result.stderr
    assert os.path.isfile(output) and os.path.isfile(plot)
    assert sorted(os.listdir(results)) == [name.encode() for name in (
        "in é_interval_2-2_noise.png", "in é_interval_2-2_views.png", "results.csv", "results.md")]
    with open(results + b"/results.csv", encoding="utf-8") as table:
        assert table.read().splitlines()[1].startswith("in é,interval,2:2,linear,")
    escaped = subprocess.run([sys.executable, "-m", "CycleINRLib.cli", "snli", output], capture_output=True, cwd=REPO,
                             timeout=300, env=_without_locale(PYTHONIOENCODING="ascii"))
    assert escaped.returncode == 0 and escaped.stderr == b"", escaped.stderr  # printed with the name escaped


def test_no_docstrings_and_an_unusable_plot_backend_change_nothing(ct_crop, tmp_path):
    """`python -OO` drops docstrings; a notebook's MPLBACKEND names a backend another Python lacks."""
    result = subprocess.run([sys.executable, "-OO", "-m", "CycleINRLib.cli", "snli", str(ct_crop), "--plot",
                             str(tmp_path / "p.png")], capture_output=True, cwd=REPO, timeout=300, encoding="utf-8",
                            env=dict(os.environ, MPLBACKEND="module://a_backend_not_installed.inline"))
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert (tmp_path / "p.png").is_file()


def test_a_home_that_cannot_be_written_draws_the_plot_without_warnings(ct_crop, tmp_path):
    """A read-only container: matplotlib finds no folder for its settings and works from a
    temporary one, which is all these figures need; its two warnings would only alarm."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
    environment["HOME"] = os.devnull  # no folder can be made under it, even as root
    result = subprocess.run([sys.executable, "-m", "CycleINRLib.cli", "snli", str(ct_crop), "--plot", str(tmp_path / "p.png")],
                            capture_output=True, cwd=REPO, timeout=300, encoding="utf-8", env=environment)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert (tmp_path / "p.png").is_file()


def test_the_installed_command_is_the_one_readme_runs(ct_crop, tmp_path):
    """README's examples call the `cycleinr` script that installing the package makes, not
    `python -m CycleINRLib.cli`."""
    script = Path(sys.executable).parent / ("cycleinr.exe" if os.name == "nt" else "cycleinr")
    assert script.is_file(), f"{script} is not there: the package is not installed into this Python (make test does it)"
    result = subprocess.run([str(script), "upsample", str(ct_crop), str(tmp_path / "o.nii.gz"), "--factor", "2", "--device", "cpu"],
                            capture_output=True, timeout=300, encoding="utf-8")
    assert result.returncode == 0, result.stderr
    assert sitk.ReadImage(str(tmp_path / "o.nii.gz")).GetSize()[2] == 2 * sitk.ReadImage(str(ct_crop)).GetSize()[2] - 1


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="a GPU is there")
def test_a_gpu_that_is_not_there_is_one_line(ct_crop, tmp_path):
    result = cycleinr("upsample", ct_crop, tmp_path / "o.nii.gz", "--factor", "2", "--device", "gpu")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "cycleinr: error: device gpu requested but torch finds no CUDA or Apple MPS GPU; use cpu or auto"]
    assert list(tmp_path.iterdir()) == []


def test_the_demo_writes_what_readme_lists(tmp_path):
    """`make demo`'s job: the volumes, both figures and a metrics table in which CycleINR has the
    best SSIM and noise matching brings its SNLI down (README, overview)."""
    folder = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "CycleINRLib.demo", "--output-dir", str(folder)],
                            capture_output=True, cwd=REPO, timeout=900, encoding="utf-8")
    assert result.returncode == 0, result.stderr
    truth = sitk.ReadImage(str(folder / "phantom_truth_1mm.nii.gz"))
    thick = sitk.ReadImage(str(folder / "phantom_thick_5mm.nii.gz"))
    assert thick.GetSpacing()[2] == 5 * truth.GetSpacing()[2] and thick.GetOrigin() == truth.GetOrigin()
    for name in ("cycleinr", "cycleinr_noise"):  # the output grid ends at the last acquired slice
        output = sitk.ReadImage(str(folder / f"phantom_{name}_1mm.nii.gz"))
        assert output.GetSize() == thick.GetSize()[:2] + ((thick.GetSize()[2] - 1) * 5 + 1,)
        assert output.GetSpacing() == truth.GetSpacing()
        assert output.GetOrigin() == truth.GetOrigin() and output.GetDirection() == truth.GetDirection()
    for figure in ("phantom_views.png", "phantom_noise_profile.png"):
        assert (folder / figure).read_bytes().startswith(b"\x89PNG")
    rows = {}
    for line in (folder / "metrics.md").read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) > 4 and cells[3] in ("linear", "cubic", "cycleinr", "cycleinr-noise"):
            rows[cells[3]] = cells
    header = [cell.strip() for cell in (folder / "metrics.md").read_text(encoding="utf-8").splitlines()[0].strip("|").split("|")]
    ssim, snli = header.index("SSIM gen"), header.index("SNLI (truth)")
    assert sorted(rows) == ["cubic", "cycleinr", "cycleinr-noise", "linear"]
    assert float(rows["cycleinr"][ssim]) > max(float(rows["linear"][ssim]), float(rows["cubic"][ssim]))
    assert float(rows["cycleinr-noise"][snli].split()[0]) < float(rows["cycleinr"][snli].split()[0])
    assert "written to" in result.stdout


def test_the_demo_says_in_one_line_where_it_cannot_write(tmp_path):
    (tmp_path / "a file").write_text("", encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "CycleINRLib.demo", "--output-dir", str(tmp_path / "a file" / "demo")],
                            capture_output=True, cwd=REPO, timeout=300, encoding="utf-8")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"python -m CycleINRLib.demo: error: {tmp_path / 'a file' / 'demo'}: Not a directory"]


def test_a_run_under_nohup_outlives_its_terminal(ct_crop, tmp_path):
    """`nohup` sets SIGHUP to be ignored: cancelling on it would end every detached run at logout."""
    process = subprocess.Popen([sys.executable, "-m", "CycleINRLib.cli", "upsample", str(ct_crop),
                                str(tmp_path / "detached.nii.gz"), "--factor", "6", "--json-progress"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                               preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN), encoding="utf-8")
    for line in process.stdout:
        if json.loads(line).get("stage") == "upsample":
            break
    process.send_signal(signal.SIGHUP)
    remaining, errors = process.communicate(timeout=300)
    assert process.returncode == 0, errors
    assert json.loads(remaining.strip().splitlines()[-1])["event"] == "done"


def test_a_gui_that_goes_away_stops_the_run_without_leaving_files(ct_crop, tmp_path):
    """A crashed Slicer closes the pipe of the progress lines: the run stops at its next line."""
    process = _upsampling_process(ct_crop, tmp_path / "orphaned.nii.gz")
    process.stdout.close()
    errors = process.stderr.read()
    assert process.wait(timeout=120) == 130, errors
    assert errors.strip().splitlines() == ["cycleinr: error: the program reading the progress lines has gone; "
                                           "nothing was written"]
    assert list(tmp_path.iterdir()) == []
