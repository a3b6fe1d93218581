"""Volume node -> file -> `cycleinr upsample` -> volume node, with real MRML from slicer-core.

The input node gets an oblique IJK-to-RAS matrix (the real one of an oblique brain MR); every
output slice must land where the grid convention puts it: output voxel (i, j, k) at input
IJK coordinate (i, j, k / r), so its RAS position is input IJK-to-RAS applied to that.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import slicer  # real MRML from the slicer-core package, a test dependency (pyproject.toml)
import vtk
from vtk.util import numpy_support  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "CycleINR"))

from CycleINRLib import geometry  # noqa: E402
from CycleINRLib.errors import InputError, UpsampleCancelled, UpsampleFailed  # noqa: E402
from CycleINRSlicerLib.job import FOLDER_PREFIX, UpsampleJob, describeOutputGrid  # noqa: E402
from CycleINRSlicerLib.node_io import arrayFromVolumeNode, ijkToRas  # noqa: E402
from CycleINRSlicerLib.process import UpsampleOptions  # noqa: E402

MR_OBLIQUE = "demo/pgbm-001_brain_mr_t1post_6.5mm.nii.gz"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def volume_node(scene, image, name):
    """A scalar volume node holding a SimpleITK image, geometry set with SetIJKToRASMatrix."""
    array = sitk.GetArrayFromImage(image)  # (k, j, i)
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(*image.GetSize())
    imageData.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.ravel(), deep=True))
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    matrix = vtk.vtkMatrix4x4()
    for row, values in enumerate(LPS_TO_RAS @ lps):
        for column, value in enumerate(values):
            matrix.SetElement(row, column, value)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetAndObserveImageData(imageData)
    node.SetIJKToRASMatrix(matrix)
    return node


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture
def oblique_mr(shared_data, scene):
    """A 40x36x7 crop of the oblique brain MR (6.5 mm slices, tilted direction matrix)."""
    image = sitk.ReadImage(str(shared_data / MR_OBLIQUE))[110:150, 130:166, 8:15]
    assert not np.allclose(np.asarray(image.GetDirection()).reshape(3, 3), np.eye(3), atol=0.01)
    return volume_node(scene, image, "pgbm crop")


def job(node, temp_folders, **options):
    run = UpsampleJob(node, UpsampleOptions(device="cpu", **options), python=sys.executable, libraryParent=REPOSITORY)
    temp_folders.append(run)
    return run


def poll_until(run, reached=None, seconds=300) -> None:
    """Poll as the panel's timer does (a busy loop would take a core from the process) until
    `reached(events)` holds, or with None until the run has finished; fails rather than hangs,
    and fails when the run ends before `reached`."""
    deadline = time.monotonic() + seconds
    while True:
        events = run.poll()
        if run.finished if reached is None else reached(events):
            return
        assert reached is None or not run.finished, f"the run ended first: {run.process.stderrTail}"
        assert time.monotonic() < deadline, f"not there after {seconds} s: {run.process.stderrTail}"
        time.sleep(0.05)


@pytest.fixture
def temp_folders():
    """Jobs of a test; afterwards, their temporary folders must all be gone."""
    jobs = []
    yield jobs
    for run in jobs:
        assert run.folder is not None and not run.folder.exists(), f"{run.folder} was left behind"


@pytest.fixture
def left_handed_mr(shared_data, scene):
    """The same crop with its slice direction reversed: a left-handed IJK-to-RAS matrix, which
    Slicer's NRRD storage reads back with the slice index order reversed."""
    image = sitk.ReadImage(str(shared_data / MR_OBLIQUE))[110:150, 130:166, 8:15]
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    direction[:, 2] *= -1
    image.SetDirection(direction.ravel().tolist())
    return volume_node(scene, image, "pgbm crop")


