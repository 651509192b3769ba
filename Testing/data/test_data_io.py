"""Reading, writing and refusing volumes: MaskSAMLib.data.io (headers, DICOM, .seg.nrrd)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MaskSAMLib.config import make_labels
from MaskSAMLib.data.geometry import Geometry, Volume
from MaskSAMLib.data.io import (
    list_dicom_series,
    read_any,
    read_dicom_series,
    read_image_info,
    read_volume,
    write_label_map,
    write_volume,
)
from MaskSAMLib.errors import MaskSAMError

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "totalseg_examples"
OBLIQUE = tuple(
    np.array([[0.9396926, -0.3420201, 0.0], [0.3420201, 0.9396926, 0.0], [0.0, 0.0, 1.0]]).reshape(
        -1
    )
)
GEOMETRY = Geometry((9, 8, 6), (0.7, 0.8, 2.5), (-12.5, 30.0, 101.25), OBLIQUE)
TERMINOLOGY = (
    "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical "
    "Structure~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"
)


def _write(array: np.ndarray, path: Path, **kwargs) -> Path:
    image = sitk.GetImageFromArray(array, **kwargs)
    sitk.WriteImage(image, str(path))
    return path


def _bytes(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _write_4d(path: Path) -> Path:
    channel = sitk.GetImageFromArray(np.zeros((3, 5, 6), np.float32))
    sitk.WriteImage(sitk.JoinSeries([channel, channel]), str(path))
    return path


def _mha_header(path: Path, dims: str) -> Path:
    header = f"ObjectType = Image\nNDims = 3\nDimSize = {dims}\nElementType = MET_UCHAR\n"
    path.write_text(header + "ElementDataFile = LOCAL\nabc")
    return path


# -- headers and refusals ------------------------------------------------------------------
def test_read_image_info_reads_header_only(tmp_path: Path) -> None:
    path = tmp_path / "ct.nii.gz"
    write_volume(np.zeros(GEOMETRY.shape, np.int16), GEOMETRY, path)
    info = read_image_info(path)
    assert info.size == GEOMETRY.size and info.dimension == 3 and info.components == 1
    assert info.geometry.allclose(GEOMETRY, 1e-5)
    assert "16-bit signed integer" in info.pixel_type


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda d: _bytes(d / "notes.nii.gz", b"hello"), "is not an image file SimpleITK can read"),
        (lambda d: _bytes(d / "empty.nrrd", b""), "empty file (0 bytes)"),
        (lambda d: d / "missing.nii.gz", "does not exist"),
        (lambda d: d, "is a folder"),
        (lambda d: _write(np.zeros((5, 6), np.float32), d / "flat.nii.gz"), "is a 2D image"),
        (
            lambda d: _write(np.zeros((1, 5, 6), np.float32), d / "slice.nii.gz"),
            "has a single slice",
        ),
        (
            lambda d: _write_4d(d / "mc.nii.gz"),
            "is a 4D image (6 x 5 x 3 x 2): MaskSAM reads one 3D volume per channel; split it into "
            "one 3D file per channel named CASE_0000, CASE_0001",
        ),
        (
            lambda d: _write(np.zeros((3, 5, 6, 3), np.uint8), d / "rgb.nrrd", isVector=True),
            "has 3 components per voxel",
        ),
        (lambda d: _mha_header(d / "zero.mha", "4 0 5"), "has zero voxels (size 4 x 0 x 5)"),
        (
            lambda d: _mha_header(d / "huge.mha", "100000 100000 100000"),
            "claims a size of 100000 x 100000 x 100000 (1,000,000,000,000,000 voxels)",
        ),
    ],
    ids=[
        "not-image",
        "zero-bytes",
        "missing",
        "folder",
        "2d",
        "one-slice",
        "4d",
        "rgb",
        "zero-voxels",
        "absurd-size",
    ],
)
def test_bad_inputs_are_refused_with_one_line(tmp_path: Path, make, expected: str) -> None:
    path = make(tmp_path)
    with pytest.raises(MaskSAMError) as info:
        read_volume(path)
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert str(path) in message


def test_voxel_budget_is_checked_before_pixels(tmp_path: Path) -> None:
    path = _write(np.zeros((10, 10, 10), np.uint8), tmp_path / "small.nrrd")
    with pytest.raises(MaskSAMError, match=r"claims a size of 10 x 10 x 10 \(1,000 voxels\)"):
        read_volume(path, max_voxels=999)
    assert read_volume(path, max_voxels=1000).array.shape == (10, 10, 10)


@pytest.mark.parametrize(("bad", "ext"), [(np.nan, ".nrrd"), (np.inf, ".mha"), (-np.inf, ".nrrd")])
def test_nan_and_inf_are_refused(tmp_path: Path, bad: float, ext: str) -> None:
    # (ITK's NIfTI reader itself turns non-finite voxels into 0, so NRRD/MHA carry them here.)
    array = np.zeros((4, 5, 6), np.float32)
    array[1, 2, 3] = bad
    array[0, 0, 0] = bad
    path = _write(array, tmp_path / f"bad{ext}")
    with pytest.raises(MaskSAMError, match="contains NaN or Inf values in 2 voxels"):
        read_volume(path)


def test_truncated_file_fails_after_header(tmp_path: Path) -> None:
    path = tmp_path / "cut.nrrd"  # (ITK's NIfTI reader pads a truncated file with zeros)
    rng = np.random.default_rng(0)
    _write(rng.normal(size=(20, 30, 40)).astype(np.float32), path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 3])
    assert read_image_info(path).size == (40, 30, 20)
    with pytest.raises(MaskSAMError, match="could not be read past its header"):
        read_volume(path)


# -- writing ------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha", ".seg.nrrd"])
@pytest.mark.parametrize(("top", "dtype"), [(255, np.uint8), (256, np.uint16)])
def test_label_map_round_trip(tmp_path: Path, ext: str, top: int, dtype: type) -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, GEOMETRY.shape).astype(np.int64)
    labels[0, 0, 0] = top
    path = write_label_map(labels, GEOMETRY, tmp_path / f"out{ext}")
    back = read_volume(path)
    assert back.array.dtype == dtype
    assert np.array_equal(back.array, labels)
    assert back.geometry.allclose(GEOMETRY, 1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"out{ext}"]  # no temp file left


def test_label_map_refusals(tmp_path: Path) -> None:
    labels = np.zeros(GEOMETRY.shape, np.uint8)
    target = write_label_map(labels, GEOMETRY, tmp_path / "seg.nii.gz")
    with pytest.raises(MaskSAMError, match="already exists; pass --overwrite"):
        write_label_map(labels, GEOMETRY, target)
    write_label_map(labels + 1, GEOMETRY, target, overwrite=True)
    assert read_volume(target).array.max() == 1
    with pytest.raises(MaskSAMError, match="unsupported file type; use one of .seg.nrrd"):
        write_label_map(labels, GEOMETRY, tmp_path / "seg.png")
    with pytest.raises(MaskSAMError, match="does not exist"):
        write_label_map(labels, GEOMETRY, tmp_path / "no" / "seg.nrrd")
    with pytest.raises(ValueError, match="does not match grid"):
        write_label_map(labels[:-1], GEOMETRY, tmp_path / "x.nrrd")
    with pytest.raises(MaskSAMError, match="color must be three integers 0-255"):
        write_label_map(
            labels,
            GEOMETRY,
            tmp_path / "x.seg.nrrd",
            labels=[{"value": 1, "name": "a", "color": [300, 0, 0]}],
        )
    with pytest.raises(MaskSAMError, match="is not a Slicer terminology entry"):
        write_label_map(
            labels,
            GEOMETRY,
            tmp_path / "x.seg.nrrd",
            labels=[{"value": 1, "name": "a", "terminology": "liver"}],
        )
    assert not (tmp_path / "x.seg.nrrd").exists()


def test_seg_nrrd_read_by_slicerio(tmp_path: Path) -> None:
    slicerio = pytest.importorskip("slicerio")
    labels = np.zeros(GEOMETRY.shape, np.uint8)
    labels[1:3, 2:5, 3:7] = 1
    labels[4, 0, 0] = 3
    entries = [
        {"value": 0, "name": "background"},
        {"value": 1, "name": "liver", "color": [221, 130, 101], "terminology": TERMINOLOGY},
        {"value": 2, "name": "kidney_left", "color": [185, 102, 83]},
        {"value": 3, "name": "aorta", "color": [224, 97, 76]},
    ]
    path = write_label_map(labels, GEOMETRY, tmp_path / "case.seg.nrrd", labels=entries)
    seg = slicerio.read_segmentation(str(path))
    segments = {s["name"]: s for s in seg["segments"]}
    assert list(segments) == ["liver", "kidney_left", "aorta"]  # background is no segment
    for entry in entries[1:]:
        segment = segments[entry["name"]]
        assert segment["labelValue"] == entry["value"]
        assert np.allclose(segment["color"], np.array(entry["color"]) / 255.0, atol=1e-5)
        assert segment["layer"] == 0
    assert segments["liver"]["terminology"]["type"] == ["SCT", "10200004", "Liver"]
    assert segments["liver"]["extent"] == [3, 6, 2, 4, 1, 2]  # i0 i1 j0 j1 k0 k1
    assert seg["masterRepresentation"] == "Binary labelmap"
    assert seg["containedRepresentationNames"] == ["Binary labelmap"]
    assert np.allclose(seg["ijkToLPS"], GEOMETRY.index_to_physical, atol=1e-5)
    assert np.array_equal(seg["voxels"], labels.transpose(2, 1, 0))  # slicerio is (i, j, k)
    reference = next(
        p for p in seg["conversionParameters"] if p["name"] == "Reference image geometry"
    )
    values = [float(v) for v in reference["value"].strip(";").split(";")]
    ras = GEOMETRY.index_to_physical * np.array([-1, -1, 1, 1])[:, None]
    assert np.allclose(values[:16], ras.reshape(-1), atol=1e-5)
    assert values[16:] == [0, 8, 0, 7, 0, 5]
    for segment in seg["segments"]:
        mask = slicerio.segment_mask(seg, segment["id"])
        assert mask.sum() == (labels == segment["labelValue"]).sum()
    with pytest.raises(ValueError, match=r"values \[3\] that have no label entry"):
        write_label_map(labels, GEOMETRY, tmp_path / "b.seg.nrrd", labels=entries[:3])


def test_seg_nrrd_read_by_slicer_storage_node(tmp_path: Path) -> None:
    """Slicer's own reader (slicer-core's MRML) sees the names, colours, values and grid."""
    slicer = pytest.importorskip("slicer")
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkCommonCore import reference
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    labels = np.zeros(GEOMETRY.shape, np.uint8)
    labels[1:3, 2:5, 3:7] = 1
    labels[4, 0, 0] = 2
    entries = [
        {"value": 1, "name": "liver", "color": [221, 130, 101], "terminology": TERMINOLOGY},
        {"value": 2, "name": "aorta", "color": [224, 97, 76]},
    ]
    path = write_label_map(labels, GEOMETRY, tmp_path / "case.seg.nrrd", labels=entries)
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 2
    for entry in entries:
        segment = segmentation.GetSegment(f"Segment_{entry['value']}")
        assert segment.GetName() == entry["name"]
        assert np.allclose(segment.GetColor(), np.array(entry["color"]) / 255, atol=1e-5)
        assert segment.GetLabelValue() == entry["value"]
        labelmap = segment.GetRepresentation("Binary labelmap")
        voxels = vtk_to_numpy(labelmap.GetPointData().GetScalars())
        assert (voxels == entry["value"]).sum() == (labels == entry["value"]).sum()
        matrix = vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(matrix)
        ijk_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
        lps = GEOMETRY.index_to_physical * np.array([-1, -1, 1, 1])[:, None]
        assert np.allclose(ijk_to_ras, lps, atol=1e-5)
    tag = reference("")
    segmentation.GetSegment("Segment_1").GetTag("TerminologyEntry", tag)
    assert str(tag) == TERMINOLOGY


def test_seg_nrrd_without_labels_names_present_values(tmp_path: Path) -> None:
    slicerio = pytest.importorskip("slicerio")
    labels = np.zeros(GEOMETRY.shape, np.uint16)
    labels[0, 0, :2] = 7
    labels[5, 7, 8] = 300
    seg = slicerio.read_segmentation(
        str(write_label_map(labels, GEOMETRY, tmp_path / "a.seg.nrrd"))
    )
    assert [(s["name"], s["labelValue"]) for s in seg["segments"]] == [
        ("Segment_7", 7),
        ("Segment_300", 300),
    ]
    assert seg["voxels"].dtype == np.uint16
    model_colors = {lab.value: lab.color for lab in make_labels(
        [f"structure {v}" for v in range(301)])}  # unknown names: palette colours
    for segment in seg["segments"]:  # the writer's fallback colour is the model's, one palette
        expected = np.array(model_colors[segment["labelValue"]]) / 255.0
        assert np.allclose(segment["color"], expected, atol=1e-5), segment["name"]


def test_geometry_dict_and_sitk_round_trip() -> None:
    data = json.loads(json.dumps(GEOMETRY.to_dict()))
    assert Geometry.from_dict(data) == GEOMETRY
    array = np.arange(np.prod(GEOMETRY.shape), dtype=np.float32).reshape(GEOMETRY.shape)
    volume = Volume.from_sitk(GEOMETRY.to_sitk(array))
    assert np.array_equal(volume.array, array) and volume.geometry.allclose(GEOMETRY, 1e-9)
    # voxel (i, j, k) = (2, 3, 4) sits where SimpleITK says it does
    image = GEOMETRY.to_sitk(array)
    assert np.allclose(
        GEOMETRY.physical_point((2, 3, 4))[:3], image.TransformIndexToPhysicalPoint((2, 3, 4))
    )
    shifted = Geometry(GEOMETRY.size, GEOMETRY.spacing, (-12.5, 30.01, 101.25), GEOMETRY.direction)
    assert GEOMETRY.allclose(shifted, tol=0.02) and not GEOMETRY.allclose(shifted, tol=1e-3)
    assert GEOMETRY.differences(shifted)[0].startswith("origin")


# -- DICOM --------------------------------------------------------------------------------
def write_dicom_series(
    folder: Path,
    array: np.ndarray,
    uid: str,
    *,
    spacing: tuple[float, float, float] = (0.8, 0.9, 2.5),
    origin: tuple[float, float, float] = (-50.0, -60.0, 10.0),
    description: str = "test series",
) -> None:
    """One file per slice of ``array`` (z, y, x) with the tags a series reader needs."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(array.shape[0]):
        image = sitk.GetImageFromArray(array[k].astype(np.int16))
        image.SetSpacing(spacing[:2])
        position = (origin[0], origin[1], origin[2] + k * spacing[2])
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{uid}.{k + 1}",
            "0008|0060": "CT",
            "0008|103e": description,
            "0010|0010": "Phantom^Test",
            "0010|0020": "P1",
            "0020|000d": f"{uid}.0",
            "0020|000e": uid,
            "0020|0013": str(k + 1),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0032": "\\".join(f"{v:.4f}" for v in position),
            "0018|0050": f"{spacing[2]:.4f}",
        }
        for key, value in tags.items():
            image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"IM{k:04d}.dcm"))
        writer.Execute(image)


