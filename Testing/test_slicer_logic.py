"""The module's logic class (CycleINR/CycleINR.py) on real MRML, called as in Slicer's console.

Outside Slicer there is no Qt and no scripted-module base classes (the slicer-core package has
neither), so this stands in minimal ones for `qt`, `slicer.ScriptedLoadableModule` and
`slicer.parameterNodeWrapper`, which the logic's code path does not use; the logic, the job, the
process, the command line and MRML are the real ones.
"""

import re
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import slicer  # real MRML from the slicer-core package, a test dependency (pyproject.toml)

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "CycleINR"))

from CycleINRLib.errors import InputError, UpsampleCancelled  # noqa: E402
from CycleINRSlicerLib.node_io import arrayFromVolumeNode, ijkToRas  # noqa: E402
from CycleINRSlicerLib.process import UpsampleOptions  # noqa: E402
from test_slicer_nodes import MR_OBLIQUE, volume_node  # noqa: E402


def _stand_ins() -> dict:
    """Modules Slicer's application provides and slicer-core does not."""
    qt = types.ModuleType("qt")
    qt.QTimer = type("QTimer", (), {})
    base = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleTest"):
        setattr(base, name, type(name, (), {"__init__": lambda self, *args: None}))
    base.ScriptedLoadableModuleLogic = type("ScriptedLoadableModuleLogic", (), {"__init__": lambda self, *args: None})
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.WithinRange = lambda low, high: (low, high)
    wrapper.parameterNodeWrapper = lambda cls: cls
    return {"qt": qt, "slicer.ScriptedLoadableModule": base, "slicer.parameterNodeWrapper": wrapper}


@pytest.fixture(scope="module")
def logic():
    stand_ins = _stand_ins()
    saved = {name: sys.modules.get(name) for name in [*stand_ins, "CycleINR"]}
    sys.modules.update(stand_ins)
    try:
        import CycleINR

        yield CycleINR.CycleINRLogic()
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()  # held by the test: a node does not keep its scene alive


@pytest.fixture
def mr_crop(shared_data, scene):
    image = sitk.ReadImage(str(shared_data / MR_OBLIQUE))[110:150, 130:166, 8:15]
    return volume_node(scene, image, "pgbm crop")


def test_the_documented_console_call_and_its_noise_comparison(logic, scene, mr_crop, monkeypatch):
    before = arrayFromVolumeNode(mr_crop).copy()
    repaints = []  # Slicer's console shows the progress lines only if the call lets it repaint
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(processEvents=lambda: repaints.append(1)), raising=False)
    output = logic.upsample(mr_crop, factor=2.0, axis=0, device="cpu")
    assert repaints
    assert output.GetName() == "pgbm crop x2" and output.GetImageData().GetDimensions() == (79, 36, 7)
    np.testing.assert_allclose(ijkToRas(output)[:, 1:], ijkToRas(mr_crop)[:, 1:])  # only the I axis is finer
    text, chart = logic.compareNoise(mr_crop, output)  # along I, the axis the output records
    assert text.startswith("SNLI: input") and chart.GetNumberOfPlotSeriesNodes() == 2
    assert chart.GetNthPlotSeriesNode(1).GetTableNode().GetNumberOfRows() == 79
    np.testing.assert_array_equal(arrayFromVolumeNode(mr_crop), before)
    assert scene.GetFirstNodeByName("pgbm crop") is mr_crop
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    for other, message in [(None, "the output must be a scalar (grey-value) volume node, not a NoneType"),
                           (empty, "volume 'empty' holds no image data")]:
        with pytest.raises(InputError, match=re.escape(message)):
            logic.compareNoise(mr_crop, other)