@pytest.mark.parametrize("volume", ["oblique_mr", "left_handed_mr"])
def test_every_output_slice_lies_where_the_convention_puts_it(volume, request, scene, temp_folders):
    oblique_mr = request.getfixturevalue(volume)
    factor = 2.5
    before = arrayFromVolumeNode(oblique_mr).copy()
    output = job(oblique_mr, temp_folders, factor=factor).wait()

    size = oblique_mr.GetImageData().GetDimensions()
    slices = geometry.output_slice_count(size[2], factor)
    assert output.GetImageData().GetDimensions() == (size[0], size[1], slices)
    assert output.GetScene() is scene and output.GetName() == "pgbm crop x2.5"

    inputMatrix, outputMatrix = ijkToRas(oblique_mr), ijkToRas(output)
    i, j = np.meshgrid([0, size[0] - 1], [0, size[1] - 1])
    for k_out in range(slices):
        corners = np.stack([i.ravel(), j.ravel(), np.full(i.size, k_out), np.ones(i.size)])
        at_input = corners.copy()
        at_input[2] = k_out / factor
        np.testing.assert_allclose(outputMatrix @ corners, inputMatrix @ at_input, atol=1e-4)

    # Acquired slices are kept verbatim where output slices coincide (j = 5m <-> k = 2m at r = 2.5):
    # the voxels are not flipped or transposed on their way through the files.
    result = arrayFromVolumeNode(output)
    for k_out, k_in in geometry.acquired_slice_matches(size[2], factor):
        np.testing.assert_array_equal(result[k_out], before[k_in])
    np.testing.assert_array_equal(arrayFromVolumeNode(oblique_mr), before)


def test_target_spacing_into_a_given_node_under_the_input_transform(oblique_mr, scene, temp_folders):
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    oblique_mr.SetAndObserveTransformNodeID(transform.GetID())
    existing = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "chosen output")
    existing.AddDefaultStorageNode()  # where the user saves it: reading the result must not drop it
    storage = existing.GetStorageNodeID()

    output = job(oblique_mr, temp_folders, spacing=2.0, axis=2).wait()
    assert output.GetSpacing()[2] == pytest.approx(2.0)
    assert output.GetTransformNodeID() == transform.GetID()

    again = UpsampleJob(oblique_mr, UpsampleOptions(factor=2.0, device="cpu"), outputNode=existing,
                        python=sys.executable, libraryParent=REPOSITORY)
    temp_folders.append(again)
    assert again.wait() is existing
    assert existing.GetImageData().GetDimensions()[2] == geometry.output_slice_count(7, 2.0)
    assert storage is not None and existing.GetStorageNodeID() == storage


def test_a_failed_run_changes_nothing_and_removes_its_files(oblique_mr, scene, temp_folders):
    volumes = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    with pytest.raises(UpsampleFailed, match="not smaller than the input's slice spacing"):
        job(oblique_mr, temp_folders, spacing=20.0).wait()
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volumes


def test_cancel_changes_nothing_and_removes_its_files(shared_data, scene, temp_folders):
    image = sitk.ReadImage(str(shared_data / MR_OBLIQUE))[60:200, 80:240, 4:20]
    node = volume_node(scene, image, "larger crop")
    volumes = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    run = job(node, temp_folders, factor=3.0)
    run.start()
    poll_until(run, lambda events: any(event["event"] == "progress" for event in events))
    run.cancel()
    poll_until(run)
    with pytest.raises(UpsampleCancelled):
        run.finish()
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volumes


@pytest.mark.skipif(os.name != "posix", reason="orphaned folders are looked for on POSIX only")
def test_a_run_removes_the_folders_that_a_crashed_slicer_left_behind(oblique_mr, temp_folders):
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    orphaned = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX.format(pid=ended.pid)))
    (orphaned / "input.nrrd").write_bytes(b"the copy of a volume that a crash left behind")
    running = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX.format(pid=os.getpid())))
    try:
        job(oblique_mr, temp_folders, factor=2.0).wait()
        assert not orphaned.exists()
        assert running.exists()
    finally:
        for folder in (orphaned, running):
            shutil.rmtree(folder, ignore_errors=True)


