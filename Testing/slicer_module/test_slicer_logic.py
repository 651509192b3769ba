"""MaskSAMSlicer logic against a real MRML scene (slicer-core), real child processes.

No Slicer application here: the logic classes use MRML and ``slicer.util`` only, so they run
on ``slicer-core``. Segment/train end-to-end tests run the real ``python -m MaskSAMLib`` child and
skip (saying why) while those subcommands are not in the CLI yet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "MaskSAMSlicer"

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install "
                                              "slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)
SimpleITK = pytest.importorskip("SimpleITK")
psutil = pytest.importorskip("psutil")

import slicer.util  # noqa: E402
import vtk  # noqa: E402

if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from MaskSAMSlicerLib import volumeIO  # noqa: E402
from MaskSAMSlicerLib.errors import (  # noqa: E402
    CancelledError,
    ChildFailedError,
    InputError,
    ModelError,
    ReplaceNotConfirmedError,
    TrainingCaseError,
)
from MaskSAMSlicerLib.modelRegistry import ModelRegistry, readModelDir  # noqa: E402
from MaskSAMSlicerLib.process import ProcessRunner, childEnvironment, masksamCommand  # noqa: E402
from MaskSAMSlicerLib.segmentationLogic import (  # noqa: E402
    SegmentationLogic,
    describeDevices,
    deviceProbeCommand,
    registerSegmentationConverterRules,
)
from MaskSAMSlicerLib.trainingCases import TrainingCaseStore  # noqa: E402
from MaskSAMSlicerLib.trainingLogic import TrainingCurves, TrainingLogic  # noqa: E402

from MaskSAMLib.files import sha256_file as sha256OfFile  # noqa: E402

PY = sys.executable
LIVER_TERMINOLOGY = (
    "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical "
    "Structure~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"
)
LABELS = [
    {"value": 0, "name": "background", "color": [0, 0, 0], "terminology": None},
    {"value": 1, "name": "liver", "color": [221, 130, 101], "terminology": LIVER_TERMINOLOGY},
    {"value": 2, "name": "spleen", "color": [157, 108, 162], "terminology": None},
    {"value": 4, "name": "kidney_left", "color": [185, 102, 83], "terminology": None},
]


def cliSubcommands() -> set[str]:
    """Subcommands of MaskSAMLib's CLI (empty when the CLI cannot be built right now)."""
    try:
        from MaskSAMLib.cli import build_parser

        parser = build_parser()
    except Exception:  # noqa: BLE001 - a library mid-change must not break collection
        return set()
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            return set(action.choices)
    return set()


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def converterRules():
    registerSegmentationConverterRules()


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def directionRas(angleDeg: float = 20.0) -> np.ndarray:
    """An oblique rotation with one flipped axis (a realistic awkward direction)."""
    a = np.deg2rad(angleDeg)
    rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    return rot @ np.diag([1.0, -1.0, 1.0])


def makeVolume(scene, array, *, spacing=(0.8, 0.7, 2.5), origin=(12.5, -30.25, 40.0),
               direction=None, name="ct", labelmap=False):
    cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(cls, name)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin)
    direction = directionRas() if direction is None else direction
    node.SetIJKToRASDirections(*[float(v) for v in np.asarray(direction).T.reshape(-1)])
    return node


def phantomArray(shape=(12, 20, 24)) -> np.ndarray:
    """(z, y, x) CT-like numbers: a bright block (liver-ish) and a dark block."""
    array = np.full(shape, -100, dtype=np.int16)
    array[2:9, 3:12, 4:14] = 200
    array[3:8, 13:18, 15:22] = -700
    return array


def addSegment(segNode, name, mask, referenceVolume, color=(1, 0, 0)):
    """Add a segment from a (z, y, x) mask on the reference volume's grid (no slicer.app)."""
    scene = segNode.GetScene()
    segmentation = segNode.GetSegmentation()
    segmentId = segmentation.AddEmptySegment("", name, color)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    slicer.util.updateVolumeFromArray(labelmap, mask.astype(np.uint8))
    labelmap.CopyOrientation(referenceVolume)
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segmentId)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
        labelmap, segNode, ids)
    scene.RemoveNode(labelmap)
    return segmentId


def exportSegment(segNode, segmentId, referenceVolume) -> np.ndarray:
    scene = segNode.GetScene()
    out = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segmentId)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        segNode, ids, out, referenceVolume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
    )
    array = slicer.util.arrayFromVolume(out).copy()
    scene.RemoveNode(out)
    return array


