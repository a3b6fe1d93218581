"""One upsampling run from a volume node to a new volume node, without Qt.

input node -> temporary NRRD -> `cycleinr upsample` process -> output node. The temporary
folder is removed in every case (success, bad input, crash, cancel), and the scene only
changes once a complete output has been read back. A folder that a crash of Slicer itself
left behind is removed by the next run.
"""

import math
import numbers
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from CycleINRLib import geometry
from CycleINRLib.config import DEVICES
from CycleINRLib.errors import InputError, UpsampleCancelled, UpsampleFailed
from CycleINRLib.io import Volume, validate_volume
from .node_io import (alignAxes, arrayFromVolumeNode, copyDisplay, ijkToRas, placeBeside, readVolumeFile, replaceVolume,
                      restoreVolume, snapshotVolume, writeVolumeNode)
from .process import ProgressCallback, UpsampleOptions, UpsampleProcess, upsampleCommand

AXIS_NAMES = ("I", "J", "K")
SLICE_AXIS_ATTRIBUTE = "CycleINR.sliceAxis"  # on the output node: the IJK axis that was upsampled
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
FOLDER_PREFIX = "CycleINR-run-{pid}-"  # the pid of the Slicer that owns the folder
OWNED_FOLDER = re.compile(r"CycleINR-run-(\d+)-")
CANCELLED = "upsampling was cancelled; nothing was written"


SCALAR_VOLUME_CLASS = "vtkMRMLScalarVolumeNode"  # not its label-map, vector, DWI or DTI subclasses
# What Slicer's NRRD writer takes (vtkITKImageWriter has no signed char or 64-bit integers).
WRITABLE_PIXEL_TYPES = ("uint8", "int16", "uint16", "int32", "uint32", "float32", "float64")


def checkRequest(inputNode, options: UpsampleOptions, outputNode=None) -> None:
    """Refuse, before anything is written, what the command line would refuse later (naming the
    node, not a temporary file), and an output node that would overwrite the input or could
    not hold the result."""
    if inputNode is None or (_isScalarVolume(inputNode) and inputNode.GetImageData() is None):
        raise InputError("Select an input volume that holds image data.")
    array = scalarVolumeArray(inputNode, "input")
    name = inputNode.GetName()
    if inputNode.GetScene() is None:
        raise InputError(f"'{name}' is in no scene; add it to the scene first")
    if array.dtype.name not in WRITABLE_PIXEL_TYPES:
        raise InputError(f"'{name}' has pixel type {array.dtype.name}, which Slicer cannot hand over; "
                         f"cast it to one of {', '.join(WRITABLE_PIXEL_TYPES)} first")
    validate_volume(Volume(array, tuple(inputNode.GetSpacing()), (0.0, 0.0, 0.0), IDENTITY), f"'{name}'")
    _checkOptions(options)
    if outputNode is not None:
        if outputNode is inputNode:
            raise InputError("the output volume must not be the input volume")
        if not _isScalarVolume(outputNode):
            raise InputError(f"the output must be a scalar volume node, not {_kind(outputNode)}")
        if outputNode.GetScene() is not inputNode.GetScene():
            raise InputError(f"output '{outputNode.GetName()}' is not in the input volume's scene")


def scalarVolumeArray(node, role: str):
    """The voxels of a scalar volume node that holds image data; InputError naming what `role` got."""
    if not _isScalarVolume(node):
        raise InputError(f"the {role} must be a scalar (grey-value) volume node, not {_kind(node)}")
    try:
        return arrayFromVolumeNode(node)
    except ValueError as error:
        raise InputError(str(error)) from None


def _isScalarVolume(node) -> bool:
    return hasattr(node, "GetClassName") and node.GetClassName() == SCALAR_VOLUME_CLASS


def _kind(node) -> str:
    """'a vtkMRMLLabelMapVolumeNode', 'a str': what was given instead of a volume node."""
    return f"a {node.GetClassName() if hasattr(node, 'GetClassName') else type(node).__name__}"


def _checkOptions(options: UpsampleOptions) -> None:
    """Settings of the wrong type, which the console call may be given (spacing="2", axis=2.0)."""
    if (options.factor is None) == (options.spacing is None):
        raise InputError("give either an upsampling factor or a target slice spacing")
    for setting in ("factor", "spacing", "maxMemoryGB"):
        value = getattr(options, setting)
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise InputError(f"{setting} must be a number, not {value!r}")
    if options.axis is not None and (isinstance(options.axis, bool) or not isinstance(options.axis, numbers.Integral)
                                     or options.axis not in (0, 1, 2)):
        raise InputError(f"axis must be None, 0, 1 or 2, not {options.axis!r}")
    for setting in ("keepAcquiredSlices", "matchNoise", "flipEnsemble", "bf16"):
        value = getattr(options, setting)
        if not isinstance(value, bool) and not (setting == "keepAcquiredSlices" and value is None):
            raise InputError(f"{setting} must be True or False, not {value!r}")
    if options.device not in DEVICES:
        raise InputError(f"device must be one of {', '.join(DEVICES)}, not {options.device!r}")
    if options.maxMemoryGB is not None and not 0 < options.maxMemoryGB < math.inf:
        raise InputError(f"maxMemoryGB must be a positive number, not {options.maxMemoryGB!r}")
    if options.weights and not os.path.isfile(options.weights):
        raise InputError(f"{options.weights}: weights file not found")