def test_the_readout_states_spacing_slices_and_size():
    text = describeOutputGrid((260, 320, 24), (0.6875, 0.6875, 6.5), 2, factor=2.5)
    slices = geometry.output_slice_count(24, 2.5)
    assert "K axis x2.5" in text and "6.5 -> 2.6 mm" in text and f"24 -> {slices} slices" in text
    assert f"260x320x{slices}, {260 * 320 * slices * 2 / 1e6:.1f} MB" in text
    assert "I axis" in describeOutputGrid((10, 20, 30), (3.0, 1.0, 1.0), 4, targetSpacing=1.0)
    barely = describeOutputGrid((10, 20, 7), (1.0, 1.0, 6.5), 2, factor=1.0001)  # not "x1", which says nothing happens
    assert "K axis x1.0001: slice spacing 6.5 -> 6.499 mm" in barely
    with pytest.raises(InputError):
        describeOutputGrid((10, 20, 30), (1.0, 1.0, 3.0), 4, factor=1.0)
    with pytest.raises(InputError):
        describeOutputGrid((10, 20, 30), (1.0, 1.0, 3.0), 4, targetSpacing=5.0)
    # what Apply would refuse does not enable it: a single slice, an empty image
    for size, message in [((4, 4, 1), "image of size 4x4x1 is 2D (a single slice)"), ((0, 0, 0), "image of size 0x0x0 is empty")]:
        with pytest.raises(InputError, match=re.escape(message)):
            describeOutputGrid(size, (1.0, 1.0, 3.0), 2, factor=2.0)


def test_noise_levels_of_input_and_output_become_a_plot(oblique_mr, scene, temp_folders):
    from CycleINRSlicerLib.results import addNoisePlot, noiseLevels, summary

    output = job(oblique_mr, temp_folders, factor=2.0).wait()
    inputLevels, outputLevels = noiseLevels(oblique_mr, 2), noiseLevels(output, 2)
    assert len(inputLevels.levels) == 7 and len(outputLevels.levels) == 13
    assert outputLevels.positions[-1] == pytest.approx(inputLevels.positions[-1])
    assert "SNLI: input" in summary(inputLevels, outputLevels)

    chart = addNoisePlot(scene, inputLevels, outputLevels)
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    rows = [chart.GetNthPlotSeriesNode(n).GetTableNode().GetNumberOfRows() for n in range(2)]
    assert rows == [7, 13]
    names = [chart.GetNthPlotSeriesNode(n).GetName() for n in range(2)]
    assert names == ["pgbm crop noise level", f"{output.GetName()} noise level"]  # getNode still finds the volumes


def test_requests_that_would_fail_later_are_refused_before_anything_is_written(oblique_mr, scene):
    from CycleINRSlicerLib.job import checkRequest

    def node(array, className="vtkMRMLScalarVolumeNode", target=scene):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((1.0, 1.0, 5.0))
        made = volume_node(target, image, "made")
        if className != "vtkMRMLScalarVolumeNode":
            other = target.AddNewNodeByClass(className, "other")
            other.SetAndObserveImageData(made.GetImageData())
            return other
        return made

    volumes = np.zeros((4, 8, 8), np.int16)
    nan = np.ones((4, 8, 8), np.float32)
    nan[1, 2, 3] = np.nan
    factor = UpsampleOptions(factor=2.0, device="cpu")
    free = slicer.vtkMRMLScalarVolumeNode()  # never added to a scene
    free.SetName("free")
    free.SetAndObserveImageData(oblique_mr.GetImageData())
    for inputNode, options, outputNode, message in [
        (None, factor, None, "Select an input volume that holds image data"),
        (scene.AddNewNodeByClass("vtkMRMLModelNode"), factor, None, "a scalar (grey-value) volume node, not a vtkMRMLModelNode"),
        ("made", factor, None, "a scalar (grey-value) volume node, not a str"),
        (node(volumes, "vtkMRMLLabelMapVolumeNode"), factor, None, "volume node, not a vtkMRMLLabelMapVolumeNode"),
        (scene.AddNewNodeByClass("vtkMRMLDiffusionTensorVolumeNode"), factor, None,
         "volume node, not a vtkMRMLDiffusionTensorVolumeNode"),
        (free, factor, None, "'free' is in no scene; add it to the scene first"),
        (node(volumes.astype(np.int64)), factor, None, "pixel type int64, which Slicer cannot hand over; cast it"),
        (node(volumes.astype(np.int8)), factor, None, "pixel type int8"),
        (node(volumes[:1]), factor, None, "is 2D (a single slice)"),
        (node(nan), factor, None, "contains NaN or infinite voxels"),
        (node(volumes.astype(np.float64) + 1e300), factor, None, "its values reach 1e+300, beyond 3.4e+38"),
        (oblique_mr, UpsampleOptions(device="cpu"), None, "give either an upsampling factor or a target slice spacing"),
        (oblique_mr, UpsampleOptions(factor=2.0, spacing=2.0), None, "give either an upsampling factor or"),
        (oblique_mr, UpsampleOptions(factor=2.0, device="tpu"), None, "device must be one of"),
        (oblique_mr, UpsampleOptions(factor=2.0, maxMemoryGB=-1.0), None, "maxMemoryGB must be a positive number"),
        (oblique_mr, UpsampleOptions(factor=2.0, weights="/no/such/mr.safetensors"), None,
         "/no/such/mr.safetensors: weights file not found"),
        (oblique_mr, UpsampleOptions(spacing="2"), None, "spacing must be a number, not '2'"),
        (oblique_mr, UpsampleOptions(factor=2.0, maxMemoryGB="2"), None, "maxMemoryGB must be a number, not '2'"),
        (oblique_mr, UpsampleOptions(factor=2.0, axis=2.0), None, "axis must be None, 0, 1 or 2, not 2.0"),
        (oblique_mr, UpsampleOptions(factor=2.0, axis=True), None, "axis must be None, 0, 1 or 2, not True"),
        (oblique_mr, UpsampleOptions(factor=2.0, keepAcquiredSlices="no"), None,
         "keepAcquiredSlices must be True or False, not 'no'"),
        (oblique_mr, factor, oblique_mr, "must not be the input volume"),
        (oblique_mr, factor, node(volumes, "vtkMRMLLabelMapVolumeNode"),
         "the output must be a scalar volume node, not a vtkMRMLLabelMapVolumeNode"),
        (oblique_mr, factor, scene.AddNewNodeByClass("vtkMRMLDiffusionWeightedVolumeNode"),
         "not a vtkMRMLDiffusionWeightedVolumeNode"),
        (oblique_mr, factor, "x", "the output must be a scalar volume node, not a str"),
        (oblique_mr, factor, node(volumes, target=slicer.vtkMRMLScene()), "is not in the input volume's scene"),
    ]:
        with pytest.raises(InputError, match=re.escape(message)):
            checkRequest(inputNode, options, outputNode)
    checkRequest(oblique_mr, UpsampleOptions(factor=np.float32(2.5), device="gpu", axis=np.int64(2)))  # numpy numbers are numbers