def nodeIds(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


@pytest.fixture(scope="session")
def tinyModelDir(tmp_path_factory) -> Path:
    """A real MaskSAM model folder (tiny backbone, random weights) made by the real CLI."""
    root = tmp_path_factory.mktemp("tiny-model")
    labels = root / "labels.json"
    labels.write_text(json.dumps(["background", "liver", "spleen"]))
    out = root / "tiny"
    result = subprocess.run(
        [PY, "-m", "MaskSAMLib", "init", "--backbone", "tiny", "--labels", str(labels),
         "--out", str(out)],
        cwd=REPO, env=childEnvironment(extraPythonPath=str(REPO)), capture_output=True,
        text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return out


# ----------------------------------------------------------------------------- volumeIO
def test_volume_written_with_exact_geometry_and_voxels(scene, tmp_path):
    array = phantomArray()
    volume = makeVolume(scene, array)
    path = tmp_path / "ct.nrrd"
    geometry = volumeIO.writeVolumeNode(volume, path)
    image = SimpleITK.ReadImage(str(path))
    assert image.GetSize() == (24, 20, 12)
    np.testing.assert_array_equal(SimpleITK.GetArrayFromImage(image), array)
    assert image.GetSpacing() == pytest.approx(geometry.spacing, abs=1e-12)
    # Every voxel centre maps to the same physical point in Slicer (RAS) and in the file (LPS).
    ijkToRas = volumeIO.ijkToRasMatrix(volume)
    for ijk in [(0, 0, 0), (23, 19, 11), (5, 7, 3)]:
        ras = ijkToRas @ np.array([*ijk, 1.0])
        lps = image.TransformIndexToPhysicalPoint(ijk)
        assert (-lps[0], -lps[1], lps[2]) == pytest.approx(tuple(ras[:3]), abs=1e-9)


def test_bad_volumes_are_refused_with_a_message(scene):
    with pytest.raises(InputError, match="No input volume"):
        volumeIO.checkScalarVolume(None)
    flat = makeVolume(scene, np.zeros((1, 20, 20), np.int16), name="slice")
    with pytest.raises(InputError, match="is 2D"):
        volumeIO.checkScalarVolume(flat)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError, match="holds no voxels"):
        volumeIO.checkScalarVolume(empty)
    label = makeVolume(scene, np.zeros((4, 4, 4), np.uint8), labelmap=True, name="lab")
    with pytest.raises(InputError, match="not a scalar image"):
        volumeIO.checkScalarVolume(label)


def test_roi_box_covers_the_roi_and_refuses_a_miss(scene):
    volume = makeVolume(scene, phantomArray(), direction=np.eye(3), origin=(0, 0, 0),
                        spacing=(1.0, 1.0, 2.0))
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "roi")
    roi.SetXYZ(10.0, 8.0, 10.0)
    roi.SetRadiusXYZ(4.0, 3.0, 4.0)
    assert volumeIO.ijkBoxFromRoi(roi, volume) == ((6, 15), (5, 12), (3, 8))
    roi.SetXYZ(500.0, 500.0, 500.0)
    with pytest.raises(InputError, match="does not overlap"):
        volumeIO.ijkBoxFromRoi(roi, volume)


# ----------------------------------------------------------------------------- label map import
def test_label_map_becomes_named_coloured_segments_on_the_volume_grid(scene):
    array = phantomArray()
    volume = makeVolume(scene, array)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    labels = np.zeros(array.shape, np.uint8)
    labels[array == 200] = 1
    labels[array == -700] = 4
    labels[0, 0, 0] = 9  # not a class of the model
    result = SegmentationLogic(scene).importLabelArray(labels, volume, LABELS)
    seg = result.segmentationNode
    segmentation = seg.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName()
             for i in range(segmentation.GetNumberOfSegments())]
    assert names == ["liver", "spleen", "kidney_left"]
    liver = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("liver"))
    assert liver.GetColor() == pytest.approx((221 / 255, 130 / 255, 101 / 255))
    assert liver.GetTerminology() == LIVER_TERMINOLOGY
    # Reference geometry is the input volume's (what DICOM SEG export needs) ...
    reference = seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole())
    assert reference is volume
    # ... the segmentation follows the volume's transform, and 3D surfaces exist.
    assert seg.GetTransformNodeID() == transform.GetID()
    assert segmentation.ContainsRepresentation("Closed surface")
    # Voxel for voxel, each segment is its class in the label map.
    for row in result.summary:
        exported = exportSegment(seg, row["segmentId"], volume)
        np.testing.assert_array_equal(exported > 0, labels == row["value"])
    voxelMl = 0.8 * 0.7 * 2.5 / 1000
    summary = {row["name"]: row for row in result.summary}
    assert summary["liver"]["volumeMl"] == pytest.approx((array == 200).sum() * voxelMl)
    assert summary["spleen"]["voxels"] == 0
    assert any("[9]" in w for w in result.warnings)
    assert any("spleen" in w for w in result.warnings)
    assert scene.GetFirstNodeByName("__masksam_tmp__") is None


def converterRuleNames() -> list[str]:
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    return sorted(rule.GetClassName() for rule in factory.GetConverterRules())


