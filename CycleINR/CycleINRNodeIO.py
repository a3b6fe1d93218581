"""Volume node <-> NRRD file, through Slicer's own volume storage node.

The storage node converts between Slicer's RAS and the file's LPS, so the output node's
IJK-to-RAS is exactly what the command line wrote. Only MRML classes are used (no Qt, no
slicer.util): pytest runs this with the `slicer-core` package.
"""

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support


def writeVolumeNode(volumeNode, path) -> None:
    """Write the node's voxels and IJK-to-RAS geometry (parent transforms are not applied)."""
    storageNode = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storageNode.SetFileName(str(path))
    storageNode.SetUseCompression(0)  # a temporary file: speed over size
    if not storageNode.WriteData(volumeNode):
        raise OSError(f"could not write volume '{volumeNode.GetName()}' to {path}")


def readVolumeNode(path, scene, name: str, volumeNode=None):
    """Read a single volume file into `volumeNode`, or into a new scalar volume node in `scene`.

    The node keeps no reference to the file, which is temporary.
    """
    if volumeNode is None:
        volumeNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storageNode = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storageNode.SetFileName(str(path))
    storageNode.SetSingleFile(1)  # never pull in numbered neighbours as a series
    if not storageNode.ReadData(volumeNode):
        raise OSError(f"could not read the upsampled volume from {path}")
    return volumeNode


def copyDisplay(sourceNode, targetNode) -> None:
    """Give the output the input's colour map and window/level, so both look alike."""
    targetNode.CreateDefaultDisplayNodes()
    source, target = sourceNode.GetDisplayNode(), targetNode.GetDisplayNode()
    if source is None or target is None:
        return
    target.SetAndObserveColorNodeID(source.GetColorNodeID())
    target.SetAutoWindowLevel(source.GetAutoWindowLevel())
    if not source.GetAutoWindowLevel():
        target.SetWindowLevel(source.GetWindow(), source.GetLevel())


def arrayFromVolumeNode(volumeNode) -> np.ndarray:
    """The voxels as a numpy view in (k, j, i) order, as ITK and CycleINRLib hold them."""
    imageData = volumeNode.GetImageData()
    if imageData is None or imageData.GetPointData().GetScalars() is None:
        raise ValueError(f"volume '{volumeNode.GetName()}' holds no image data")
    if imageData.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"volume '{volumeNode.GetName()}' has {imageData.GetNumberOfScalarComponents()} "
                         "components per voxel; a scalar volume is needed")
    dimensions = imageData.GetDimensions()
    return numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars()).reshape(dimensions[::-1])


def ijkToRas(volumeNode) -> np.ndarray:
    """The node's 4x4 IJK-to-RAS matrix (without parent transforms)."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])
