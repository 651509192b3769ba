"""Dice, HD95 and volume metrics against hand-computed values; files, folders and reports."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MaskSAMLib.data.dataset_json import case_id
from MaskSAMLib.data.geometry import Geometry
from MaskSAMLib.errors import MaskSAMError
from MaskSAMLib.evaluation import (
    evaluate_arrays,
    evaluate_files,
    evaluate_folders,
    evaluate_paths,
    format_table,
    hd95,
    write_report,
)
from MaskSAMLib.labels import read_label_file


def _write(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
           direction=None) -> Path:  # fmt: skip
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return path


def _cube(shape=(8, 8, 8), start=(2, 2, 2), side=3) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + side) for s in start)] = True
    return mask


def _by_value(rows):
    return {row["value"]: row for row in rows}


def test_dice_and_volumes_hand_computed():
    pred = np.array([[[1, 1, 1, 0], [2, 2, 0, 0]]])
    ref = np.array([[[1, 1, 0, 0], [2, 2, 2, 2]]])
    # voxel = 10 x 2 x 0.5 mm = 10 mm^3 = 0.01 ml
    rows = _by_value(evaluate_arrays(pred, ref, (10.0, 2.0, 0.5)))
    assert [r["label"] for r in rows.values()] == ["label_1", "label_2"]
    assert rows[1]["dice"] == pytest.approx(2 * 2 / (3 + 2))
    assert rows[2]["dice"] == pytest.approx(2 * 2 / (2 + 4))
    assert rows[1]["volume_pred_ml"] == pytest.approx(0.03)
    assert rows[1]["volume_ref_ml"] == pytest.approx(0.02)
    assert rows[1]["volume_diff_ml"] == pytest.approx(0.01)
    assert rows[1]["volume_diff_rel"] == pytest.approx(0.5)
    assert rows[2]["volume_diff_ml"] == pytest.approx(-0.02)
    assert rows[2]["volume_diff_rel"] == pytest.approx(-0.5)
    assert rows[1]["note"] is None


@pytest.mark.parametrize(
    ("shift", "spacing", "expected_mm"),
    [((1, 0, 0), (3.0, 1.0, 1.0), 3.0), ((0, 0, 1), (3.0, 1.0, 1.0), 1.0),
     ((0, 2, 0), (3.0, 0.7, 1.0), 1.4)],
)  # fmt: skip
def test_hd95_of_offset_cubes_uses_physical_spacing(shift, spacing, expected_mm):
    # Two 3x3x3 cubes offset by one (or two) voxels along one axis: every surface voxel is either
    # on the other cube's surface or one offset away, and fewer than 5% are closer -> HD95 = offset.
    a = _cube()
    b = np.roll(a, shift, axis=(0, 1, 2))
    assert hd95(a, b, spacing) == pytest.approx(expected_mm)
    assert hd95(b, a, spacing) == pytest.approx(expected_mm)
    pred = a.astype(np.uint8)
    rows = evaluate_arrays(pred, b.astype(np.uint8), spacing, {"background": 0, "cube": 1})
    overlap = 27 - 9 * max(shift)
    assert rows[0]["dice"] == pytest.approx(2 * overlap / 54)
    assert rows[0]["hd95_mm"] == pytest.approx(expected_mm)


def test_hd95_is_a_percentile_not_the_maximum():
    # A: one-voxel sheet at z=2; B: sheet at z=4 plus isolated outlier voxels at z=7.
    a = np.zeros((9, 5, 5), dtype=bool)
    b = np.zeros_like(a)
    a[2] = True
    b[4] = True
    spacing = (2.5, 1.0, 1.0)
    b[7, 0, 0] = True
    # B->A: 25 distances of 5 mm and one of 12.5 mm; the 95th percentile (index 23.75 of 0..25)
    # is still 5 mm although the Hausdorff distance is 12.5 mm.
    assert hd95(a, b, spacing) == pytest.approx(5.0)
    b[7, 4, 4] = True
    # Two outliers: 27 distances; index 0.95 * 26 = 24.7 -> 5 + 0.7 * (12.5 - 5) = 10.25 mm.
    assert hd95(a, b, spacing) == pytest.approx(10.25)


def _brute_force_hd95(a, b, spacing):
    from scipy import ndimage

    def surface_points(mask):
        padded = np.pad(mask, 1)
        eroded = ndimage.binary_erosion(padded, ndimage.generate_binary_structure(3, 1))
        return (np.argwhere(padded & ~eroded) - 1) * np.asarray(spacing)

    pa, pb = surface_points(a), surface_points(b)
    dist = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(dist.min(1), 95), np.percentile(dist.min(0), 95))


def test_hd95_matches_brute_force_on_irregular_shapes_touching_the_border():
    rng = np.random.default_rng(0)
    from scipy import ndimage

    for _ in range(3):
        field = ndimage.gaussian_filter(rng.normal(size=(10, 14, 12)), 1.5)
        a, b = field > 0.05, np.roll(field, 2, axis=2) > 0.1
        spacing = (3.0, 0.8, 1.3)
        assert hd95(a, b, spacing) == pytest.approx(_brute_force_hd95(a, b, spacing))


def test_empty_class_conventions():
    labels = {"background": 0, "both_absent": 1, "pred_only": 2, "ref_only": 3}
    pred = np.zeros((4, 4, 4), dtype=np.uint8)
    ref = np.zeros_like(pred)
    pred[0, 0, :2] = 2
    ref[3, 3, :] = 3
    rows = _by_value(evaluate_arrays(pred, ref, (1.0, 1.0, 1.0), labels))
    assert rows[1]["dice"] == 1.0 and rows[1]["hd95_mm"] is None
    assert "absent from prediction and reference" in rows[1]["note"]
    assert rows[2]["dice"] == 0.0 and rows[2]["hd95_mm"] is None
    assert "absent from reference" in rows[2]["note"]
    assert rows[2]["volume_diff_rel"] is None  # no reference volume to divide by
    assert rows[3]["dice"] == 0.0 and rows[3]["hd95_mm"] is None
    assert "absent from prediction" in rows[3]["note"]
    assert rows[3]["volume_diff_rel"] == pytest.approx(-1.0)
    assert hd95(pred == 1, ref == 1, (1.0, 1.0, 1.0)) is None


def test_evaluate_files_reports_physical_metrics(tmp_path):
    a, b = _cube(), np.roll(_cube(), 1, axis=0)  # shifted along z (numpy axis 0)
    spacing = (0.8, 0.8, 3.0)  # SimpleITK order x, y, z
    pred = _write(tmp_path / "case1.nii.gz", a, spacing, origin=(10.0, -5.0, 2.0))
    ref = _write(tmp_path / "case1.nrrd", b, spacing, origin=(10.0, -5.0, 2.0))
    report = evaluate_files(pred, ref)
    row = report["cases"][0]["classes"][0]
    assert report["cases"][0]["case"] == "case1"
    assert row["hd95_mm"] == pytest.approx(3.0)
    assert row["dice"] == pytest.approx(2 / 3)
    assert row["volume_ref_ml"] == pytest.approx(27 * 0.8 * 0.8 * 3.0 / 1000)
    assert report["mean"][0]["dice"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("change", "word"),
    [({"spacing": (1.0, 1.0, 1.2)}, "spacing"), ({"origin": (0.0, 0.5, 0.0)}, "origin"),
     ({"direction": (1, 0, 0, 0, -1, 0, 0, 0, -1)}, "direction"), ({"shape": (8, 8, 9)}, "size")],
)  # fmt: skip
def test_geometry_mismatch_is_an_error_never_a_resample(tmp_path, change, word):
    ref = _write(tmp_path / "ref.nii.gz", _cube())
    change = dict(change)
    shape = change.pop("shape", (8, 8, 8))
    pred = _write(tmp_path / "pred.nii.gz", _cube(shape=shape), **change)
    with pytest.raises(MaskSAMError, match=word):
        evaluate_files(pred, ref)


@pytest.mark.parametrize(
    ("change", "same"),
    [({"spacing": (1.0005, 1.0, 1.0)}, True), ({"spacing": (1.002, 1.0, 1.0)}, False),
     ({"origin": (0.0005, 0.0, 0.0)}, True), ({"origin": (0.005, 0.0, 0.0)}, False),
     ({"direction": (1, 0.0005, 0, -0.0005, 1, 0, 0, 0, 1)}, True),
     ({"direction": (1, 0.005, 0, -0.005, 1, 0, 0, 0, 1)}, False)],
)  # fmt: skip
def test_evaluate_uses_the_one_same_grid_rule(tmp_path, change, same):
    """evaluate accepts exactly the grids that Geometry.differences (GRID_TOL) calls the same."""
    ref = _write(tmp_path / "ref.nrrd", _cube())
    pred = _write(tmp_path / "pred.nrrd", _cube(), **change)
    grids = [Geometry.from_sitk(sitk.ReadImage(str(p))) for p in (pred, ref)]
    assert grids[0].allclose(grids[1]) is same
    if same:
        assert evaluate_files(pred, ref)["cases"][0]["classes"][0]["dice"] == 1.0
    else:
        with pytest.raises(MaskSAMError, match="never resamples"):
            evaluate_files(pred, ref)


def test_float_rounding_of_geometry_is_tolerated(tmp_path):
    ref = _write(tmp_path / "ref.nrrd", _cube(), spacing=(0.7, 0.7, 2.5), origin=(-120.3, 4, 9))
    pred = _write(tmp_path / "pred.nrrd", _cube(), spacing=(0.7 + 1e-7, 0.7, 2.5),
                  origin=(-120.3 + 1e-5, 4, 9))  # fmt: skip
    assert evaluate_files(pred, ref)["cases"][0]["classes"][0]["dice"] == 1.0


def test_non_label_files_are_refused(tmp_path):
    ref = _write(tmp_path / "ref.nii.gz", _cube())
    image = sitk.GetImageFromArray(_cube().astype(np.float32) * 0.5)
    sitk.WriteImage(image, str(tmp_path / "prob.nii.gz"))
    with pytest.raises(MaskSAMError, match="non-integer"):
        evaluate_files(tmp_path / "prob.nii.gz", ref)
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image")
    with pytest.raises(MaskSAMError, match="not a readable image"):
        evaluate_files(tmp_path / "junk.nii.gz", ref)
    with pytest.raises(MaskSAMError, match="does not exist"):
        evaluate_files(tmp_path / "missing.nii.gz", ref)


def test_case_ids_strip_compound_extensions(tmp_path):
    """One case-id rule for evaluate's pairing, segment's inputs and datasets."""
    assert case_id("a/liver_01.nii.gz") == "liver_01"
    assert case_id("liver_01.seg.nrrd") == "liver_01"
    assert case_id("x.mha") == "x"
    assert case_id("ct_0000.nii.gz") == "ct_0000"  # a label map keeps its whole name
    assert case_id("ct_0000.nii.gz", strip_channel=True) == "ct"  # an image: its case
    assert case_id("x.label.nii.gz", ending=".label.nii.gz") == "x"
    (tmp_path / "series_7").mkdir()
    assert case_id(tmp_path / "series_7") == "series_7"  # a DICOM folder: its name


def _pair_folders(tmp_path):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    full = np.zeros((6, 6, 6), dtype=np.uint8)
    full[1:4, 1:4, 1:4] = 1
    half = full.copy()
    half[1:4, 1:4, 1] = 0  # pred misses one of three slabs: Dice 2*18/(18+27) = 0.8
    _write(pred_dir / "a.nii.gz", full)
    _write(ref_dir / "a.nii.gz", full)
    two = full.copy()
    two[5, 5, 5] = 2  # class 2 only in case b's prediction
    _write(pred_dir / "b.nrrd", np.where(two == 2, 2, half))
    _write(ref_dir / "b.seg.nrrd", full)
    _write(pred_dir / "c.mha", full)  # no reference
    _write(ref_dir / "d.nii.gz", full)  # no prediction
    (pred_dir / "readme.txt").write_text("ignored")
    return pred_dir, ref_dir


def test_folders_pair_by_case_id_and_report_unpaired(tmp_path):
    pred_dir, ref_dir = _pair_folders(tmp_path)
    report = evaluate_paths(pred_dir, ref_dir)
    assert [c["case"] for c in report["cases"]] == ["a", "b"]
    assert report["unpaired"] == {"prediction_only": ["c"], "reference_only": ["d"]}
    rows = {c["case"]: _by_value(c["classes"]) for c in report["cases"]}
    assert rows["a"][1]["dice"] == 1.0 and rows["a"][1]["hd95_mm"] == 0.0
    assert rows["b"][1]["dice"] == pytest.approx(0.8)
    # Class 2 exists only in b's prediction: a scores it by the "absent from both" convention.
    assert rows["a"][2]["dice"] == 1.0 and rows["a"][2]["hd95_mm"] is None
    assert rows["b"][2]["dice"] == 0.0 and rows["b"][2]["hd95_mm"] is None
    means = _by_value(report["mean"])
    assert means[1]["dice"] == pytest.approx(0.9)
    assert means[1]["hd95_cases"] == 2
    assert means[2]["dice"] == pytest.approx(0.5) and means[2]["hd95_mm"] is None
    assert means[2]["hd95_cases"] == 0
    assert report["mean_foreground_dice"] == pytest.approx(0.7)


def test_folders_with_no_pair_or_duplicate_cases_are_errors(tmp_path):
    pred_dir, ref_dir = _pair_folders(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MaskSAMError, match="No case"):
        evaluate_folders(empty, ref_dir)
    _write(pred_dir / "a.mha", np.zeros((6, 6, 6)))
    with pytest.raises(MaskSAMError, match="twice"):
        evaluate_folders(pred_dir, ref_dir)
    with pytest.raises(MaskSAMError, match="two folders"):
        evaluate_paths(pred_dir, ref_dir / "d.nii.gz")


def test_labels_from_dataset_json(tmp_path):
    pred_dir, ref_dir = _pair_folders(tmp_path)
    ds = tmp_path / "dataset.json"
    ds.write_text(json.dumps({"labels": {"background": 0, "liver": 1, "tumour": 3}}))
    report = evaluate_folders(pred_dir, ref_dir, labels=ds)
    assert [m["label"] for m in report["mean"]] == ["liver", "tumour"]
    assert _by_value(report["mean"])[3]["dice"] == 1.0  # absent everywhere
    assert any("undeclared values [2]" in w for w in report["warnings"])
    ds.write_text(json.dumps({"labels": {"background": 0, "tumour": [1, 2]}}))
    with pytest.raises(MaskSAMError, match="region-based"):
        read_label_file(ds)
    ds.write_text(json.dumps({"labels": {"liver": 1}}))
    with pytest.raises(MaskSAMError, match="background"):
        read_label_file(tmp_path)


def test_report_files_and_table(tmp_path):
    pred_dir, ref_dir = _pair_folders(tmp_path)
    report = evaluate_folders(pred_dir, ref_dir)
    out = tmp_path / "out"
    out.mkdir()
    json_path, csv_path = write_report(report, out / "report.json")
    assert sorted(p.name for p in out.iterdir()) == ["report.csv", "report.json"]
    loaded = json.loads(json_path.read_text())
    row = _by_value(loaded["cases"][1]["classes"])[2]
    assert row["hd95_mm"] is None and "HD95 not defined" in row["note"]
    assert "null" in json_path.read_text()
    assert loaded["conventions"]["dice_absent_from_both"] == 1.0
    with open(csv_path, newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 2 * 2 + 2  # two cases x two classes, then one mean row per class
    assert [r["case"] for r in table] == ["a", "a", "b", "b", "mean", "mean"]
    assert float(table[2]["dice"]) == pytest.approx(0.8)
    assert table[3]["hd95_mm"] == ""
    text = format_table(report)
    assert "label_1" in text and "0.900" in text and "n/a" in text
    assert "Only in the prediction folder (not evaluated): c" in text
    single = format_table(evaluate_files(pred_dir / "b.nrrd", ref_dir / "b.seg.nrrd"))
    assert "case b" in single and "0.800" in single


@pytest.mark.parametrize(
    "direction",
    [(1, 0, 0, 0, 1, 0, 0, 0, 1), (0, 0, -1, 1, 0, 0, 0, -1, 0), (-1, 0, 0, 0, 0, 1, 0, 1, 0)],
)
def test_metrics_follow_voxel_spacing_whatever_the_direction(tmp_path, direction):
    a, b = _cube(), np.roll(_cube(), 1, axis=0)  # shifted along the third voxel axis (2 mm)
    pred = _write(tmp_path / "p.nii.gz", a, (1.0, 1.0, 2.0), direction=direction)
    ref = _write(tmp_path / "r.nii.gz", b, (1.0, 1.0, 2.0), direction=direction)
    assert evaluate_files(pred, ref)["cases"][0]["classes"][0]["hd95_mm"] == pytest.approx(2.0)