def test_bad_requests_and_ctrl_c_leave_the_scene_as_it_was(logic, scene, mr_crop, monkeypatch):
    before = arrayFromVolumeNode(mr_crop).copy()
    nodes = scene.GetNumberOfNodes()
    for settings, message in [({"factor": 2.0, "spacing": 2.0}, "give either an upsampling factor"),
                              ({"factor": 2.0, "outputVolumeNode": mr_crop}, "must not be the input volume"),
                              ({"factor": 2.0, "device": "tpu"}, "device must be one of")]:
        with pytest.raises(InputError, match=message):
            logic.upsample(mr_crop, **settings)

    def interrupt(fraction, message):
        raise KeyboardInterrupt

    with pytest.raises(UpsampleCancelled):
        logic.upsample(mr_crop, factor=2.0, device="cpu", progressCallback=interrupt)
    assert scene.GetNumberOfNodes() == nodes
    np.testing.assert_array_equal(arrayFromVolumeNode(mr_crop), before)

    # Ctrl-C outside the progress loop: while the input is written, or once the result is read back
    from CycleINRSlicerLib import job

    for step in ("writeVolumeNode", "alignAxes"):
        with monkeypatch.context() as patch:
            patch.setattr(job, step, lambda *arguments: interrupt(0.0, step))
            with pytest.raises(UpsampleCancelled, match="nothing was written"):
                logic.upsample(mr_crop, factor=2.0, device="cpu")
        assert scene.GetNumberOfNodes() == nodes, step


class _Installs:
    """Records what the logic asks Slicer's package tools to do (stand-ins: installing for real
    would change this environment); `asked` counts confirmation dialogs."""

    def __init__(self, testing: bool):
        self.testing, self.asked, self.installed, self.ensured = testing, 0, [], []
        self.app = types.SimpleNamespace(testingEnabled=lambda: self.testing)

    def confirm(self, text, windowTitle=None):
        self.asked += 1
        return True

    def pip_install(self, arguments):
        constraints = Path(arguments[arguments.index("--constraint") + 1]).read_text(encoding="utf-8").split()
        self.installed.append((arguments[:arguments.index("--constraint")], constraints))

    def pip_ensure(self, requirements, constraints=None, prompt_install=True, requester=None, skip_in_testing=True):
        self.ensured.append({"prompt_install": prompt_install, "skip_in_testing": skip_in_testing})