def test_converter_rules_do_not_pile_up_over_several_runs(scene, tmp_path):
    """Each Apply and Add case once created a module logic whose SetMRMLScene registered the
    four rules again (4 -> 8 -> 12, with a warning each time)."""
    before = converterRuleNames()
    assert len(before) == 4
    logic = SegmentationLogic(scene)
    store = TrainingCaseStore(tmp_path / "cases")
    array = phantomArray()
    labels = np.zeros(array.shape, np.uint8)
    labels[array == 200] = 1
    for run in range(3):
        volume = makeVolume(scene, array)
        result = logic.importLabelArray(labels, volume, LABELS)
        store.addCase(volume, result.segmentationNode)
        registerSegmentationConverterRules()
        assert converterRuleNames() == before, f"after run {run + 1}"


def test_existing_segmentation_is_replaced_only_when_confirmed(scene):
    array = phantomArray()
    volume = makeVolume(scene, array)
    existing = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my work")
    existing.CreateDefaultDisplayNodes()
    addSegment(existing, "my annotation", array > 0, volume)
    before = nodeIds(scene)
    labels = (array == 200).astype(np.uint8)
    logic = SegmentationLogic(scene)
    with pytest.raises(ReplaceNotConfirmedError, match="my work"):
        logic.importLabelArray(labels, volume, LABELS, outputSegmentationNode=existing)
    assert nodeIds(scene) == before
    assert existing.GetSegmentation().GetNthSegment(0).GetName() == "my annotation"
    result = logic.importLabelArray(labels, volume, LABELS, outputSegmentationNode=existing,
                                    replaceConfirmed=True)
    assert result.segmentationNode is existing
    assert existing.GetSegmentation().GetNthSegment(0).GetName() == "liver"
    assert existing.GetSegmentation().GetNumberOfSegments() == 3
    # Only the existing node's display/storage helpers: no stray segmentation nodes left.
    assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 1


# ----------------------------------------------------------------------------- child pipeline
FAKE_SEGMENT = textwrap.dedent(
    """
    import json, os, sys, time
    import numpy as np, SimpleITK as sitk
    args = sys.argv[1:]
    src, out = args[0], args[args.index("--out") + 1]
    def emit(**e):
        print(json.dumps({"v": 1, **e}), flush=True)
    emit(event="start", stage="segment", done=0, total=3, device="cpu")
    print("reading " + src, file=sys.stderr, flush=True)
    delay = float(os.environ.get("FAKE_DELAY", "0"))
    if os.environ.get("FAKE_GRANDCHILD"):
        import subprocess
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(os.environ["FAKE_GRANDCHILD"], "w") as f:
            f.write(str(child.pid))
    for i in range(1, 3):
        time.sleep(delay)
        emit(event="progress", stage="segment", done=i, total=3, eta_s=delay)
    if os.environ.get("FAKE_FAIL"):
        emit(event="error", message="Out of memory on cuda; use --fast or the CPU.")
        print("error: Out of memory on cuda; use --fast or the CPU.", file=sys.stderr)
        sys.exit(1)
    image = sitk.ReadImage(src)
    a = sitk.GetArrayFromImage(image)
    lab = np.zeros(a.shape, np.uint8)
    lab[a == 200] = 1
    lab[a == -700] = 2
    result = sitk.GetImageFromArray(lab)
    result.CopyInformation(image)
    sitk.WriteImage(result, out)
    emit(event="done", stage="segment", output=out)
    """
)


class FakeSegmentLogic(SegmentationLogic):
    """The real logic with the child swapped for a stand-in script (same arguments)."""

    def __init__(self, scene, script: Path, **kwargs):
        super().__init__(scene, python=PY, **kwargs)
        self.script = script

    def buildCommand(self, inputPath, model, outputPath, device, speed):
        args = super().buildCommand(inputPath, model, outputPath, device, speed)
        assert args[1:4] == ["-m", "MaskSAMLib", "segment"]
        return [PY, str(self.script), *args[4:]]


@pytest.fixture
def fakeScript(tmp_path) -> Path:
    path = tmp_path / "fake_segment.py"
    path.write_text(FAKE_SEGMENT)
    return path


