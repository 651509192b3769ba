"""The module's parameter node (saved with the scene; GUI bound through SlicerParameterName).

Only loads inside Slicer (``slicer.parameterNodeWrapper`` is not part of slicer-core).
Choices that are not per-scene (device, speed, selected model, folders) live in QSettings.
"""

from typing import Annotated

from slicer import (
    vtkMRMLMarkupsROINode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
)
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper


@parameterNodeWrapper
class MaskSAMSlicerParameterNode:
    """
    inputVolume - the volume to auto-segment.
    outputSegmentation - where the result goes; None means a new segmentation node.
    cropToRoi, cropRoi - segment only inside a markups ROI (the result keeps the full grid).
    caseVolume, caseSegmentation - the pair the Train tab's "Add case" exports.
    allowNewClasses - segments whose names match no class add classes.
    iterations, learningRate, batchSize, outputModelName - training settings.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    cropToRoi: bool = False
    cropRoi: vtkMRMLMarkupsROINode
    caseVolume: vtkMRMLScalarVolumeNode
    caseSegmentation: vtkMRMLSegmentationNode
    allowNewClasses: bool = True
    iterations: Annotated[int, WithinRange(1, 1000000)] = 1000
    learningRate: Annotated[float, WithinRange(0.000001, 0.1)] = 0.001
    batchSize: Annotated[int, WithinRange(1, 64)] = 2
    outputModelName: str = "my-model"
