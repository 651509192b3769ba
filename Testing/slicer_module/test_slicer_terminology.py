"""Terminology and colours: standard ones for known structures, the annotator's carried over.

A class's colour and terminology chosen in Slicer (on the segments of a training case) end up
in the trained model's ``config.json``, and from there on every segment its auto-segmentations
create in the scene. Real MRML (slicer-core); no child process, no torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "MaskSAMSlicer"

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)
pytest.importorskip("SimpleITK")
safetensorsNumpy = pytest.importorskip("safetensors.numpy")
import slicer.util  # noqa: E402
import vtk  # noqa: E402

if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from MaskSAMSlicerLib.modelRegistry import readModelDir  # noqa: E402
from MaskSAMSlicerLib.segmentationLogic import (  # noqa: E402
    SegmentationLogic,
    registerSegmentationConverterRules,
)
from MaskSAMSlicerLib.trainingCases import (  # noqa: E402
    TrainingCaseStore,
    applyClassStyles,
    isGenericTerminology,
)
from MaskSAMSlicerLib.trainingLogic import TrainingJob, TrainingLogic  # noqa: E402

from MaskSAMLib.config import ModelConfig, make_labels, make_model_config  # noqa: E402
from MaskSAMLib.terminology import terminology_for  # noqa: E402

SLICER_DEFAULT = ("Segmentation category and type - 3D Slicer General Anatomy list~"
                  "SCT^85756007^Tissue~SCT^85756007^Tissue~^^~Anatomic codes - DICOM master "
                  "list~^^~^^")
USER_LIVER = ("Segmentation category and type - 3D Slicer General Anatomy list~"
              "SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^~Anatomic codes - "
              "DICOM master list~^^~^^")
USER_LESION = ("Segmentation category and type - DICOM master list~SCT^49755003^Morphologically "
               "Abnormal Structure~SCT^4147007^Mass~^^~Anatomic codes - DICOM master list~"
               "SCT^10200004^Liver~^^")


@pytest.fixture(scope="module", autouse=True)
def converterRules():
    registerSegmentationConverterRules()


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def makeCase(scene, segments, name="case"):
    """A small volume and a segmentation with ``[(name, mask value, colour, terminology)]``."""
    array = np.zeros((6, 12, 14), np.int16)
    array[1:5, 2:6, 2:7] = 1
    array[1:5, 7:11, 8:13] = 2
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{name} volume")
    slicer.util.updateVolumeFromArray(volume, array)
    volume.SetSpacing(0.9, 0.8, 2.5)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name} segmentation")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for segmentName, value, color, terminology in segments:
        segmentId = seg.GetSegmentation().AddEmptySegment("", segmentName, color)
        if terminology:
            seg.GetSegmentation().GetSegment(segmentId).SetTerminology(terminology)
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        slicer.util.updateVolumeFromArray(labelmap, (array == value).astype(np.uint8))
        labelmap.CopyOrientation(volume)
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segmentId)
        assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
            labelmap, seg, ids)
        scene.RemoveNode(labelmap)
    return volume, seg, array


def makeModelDir(folder: Path, names: list[str]) -> Path:
    """A model folder as ``masksam train`` writes it (labels from make_labels)."""
    folder.mkdir(parents=True)
    config = make_model_config(backbone="tiny", labels=make_labels(["background", *names]))
    config.save(folder / "config.json")
    safetensorsNumpy.save_file({"w": np.zeros(2, np.float32)}, str(folder / "model.safetensors"))
    return folder


def finishedJob(datasetDir: Path, modelDir: Path) -> TrainingJob:
    runner = SimpleNamespace(wasCancelled=lambda: False, returnCode=0)
    return TrainingJob(datasetDir, modelDir, runner, curves=None)


def test_case_colours_and_terminology_reach_the_trained_model_and_its_segments(scene, tmp_path):
    store = TrainingCaseStore(tmp_path / "cases")
    volume, seg, array = makeCase(scene, [
        ("liver", 1, (0.2, 0.8, 0.4), USER_LIVER),
        ("lesion", 2, (1.0, 1.0, 0.0), USER_LESION),
    ])
    store.addCase(volume, seg)
    styles = store.classStyles()
    assert styles["liver"] == {"color": [51, 204, 102], "terminology": USER_LIVER}
    assert styles["lesion"]["terminology"] == USER_LESION
    # A second case of the same classes whose segments only carry Slicer's default keeps the
    # annotator's real choice from the first case (and takes the newer colour).
    volume2, seg2, _ = makeCase(scene, [("Liver", 1, (0.4, 0.6, 0.2), SLICER_DEFAULT),
                                        ("lesion", 2, (1.0, 1.0, 0.0), None)], name="second")
    store.addCase(volume2, seg2)
    assert store.classStyles()["liver"] == {"color": [102, 153, 51], "terminology": USER_LIVER}
    # Persisted with the cases.
    assert TrainingCaseStore(tmp_path / "cases").classStyles() == store.classStyles()

    modelDir = makeModelDir(tmp_path / "models" / "mine", ["liver", "lesion"])
    model = TrainingLogic(scene).finishTraining(finishedJob(store.folder, modelDir))
    byName = {lab["name"]: lab for lab in model.labels}
    assert byName["liver"]["color"] == [102, 153, 51]
    assert byName["liver"]["terminology"] == USER_LIVER
    assert byName["lesion"]["terminology"] == USER_LESION
    assert byName["lesion"]["color"] == [255, 255, 0]
    # MaskSAMLib still reads the rewritten config.json.
    reloaded = ModelConfig.load(modelDir / "config.json")
    assert [lab.terminology for lab in reloaded.labels][1:] == [USER_LIVER, USER_LESION]

    # Auto-segmentations with that model: the segments in the scene carry them.
    labels = np.zeros(array.shape, np.uint8)
    labels[array == 1] = 1
    labels[array == 2] = 2
    result = SegmentationLogic(scene).importLabelArray(labels, volume, model.labels)
    segmentation = result.segmentationNode.GetSegmentation()
    liver = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("liver"))
    lesion = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("lesion"))
    assert liver.GetTerminology() == USER_LIVER
    assert lesion.GetTerminology() == USER_LESION
    assert liver.GetColor() == pytest.approx((102 / 255, 153 / 255, 51 / 255))


def test_standard_terminology_is_kept_when_the_case_has_only_slicers_default(scene, tmp_path):
    store = TrainingCaseStore(tmp_path / "cases")
    volume, seg, array = makeCase(scene, [("kidney_left", 1, (0.2, 0.2, 0.9), SLICER_DEFAULT),
                                          ("myocardium", 2, (0.9, 0.2, 0.2), None)])
    store.addCase(volume, seg)
    modelDir = makeModelDir(tmp_path / "m", ["kidney_left", "myocardium"])
    model = TrainingLogic(scene).finishTraining(finishedJob(store.folder, modelDir))
    byName = {lab["name"]: lab for lab in model.labels}
    assert byName["kidney_left"]["terminology"] == terminology_for("kidney_left")
    assert byName["myocardium"]["terminology"] == terminology_for("myocardium")
    assert byName["kidney_left"]["color"] == [51, 51, 230]
    result = SegmentationLogic(scene).importLabelArray(
        (array == 1).astype(np.uint8), volume, model.labels)
    segmentation = result.segmentationNode.GetSegmentation()
    kidney = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("kidney_left"))
    assert "SCT^64033007^Kidney~SCT^7771000^Left" in kidney.GetTerminology()


def test_a_dataset_folder_without_cases_manifest_leaves_the_model_alone(tmp_path):
    dataset = tmp_path / "nnunet"
    dataset.mkdir()
    (dataset / "dataset.json").write_text("{}")
    modelDir = makeModelDir(tmp_path / "m", ["liver"])
    before = (modelDir / "config.json").read_bytes()
    assert not TrainingLogic.applyCaseStyles(dataset, modelDir)
    assert (modelDir / "config.json").read_bytes() == before
    assert readModelDir(modelDir).labels[1]["terminology"] == terminology_for("liver")


def test_apply_class_styles_rules():
    labels = [{"value": 0, "name": "background", "color": [0, 0, 0], "terminology": None},
              {"value": 1, "name": "Liver", "color": [1, 2, 3], "terminology": "x"}]
    styles = {"liver": {"color": [9, 9, 9], "terminology": "not a terminology"}}
    out = applyClassStyles(labels, styles)
    assert out[1] == {"value": 1, "name": "Liver", "color": [9, 9, 9], "terminology": "x"}
    assert out[0] == labels[0] and labels[1]["color"] == [1, 2, 3]  # input not changed
    assert isGenericTerminology(None) and isGenericTerminology(SLICER_DEFAULT)
    assert not isGenericTerminology(USER_LIVER)