def upsampledAxis(inputNode, outputNode, axis=None) -> int:
    """The IJK axis a run upsampled: `axis` if given, else what the output node records, else the
    input's coarsest (what a run with axis None picks)."""
    if axis is None and outputNode is not None and outputNode.GetAttribute(SLICE_AXIS_ATTRIBUTE) in ("0", "1", "2"):
        axis = int(outputNode.GetAttribute(SLICE_AXIS_ATTRIBUTE))
    return geometry.slice_axis(tuple(inputNode.GetSpacing()), axis)


class UpsampleJob:
    """Upsample `inputNode`; `wait()` blocks, or `start()` + `poll()` + `finish()` from a timer."""

    def __init__(self, inputNode, options: UpsampleOptions, outputNode=None, python=None, libraryParent=None):
        self.inputNode = inputNode
        self.options = options
        self.outputNode = outputNode
        self.python = python or sys.executable
        self.libraryParent = libraryParent
        self.process = None
        self.folder = None
        self.inputPlacement = None  # the input's geometry and parent transform as written for the process
        self.abandonMessage = None  # why the run was cancelled when its nodes left the scene or the input moved

    def start(self) -> None:
        removeOrphanedFolders()
        try:
            self.folder = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX.format(pid=os.getpid())))
        except OSError as error:
            raise UpsampleFailed(f"cannot make a temporary folder in {tempfile.gettempdir()}: "
                                 f"{error.strerror or error}; nothing was started") from None
        self.inputPlacement = _placement(self.inputNode)
        try:
            inputPath = self.folder / "input.nrrd"
            writeVolumeNode(self.inputNode, inputPath)
            command = upsampleCommand(self.python, inputPath, self.folder / "output.nrrd", self.options)
            self.process = UpsampleProcess(command, self.libraryParent)
            self.process.start()
        except BaseException:
            self.cleanup()
            raise

    def poll(self) -> list:
        """The process's new events, after `_cancelIfAbandoned`."""
        self._cancelIfAbandoned()
        return self.process.poll()

    def _cancelIfAbandoned(self) -> None:
        """Cancel a run whose input or output node left the scene, or whose input was moved
        (its geometry or parent transform changed)."""
        if self.abandonMessage is None:
            self.abandonMessage = self._abandonMessage()
            if self.abandonMessage is not None:
                self.process.cancel()

    @property
    def finished(self) -> bool:
        return self.process.finished

    def cancel(self) -> None:
        self.process.cancel()

    def finish(self):
        """Read the result into the output node (created now) and remove the temporary files."""
        try:
            try:
                result = self.process.outcome()
            except UpsampleCancelled:
                raise UpsampleCancelled(self.abandonMessage or CANCELLED) from None
            try:
                return self._readOutput(result["output"])
            except KeyboardInterrupt:  # Ctrl-C in the read-back: _readOutput undid what it had changed
                raise UpsampleCancelled(CANCELLED) from None
            except OSError as error:  # read back outside the scene: nothing there has changed
                raise UpsampleFailed(f"{error}; nothing was changed") from None
        finally:
            self.cleanup()

    def wait(self, progressCallback: Optional[ProgressCallback] = None, idle: Optional[Callable[[], None]] = None):
        """Run to the end, blocking; returns the output node or raises. `idle` is called between
        polls (Slicer's processEvents): what the user does meanwhile can cancel the run, as in `poll`."""
        def between() -> None:
            if idle is not None:
                idle()
            self._cancelIfAbandoned()

        try:
            if self.process is None:
                self.start()  # writing the input takes seconds for a large volume: Ctrl-C may land there
            self.process.wait(progressCallback, idle=between)
        except KeyboardInterrupt:  # Ctrl-C in Slicer's console: the process is stopped
            self.cleanup()
            raise UpsampleCancelled(CANCELLED) from None
        except UpsampleCancelled:
            self.cleanup()
            raise UpsampleCancelled(self.abandonMessage or CANCELLED) from None
        except BaseException:
            self.cleanup()
            raise
        return self.finish()

    def cleanup(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _abandonMessage(self) -> Optional[str]:
        scene = self.inputNode.GetScene()
        name = self.inputNode.GetName()
        if scene is None or scene.GetNodeByID(self.inputNode.GetID()) is not self.inputNode:
            return f"'{name}' left the scene during the run; nothing was added"
        if self.outputNode is not None and self.outputNode.GetScene() is not scene:
            return f"output '{self.outputNode.GetName()}' left the scene during the run; nothing was added"
        if self.inputPlacement is not None and not _samePlacement(_placement(self.inputNode), self.inputPlacement):
            return (f"'{name}' was moved during the run (its geometry or transform changed), so the result "
                    "would not lie on it; nothing was added: run it again")
        return None

    def _readOutput(self, path):
        """The result read outside the scene, then handed to the output node: a read that fails
        or is interrupted leaves the scene and a chosen output node as they were."""
        abandoned = self._abandonMessage()
        if abandoned is not None:
            raise UpsampleCancelled(abandoned)
        result = readVolumeFile(path)
        alignAxes(result, self.inputNode)
        scene = self.inputNode.GetScene()
        node = self.outputNode
        before = None if node is None else (snapshotVolume(node), node.GetAttribute(SLICE_AXIS_ATTRIBUTE),
                                            node.GetTransformNodeID())
        try:
            if node is None:
                node = scene.AddNewNodeByClass(SCALAR_VOLUME_CLASS,
                                               scene.GenerateUniqueName(outputName(self.inputNode, self.options)))
                placeBeside(node, self.inputNode)
            replaceVolume(node, result)
            node.SetAttribute(SLICE_AXIS_ATTRIBUTE, str(geometry.slice_axis(tuple(self.inputNode.GetSpacing()), self.options.axis)))
            node.SetAndObserveTransformNodeID(self.inputNode.GetTransformNodeID())
            copyDisplay(self.inputNode, node)
        except BaseException:  # a node made here goes again; a chosen one gets back what it held
            if self.outputNode is None:
                if node is not None:
                    scene.RemoveNode(node)
            else:
                volume, axis, transform = before
                restoreVolume(node, volume)
                node.SetAttribute(SLICE_AXIS_ATTRIBUTE, axis)
                node.SetAndObserveTransformNodeID(transform)
            raise
        self.outputNode = node
        return node


def _placement(volumeNode) -> tuple:
    """Where a volume node's voxels lie: its IJK-to-RAS and parent transform."""
    return ijkToRas(volumeNode), volumeNode.GetTransformNodeID()


def _samePlacement(now: tuple, before: tuple) -> bool:
    """Equal but for rounding: setting a matrix to its own values can move it by an ulp."""
    return now[1] == before[1] and np.allclose(now[0], before[0], rtol=0, atol=1e-6)


def removeOrphanedFolders(root=None) -> None:
    """Remove run folders whose Slicer has ended: a crash of Slicer leaves its copy of the input
    volume there. Only on POSIX, where a process can be looked up without extra packages."""
    if os.name != "posix":
        return
    for folder in Path(root or tempfile.gettempdir()).glob("CycleINR-run-*"):
        owner = OWNED_FOLDER.match(folder.name)
        if owner and folder.is_dir() and not processExists(int(owner.group(1))):
            shutil.rmtree(folder, ignore_errors=True)


def processExists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def effectiveFactor(inputNode, options: UpsampleOptions) -> float:
    """The factor the run uses, also when the user gave a target spacing."""
    if options.factor is not None:
        return geometry.check_factor(options.factor)
    axis = geometry.slice_axis(tuple(inputNode.GetSpacing()), options.axis)
    return geometry.factor_for_spacing(inputNode.GetSpacing()[axis], options.spacing)


def outputName(inputNode, options: UpsampleOptions) -> str:
    return f"{inputNode.GetName()} x{factorLabel(effectiveFactor(inputNode, options))}"


def factorLabel(factor: float) -> str:
    """'2.5', '2.67'; never '1', which would say that nothing was upsampled (1.0001 stays 1.0001)."""
    for digits in range(3, 10):
        label = f"{factor:.{digits}g}"
        if float(label) > 1:
            break
    return label


def describeOutputGrid(size, spacing, bytesPerVoxel: int, axis=None, factor=None, targetSpacing=None) -> str:
    """The panel's live readout of what Apply will produce; raises InputError for bad settings
    and for an image Apply would refuse for its size (the rest of the checks read every voxel)."""
    if min(size) < 2:
        raise InputError(f"image of size {'x'.join(str(n) for n in size)} is {'empty' if min(size) < 1 else '2D (a single slice)'}; "
                         "a 3D volume is needed")
    axis = geometry.slice_axis(tuple(spacing), axis)
    if factor is None:
        factor = geometry.factor_for_spacing(spacing[axis], targetSpacing)
    factor = geometry.check_factor(factor)
    outSize, outSpacing = geometry.output_size_and_spacing(tuple(size), tuple(spacing), axis, factor)
    megabytes = outSize[0] * outSize[1] * outSize[2] * bytesPerVoxel / 1e6
    return (f"{AXIS_NAMES[axis]} axis x{factorLabel(factor)}: slice spacing {spacing[axis]:.4g} -> {outSpacing[axis]:.4g} mm, "
            f"{size[axis]} -> {outSize[axis]} slices; output {outSize[0]}x{outSize[1]}x{outSize[2]}, "
            f"{megabytes:.1f} MB")
