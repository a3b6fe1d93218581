"""Upsample slices: thin slices from thick-slice CT and MR volumes with CycleINR, inside 3D Slicer.

Module, Widget, Logic and Test classes as in Slicer's scripted-module template. The model runs
in a separate process (Slicer's Python running `cycleinr upsample --json-progress`); the Qt-free
parts live in the CycleINRSlicerLib package beside this file (process, node_io, job, results):
Slicer loads every .py file at the top of a module folder as a module of its own.
"""

import enum
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from CycleINRSlicerLib import findLibraryParent

LIBRARY_PARENT = findLibraryParent(os.path.dirname(os.path.abspath(__file__)))
if str(LIBRARY_PARENT) not in sys.path:
    sys.path.append(str(LIBRARY_PARENT))

from CycleINRLib import geometry  # noqa: E402  (needs LIBRARY_PARENT on sys.path)
# What the logic raises, importable from here as from CycleINRLib.errors.
from CycleINRLib.errors import InputError, UpsampleCancelled, UpsampleFailed  # noqa: E402
from CycleINRSlicerLib.process import DeviceProbe, UpsampleOptions  # noqa: E402
from CycleINRSlicerLib.job import UpsampleJob, checkRequest, describeOutputGrid, scalarVolumeArray, upsampledAxis  # noqa: E402

# Import name -> requirement, for what the command line and the noise metrics need beyond
# what Slicer ships (numpy and SimpleITK, which are never reinstalled) and torch.
EXTRA_PACKAGES = {"safetensors": "safetensors>=0.4", "tqdm": "tqdm>=4.60", "pywt": "PyWavelets>=1.4",
                  "scipy": "scipy>=1.10", "skimage": "scikit-image>=0.21"}
POLL_INTERVAL_MS = 200
COMPARISON_LAYOUT_ID = 8801
COMPARISON_VIEWS = (("CycleINRInputCoronal", "Coronal", "input"), ("CycleINROutputCoronal", "Coronal", "output"),
                    ("CycleINRInputSagittal", "Sagittal", "input"), ("CycleINROutputSagittal", "Sagittal", "output"))


#
# CycleINR
#


