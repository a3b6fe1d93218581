"""One upsampling run from a volume node to a new volume node, without Qt.

input node -> temporary NRRD -> `cycleinr upsample` process -> output node. The temporary
folder is removed in every case (success, bad input, crash, cancel), and the scene only
changes once a complete output has been read back.
"""

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

from CycleINRLib import geometry
from CycleINRNodeIO import copyDisplay, readVolumeNode, writeVolumeNode
from CycleINRProcess import ProgressCallback, UpsampleOptions, UpsampleProcess, upsampleCommand

AXIS_NAMES = ("I", "J", "K")


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

    def start(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="CycleINR-"))
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
        return self.process.poll()

    @property
    def finished(self) -> bool:
        return self.process.finished

    def cancel(self) -> None:
        self.process.cancel()

    def finish(self):
        """Read the result into the output node (created now) and remove the temporary files."""
        try:
            result = self.process.outcome()
            return self._readOutput(result["output"])
        finally:
            self.cleanup()

    def wait(self, progressCallback: Optional[ProgressCallback] = None):
        """Run to the end, blocking; returns the output node or raises."""
        if self.process is None:
            self.start()
        try:
            self.process.wait(progressCallback)
        except BaseException:
            self.cleanup()
            raise
        return self.finish()

    def cleanup(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _readOutput(self, path):
        scene = self.inputNode.GetScene()
        name = scene.GenerateUniqueName(outputName(self.inputNode, self.options))
        node = readVolumeNode(path, scene, name, self.outputNode)
        node.SetAndObserveTransformNodeID(self.inputNode.GetTransformNodeID())
        copyDisplay(self.inputNode, node)
        self.outputNode = node
        return node


def effectiveFactor(inputNode, options: UpsampleOptions) -> float:
    """The factor the run uses, also when the user gave a target spacing."""
    if options.factor is not None:
        return geometry.check_factor(options.factor)
    axis = geometry.slice_axis(tuple(inputNode.GetSpacing()), options.axis)
    return geometry.factor_for_spacing(inputNode.GetSpacing()[axis], options.spacing)


def outputName(inputNode, options: UpsampleOptions) -> str:
    return f"{inputNode.GetName()} x{effectiveFactor(inputNode, options):.3g}"


def describeOutputGrid(size, spacing, bytesPerVoxel: int, axis=None, factor=None, targetSpacing=None) -> str:
    """The panel's live readout of what Apply will produce; raises InputError for bad settings."""
    axis = geometry.slice_axis(tuple(spacing), axis)
    if factor is None:
        factor = geometry.factor_for_spacing(spacing[axis], targetSpacing)
    factor = geometry.check_factor(factor)
    outSize, outSpacing = geometry.output_size_and_spacing(tuple(size), tuple(spacing), axis, factor)
    megabytes = outSize[0] * outSize[1] * outSize[2] * bytesPerVoxel / 1e6
    return (f"{AXIS_NAMES[axis]} axis x{factor:.3g}: slice spacing {spacing[axis]:.3g} -> {outSpacing[axis]:.3g} mm, "
            f"{size[axis]} -> {outSize[axis]} slices; output {outSize[0]}x{outSize[1]}x{outSize[2]}, "
            f"{megabytes:.1f} MB")