UID_A, UID_B, UID_C = (
    "1.2.826.0.1.3680043.2.1125.11",
    "1.2.826.0.1.3680043.2.1125.12",
    ("1.2.826.0.1.3680043.2.1125.13"),
)


def test_dicom_series_read_exactly(tmp_path: Path) -> None:
    array = (np.arange(6 * 8 * 9).reshape(6, 8, 9) * 7 % 900 - 300).astype(np.int16)
    write_dicom_series(tmp_path / "study" / "series_a", array, UID_A)
    volume = read_any(tmp_path / "study")  # found in a sub-folder
    assert np.array_equal(volume.array, array)
    assert volume.geometry.allclose(
        Geometry((9, 8, 6), (0.8, 0.9, 2.5), (-50, -60, 10), (1, 0, 0, 0, 1, 0, 0, 0, 1)), 1e-4
    )


def test_dicom_series_choice(tmp_path: Path) -> None:
    array = np.zeros((5, 6, 7), np.int16)
    write_dicom_series(tmp_path / "a", array, UID_A, description="axial")
    write_dicom_series(tmp_path / "b", array[:3] + 1, UID_B, description="scout")
    assert [s.num_slices for s in list_dicom_series(tmp_path)] == [5, 3]
    assert read_dicom_series(tmp_path).array.shape == (5, 6, 7)  # most slices wins
    assert read_dicom_series(tmp_path, UID_B).array.max() == 1
    with pytest.raises(MaskSAMError, match=f"Series 9.9 is not in .*{UID_A} \\(5 slices"):
        read_dicom_series(tmp_path, "9.9")
    write_dicom_series(tmp_path / "c", array + 2, UID_C, description="coronal")
    with pytest.raises(MaskSAMError) as info:
        read_dicom_series(tmp_path)
    message = str(info.value)
    assert "3 DICOM series and 2 have the most slices" in message
    assert f"{UID_A} (5 slices, 'axial')" in message and f"{UID_C} (5 slices, 'coronal')" in message
    assert "--series-uid" in message