def test_segmentation_pipeline_with_crop_lands_on_the_full_grid(scene, tmp_path, fakeScript,
                                                                 tinyModelDir, monkeypatch):
    array = phantomArray()
    volume = makeVolume(scene, array)
    # ROI around the bright block only (in world coordinates of this oblique volume).
    ijkToRas = volumeIO.ijkToRasMatrix(volume)
    centre = ijkToRas @ np.array([8.5, 7.0, 5.5, 1.0])
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "roi")
    roi.SetXYZ(*centre[:3])
    roi.SetRadiusXYZ(4.0, 4.0, 8.0)
    events = []
    logic = FakeSegmentLogic(scene, fakeScript, tempRoot=str(tmp_path))
    model = readModelDir(tinyModelDir)
    model.labels = LABELS[:3]
    monkeypatch.setattr(SegmentationLogic, "resolveModel", staticmethod(lambda m: model))
    job = logic.startSegmentation(volume, model, device="CPU", speed="Fast", roiNode=roi,
                                  onEvent=events.append)
    args = job.runner.args
    assert "--fast" in args and args[args.index("--device") + 1] == "cpu"
    assert job.runner.env["CUDA_VISIBLE_DEVICES"] == "-1"
    assert job.ijkBox is not None and job.inputGeometry.size != volumeIO.volumeSize(volume)
    job.runner.wait(timeout=60)
    assert [e["event"] for e in events if e["event"] != "stderr"] == [
        "start", "progress", "progress", "done", "exit"]
    assert job.gpuDescription == "cpu"
    result = logic.finishSegmentation(job)
    (i0, i1), (j0, j1), (k0, k1) = job.ijkBox
    expected = np.zeros(array.shape, bool)
    expected[k0:k1, j0:j1, i0:i1] = (array == 200)[k0:k1, j0:j1, i0:i1]
    liverId = result.summary[0]["segmentId"]
    np.testing.assert_array_equal(exportSegment(result.segmentationNode, liverId, volume) > 0,
                                  expected)
    assert expected.sum() > 0
    assert not job.workDir.exists()


def test_failed_child_reports_its_message_and_adds_nothing(scene, tmp_path, fakeScript,
                                                          tinyModelDir, monkeypatch):
    volume = makeVolume(scene, phantomArray())
    before = nodeIds(scene)
    logic = FakeSegmentLogic(scene, fakeScript, tempRoot=str(tmp_path),
                             environment={**os.environ, "FAKE_FAIL": "1"})
    job = logic.startSegmentation(volume, tinyModelDir)
    job.runner.wait(timeout=60)
    with pytest.raises(ChildFailedError, match="Out of memory"):
        logic.finishSegmentation(job)
    assert nodeIds(scene) == before


def test_cancel_kills_the_child_tree_and_leaves_the_scene_untouched(scene, tmp_path, fakeScript,
                                                                   tinyModelDir):
    volume = makeVolume(scene, phantomArray())
    existing = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "keep me")
    addSegment(existing, "mine", phantomArray() > 0, volume)
    before = nodeIds(scene)
    pidFile = tmp_path / "grandchild.pid"
    logic = FakeSegmentLogic(scene, fakeScript, tempRoot=str(tmp_path),
                             environment={**os.environ, "FAKE_DELAY": "30",
                                          "FAKE_GRANDCHILD": str(pidFile)})
    job = logic.startSegmentation(volume, tinyModelDir, outputSegmentationNode=existing,
                                  replaceConfirmed=True)
    deadline = time.monotonic() + 30
    while not pidFile.exists() or not pidFile.read_text():
        job.runner.poll()
        assert time.monotonic() < deadline, "the stand-in child did not start its grandchild"
        time.sleep(0.05)
    grandchild = int(pidFile.read_text())
    childPid = job.runner.pid
    assert psutil.pid_exists(grandchild)
    started = time.monotonic()
    logic.cancel(job)
    job.runner.wait(timeout=30)
    assert time.monotonic() - started < 15
    with pytest.raises(CancelledError):
        logic.finishSegmentation(job, outputSegmentationNode=existing, replaceConfirmed=True)
    for pid in (childPid, grandchild):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert nodeIds(scene) == before
    assert existing.GetSegmentation().GetNthSegment(0).GetName() == "mine"
    assert not job.workDir.exists()


def test_replace_is_refused_before_the_child_starts(scene, tmp_path, fakeScript, tinyModelDir):
    volume = makeVolume(scene, phantomArray())
    existing = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "keep me")
    addSegment(existing, "mine", phantomArray() > 0, volume)
    logic = FakeSegmentLogic(scene, fakeScript, tempRoot=str(tmp_path))
    with pytest.raises(ReplaceNotConfirmedError):
        logic.startSegmentation(volume, tinyModelDir, outputSegmentationNode=existing)
    assert list(tmp_path.glob("MaskSAMSlicer-segment-*")) == []


def test_missing_or_corrupt_model_is_a_clear_error(scene, tmp_path, tinyModelDir):
    volume = makeVolume(scene, phantomArray())
    logic = SegmentationLogic(scene, python=PY, tempRoot=str(tmp_path))
    with pytest.raises(ModelError, match="No model is selected"):
        logic.startSegmentation(volume, "")
    with pytest.raises(ModelError, match="does not exist"):
        logic.startSegmentation(volume, tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tinyModelDir / "config.json").read_text())
    weights = (tinyModelDir / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ModelError, match="truncated"):
        logic.startSegmentation(volume, broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        logic.startSegmentation(volume, broken)
    assert list(tmp_path.glob("MaskSAMSlicer-segment-*")) == []


# ----------------------------------------------------------------------------- training cases
def makeCase(scene, names_masks, *, name="case", direction=None, shape=(10, 16, 18)):
    array = phantomArray(shape)
    volume = makeVolume(scene, array, name=f"{name} volume", direction=direction)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name} segmentation")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for segmentName, mask in names_masks(array):
        addSegment(seg, segmentName, mask, volume)
    return volume, seg, array