@pytest.mark.parametrize("damage", ["remove the input", "move the input", "garble the result",
                                    "garble the result for a chosen output", "interrupt the read-back of a chosen output",
                                    "interrupt the hand-over of the voxels to a chosen output"])
def test_an_input_gone_or_moved_or_a_result_not_read_back_changes_nothing(oblique_mr, scene, temp_folders, damage,
                                                                           monkeypatch):
    """The scene changes only once a whole result has been read back: a chosen output node (last
    run's result, say) keeps its voxels, geometry and storage node, and Slicer's reader, which
    empties the node it reads into, never reads into it."""
    inputNode = volume_node(scene, sitk.GetImageFromArray(arrayFromVolumeNode(oblique_mr).copy()), "in")
    chosen = volume_node(scene, sitk.GetImageFromArray(np.arange(60, dtype=np.int16).reshape(3, 4, 5)), "last result")
    chosen.AddDefaultStorageNode()
    kept = (arrayFromVolumeNode(chosen).copy(), ijkToRas(chosen), chosen.GetStorageNodeID(), chosen.GetImageData())
    run = job(inputNode, temp_folders, factor=2.0)
    if "chosen output" in damage:
        run.outputNode = chosen
    run.start()
    poll_until(run)
    nodes = scene.GetNumberOfNodes()
    if damage == "remove the input":
        scene.RemoveNode(inputNode)
        nodes -= 1
        failure, message = UpsampleCancelled, "left the scene during the run; nothing was added"
    elif damage == "move the input":  # Harden transform or Center volume while it ran: the result would lie elsewhere
        moved = vtk.vtkMatrix4x4()
        inputNode.GetIJKToRASMatrix(moved)
        moved.SetElement(0, 3, moved.GetElement(0, 3) + 50.0)
        inputNode.SetIJKToRASMatrix(moved)
        failure, message = UpsampleCancelled, re.escape("'in' was moved during the run (its geometry or transform changed)")
    elif damage.startswith("garble"):
        (run.folder / "output.nrrd").write_bytes(b"not a volume any more")  # a full disk, a cleaner
        failure, message = UpsampleFailed, "could not read the upsampled volume from .*; nothing was changed"
    else:
        import CycleINRSlicerLib.job as job_module
        step = "replaceVolume" if "voxels" in damage else "copyDisplay"
        done = getattr(job_module, step)

        def interrupted(*args):  # Ctrl-C just after the voxels changed hands, or as the display is copied
            if step == "replaceVolume":
                done(*args)
            raise KeyboardInterrupt
        monkeypatch.setattr(job_module, step, interrupted)
        failure, message = UpsampleCancelled, "cancelled; nothing was written"
    with pytest.raises(failure, match=message):
        run.finish()
    assert scene.GetNumberOfNodes() == nodes
    assert np.array_equal(arrayFromVolumeNode(chosen), kept[0]) and np.array_equal(ijkToRas(chosen), kept[1])
    assert chosen.GetStorageNodeID() == kept[2] and chosen.GetImageData() is kept[3]
    assert chosen.GetAttribute("CycleINR.sliceAxis") is None