class CycleINR(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Upsample slices"
        self.parent.categories = ["Filtering"]
        self.parent.dependencies = []
        self.parent.contributors = ["CycleINR developers"]
        self.parent.helpText = """
Makes thin slices from a thick-slice CT or MR volume: the slice axis is upsampled by any factor
(2.5, 3.7, ...) or to a target slice spacing with CycleINR, a learned implicit neural representation.
<p><b>Output grid.</b> Only the slice axis changes. With input slice spacing s, N slices and factor r,
the output keeps the input's origin and direction, has slice spacing s/r and floor((N-1)&middot;r)+1 slices;
output slice j lies at input slice coordinate j/r, so no slice is invented beyond the last acquired one.
With an integer factor every r-th output slice coincides with an acquired slice.</p>
<p>The model runs in a separate process, so the application stays responsive and an out-of-memory
error cannot close it. Results: SNLI (slice-wise noise level inconsistency; lower is more consistent)
and a per-slice noise-level plot of input and output.</p>
<p>See the <a href="https://github.com/cycleinr/CycleINR#3d-slicer-the-upsample-slices-module">project README</a> for the scripting API.</p>
"""
        self.parent.acknowledgementText = """
Method: Wei Fang, Yuxing Tang, Heng Guo, Mingze Yuan, Tony C. W. Mok, Ke Yan, Jiawen Yao, Xin Chen, Zaiyi Liu,
Le Lu, Ling Zhang, Minfeng Xu. "CycleINR: Cycle Implicit Neural Representation for Arbitrary-Scale Volumetric
Super-Resolution of Medical Data." CVPR 2024. Please cite it when you publish results made with this module.
"""


#
# Parameter node
#


class SliceAxis(enum.Enum):
    AUTO = "auto"
    I = "0"  # noqa: E741 - Slicer's IJK axis names
    J = "1"
    K = "2"

    def label(self):
        return "automatic (coarsest)" if self is SliceAxis.AUTO else f"{self.name} axis"

    @property
    def index(self) -> Optional[int]:
        return None if self is SliceAxis.AUTO else int(self.value)


class Device(enum.Enum):
    AUTO = "auto"
    GPU = "gpu"
    CPU = "cpu"

    def label(self):
        return {"auto": "automatic (GPU if detected)", "gpu": "GPU", "cpu": "CPU"}[self.value]


class Amount(enum.Enum):
    FACTOR = "factor"
    SPACING = "spacing"

    def label(self):
        return "by a factor" if self is Amount.FACTOR else "to a slice spacing"


@parameterNodeWrapper
class CycleINRParameterNode:
    """Every field is bound to a widget of CycleINR.ui through its SlicerParameterName property
    (decimals and steps are set there too: the Decimals annotation is newer than Slicer 5.4).

    weightsPath: empty means the weights bundled with the extension (a plain line edit: CTK's path
    line edit never reports a cleared field, so the bundled weights could not be chosen again).
    maxMemoryGB: 0 means the engine's default budget.
    outputVolume: None means a new volume node named after the input and the factor.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    amount: Amount = Amount.FACTOR
    factor: Annotated[float, WithinRange(1.01, geometry.MAX_FACTOR)] = 2.5
    targetSpacing: Annotated[float, WithinRange(0.01, 100.0)] = 1.0
    sliceAxis: SliceAxis = SliceAxis.AUTO
    device: Device = Device.AUTO
    weightsPath: str = ""
    maxMemoryGB: Annotated[float, WithinRange(0.0, 1024.0)] = 0.0
    keepAcquiredSlices: bool = True
    matchNoise: bool = False
    flipEnsemble: bool = False
    bf16: bool = False
    outputVolume: vtkMRMLScalarVolumeNode


#
# CycleINRWidget
#


class CycleINRWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the .ui to the parameter node; runs the job from a timer so the GUI never blocks."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._starting = False  # Apply's checks and installs run; pip keeps the GUI responsive meanwhile
        self._lastInput = None
        self._lastOutput = None
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPoll)
        self._deviceTimer = qt.QTimer()  # polls the device check, which runs in a separate process
        self._deviceTimer.setInterval(POLL_INTERVAL_MS)
        self._deviceTimer.connect("timeout()", self._showDevices)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CycleINR.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CycleINRLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.showViewsButton.connect("clicked(bool)", self.onShowViewsButton)
        self.ui.weightsBrowseButton.connect("clicked(bool)", self.onBrowseWeights)
        self.ui.progressBar.hide()
        self.ui.showViewsButton.enabled = False
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._timer.stop()
        self._deviceTimer.stop()
        if self._job is not None:
            self._job.process.stop()
            self._job.cleanup()
            self._job = None
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self._showDevices()

    def _showDevices(self) -> None:
        description = self.logic.deviceDescription()
        if description is None:
            self.ui.deviceInfoLabel.text = "Detecting devices..."
            self._deviceTimer.start()
        else:
            self._deviceTimer.stop()
            self.ui.deviceInfoLabel.text = description

    def exit(self) -> None:
        self._deviceTimer.stop()  # enter() starts it again while the check runs
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateReadout)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None:
            self._job.cancel()  # its input is about to go; the run ends as cancelled
        self._lastInput = self._lastOutput = None  # node IDs restart after a close: never compare stale ones
        self.ui.showViewsButton.enabled = False
        self.ui.resultsLabel.text = ""
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            scalarVolumes = (node for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                             if node.GetClassName() == "vtkMRMLScalarVolumeNode")  # not label maps, vector volumes
            self._parameterNode.inputVolume = next(scalarVolumes, None)

    def setParameterNode(self, inputParameterNode: Optional[CycleINRParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateReadout)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateReadout)
            self._updateReadout()

    def _updateReadout(self, caller=None, event=None) -> None:
        """Live readout of the output grid; Apply is enabled only when it makes sense."""
        parameters = self._parameterNode
        if parameters is None:
            return
        byFactor = parameters.amount is Amount.FACTOR
        self.ui.factorSpinBox.visible = byFactor
        self.ui.targetSpacingSpinBox.visible = not byFactor
        try:
            self.ui.readoutLabel.text = self.logic.describeOutput(
                parameters.inputVolume, self.logic.optionsFromParameters(parameters))
            ready = True
        except (InputError, ValueError) as error:
            self.ui.readoutLabel.text = str(error)
            ready = False
        if self._job is None and not self._starting:
            self.ui.applyButton.enabled = ready

    def onBrowseWeights(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, "CycleINR weights file", self._parameterNode.weightsPath,
                                              "CycleINR weights (*.safetensors)")
        if path:
            self._parameterNode.weightsPath = path

    def onApplyButton(self) -> None:
        if self._job is not None:
            self._job.cancel()
            self._setStatus("Cancelling...")
            return
        if self._starting:
            return
        self._starting = True
        self.ui.applyButton.enabled = False
        self._setStatus("Checking the Python packages...")
        try:
            self._start()
        except Exception as error:  # noqa: BLE001 - every failure is shown in the panel
            self._showError(error)
        finally:
            self._starting = False
            self._showDevices()  # PyTorch may have been installed just now
            self._updateReadout()

    def _start(self) -> None:
        parameters = self._parameterNode
        self._job = self.logic.startUpsample(parameters.inputVolume, self.logic.optionsFromParameters(parameters),
                                             parameters.outputVolume)
        self._setRunning(True)
        self._setStatus("Starting...")
        self._timer.start()

    def onPoll(self) -> None:
        job = self._job
        try:
            if job.poll():
                self.ui.progressBar.value = int(round(100 * job.process.fraction))
                self._setStatus(job.process.message)
        except Exception as error:  # noqa: BLE001 - an event it cannot read must not stall the panel
            logging.error("Upsample slices: cannot read the process's progress: %s", error)
        if job.finished:
            self._timer.stop()
            self._job = None
            self._setRunning(False)
            self._finish(job)

    def _finish(self, job: UpsampleJob) -> None:
        try:
            outputNode = job.finish()
        except UpsampleCancelled as cancelled:
            reason = str(cancelled)
            self._setStatus(f"{reason[:1].upper()}{reason[1:]}; the scene is unchanged.")
            return
        except Exception as error:  # noqa: BLE001
            self._showError(error)
            return
        self._lastInput, self._lastOutput = job.inputNode, outputNode
        self._showResults(job, outputNode)

    def _showResults(self, job: UpsampleJob, outputNode) -> None:
        # every slice view, the comparison views too (Compare resets them): the chart below
        # switches to a layout with a plot view, the comparison layout has none
        slicer.util.setSliceViewerLayers(background=outputNode, fit=True)
        warnings = "".join(f"\nWarning: {message}" for message in job.process.warnings)
        self._setStatus(f"Done: '{outputNode.GetName()}' on {job.process.result.get('device', '?')} "
                        f"in {job.process.result.get('seconds', 0):.1f} s.{warnings}")
        try:
            summary, chart = self.logic.compareNoise(job.inputNode, outputNode, job.options.axis,
                                                     job.process.result.get("noise"))
        except Exception as error:  # noqa: BLE001 - the volume is there even when metrics fail
            self._showError(error, "Upsampling succeeded, but the noise comparison failed")
            return
        self.ui.resultsLabel.text = summary
        slicer.modules.plots.logic().ShowChartInLayout(chart)
        self.ui.showViewsButton.enabled = True

    def onShowViewsButton(self) -> None:
        if any(node is None or node.GetScene() is not slicer.mrmlScene for node in (self._lastInput, self._lastOutput)):
            self.ui.showViewsButton.enabled = False
            self._setStatus("The last run's input or output is no longer in the scene.")
            return
        self.logic.showComparisonViews(self._lastInput, self._lastOutput)

    def _setRunning(self, running: bool) -> None:
        self.ui.applyButton.text = "Cancel" if running else "Apply"
        self.ui.applyButton.toolTip = "Stop the upsampling; nothing is added to the scene" if running \
            else "Upsample the input volume"
        self.ui.applyButton.enabled = True
        self.ui.progressBar.value = 0
        self.ui.progressBar.visible = running
        self.ui.inputsCollapsibleButton.enabled = not running
        self.ui.advancedCollapsibleButton.enabled = not running
        self.ui.outputsCollapsibleButton.enabled = not running
        if not running:
            self._updateReadout()

    def _setStatus(self, text: str) -> None:
        self.ui.statusLabel.setStyleSheet("")
        self.ui.statusLabel.text = text

    def _showError(self, error: Exception, prefix: str = "Upsampling failed") -> None:
        """One clear line in the panel; the details go to the Python console log."""
        self.ui.statusLabel.setStyleSheet("color: #c0392b")
        self.ui.statusLabel.text = f"{prefix}: {error}"
        logging.error("%s: %s\n%s%s", prefix, error,
                      "".join(traceback.format_exception(type(error), error, error.__traceback__)),
                      getattr(error, "details", ""))
        self._updateReadout()


#
# CycleINRLogic
#


class CycleINRLogic(ScriptedLoadableModuleLogic):
    """Everything the module does, callable without the GUI:

        logic = slicer.util.getModuleLogic("CycleINR")
        outputNode = logic.upsample(volumeNode, factor=2.5)
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._deviceProbe = None  # what PyTorch detects, asked once in a separate process

    def getParameterNode(self):
        return CycleINRParameterNode(super().getParameterNode())

    def upsample(self, inputVolumeNode, factor=None, spacing=None, axis=None, device="auto", weights=None,
                 maxMemoryGB=None, keepAcquiredSlices=None, outputVolumeNode=None, progressCallback=None,
                 matchNoise=False, flipEnsemble=False, bf16=False):
        """Upsample the slice axis of `inputVolumeNode`; blocks and returns the output volume node.

        Give `factor` (any number > 1, e.g. 2.5) or `spacing` (target slice spacing in mm).
        axis: None (the coarsest), 0, 1 or 2 (the I, J or K axis). device: "auto", "cpu", "cuda",
        "mps" or "gpu". weights: a .safetensors file, None for the bundled weights.
        maxMemoryGB: None for the engine's default. keepAcquiredSlices: None for the default (on).
        matchNoise: add synthetic noise to generated slices up to the acquired slices' noise level.
        flipEnsemble: average with a second pass over the slice-reversed volume (twice the time,
        +0.04 to +0.14 dB PSNR on the validation CT).
        bf16: bfloat16 arithmetic, 1.7 to 1.9 times faster on a CPU with AMX, PSNR within 0.01 dB.
        outputVolumeNode: None creates a new node. progressCallback(fraction, message) is called
        on every progress report. Raises UpsampleFailed (message + `details`) or UpsampleCancelled.
        """
        options = UpsampleOptions(factor=factor, spacing=spacing, axis=axis, device=device, weights=weights,
                                  maxMemoryGB=maxMemoryGB, keepAcquiredSlices=keepAcquiredSlices, matchNoise=matchNoise,
                                  flipEnsemble=flipEnsemble, bf16=bf16)
        return self._prepareJob(inputVolumeNode, options, outputVolumeNode).wait(progressCallback, self._processEvents)

    @staticmethod
    def _processEvents() -> None:
        """Let Slicer repaint while the blocking call waits: the console shows the progress
        callback's lines as they come, not all at the end."""
        if hasattr(slicer, "app"):  # not in slicer-core outside the application
            slicer.app.processEvents()

    def startUpsample(self, inputVolumeNode, options: UpsampleOptions, outputVolumeNode=None) -> UpsampleJob:
        """Start without blocking; the caller polls the returned job (the panel does, from a timer)."""
        job = self._prepareJob(inputVolumeNode, options, outputVolumeNode)
        job.start()
        return job

    def _prepareJob(self, inputVolumeNode, options: UpsampleOptions, outputVolumeNode) -> UpsampleJob:
        """Check the input and make sure the packages are there."""
        self.checkInput(inputVolumeNode, options, outputVolumeNode)
        if not self.ensureDependencies():
            raise UpsampleFailed("the required Python packages are not installed; nothing was started")
        return UpsampleJob(inputVolumeNode, options, outputVolumeNode, self.pythonExecutable(), LIBRARY_PARENT)

    def checkInput(self, volumeNode, options: UpsampleOptions, outputVolumeNode=None) -> None:
        """Refuse what the command line would refuse, before anything is written."""
        checkRequest(volumeNode, options, outputVolumeNode)
        self.describeOutput(volumeNode, options)

    @staticmethod
    def optionsFromParameters(parameters: CycleINRParameterNode) -> UpsampleOptions:
        byFactor = parameters.amount is Amount.FACTOR
        weightsPath = parameters.weightsPath.strip()
        weights = weightsPath if weightsPath not in ("", ".") else None  # ".": an empty path in scenes saved before 2026-11-27
        return UpsampleOptions(
            factor=parameters.factor if byFactor else None,
            spacing=None if byFactor else parameters.targetSpacing,
            axis=parameters.sliceAxis.index, device=parameters.device.value, weights=weights,
            maxMemoryGB=parameters.maxMemoryGB or None, keepAcquiredSlices=parameters.keepAcquiredSlices,
            matchNoise=parameters.matchNoise, flipEnsemble=parameters.flipEnsemble, bf16=parameters.bf16,
            noiseReport=True)

    @staticmethod
    def describeOutput(volumeNode, options: UpsampleOptions) -> str:
        if volumeNode is None or volumeNode.GetImageData() is None:
            raise InputError("Select an input volume that holds image data.")
        imageData = volumeNode.GetImageData()
        return describeOutputGrid(imageData.GetDimensions(), volumeNode.GetSpacing(), imageData.GetScalarSize(),
                                  options.axis, options.factor, options.spacing)

    @staticmethod
    def pythonExecutable() -> str:
        """Slicer's own Python interpreter, which runs the command line."""
        return shutil.which("PythonSlicer") or sys.executable

    # Devices

    def deviceDescription(self) -> Optional[str]:
        """What PyTorch detects, in words for the panel; None while a separate process asks it
        (importing torch into Slicer would stall the GUI and hold GPU memory)."""
        if importlib.util.find_spec("torch") is None:
            return "PyTorch is not installed yet; it is installed (after you confirm) on the first Apply."
        if self._deviceProbe is None:
            self._deviceProbe = DeviceProbe(self.pythonExecutable())
        facts = self._deviceProbe.result()
        return None if facts is None else self._describeDevices(facts)

    @staticmethod
    def _describeDevices(facts: dict) -> str:
        if "error" in facts:
            return f"PyTorch cannot be loaded: {facts['error']}"
        if facts.get("cudaDevice"):
            return f"GPU detected: {facts['cudaDevice']} (CUDA {facts['cudaBuild']}); automatic uses it."
        if facts.get("mps"):
            return "Apple GPU (MPS) detected; automatic uses it."
        build = "a CPU-only build" if facts.get("cudaBuild") is None else f"a CUDA {facts['cudaBuild']} build"
        return (f"No GPU detected: PyTorch {facts.get('torch', '?')} is {build}. The CPU works, more slowly. "
                "With an NVIDIA GPU, reinstall PyTorch with CUDA in the PyTorch Utils module.")

    # Dependencies

    def ensureDependencies(self) -> bool:
        """Install torch and the missing extra packages after one confirmation; False if declined."""
        if not self._ensureTorch():
            return False
        missing = [requirement for name, requirement in EXTRA_PACKAGES.items()
                   if importlib.util.find_spec(name) is None]
        if not missing:
            return True
        self._install(missing)
        return all(importlib.util.find_spec(name) is not None for name in EXTRA_PACKAGES)

    def _install(self, requirements: list) -> None:
        """pip-install after one confirmation listing `requirements`; Slicer's numpy and SimpleITK
        stay pinned. Under Slicer's --testing (the self-test in CTest) nobody can answer a dialog,
        which would wait for ever: it installs without one, as PyTorchUtils does for torch.
        A declined install returns (the caller finds the packages missing); a failed one raises
        UpsampleFailed."""
        testing = slicer.app.testingEnabled()
        slicerPackaging = self._slicerPackaging()
        with tempfile.TemporaryDirectory(prefix="CycleINR-") as folder:
            constraints = self._writeBundledConstraints(os.path.join(folder, "constraints.txt"))
            try:
                if slicerPackaging is not None:  # it asks for confirmation itself
                    from packaging.requirements import Requirement

                    accepted = inspect.signature(slicerPackaging.pip_ensure).parameters
                    unattended = {name: value for name, value in (("prompt_install", not testing), ("skip_in_testing", False))
                                  if name in accepted}
                    slicerPackaging.pip_ensure([Requirement(requirement) for requirement in requirements],
                                               requester="Upsample slices (CycleINR)", constraints=constraints, **unattended)
                elif testing or slicer.util.confirmOkCancelDisplay(
                        "Upsample slices needs these Python packages, which will be downloaded and installed now:\n"
                        + "\n".join(requirements), windowTitle="Upsample slices"):
                    slicer.util.pip_install(requirements + ["--constraint", constraints])
            except subprocess.CalledProcessError as error:
                raise UpsampleFailed(f"pip could not install {', '.join(requirements)} (exit status {error.returncode}); "
                                     "its output is in the Python console") from None
            except RuntimeError as error:  # slicer.packaging's pip_ensure when the user declines
                logging.info("Upsample slices: %s", error)
        importlib.invalidate_caches()

    @staticmethod
    def _slicerPackaging():
        """slicer.packaging (Slicer 5.11+, earlier previews: slicer.pydeps) where it has pip_ensure
        (some development builds had a slicer.packaging without it), or None."""
        for name in ("slicer.packaging", "slicer.pydeps"):
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            if hasattr(module, "pip_ensure"):
                return module
        return None

    @staticmethod
    def _writeBundledConstraints(path: str) -> str:
        """A pip constraints file pinning Slicer's own numpy and SimpleITK, so neither is replaced:
        the versions pip sees; one it cannot read (a build's own version string) stays unpinned."""
        from packaging.version import InvalidVersion, Version

        pins = []
        for name in ("numpy", "SimpleITK"):
            try:
                version = importlib.metadata.version(name)
                Version(version)
            except importlib.metadata.PackageNotFoundError:
                continue  # not a distribution pip knows of: nothing it could replace
            except InvalidVersion:
                logging.warning("Upsample slices: %s %s is not a version pip reads; not pinned", name, version)
                continue  # pip would refuse the whole constraints file
            pins.append(f"{name}=={version}\n")
        with open(path, "w", encoding="utf-8") as constraints:
            constraints.writelines(pins)
        return path

    def _ensureTorch(self) -> bool:
        if importlib.util.find_spec("torch") is not None:
            return True
        self._deviceProbe = None  # asked again once PyTorch is installed
        try:
            import PyTorchUtils
        except ImportError:
            if self._slicerPackaging() is None:
                raise UpsampleFailed("PyTorch is missing: install the PyTorch extension from the Extensions "
                                     "Manager, restart Slicer, and try again") from None
            self._install(["torch"])
            return importlib.util.find_spec("torch") is not None
        return PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True) is not None

    # Results

    @staticmethod
    def compareNoise(inputVolumeNode, outputVolumeNode, axis=None, report=None):
        """SNLI and mean noise of input and output as text, and a per-slice noise chart node.

        report: the `noise` entry of a run's result (`UpsampleOptions(noiseReport=True)`), whose
        process measured the slices already; None measures the nodes here.
        """
        from CycleINRSlicerLib.results import addNoisePlot, noiseLevels, reportedLevels, summary

        scalarVolumeArray(inputVolumeNode, "input")
        scalarVolumeArray(outputVolumeNode, "output")
        axis = upsampledAxis(inputVolumeNode, outputVolumeNode, axis)  # the output node records its run's
        if report is None:
            inputLevels, outputLevels = noiseLevels(inputVolumeNode, axis), noiseLevels(outputVolumeNode, axis)
        else:
            inputLevels = reportedLevels(inputVolumeNode, axis, report["input"])
            outputLevels = reportedLevels(outputVolumeNode, axis, report["output"])
        text = summary(inputLevels, outputLevels)
        logging.info("Upsample slices, %s -> %s:\n%s", inputVolumeNode.GetName(), outputVolumeNode.GetName(), text)
        return text, addNoisePlot(inputVolumeNode.GetScene(), inputLevels, outputLevels)

    def showComparisonViews(self, inputVolumeNode, outputVolumeNode) -> None:
        """Input and output side by side in linked coronal and sagittal views."""
        layoutManager = slicer.app.layoutManager()
        layoutNode = layoutManager.layoutLogic().GetLayoutNode()
        if not layoutNode.IsLayoutDescription(COMPARISON_LAYOUT_ID):
            layoutNode.AddLayoutDescription(COMPARISON_LAYOUT_ID, self._comparisonLayout())
        layoutManager.setLayout(COMPARISON_LAYOUT_ID)
        slicer.app.processEvents()  # the new views take their size: fitting before would frame them badly
        volumes = {"input": inputVolumeNode, "output": outputVolumeNode}
        for viewName, _, role in COMPARISON_VIEWS:
            sliceWidget = layoutManager.sliceWidget(viewName)
            compositeNode = sliceWidget.mrmlSliceCompositeNode()
            compositeNode.SetBackgroundVolumeID(volumes[role].GetID())
            compositeNode.SetForegroundVolumeID(None)
            compositeNode.SetLinkedControl(True)
            compositeNode.SetHotLinkedControl(True)
            sliceWidget.sliceLogic().FitSliceToAll()

    @staticmethod
    def _comparisonLayout() -> str:
        def view(name, orientation, role):
            return (f'<item><view class="vtkMRMLSliceNode" singletontag="{name}">'
                    f'<property name="orientation" action="default">{orientation}</property>'
                    f'<property name="viewlabel" action="default">{role[0].upper()}{orientation[0]}</property>'
                    f'<property name="viewcolor" action="default">{"#8C8C8C" if role == "input" else "#6FB05F"}'
                    '</property></view></item>')

        rows = [COMPARISON_VIEWS[:2], COMPARISON_VIEWS[2:]]
        return ('<layout type="vertical">'
                + "".join('<item><layout type="horizontal">' + "".join(view(*v) for v in row) + "</layout></item>"
                          for row in rows)
                + "</layout>")