def test_scene_pairs_export_to_an_nnunet_dataset_with_exact_geometry(scene, tmp_path):
    store = TrainingCaseStore(tmp_path / "cases")
    vol1, seg1, a1 = makeCase(scene, lambda a: [("Liver", a == 200), ("spleen", a == -700)],
                              name="first")
    vol2, seg2, a2 = makeCase(scene, lambda a: [("liver", a == 200), ("Kidney Left", a == -700)],
                              name="second", direction=np.eye(3), shape=(12, 14, 20))
    first = store.addCase(vol1, seg1)
    second = store.addCase(vol2, seg2)
    assert store.labels() == {"background": 0, "Liver": 1, "spleen": 2, "Kidney Left": 3}
    assert first["classes"] == ["Liver", "spleen"] and second["classes"] == ["Kidney Left", "Liver"]
    dataset = json.loads((store.folder / "dataset.json").read_text())
    assert dataset["numTraining"] == 2 and dataset["file_ending"] == ".nrrd"
    assert dataset["channel_names"] == {"0": "CT"}
    for entry, volume, array, expected in (
        (first, vol1, a1, {1: 200, 2: -700}), (second, vol2, a2, {1: 200, 3: -700}),
    ):
        imagePath, labelPath = store.casePaths(entry["caseId"])
        image, label = SimpleITK.ReadImage(str(imagePath)), SimpleITK.ReadImage(str(labelPath))
        geometry = volumeIO.volumeGeometry(volume)
        for sitkImage in (image, label):
            assert sitkImage.GetSize() == geometry.size
            assert sitkImage.GetSpacing() == pytest.approx(geometry.spacing, abs=1e-12)
            assert sitkImage.GetOrigin() == pytest.approx(geometry.origin, abs=1e-12)
            assert sitkImage.GetDirection() == pytest.approx(geometry.direction, abs=1e-12)
        np.testing.assert_array_equal(SimpleITK.GetArrayFromImage(image), array)
        labelArray = SimpleITK.GetArrayFromImage(label)
        for value, intensity in expected.items():
            np.testing.assert_array_equal(labelArray == value, array == intensity)
    # MaskSAMLib's own dataset validation accepts the export.
    from MaskSAMLib.data.dataset_json import load_dataset, validate_dataset

    spec = load_dataset(store.folder)
    validate_dataset(spec, tol=1e-9)
    assert [c.case_id for c in spec.cases] == ["case_0001", "case_0002"]
    # The manifest persists: a new store on the same folder sees the same cases and labels.
    again = TrainingCaseStore(tmp_path / "cases")
    assert again.labels() == store.labels() and len(again.cases()) == 2
    assert again.missingClassesPerCase() == {"case_0001": ["Kidney Left"],
                                             "case_0002": ["spleen"]}
    # Re-adding a corrected pair replaces it; removing deletes its files.
    again.addCase(vol1, seg1)
    assert [c["caseId"] for c in again.cases()] == ["case_0001", "case_0002"]
    again.removeCase("case_0002")
    assert not any(p.exists() for p in again.casePaths("case_0002"))
    assert json.loads((again.folder / "dataset.json").read_text())["numTraining"] == 1


def test_unmatched_segment_names_and_empty_segmentations_are_refused(scene, tmp_path):
    store = TrainingCaseStore(tmp_path / "cases")
    store.addClasses(LABELS)
    volume, seg, _ = makeCase(scene, lambda a: [("LIVER", a == 200), ("tumour", a == -700)])
    with pytest.raises(TrainingCaseError, match=r"'tumour'.*known classes: liver, spleen"):
        store.addCase(volume, seg, allowNewClasses=False)
    assert store.isEmpty() and not (store.folder / "imagesTr").exists()
    entry = store.addCase(volume, seg, allowNewClasses=True)
    assert store.labels()["tumour"] == 5 and entry["classes"] == ["liver", "tumour"]
    emptySeg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nothing")
    with pytest.raises(TrainingCaseError, match="has no segments"):
        store.addCase(volume, emptySeg)
    with pytest.raises(TrainingCaseError, match="value 3 in the model"):
        store.addClasses({"background": 0, "liver": 3})


