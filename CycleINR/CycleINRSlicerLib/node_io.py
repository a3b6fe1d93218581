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


def readVolumeFile(path):
    """A new scalar volume node, in no scene, with a single volume file's voxels and IJK-to-RAS.

    Outside the scene so that a read that fails or is interrupted touches nothing the user has
    (Slicer's reader empties the node it reads into before it knows the file is whole).
    """
    volumeNode = slicer.vtkMRMLScalarVolumeNode()
    storageNode = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storageNode.SetFileName(str(path))
    storageNode.SetSingleFile(1)  # never pull in numbered neighbours as a series
    if not storageNode.ReadData(volumeNode) or volumeNode.GetImageData() is None:
        raise OSError(f"could not read the upsampled volume from {path}")
    return volumeNode


def snapshotVolume(volumeNode) -> tuple:
    """What `restoreVolume` gives back: the node's image data and IJK-to-RAS."""
    return volumeNode.GetImageData(), _matrix(volumeNode)


def replaceVolume(targetNode, sourceNode) -> None:
    """Give `targetNode` the voxels and IJK-to-RAS of `sourceNode`, in one modification (views
    never draw the new matrix over the old voxels). The target keeps its storage node (where
    the user saves it)."""
    restoreVolume(targetNode, snapshotVolume(sourceNode))


def restoreVolume(targetNode, snapshot: tuple) -> None:
    imageData, matrix = snapshot
    wasModifying = targetNode.StartModify()
    targetNode.SetIJKToRASMatrix(matrix)
    targetNode.SetAndObserveImageData(imageData)
    targetNode.EndModify(wasModifying)


def _matrix(volumeNode):
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return matrix


def alignAxes(volumeNode, referenceNode) -> None:
    """Slicer's NRRD storage reads a volume with a left-handed IJK-to-RAS matrix back with the
    index order of an axis reversed (the voxels stay where they are in RAS, the origin moves to
    the other end); reverse such axes back, so that the node's origin and axis directions are the
    reference's, as the output grid convention says."""
    have, reference = ijkToRas(volumeNode), ijkToRas(referenceNode)
    flipped = [axis for axis in range(3) if np.dot(have[:3, axis], reference[:3, axis]) < 0]
    if not flipped:
        return
    dimensions = volumeNode.GetImageData().GetDimensions()
    farCorner = np.array([dimensions[axis] - 1 if axis in flipped else 0 for axis in range(3)] + [1])
    wanted = have.copy()
    wanted[:, 3] = have @ farCorner
    wanted[:3, flipped] *= -1
    voxels = arrayFromVolumeNode(volumeNode)  # a view of the node's buffer, (k, j, i)
    voxels[...] = np.flip(voxels, axis=tuple(2 - axis for axis in flipped)).copy()
    volumeNode.GetImageData().GetPointData().GetScalars().Modified()
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, wanted[row, column])
    volumeNode.SetIJKToRASMatrix(matrix)


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
    matrix = _matrix(volumeNode)
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def placeBeside(node, referenceNode) -> None:
    """In the Data module, put `node` where `referenceNode` is (a DICOM volume's study), not at
    the top of the scene."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
    reference = hierarchy.GetItemByDataNode(referenceNode)
    if not reference:
        return
    parent = hierarchy.GetItemParent(reference)
    item = hierarchy.GetItemByDataNode(node)
    if item:  # Slicer's subject hierarchy logic made one when the node was added
        hierarchy.SetItemParent(item, parent)
    else:
        hierarchy.CreateItem(parent, node)