def test_folder_without_dicom(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(MaskSAMError, match="No DICOM series found in"):
        read_any(tmp_path)
    write_dicom_series(tmp_path / "one", np.zeros((1, 4, 4)), UID_A)
    with pytest.raises(MaskSAMError, match="one has a single slice"):
        read_any(tmp_path)


# -- real data ------------------------------------------------------------------------------
@pytest.mark.shared_data
def test_totalseg_ct_to_seg_nrrd(tmp_path: Path) -> None:
    if not SHARED.is_dir():
        pytest.skip(f"shared example data not found at {SHARED}")
    slicerio = pytest.importorskip("slicerio")
    names = json.loads((SHARED / "classes.json").read_text())["ct"]
    label = read_volume(SHARED / "ct_abdomen_3mm_seg.nii.gz")
    image_info = read_image_info(SHARED / "ct_abdomen_3mm.nii.gz")
    assert image_info.geometry.allclose(label.geometry)
    entries = [{"value": int(v), "name": n} for v, n in names.items()]
    path = write_label_map(label.array, label.geometry, tmp_path / "ct.seg.nrrd", labels=entries)
    seg = slicerio.read_segmentation(str(path))
    by_value = {s["labelValue"]: s["name"] for s in seg["segments"]}
    assert by_value[1] == "spleen" and by_value[5] == "liver" and by_value[52] == "aorta"
    assert np.array_equal(seg["voxels"], label.array.transpose(2, 1, 0))
    assert np.allclose(seg["ijkToLPS"], label.geometry.index_to_physical, atol=1e-4)
