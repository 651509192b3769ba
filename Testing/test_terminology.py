"""Standard terminology for known structures: in the labels, the .seg.nrrd and Slicer's reader.

Torch-free (also part of the Python 3.12 run). The codes were checked against Slicer 5.10.0's
terminology tables (``Modules/Loadable/Terminologies/Resources/``); this test pins them so a
typo in a code or a meaning (Slicer compares both) fails here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from MaskSAMLib.config import _KNOWN_COLORS, make_labels
from MaskSAMLib.data.geometry import Geometry
from MaskSAMLib.data.writers import _check_terminology, write_label_map
from MaskSAMLib.errors import MaskSAMError
from MaskSAMLib.terminology import (
    DICOM_MASTER,
    GENERAL_ANATOMY,
    STRUCTURES,
    TerminologyEntry,
    terminology_entry,
    terminology_for,
)

#: name -> (context, category code, type code, type meaning, modifier code) from Slicer's tables.
EXPECTED = {
    "liver": (GENERAL_ANATOMY, "123037004", "10200004", "Liver", None),
    "spleen": (GENERAL_ANATOMY, "123037004", "78961009", "Spleen", None),
    "kidney_left": (GENERAL_ANATOMY, "123037004", "64033007", "Kidney", "7771000"),
    "kidney_right": (GENERAL_ANATOMY, "123037004", "64033007", "Kidney", "24028007"),
    "stomach": (GENERAL_ANATOMY, "123037004", "69695003", "Stomach", None),
    "aorta": (GENERAL_ANATOMY, "123037004", "15825003", "Aorta", None),
    "pancreas": (GENERAL_ANATOMY, "123037004", "15776009", "Pancreas", None),
    "gallbladder": (GENERAL_ANATOMY, "123037004", "28231008", "Gallbladder", None),
    "inferior_vena_cava": (DICOM_MASTER, "123037004", "64131007", "Inferior vena cava", None),
    "esophagus": (GENERAL_ANATOMY, "123037004", "32849002", "Esophagus", None),
    "heart": (GENERAL_ANATOMY, "123037004", "80891009", "Heart", None),
    "urinary_bladder": (GENERAL_ANATOMY, "123037004", "89837001", "Bladder", None),
    "lung": (GENERAL_ANATOMY, "123037004", "39607008", "Lung", None),
    "duodenum": (GENERAL_ANATOMY, "123037004", "38848004", "Duodenum", None),
    "small_bowel": (GENERAL_ANATOMY, "123037004", "30315005", "Small Intestine", None),
    "colon": (GENERAL_ANATOMY, "123037004", "71854001", "Colon", None),
    "prostate": (GENERAL_ANATOMY, "123037004", "41216001", "Prostate", None),
    "bone": (GENERAL_ANATOMY, "85756007", "272673000", "Bone", None),
    "spine": (DICOM_MASTER, "123037004", "421060004", "Spine", None),
    "vertebra": (DICOM_MASTER, "123037004", "51282000", "Vertebra", None),
    "right_ventricle": (GENERAL_ANATOMY, "123037004", "53085002", "Right Ventricle", None),
    "left_ventricle": (GENERAL_ANATOMY, "123037004", "87878005", "Left Ventricle", None),
    "myocardium": (DICOM_MASTER, "123037004", "74281007", "Myocardium", None),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_known_structures_have_slicers_codes(name):
    context, category, value, meaning, modifier = EXPECTED[name]
    text = terminology_for(name)
    fields = text.split("~")
    assert len(fields) == 7
    assert fields[0] == context
    assert fields[1].split("^")[:2] == ["SCT", category]
    assert fields[2] == f"SCT^{value}^{meaning}"
    assert fields[3] == ("^^" if modifier is None else
                         f"SCT^{modifier}^{'Left' if modifier == '7771000' else 'Right'}")
    assert fields[4] == "Anatomic codes - DICOM master list"
    _check_terminology(name, text)  # what the .seg.nrrd writer accepts
    assert TerminologyEntry.parse(text).serialize() == text


def test_every_organ_with_a_known_colour_has_terminology():
    assert set(_KNOWN_COLORS) - set(STRUCTURES) == set()


def test_myocardium_is_the_left_ventricle_myocardium():
    entry = terminology_entry("myocardium")
    assert entry.region is not None and entry.region.value == "87878005"


def test_spellings_match_and_unknown_names_get_none():
    assert terminology_for("Kidney Left") == terminology_for("left-kidney") == \
        terminology_for("kidney_left")
    assert terminology_for("LV") == terminology_for("left_ventricle")
    assert terminology_for("MYO") == terminology_for("myocardium")
    assert terminology_for("tumour") is None
    assert terminology_for("") is None
    with pytest.raises(MaskSAMError, match="7 fields"):
        TerminologyEntry.parse("SCT^10200004^Liver")


def test_make_labels_fills_terminology():
    labels = make_labels(["background", "liver", "Kidney_Right", "right_ventricle", "tumour"])
    assert labels[0].terminology is None
    assert labels[1].terminology == terminology_for("liver")
    assert "SCT^24028007^Right" in labels[2].terminology
    assert "SCT^53085002^Right Ventricle" in labels[3].terminology
    assert labels[4].terminology is None


GEOMETRY = Geometry((8, 7, 5), (0.8, 0.8, 2.0), (-10.0, 20.0, 30.0),
                    (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def writeSegNrrd(tmp_path: Path, names: list[str]) -> tuple[Path, list[dict]]:
    labels = make_labels(["background", *names])
    array = np.zeros(GEOMETRY.shape, np.uint8)
    for lab in labels[1:]:
        array[lab.value - 1, :, :3] = lab.value
    entries = [dataclasses.asdict(lab) for lab in labels]
    return write_label_map(array, GEOMETRY, tmp_path / "seg.seg.nrrd", labels=entries), entries


def test_terminology_lands_in_the_written_seg_nrrd(tmp_path):
    slicerio = pytest.importorskip("slicerio")
    path, entries = writeSegNrrd(tmp_path, ["liver", "kidney_left", "myocardium"])
    segments = {s["name"]: s for s in slicerio.read_segmentation(str(path))["segments"]}
    assert segments["liver"]["terminology"]["type"] == ["SCT", "10200004", "Liver"]
    assert segments["kidney_left"]["terminology"]["typeModifier"] == ["SCT", "7771000", "Left"]
    assert segments["myocardium"]["terminology"]["type"] == ["SCT", "74281007", "Myocardium"]


def test_slicers_reader_sees_the_terminology(tmp_path):
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the installed 'slicer' package is not slicer-core")
    path, entries = writeSegNrrd(tmp_path, ["spleen", "kidney_right", "left_ventricle"])
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    segmentation = node.GetSegmentation()
    for entry in entries[1:]:
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(entry["name"]))
        assert segment.GetTerminology() == entry["terminology"]