#
# CycleINRTest
#


class CycleINRTest(ScriptedLoadableModuleTest):
    """Inside Slicer: SampleData CT, a small crop, a fractional factor; geometry and SNLI checks."""

    FACTOR = 2.5

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_UpsampleFractionalFactor()
        self.setUp()
        self.test_BadInputLeavesSceneUnchanged()

    def _smallCrop(self):
        """The CTChest sample cropped to 48x48x12 voxels around its centre, keeping every 5th slice."""
        import SampleData

        volumeNode = SampleData.SampleDataLogic().downloadSample("CTChest")
        array = slicer.util.arrayFromVolume(volumeNode)
        k, j, i = (n // 2 for n in array.shape)
        crop = array[k - 30:k + 30:5, j - 24:j + 24, i - 24:i + 24].copy()
        cropNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CTChest crop")
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        corner = [i - 24, j - 24, k - 30, 1]
        origin = matrix.MultiplyPoint(corner)[:3]
        for row in range(3):
            matrix.SetElement(row, 2, matrix.GetElement(row, 2) * 5)  # every 5th slice: 5x the slice step
            matrix.SetElement(row, 3, origin[row])
        cropNode.SetIJKToRASMatrix(matrix)
        slicer.util.updateVolumeFromArray(cropNode, crop)
        return cropNode

    def test_UpsampleFractionalFactor(self):
        import numpy as np

        self.delayDisplay("Upsampling a CT crop by 2.5")
        inputNode = self._smallCrop()
        reports = []
        logic = CycleINRLogic()
        outputNode = logic.upsample(inputNode, factor=self.FACTOR, device="cpu",
                                    progressCallback=lambda fraction, message: reports.append(fraction))
        self.assertTrue(reports and 0.0 <= min(reports) and max(reports) <= 1.0)

        inputShape = slicer.util.arrayFromVolume(inputNode).shape
        outputShape = slicer.util.arrayFromVolume(outputNode).shape
        expectedSlices = geometry.output_slice_count(inputShape[0], self.FACTOR)
        self.assertEqual(outputShape, (expectedSlices,) + inputShape[1:])

        inputMatrix, outputMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        inputNode.GetIJKToRASMatrix(inputMatrix)
        outputNode.GetIJKToRASMatrix(outputMatrix)
        for j in range(expectedSlices):
            expected = inputMatrix.MultiplyPoint([3, 5, j / self.FACTOR, 1])
            actual = outputMatrix.MultiplyPoint([3, 5, j, 1])
            np.testing.assert_allclose(actual, expected, atol=1e-3)

        text, chart = logic.compareNoise(inputNode, outputNode)
        self.assertIn("SNLI", text)
        self.assertEqual(chart.GetNumberOfPlotSeriesNodes(), 2)
        self.delayDisplay("Test passed")

    def test_BadInputLeavesSceneUnchanged(self):
        self.delayDisplay("A target spacing larger than the input's must fail cleanly")
        inputNode = self._smallCrop()
        volumesBefore = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
        with self.assertRaises(InputError):
            CycleINRLogic().upsample(inputNode, spacing=50.0, device="cpu")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"), volumesBefore)
        self.delayDisplay("Test passed")