def test_training_checks_cases_and_base_model_classes(scene, tmp_path, tinyModelDir):
    store = TrainingCaseStore(tmp_path / "cases")
    store.writeDatasetJson()
    logic = TrainingLogic(scene, python=PY)
    with pytest.raises(TrainingCaseError, match="no training cases"):
        logic.checkDataset(store.folder)
    volume, seg, _ = makeCase(scene, lambda a: [("liver", a == 200)])
    store.addCase(volume, seg)
    logic.checkDataset(store.folder)
    model = readModelDir(tinyModelDir)
    with pytest.raises(TrainingCaseError, match=r"lack \(spleen\)"):
        logic.checkDataset(store.folder, initModel=model)
    args = logic.buildCommand(store.folder, tmp_path / "out", backbone="tiny", iterations=5,
                              batchSize=1, learningRate=1e-4, device="CPU")
    assert args[1:4] == ["-m", "MaskSAMLib", "train"]
    assert args[args.index("--backbone") + 1] == "tiny" and "--resume" not in args
    assert args[-2:] == ["--progress", "json"]
    with pytest.raises(InputError, match="SAM checkpoint"):
        logic.buildCommand(store.folder, tmp_path / "out", backbone="vit_b")
    args = logic.buildCommand(store.folder, tmp_path / "out", initModel=model, resume=True)
    assert args[args.index("--init") + 1] == str(tinyModelDir) and "--resume" in args


def test_training_curves_fill_plot_tables(scene):
    logic = TrainingLogic(scene, python=PY)
    chart = logic.createCurveNodes()
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    curves = TrainingCurves()
    for event in (
        {"event": "progress", "stage": "train", "done": 1, "total": 10, "loss": 2.5},
        {"event": "progress", "stage": "train", "done": 2, "total": 10, "loss": 2.0},
        {"event": "metric", "stage": "validate", "done": 2, "dice": {"liver": 0.5, "spleen": 0.7}},
        {"event": "log", "message": "hello"},
    ):
        curves.update(event)
    logic.updateCurveTables(curves)
    assert curves.loss == [(1, 2.5), (2, 2.0)] and curves.dice == [(2, pytest.approx(0.6))]
    loss = logic.lossTableNode.GetTable()
    assert loss.GetNumberOfRows() == 2 and loss.GetValue(1, 1).ToDouble() == 2.0
    assert logic.diceTableNode.GetTable().GetValue(0, 1).ToDouble() == pytest.approx(0.6)


def test_stop_file_stops_training_child_cleanly(tmp_path):
    """Stop writes OUT/STOP; a trainer that honours it exits 130 without being killed."""
    out = tmp_path / "model"
    out.mkdir()
    script = tmp_path / "fake_train.py"
    script.write_text(textwrap.dedent(
        """
        import json, os, sys, time
        out = sys.argv[1]
        def emit(**event):
            print(json.dumps({"v": 1, **event}), flush=True)
        emit(event="start", stage="train", done=0, total=100)
        for i in range(1, 1000):
            if os.path.exists(os.path.join(out, "STOP")):
                open(os.path.join(out, "checkpoint.pt"), "w").write("saved")
                emit(event="log", message="stopped, checkpoint saved")
                sys.exit(130)
            emit(event="progress", stage="train", done=i, total=100, loss=1.0 / i)
            time.sleep(0.05)
        """
    ))
    (out / "STOP").write_text("stale")  # left over from an earlier run: must not stop this one
    runner = ProcessRunner([PY, str(script), str(out)], stopFile=out / "STOP", stopGraceS=20,
                           terminateGraceS=5).start()
    events = []
    while not any(e.get("event") == "progress" and e.get("done", 0) >= 3 for e in events):
        events += runner.poll()
        time.sleep(0.02)
    runner.cancel()
    events += runner.collect(timeout=20)
    assert runner.returnCode == 130 and runner.wasCancelled()
    assert (out / "checkpoint.pt").read_text() == "saved"
    assert any(e.get("message") == "stopped, checkpoint saved" for e in events)


# ----------------------------------------------------------------------------- process runner
def test_runner_parses_events_and_drains_both_streams(tmp_path):
    script = tmp_path / "chatty.py"
    script.write_text(textwrap.dedent(
        """
        import json, sys
        for i in range(3):
            print(json.dumps({"v": 1, "event": "progress", "stage": "s", "done": i, "total": 3}))
        print("a stray line")
        sys.stderr.write("x" * 200000 + "\\n")  # more than a pipe buffer: must be drained
        print(json.dumps({"v": 1, "event": "error", "message": "CUDA was chosen but no GPU."}))
        sys.exit(1)
        """
    ))
    code, events, runner = __import__("MaskSAMSlicerLib.process", fromlist=["runBlocking"]) \
        .runBlocking([PY, str(script)], timeout=30)
    kinds = [e["event"] for e in events]
    assert kinds.count("progress") == 3 and "stdout" in kinds and kinds[-1] == "exit"
    assert code == 1 and runner.failureMessage() == "CUDA was chosen but no GPU."
    assert len(runner.stderrTail[-1]) == 200000


