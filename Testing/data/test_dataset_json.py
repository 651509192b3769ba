"""nnU-Net v2 / MSD dataset folders: loading, validation errors, label files, planning."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MaskSAMLib.data.dataset_json import load_dataset, validate_dataset
from MaskSAMLib.data.geometry import Geometry
from MaskSAMLib.data.io import write_label_map, write_volume
from MaskSAMLib.data.planning import plan_preprocessing
from MaskSAMLib.data.preprocessing import PreprocessConfig
from MaskSAMLib.errors import MaskSAMError
from MaskSAMLib.labels import read_label_file

LABELS = {"background": 0, "liver": 1, "spleen": 2}
GEOMETRY = Geometry((12, 10, 6), (0.8, 0.8, 3.0), (1.0, 2.0, 3.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def _case_arrays(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    label = np.zeros(GEOMETRY.shape, np.uint8)
    label[1:4, 2:6, 3:8] = 1
    label[4, 6:9, 8:11] = 2
    image = (rng.normal(0, 20, GEOMETRY.shape) - 900 + 1000 * (label > 0)).astype(np.int16)
    return image, label


def make_nnunet(
    folder: Path, cases: int = 3, channels: tuple[str, ...] = ("CT",), ending: str = ".nii.gz"
) -> Path:
    """A small valid nnU-Net v2 raw dataset."""
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for index in range(cases):
        image, label = _case_arrays(index)
        case = f"case_{index:03d}"
        for channel in range(len(channels)):
            path = folder / "imagesTr" / f"{case}_{channel:04d}{ending}"
            write_volume(image + channel, GEOMETRY, path)
        write_label_map(label, GEOMETRY, folder / "labelsTr" / f"{case}{ending}")
    dataset = {
        "name": "Toy",
        "channel_names": {str(i): n for i, n in enumerate(channels)},
        "labels": LABELS,
        "numTraining": cases,
        "file_ending": ending,
    }
    (folder / "dataset.json").write_text(json.dumps(dataset))
    return folder


def _edit_json(folder: Path, **changes) -> None:
    path = folder / "dataset.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _problems(folder: Path) -> str:
    with pytest.raises(MaskSAMError) as info:
        validate_dataset(load_dataset(folder))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_valid_nnunet_dataset(tmp_path: Path) -> None:
    folder = make_nnunet(tmp_path / "Dataset001_Toy", channels=("CT", "T1"))
    spec = load_dataset(folder)
    assert spec.name == "Toy" and spec.channel_names == ["CT", "T1"]
    assert spec.labels == LABELS and spec.file_ending == ".nii.gz"
    assert [c.case_id for c in spec.cases] == ["case_000", "case_001", "case_002"]
    assert spec.cases[1].image_paths[1] == folder / "imagesTr" / "case_001_0001.nii.gz"
    assert spec.cases[1].label_path == folder / "labelsTr" / "case_001.nii.gz"
    validate_dataset(spec)
    assert spec.label_entries()[2] == {"value": 2, "name": "spleen"}


def test_msd_training_list(tmp_path: Path) -> None:
    folder = make_nnunet(tmp_path / "Task03_Liver", cases=2)
    for name in os.listdir(folder / "imagesTr"):  # MSD names have no channel suffix
        os.rename(folder / "imagesTr" / name, folder / "imagesTr" / name.replace("_0000", ""))
    msd = {
        "name": "Liver",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "spleen"},
        "numTraining": 2,
        "training": [
            {"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"}
            for i in range(2)
        ],
    }
    (folder / "dataset.json").write_text(json.dumps(msd))
    spec = load_dataset(folder)
    assert spec.layout == "msd" and spec.labels == LABELS and spec.file_ending == ".nii.gz"
    assert [c.case_id for c in spec.cases] == ["case_000", "case_001"]
    validate_dataset(spec)
    # A multi-modal MSD image is a single 4D file: refused, saying how to split it.
    channel = sitk.GetImageFromArray(np.zeros(GEOMETRY.shape, np.float32))
    sitk.WriteImage(
        sitk.JoinSeries([channel, channel]), str(folder / "imagesTr" / "case_001.nii.gz")
    )
    message = _problems(folder)
    assert message.startswith(
        "1 problem in dataset Liver: case_001: imagesTr/case_001.nii.gz is a 4D"
    )
    assert "split it into one 3D file per channel named CASE_0000, CASE_0001" in message
    # paths that leave the folder
    msd["training"][0]["image"] = "../outside.nii.gz"
    msd["training"][1]["label"] = str(tmp_path / "labels" / "case_001.nii.gz")
    (folder / "dataset.json").write_text(json.dumps(msd))
    message = _problems(folder)
    assert "2 problems" in message and "case_000:" in message and "case_001:" in message
    assert message.count("is outside the dataset folder") == 2
    assert "case_000: ../outside.nii.gz is outside" in message


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"labels": {"background": 0, "tumor": 1, "whole": [1, 2]}},
            "label 'whole' is region-based ([1, 2]); MaskSAM needs one integer value per class",
        ),
        ({"labels": {"liver": 1, "spleen": 2}}, "must declare the background as value 0"),
        ({"labels": {"background": 0, "liver": 1, "spleen": 1}}, "label value 1 is used twice"),
        ({"labels": {"background": 0, "liver": 1.5}}, "label 'liver' needs an integer value"),
        ({"file_ending": None}, "needs 'file_ending'"),
        ({"channel_names": {"0": "CT", "2": "T1"}}, 'keys must be "0", "1", ... without gaps'),
        ({"channel_names": None}, "needs 'channel_names'"),
    ],
    ids=["region", "no-background", "duplicate", "float", "ending", "channel-gap", "channels"],
)
def test_bad_dataset_json(tmp_path: Path, changes: dict, expected: str) -> None:
    folder = make_nnunet(tmp_path / "ds", cases=1)
    _edit_json(folder, **changes)
    with pytest.raises(MaskSAMError) as info:
        load_dataset(folder)
    assert expected in str(info.value)


def test_unreadable_dataset_json(tmp_path: Path) -> None:
    with pytest.raises(MaskSAMError, match="a dataset folder needs a dataset.json"):
        load_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(MaskSAMError, match="is not valid JSON"):
        load_dataset(tmp_path)


# The damaged datasets use NRRD files: ITK's NIfTI reader silently zeroes NaN voxels.
def _nan_image(folder: Path) -> None:
    image = np.zeros(GEOMETRY.shape, np.float32)
    image[2, 2, 2] = np.nan
    write_volume(image, GEOMETRY, folder / "imagesTr" / "case_001_0000.nrrd", overwrite=True)


def _shift_origin(folder: Path) -> None:
    image, _ = _case_arrays(1)
    moved = Geometry(GEOMETRY.size, GEOMETRY.spacing, (1.0, 2.5, 3.0), GEOMETRY.direction)
    write_volume(image, moved, folder / "imagesTr" / "case_001_0000.nrrd", overwrite=True)


def _undeclared_label(folder: Path) -> None:
    _, label = _case_arrays(1)
    label[0, 0, 0] = 5
    label[0, 0, 1] = 9
    write_label_map(label, GEOMETRY, folder / "labelsTr" / "case_001.nrrd", overwrite=True)


def _flat_image(folder: Path) -> None:
    sitk.WriteImage(
        sitk.GetImageFromArray(np.zeros((10, 12), np.int16)),
        str(folder / "imagesTr" / "case_001_0000.nrrd"),
    )


def _garbage(folder: Path) -> None:
    (folder / "imagesTr" / "case_001_0000.nrrd").write_bytes(b"not an image")


def _missing(folder: Path) -> None:
    (folder / "imagesTr" / "case_001_0000.nrrd").unlink()


def _symlink_out(folder: Path) -> None:
    outside = folder.parent / "elsewhere.nrrd"
    os.replace(folder / "labelsTr" / "case_001.nrrd", outside)
    os.symlink(outside, folder / "labelsTr" / "case_001.nrrd")


def _float_label(folder: Path) -> None:
    _, label = _case_arrays(1)
    write_volume(
        label.astype(np.float32) * 0.5,
        GEOMETRY,
        folder / "labelsTr" / "case_001.nrrd",
        overwrite=True,
    )


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (
            _nan_image,
            "case_001: imagesTr/case_001_0000.nrrd contains NaN or Inf values in 1 voxels",
        ),
        (
            _shift_origin,
            "case_001: imagesTr/case_001_0000.nrrd and its label differ in origin "
            "(1, 2.5, 3) vs (1, 2, 3); resample the label onto the image grid",
        ),
        (
            _undeclared_label,
            "case_001: label labelsTr/case_001.nrrd holds values [5, 9] not "
            "declared in dataset.json 'labels'",
        ),
        (_flat_image, "case_001: imagesTr/case_001_0000.nrrd is a 2D image"),
        (_garbage, "case_001: imagesTr/case_001_0000.nrrd is not an image file SimpleITK can read"),
        (_missing, "case_001: missing file imagesTr/case_001_0000.nrrd; add it or remove the case"),
        (
            _symlink_out,
            "case_001: labelsTr/case_001.nrrd is a symbolic link pointing outside the "
            "dataset folder",
        ),
        (_float_label, "case_001: label labelsTr/case_001.nrrd holds non-integer values"),
    ],
    ids=["nan", "origin", "undeclared", "2d", "unreadable", "missing", "symlink", "float-label"],
)
def test_each_bad_case_is_named(tmp_path: Path, damage, expected: str) -> None:
    folder = make_nnunet(tmp_path / "ds", ending=".nrrd")
    damage(folder)
    message = _problems(folder)
    assert message.startswith("1 problem in dataset Toy: ")
    assert expected in message


def test_problems_are_collected_and_summarised(tmp_path: Path) -> None:
    folder = make_nnunet(tmp_path / "ds", cases=5)
    for index in range(4):
        (folder / "imagesTr" / f"case_{index:03d}_0000.nii.gz").unlink()
    (folder / "imagesTr" / "stray_0000.nii.gz").write_bytes(b"x")
    _edit_json(folder, numTraining=7)
    message = _problems(folder)
    assert message.startswith("6 problems in dataset Toy: dataset.json says numTraining=7 but 5")
    assert "imagesTr/stray_0000.nii.gz belongs to no labelled case" in message
    assert "case_000: missing file imagesTr/case_000_0000.nii.gz" in message
    assert message.endswith("; and 3 more")
    validate_dataset(load_dataset(make_nnunet(tmp_path / "ok", cases=1)), check_files=False)


def test_read_label_file_accepts_every_form_with_one_rule(tmp_path: Path) -> None:
    """One reader for init, prompt and evaluate --labels: the same file means the same labels."""
    folder = make_nnunet(tmp_path / "ds", cases=1, channels=("CT", "T2"))
    found = read_label_file(folder / "dataset.json")
    assert found.labels == {"background": 0, "liver": 1, "spleen": 2}
    assert found.channel_names == ["CT", "T2"]
    assert read_label_file(folder) == found  # a dataset folder: its dataset.json
    cases = {
        "list.json": (["Background", "liver"], {"Background": 0, "liver": 1}),
        "names.json": ({"spleen": 2, "liver": 1, "background": 0},
                       {"background": 0, "liver": 1, "spleen": 2}),
        "values.json": ({"2": "spleen", "1": "liver", "0": "bg"},
                        {"bg": 0, "liver": 1, "spleen": 2}),
        "config.json": ({"labels": [{"value": 0, "name": "background"},
                                    {"value": 52, "name": "aorta", "color": [1, 2, 3]}]},
                        {"background": 0, "aorta": 52}),
    }
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_text(json.dumps(content))
        assert read_label_file(tmp_path / name).labels == expected, name
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text((tmp_path / "config.json").read_text())
    assert read_label_file(model).labels == {"background": 0, "aorta": 52}  # a model folder
    assert read_label_file({"background": 0, "liver": 1}).labels == {"background": 0, "liver": 1}
    refused = {
        "nobg_list.json": (["liver", "spleen"], "'background'"),
        "nobg_map.json": ({"liver": 1}, "background as value 0"),
        "region.json": ({"labels": {"background": 0, "whole": [1, 2]}}, "region-based"),
        "bad.json": (42, "expected a dataset.json, a model's config.json"),
        "chan.json": ({"labels": {"background": 0}, "channel_names": {"x": "CT"}},
                      "channel numbers"),
    }
    for name, (content, match) in refused.items():
        (tmp_path / name).write_text(json.dumps(content))
        with pytest.raises(MaskSAMError, match=match):
            read_label_file(tmp_path / name)
    with pytest.raises(MaskSAMError, match="does not exist"):
        read_label_file(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(MaskSAMError, match="not valid JSON"):
        read_label_file(tmp_path / "broken.json")


def test_plan_preprocessing(tmp_path: Path) -> None:
    folder = make_nnunet(tmp_path / "ds", cases=3, channels=("CT", "T2"))
    spec = load_dataset(folder)
    config = plan_preprocessing(spec)
    # ratio 3.75 is anisotropic, but the 10th percentile of equal z spacings is the same value
    assert config.target_spacing == pytest.approx((0.8, 0.8, 3.0))
    assert config.normalization == ["CT", "zscore"] and config.ct_stats[1] is None
    stats = config.ct_stats[0]
    assert stats is not None and 50 < stats.mean < 150 and 15 < stats.std < 25
    assert PreprocessConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