def test_a_temporary_folder_that_cannot_be_made_is_one_clear_failure(oblique_mr, monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))  # TMPDIR on a removed or unmounted disk
    run = UpsampleJob(oblique_mr, UpsampleOptions(device="cpu", factor=2.0), python=sys.executable, libraryParent=REPOSITORY)
    with pytest.raises(UpsampleFailed, match=f"cannot make a temporary folder in {tmp_path / 'gone'}: No such file or "
                                             "directory; nothing was started"):
        run.start()


@pytest.mark.parametrize("removed", ["input", "output"])
def test_a_node_removed_while_the_run_goes_on_cancels_it_at_the_next_poll(oblique_mr, scene, temp_folders, removed):
    """The user deletes the input or the chosen output volume: the run stops then, not at its end,
    and the panel says why rather than "cancelled"."""
    inputNode = volume_node(scene, sitk.GetImageFromArray(np.tile(arrayFromVolumeNode(oblique_mr), (3, 4, 4))), "big")
    outputNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "chosen output")
    run = job(inputNode, temp_folders, factor=3.0)
    run.outputNode = outputNode
    run.start()
    poll_until(run, lambda events: any(event["event"] == "progress" and event.get("stage") == "upsample" for event in events))
    scene.RemoveNode(inputNode if removed == "input" else outputNode)
    run.poll()
    assert run.process._cancelRequested
    poll_until(run)
    with pytest.raises(UpsampleCancelled, match=f"{'big' if removed == 'input' else 'chosen output'}' left the scene"):
        run.finish()


def test_the_blocking_call_cancels_when_the_input_goes_while_it_waits(oblique_mr, scene, temp_folders):
    """The console call lets Slicer process events while it waits, so the user can delete the
    input meanwhile: the run stops then, as the panel's does, not at its end."""
    inputNode = volume_node(scene, sitk.GetImageFromArray(np.tile(arrayFromVolumeNode(oblique_mr), (3, 4, 4))), "big")
    run = job(inputNode, temp_folders, factor=3.0)
    progress = []

    def events() -> None:  # Slicer's processEvents: the user removes the volume once the model runs
        if progress and inputNode.GetScene() is not None:
            scene.RemoveNode(inputNode)

    with pytest.raises(UpsampleCancelled, match="'big' left the scene during the run; nothing was added"):
        run.wait(lambda fraction, message: progress.append(fraction), idle=events)
    assert run.process._cancelRequested


def test_the_output_records_the_axis_that_was_upsampled(oblique_mr, scene, temp_folders):
    from CycleINRSlicerLib.job import upsampledAxis

    output = job(oblique_mr, temp_folders, factor=2.0, axis=0).wait()
    assert output.GetImageData().GetDimensions()[0] == geometry.output_slice_count(40, 2.0)
    assert upsampledAxis(oblique_mr, output) == 0 and upsampledAxis(oblique_mr, output, 1) == 1
    assert upsampledAxis(oblique_mr, None) == 2  # the coarsest, as a run with axis None picks


def test_a_new_output_goes_where_the_input_is_in_the_data_module(oblique_mr, scene, temp_folders):
    """A DICOM volume sits in its patient's study; its result belongs there, not at the top."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.CreateFolderItem(hierarchy.GetSceneItemID(), "study")
    # slicer-core has no subject hierarchy logic to make items for nodes, as Slicer's does
    hierarchy.CreateItem(study, oblique_mr)
    output = job(oblique_mr, temp_folders, factor=2.0).wait()
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(output)) == study