def test_runner_escalates_to_kill_when_the_child_ignores_sigterm(tmp_path):
    script = tmp_path / "stubborn.py"
    script.write_text("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                      "print('ready', flush=True)\ntime.sleep(600)\n")
    runner = ProcessRunner([PY, str(script)], terminateGraceS=0.5).start()
    while not any(e.get("message") == "ready" for e in runner.poll()):
        time.sleep(0.02)
    started = time.monotonic()
    runner.cancel()
    runner.wait(timeout=20)
    assert time.monotonic() - started < 10
    assert runner.wasCancelled() and runner.returnCode != 0


def test_make_phantoms_child_reports_progress_json(tmp_path):
    out = tmp_path / "phantoms"
    args = masksamCommand("make-phantoms", str(out), "--cases", "2", "--size", "16", "16", "16",
                          python=PY)
    code, events, _ = __import__("MaskSAMSlicerLib.process", fromlist=["runBlocking"]) \
        .runBlocking(args, env=childEnvironment(extraPythonPath=str(REPO)), timeout=120)
    assert code == 0
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["done"] for e in progress] == [1, 2] and progress[-1]["total"] == 2
    done = [e for e in events if e["event"] == "done"]
    assert done and Path(done[0]["output"]) == out and (out / "dataset.json").is_file()


def test_device_probe_reports_the_device():
    code, events, _ = __import__("MaskSAMSlicerLib.process", fromlist=["runBlocking"]) \
        .runBlocking(deviceProbeCommand(PY), env=childEnvironment(forceCpu=True), timeout=120)
    done = [e for e in events if e["event"] == "done"]
    assert code == 0 and done[0]["device"] == "cpu"
    assert describeDevices(done[0]) == "CPU only (no CUDA GPU found)"


# ----------------------------------------------------------------------------- models
def test_registry_lists_user_and_added_models_and_fetches_verified_archives(tmp_path,
                                                                            tinyModelDir):
    import shutil
    import zipfile

    models = tmp_path / "models"
    shutil.copytree(tinyModelDir, models / "from-training")
    elsewhere = tmp_path / "elsewhere" / "shared-model"
    shutil.copytree(tinyModelDir, elsewhere)
    archive = tmp_path / "published.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in tinyModelDir.iterdir():
            zf.write(f, f"published/{f.name}")
    registryFile = tmp_path / "models.json"
    registryFile.write_text(json.dumps({"version": 1, "models": [
        {"name": "published", "url": archive.as_uri(), "sha256": sha256OfFile(archive),
         "backbone": "tiny", "classes": ["liver", "spleen"]},
        {"name": "tampered", "url": archive.as_uri(), "sha256": "0" * 64, "backbone": "tiny"},
    ], "baseModels": []}))
    registry = ModelRegistry(registryFile=registryFile, userModelsDir=models)
    registry.addModelDir(elsewhere)
    listed = {m.name: m for m in ModelRegistry(registryFile=registryFile,
                                               userModelsDir=models).models()}
    assert listed["from-training"].source == "user" and listed["shared-model"].source == "added"
    assert not listed["published"].available and listed["published"].classNames() == [
        "liver", "spleen"]
    assert listed["from-training"].classNames() == ["liver", "spleen"]
    fetched = registry.fetchModel("published")
    assert fetched.path == models / "published" and fetched.available
    with pytest.raises(ModelError, match="SHA-256"):
        registry.fetchModel("tampered")
    assert not (models / "tampered").exists()
    assert [p for p in models.iterdir() if p.name.startswith(".fetch-")] == []
    assert registry.newModelDir("from-training") == models / "from-training_2"
    with pytest.raises(ModelError, match="no config.json"):
        registry.addModelDir(tmp_path)


# ----------------------------------------------------------------------------- real children
@pytest.fixture(scope="session")
def sceneTrainedModel(tmp_path_factory):
    """Scene pairs -> case store -> real `masksam train` child (tiny, 2 iterations) -> model.

    One training run shared by the end-to-end tests (they need a trained model: `segment`
    refuses a model that has never seen data).
    """
    if "train" not in cliSubcommands():
        pytest.skip("'masksam train' is not in MaskSAMLib's CLI yet (issue 3)")
    registerSegmentationConverterRules()
    root = tmp_path_factory.mktemp("scene-training")
    scene = slicer.vtkMRMLScene()
    store = TrainingCaseStore(root / "cases")
    for index in range(2):
        volume, seg, _ = makeCase(scene, lambda a: [("liver", a == 200), ("spleen", a == -700)],
                                  name=f"c{index}", shape=(16, 32, 32))
        store.addCase(volume, seg)
    logic = TrainingLogic(scene, python=PY, environment=childEnvironment(extraPythonPath=str(REPO)))
    logic.createCurveNodes()
    registry = ModelRegistry(registryFile=REPO / "Resources" / "models.json",
                             userModelsDir=root / "models")
    events = []
    job = logic.startTraining(store.folder, registry.newModelDir("scene-model"), backbone="tiny",
                              iterations=2, batchSize=1, device="CPU", valFraction=0.0,
                              onEvent=events.append)
    job.runner.wait(timeout=600)
    model = logic.finishTraining(job, registry)
    return {"model": model, "registry": registry, "events": events, "logic": logic, "job": job}