@pytest.mark.parametrize("testing", [False, True])
@pytest.mark.parametrize("packaging", [False, True], ids=["slicer.util", "slicer.packaging"])
def test_packages_install_without_a_dialog_only_under_testing(logic, monkeypatch, testing, packaging):
    """Under Slicer's --testing (CTest) a confirmation dialog would wait for ever."""
    installs = _Installs(testing)
    monkeypatch.setattr(slicer, "app", installs.app, raising=False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", installs.confirm)
    monkeypatch.setattr(slicer.util, "pip_install", installs.pip_install)
    monkeypatch.setattr(logic, "_slicerPackaging",
                        lambda: types.SimpleNamespace(pip_ensure=installs.pip_ensure) if packaging else None)
    logic._install(["tqdm>=4.0"])
    if packaging:  # slicer.packaging asks itself, unless told not to
        assert installs.ensured == [{"prompt_install": not testing, "skip_in_testing": False}] and not installs.installed
    else:
        ((requirements, constraints),) = installs.installed
        assert requirements == ["tqdm>=4.0"] and installs.asked == (0 if testing else 1)
        assert f"numpy=={np.__version__}" in constraints


def test_the_panel_s_settings_become_the_command_s_options(logic):
    """An empty weights field (or the "." of scenes saved by the earlier path widget) means the
    bundled weights; a path is passed on without the spaces a paste may bring."""
    module = sys.modules[type(logic).__module__]
    settings = dict(amount=module.Amount.FACTOR, factor=2.5, targetSpacing=1.0, sliceAxis=module.SliceAxis.AUTO,
                    device=module.Device.CPU, maxMemoryGB=0.0, keepAcquiredSlices=True, matchNoise=False,
                    flipEnsemble=False, bf16=False)
    for field, weights in (("", None), (".", None), ("  ", None), (" /data/mr.safetensors ", "/data/mr.safetensors")):
        options = logic.optionsFromParameters(types.SimpleNamespace(weightsPath=field, **settings))
        assert options.weights == weights
        assert (options.factor, options.spacing, options.device, options.maxMemoryGB) == (2.5, None, "cpu", None)
        assert options.noiseReport and "--noise-report" in options.arguments()  # the chart's levels: measured there


def test_the_panel_s_chart_takes_the_levels_its_run_measured(logic, scene, mr_crop):
    """Measuring hundreds of output slices on Slicer's GUI thread would freeze it for seconds:
    the panel's run measures them in its process, and they are the ones Slicer would measure."""
    job = logic.startUpsample(mr_crop, UpsampleOptions(factor=2.0, axis=0, device="cpu", noiseReport=True))
    output = job.wait()
    report = job.process.result["noise"]
    reported, chart = logic.compareNoise(mr_crop, output, None, report)
    measured, _ = logic.compareNoise(mr_crop, output)
    assert reported == measured and reported.startswith("SNLI: input")
    levels = chart.GetNthPlotSeriesNode(1).GetTableNode().GetTable().GetColumnByName("noise level")
    assert levels.GetNumberOfTuples() == 79
    np.testing.assert_allclose([levels.GetValue(row) for row in range(79)], report["output"]["levels"])
    with pytest.raises(ValueError, match="40 noise levels reported for the 7 slices of 'pgbm crop'"):
        logic.compareNoise(mr_crop, output, 2, report)  # levels of another axis


def test_the_panel_learns_the_devices_from_a_separate_process(logic, monkeypatch):
    """Importing torch (and CUDA) into Slicer would stall its GUI and hold GPU memory: with any
    use of torch in this process made to fail, the panel still learns what PyTorch detects."""
    import torch

    class Untouchable(types.ModuleType):
        def __getattr__(self, name):
            raise AssertionError(f"torch.{name} used in Slicer's own process")

    untouchable = Untouchable("torch")
    untouchable.__spec__ = torch.__spec__  # installed, as far as find_spec can tell
    monkeypatch.setitem(sys.modules, "torch", untouchable)
    logic._deviceProbe = None  # a fresh check, not one an earlier test started
    deadline = time.monotonic() + 120
    while (description := logic.deviceDescription()) is None:
        assert time.monotonic() < deadline, "the device check did not finish"
        time.sleep(0.1)
    if torch.cuda.is_available():
        assert description.startswith(f"GPU detected: {torch.cuda.get_device_name(0)}")
    else:
        assert description.startswith(f"No GPU detected: PyTorch {torch.__version__} is a")
    assert logic.deviceDescription() == description  # asked once


def test_a_slicer_packaging_without_pip_ensure_is_not_used(logic, monkeypatch):
    """Some development builds of Slicer had a slicer.packaging with pip_install only."""
    without = types.ModuleType("slicer.packaging")
    without.pip_install = lambda arguments: None
    monkeypatch.setitem(sys.modules, "slicer.packaging", without)
    monkeypatch.setitem(sys.modules, "slicer.pydeps", None)  # None: the import fails
    assert logic._slicerPackaging() is None
    without.pip_ensure = lambda requirements, **options: None
    assert logic._slicerPackaging() is without


@pytest.mark.parametrize("outcome", ["declined", "pip failed"])
def test_a_declined_or_failed_install_says_so(logic, monkeypatch, caplog, outcome):
    """slicer.packaging raises RuntimeError when the user declines, pip_install CalledProcessError
    when pip fails: neither may reach the panel as a raw error."""
    import subprocess

    def pip_ensure(requirements, **options):
        if outcome == "declined":
            raise RuntimeError("User declined package installation")
        raise subprocess.CalledProcessError(1, ["pip", "install"])

    monkeypatch.setattr(slicer, "app", _Installs(False).app, raising=False)
    monkeypatch.setattr(logic, "_slicerPackaging", lambda: types.SimpleNamespace(pip_ensure=pip_ensure))
    module = sys.modules[type(logic).__module__]
    if outcome == "declined":
        with caplog.at_level("INFO"):
            logic._install(["tqdm>=4.0"])  # returns: the caller finds the packages missing
        assert "Upsample slices: User declined package installation" in caplog.text
    else:
        with pytest.raises(module.UpsampleFailed, match=r"pip could not install tqdm>=4.0 \(exit status 1\)"):
            logic._install(["tqdm>=4.0"])


def test_a_version_pip_cannot_read_is_left_out_of_the_constraints(logic, monkeypatch, tmp_path):
    """A source build's version string (not PEP 440) would make pip refuse the whole file."""
    import importlib.metadata

    versions = {"numpy": "1.26.4", "SimpleITK": "2.4.0-g1a2b3c-dirty"}
    monkeypatch.setattr(importlib.metadata, "version", lambda name: versions[name])
    path = logic._writeBundledConstraints(str(tmp_path / "constraints.txt"))
    assert Path(path).read_text(encoding="utf-8") == "numpy==1.26.4\n"
