"""Volume nodes <-> files with exact geometry (no resampling, no precision loss).

Slicer stores a volume as voxels plus an IJK-to-RAS matrix; files (and MaskSAMLib) use ITK's
LPS convention (origin, spacing, direction). The conversion is exact: RAS and LPS differ by the
sign of the first two axes, and NRRD keeps doubles in text, so a volume written here and a label
map read back land on the very same grid. Arrays are ``(k, j, i)`` = ``(z, y, x)`` as
``slicer.util.arrayFromVolume`` returns them.

Uses MRML, ``slicer.util``, SimpleITK and numpy; no qt, no application object.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Geometry:
    """A 3D grid in LPS: size ``(x, y, z)``, spacing, origin, direction (row-major 3x3)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    def applyTo(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def differences(self, other: Geometry, relTol: float = 1e-6) -> list[str]:
        """What differs between two grids (empty when they agree)."""
        problems = []
        if tuple(self.size) != tuple(other.size):
            problems.append(f"size {self.size} vs {other.size}")
        scale = max(1.0, float(np.max(np.abs(self.spacing))))
        if not np.allclose(self.spacing, other.spacing, rtol=relTol, atol=relTol * scale):
            problems.append(f"spacing {self.spacing} vs {other.spacing}")
        extent = scale * max(self.size)
        if not np.allclose(self.origin, other.origin, rtol=0, atol=relTol * max(1.0, extent)):
            problems.append(f"origin {self.origin} vs {other.origin}")
        if not np.allclose(self.direction, other.direction, rtol=0, atol=relTol * 10):
            problems.append("direction")
        return problems


def ijkToRasMatrix(volumeNode) -> np.ndarray:
    """The node's IJK-to-RAS matrix (4x4, local coordinates: parent transforms excluded)."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def geometryFromMatrix(ijkToRas: np.ndarray, size) -> Geometry:
    """LPS geometry of a grid of ``size`` ``(x, y, z)`` voxels with this IJK-to-RAS matrix."""
    axes = ijkToRas[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        raise InputError("The volume has a zero voxel spacing; fix its geometry in Volumes.")
    directionRas = axes / spacing
    directionLps = _LPS_FROM_RAS @ directionRas
    originLps = _LPS_FROM_RAS @ ijkToRas[:3, 3]
    return Geometry(
        size=tuple(int(s) for s in size),
        spacing=tuple(float(s) for s in spacing),
        origin=tuple(float(o) for o in originLps),
        direction=tuple(float(d) for d in directionLps.reshape(-1)),
    )


def volumeSize(volumeNode) -> tuple[int, int, int]:
    imageData = volumeNode.GetImageData()
    if imageData is None:
        return (0, 0, 0)
    dims = imageData.GetDimensions()
    return (int(dims[0]), int(dims[1]), int(dims[2]))


def volumeGeometry(volumeNode) -> Geometry:
    return geometryFromMatrix(ijkToRasMatrix(volumeNode), volumeSize(volumeNode))


def checkScalarVolume(volumeNode, what: str = "input volume") -> None:
    """Refuse what MaskSAM cannot segment, with a message saying what to do."""
    if volumeNode is None:
        raise InputError(f"No {what} is selected; load a CT or MR volume and select it.")
    if not volumeNode.IsA("vtkMRMLScalarVolumeNode") or volumeNode.IsA(
        "vtkMRMLLabelMapVolumeNode"
    ):
        raise InputError(
            f"'{volumeNode.GetName()}' is not a scalar image volume; select a CT or MR volume."
        )
    imageData = volumeNode.GetImageData()
    if imageData is None or imageData.GetNumberOfPoints() == 0:
        raise InputError(f"'{volumeNode.GetName()}' holds no voxels; load the image again.")
    if imageData.GetNumberOfScalarComponents() != 1:
        raise InputError(
            f"'{volumeNode.GetName()}' has {imageData.GetNumberOfScalarComponents()} components "
            "per voxel (colour or vector image); MaskSAM needs a single-channel CT or MR volume."
        )
    size = volumeSize(volumeNode)
    if min(size) < 2:
        raise InputError(
            f"'{volumeNode.GetName()}' is 2D ({size[0]} x {size[1]} x {size[2]} voxels); MaskSAM "
            "segments 3D volumes: load the whole series."
        )


def ijkBoxFromRoi(roiNode, volumeNode) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Voxel box ``((i0, i1), (j0, j1), (k0, k1))`` (end exclusive) covering a markups ROI.

    The ROI's world bounds are brought into the volume's local frame (through the volume's
    parent transform when it has a linear one) and clipped to the volume.
    """
    import slicer
    import vtk

    bounds = [0.0] * 6
    roiNode.GetRASBounds(bounds)
    if bounds[1] < bounds[0]:
        raise InputError(f"The ROI '{roiNode.GetName()}' is not placed; place it on the volume.")
    worldToLocal = vtk.vtkMatrix4x4()
    parent = volumeNode.GetParentTransformNode()
    if parent is not None:
        if not parent.IsLinear():
            raise InputError(
                "The volume is under a non-linear transform; harden the transform before cropping."
            )
        slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(None, parent, worldToLocal)
    rasToIjk = np.linalg.inv(ijkToRasMatrix(volumeNode))
    toLocal = np.array([[worldToLocal.GetElement(r, c) for c in range(4)] for r in range(4)])
    corners = np.array(
        [[x, y, z, 1.0] for x in bounds[0:2] for y in bounds[2:4] for z in bounds[4:6]]
    )
    ijk = (rasToIjk @ toLocal @ corners.T).T[:, :3]
    size = volumeSize(volumeNode)
    box = []
    for axis in range(3):
        # voxels whose centre lies inside the ROI
        low = int(np.ceil(ijk[:, axis].min() - 1e-6))
        high = int(np.floor(ijk[:, axis].max() + 1e-6)) + 1
        low, high = max(0, low), min(size[axis], high)
        if high - low < 1:
            raise InputError(
                f"The ROI '{roiNode.GetName()}' does not overlap '{volumeNode.GetName()}'; move it "
                "onto the volume or turn cropping off."
            )
        box.append((low, high))
    if any(high - low < 2 for low, high in box):
        raise InputError(
            f"The ROI '{roiNode.GetName()}' cuts the volume to a single slice; enlarge it."
        )
    return box[0], box[1], box[2]


def writeVolumeNode(
    volumeNode,
    path: str | os.PathLike,
    *,
    ijkBox=None,
    compress: bool = False,
) -> Geometry:
    """Write the node's voxels (optionally a voxel box of them) with exact geometry.

    Returns the written grid. The file type comes from the extension (``.nrrd`` keeps doubles).
    """
    import slicer.util

    checkScalarVolume(volumeNode)
    array = slicer.util.arrayFromVolume(volumeNode)
    matrix = ijkToRasMatrix(volumeNode)
    if ijkBox is not None:
        (i0, i1), (j0, j1), (k0, k1) = ijkBox
        array = array[k0:k1, j0:j1, i0:i1]
        shifted = matrix.copy()
        shifted[:3, 3] = (matrix @ np.array([i0, j0, k0, 1.0]))[:3]
        matrix = shifted
    array = np.ascontiguousarray(array)
    geometry = geometryFromMatrix(matrix, (array.shape[2], array.shape[1], array.shape[0]))
    image = geometry.applyTo(sitk.GetImageFromArray(array))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=compress)
    return geometry


def writeLabelArray(array: np.ndarray, geometry: Geometry, path: str | os.PathLike,
                    *, compress: bool = True) -> None:
    """Write a label map ``(z, y, x)`` (uint8 or uint16) on ``geometry``."""
    high = int(array.max()) if array.size else 0
    dtype = np.uint8 if high < 256 else np.uint16
    image = geometry.applyTo(sitk.GetImageFromArray(np.ascontiguousarray(array.astype(dtype))))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=compress)


def readLabelMap(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """A label map file as ``(array (z, y, x), geometry)``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"The label map {path} was not written; see the log for the reason.")
    image = sitk.ReadImage(str(path))
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path} is not a 3D label map.")
    geometry = Geometry(
        size=tuple(int(s) for s in image.GetSize()),
        spacing=tuple(float(s) for s in image.GetSpacing()),
        origin=tuple(float(o) for o in image.GetOrigin()),
        direction=tuple(float(d) for d in image.GetDirection()),
    )
    return sitk.GetArrayFromImage(image), geometry


def voxelVolumeMl(volumeNode) -> float:
    """Volume of one voxel in millilitres."""
    spacing = volumeNode.GetSpacing()
    return float(spacing[0] * spacing[1] * spacing[2]) / 1000.0