@pytest.mark.slow
def test_real_train_child_accepts_the_exported_dataset(sceneTrainedModel):
    model = sceneTrainedModel["model"]
    assert model.classNames() == ["liver", "spleen"]
    assert any(m.path == model.path for m in sceneTrainedModel["registry"].availableModels())
    progress = [e for e in sceneTrainedModel["events"]
                if e["event"] == "progress" and e.get("stage") == "train"]
    assert [e["done"] for e in progress] == [1, 2]
    loss = sceneTrainedModel["logic"].lossTableNode.GetTable()
    assert loss.GetNumberOfRows() == 2
    assert sceneTrainedModel["job"].curves.loss[-1][1] == pytest.approx(progress[-1]["loss"])


@pytest.mark.slow
@pytest.mark.skipif("segment" not in cliSubcommands(),
                    reason="'masksam segment' is not in MaskSAMLib's CLI yet (issue 4)")
def test_real_segment_child_matches_the_cli_label_map(scene, tmp_path, sceneTrainedModel):
    """A volume node through the real `python -m MaskSAMLib segment` child, voxel for voxel."""
    array = phantomArray((10, 32, 32))
    volume = makeVolume(scene, array)
    logic = SegmentationLogic(scene, python=PY, tempRoot=str(tmp_path),
                              environment=childEnvironment(extraPythonPath=str(REPO)))
    logic.keepTemporaryFiles = True
    events = []
    model = sceneTrainedModel["model"]
    job = logic.startSegmentation(volume, model, device="CPU", speed="Fast",
                                  onEvent=events.append)
    job.runner.wait(timeout=600)
    result = logic.finishSegmentation(job)
    assert any(e["event"] == "done" for e in events)
    cliArray, cliGeometry = volumeIO.readLabelMap(job.outputPath)
    assert not cliGeometry.differences(volumeIO.volumeGeometry(volume))
    config = json.loads((model.path / "config.json").read_text())
    classes = [lab for lab in config["labels"] if lab["value"] != 0]
    segmentation = result.segmentationNode.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName()
            for i in range(segmentation.GetNumberOfSegments())] == [c["name"] for c in classes]
    for row, lab in zip(result.summary, classes, strict=True):
        segment = segmentation.GetSegment(row["segmentId"])
        assert segment.GetColor() == pytest.approx([c / 255 for c in lab["color"]])
        exported = exportSegment(result.segmentationNode, row["segmentId"], volume)
        np.testing.assert_array_equal(exported > 0, cliArray == lab["value"])
    reference = result.segmentationNode.GetNodeReference(
        result.segmentationNode.GetReferenceImageGeometryReferenceRole())
    assert reference is volume
    assert result.sidecar is not None and result.sidecar.get("device") == "cpu"


def test_kill_ends_a_child_at_once(tmp_path):
    script = tmp_path / "sleeper.py"
    script.write_text("import time\nprint('up', flush=True)\ntime.sleep(600)\n")
    runner = ProcessRunner([PY, str(script)], stopFile=tmp_path / "STOP",
                           stopGraceS=600).start()
    while not any(e.get("message") == "up" for e in runner.poll()):
        time.sleep(0.02)
    runner.cancel()  # polite: writes the stop file, which this child ignores
    assert (tmp_path / "STOP").exists()
    with pytest.raises(TimeoutError):
        runner.wait(timeout=0.5)
    runner.kill()
    runner.wait(timeout=10)
    assert runner.wasCancelled() and runner.returnCode != 0
    assert not psutil.pid_exists(runner.pid)


@pytest.mark.slow
@pytest.mark.skipif("segment" not in cliSubcommands(),
                    reason="'masksam segment' is not in MaskSAMLib's CLI yet (issue 4)")
def test_cuda_without_a_gpu_is_a_clear_error_and_changes_nothing(scene, tmp_path,
                                                                 sceneTrainedModel):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    volume = makeVolume(scene, phantomArray((16, 32, 32)))
    before = nodeIds(scene)
    logic = SegmentationLogic(scene, python=PY, tempRoot=str(tmp_path),
                              environment=childEnvironment(extraPythonPath=str(REPO)))
    job = logic.startSegmentation(volume, sceneTrainedModel["model"], device="CUDA")
    job.runner.wait(timeout=300)
    with pytest.raises(ChildFailedError, match="(?i)cuda"):
        logic.finishSegmentation(job)
    assert job.runner.returnCode == 1
    assert nodeIds(scene) == before


@pytest.mark.parametrize("name", ["labels.nii.gz", "case.seg.nrrd", "a.b.nrrd", "x.mha",
                                  "result-1.nrrd"])
def test_the_sidecar_is_found_by_the_library_rule(tmp_path, name) -> None:
    from MaskSAMSlicerLib.segmentationLogic import sidecarPath

    from MaskSAMLib.inference.outputs import sidecar_path

    assert sidecarPath(tmp_path / name) == sidecar_path(tmp_path / name)
