"""Synthetic phantom datasets: format, geometry, anatomy sidedness, determinism, safe writes."""

from __future__ import annotations

import json
from itertools import permutations, product
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MaskSAMLib.data.phantoms import PHANTOM_LABELS, make_phantom_case, make_phantoms
from MaskSAMLib.errors import MaskSAMError

SMALL = (40, 40, 16)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_phantoms(tmp_path_factory.mktemp("phantoms") / "Dataset001_Phantoms", cases=6)


def _cases(root: Path) -> list[tuple[sitk.Image, sitk.Image]]:
    out = []
    for label_path in sorted((root / "labelsTr").iterdir()):
        case = label_path.name[: -len(".nii.gz")]
        image = sitk.ReadImage(str(root / "imagesTr" / f"{case}_0000.nii.gz"))
        out.append((image, sitk.ReadImage(str(label_path))))
    return out


def _physical_centroids(label: sitk.Image) -> dict[str, np.ndarray]:
    """Class name -> centroid in physical LPS mm (x grows towards the patient's left)."""
    array = sitk.GetArrayFromImage(label)
    out = {}
    for name, value in PHANTOM_LABELS.items():
        if value:
            kji = np.argwhere(array == value).mean(axis=0)
            ijk = [float(v) for v in kji[::-1]]
            out[name] = np.array(label.TransformContinuousIndexToPhysicalPoint(ijk))
    return out


def test_dataset_is_nnunet_v2_raw_format(dataset):
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["labels"] == PHANTOM_LABELS and meta["labels"]["background"] == 0
    assert meta["numTraining"] == 6 and meta["file_ending"] == ".nii.gz"
    images = sorted(p.name for p in (dataset / "imagesTr").iterdir())
    labels = sorted(p.name for p in (dataset / "labelsTr").iterdir())
    assert images == [f"phantom_{i:03d}_0000.nii.gz" for i in range(6)]
    assert labels == [f"phantom_{i:03d}.nii.gz" for i in range(6)]
    assert sorted(p.name for p in dataset.parent.iterdir()) == [dataset.name]  # no temp left


def test_every_case_has_every_class_and_ct_like_intensities(dataset):
    for image, label in _cases(dataset):
        hu, lab = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label)
        assert image.GetPixelID() == sitk.sitkInt16 and lab.dtype == np.uint8
        assert 24 <= min(hu.shape) <= 40 and 64 <= max(hu.shape) <= 96
        counts = np.bincount(lab.ravel(), minlength=len(PHANTOM_LABELS))
        assert len(counts) == len(PHANTOM_LABELS) and (counts[1:] >= 50).all(), counts
        mean = {name: float(hu[lab == v].mean()) for name, v in PHANTOM_LABELS.items() if v}
        assert 40 < mean["liver"] < 80 and 30 < mean["spleen"] < 65
        # Contrast-enhanced kidneys and aorta (means include partial-volume edge voxels).
        assert mean["kidney_left"] > mean["liver"] + 30 and mean["aorta"] > mean["liver"] + 30
        assert mean["spine"] > 250
        corner = hu[:, :3, :3]  # outside the body: air
        assert np.median(corner) < -900
        assert 5 < np.std(hu[lab == PHANTOM_LABELS["liver"]]) < 40  # noise, but not swamping


def test_image_and_label_share_one_anisotropic_grid(dataset):
    for image, label in _cases(dataset):
        assert image.GetSize() == label.GetSize()
        assert image.GetSpacing() == label.GetSpacing()
        assert image.GetOrigin() == label.GetOrigin()
        assert image.GetDirection() == label.GetDirection()
        spacing = np.array(image.GetSpacing())
        assert 1.0 <= spacing.min() <= 1.6 and 2.5 <= spacing.max() <= 5.0
        # The thick axis is the body axis (superior-inferior = physical z), whatever its position.
        direction = np.array(image.GetDirection()).reshape(3, 3)
        assert np.argmax(np.abs(direction[:, int(np.argmax(spacing))])) == 2


def test_geometry_differs_across_cases(dataset):
    grids = [(im.GetSize(), im.GetSpacing(), im.GetOrigin()) for im, _ in _cases(dataset)]
    directions = {im.GetDirection() for im, _ in _cases(dataset)}
    assert len(set(grids)) == len(grids)
    assert len(directions) >= 4  # several voxel orders of the same anatomy


def test_left_kidney_is_on_the_patients_left_in_every_case(dataset):
    for _, label in _cases(dataset):
        c = _physical_centroids(label)
        # LPS: +x is the patient's left.
        assert c["kidney_left"][0] > c["spine"][0] + 5 > c["kidney_right"][0] + 10
        assert c["spleen"][0] > c["spine"][0] > c["liver"][0]
        assert c["aorta"][1] < c["spine"][1]  # aorta anterior to the spine


def _all_directions() -> list[tuple[float, ...]]:
    out = []
    for perm, signs in product(permutations(range(3)), product((1.0, -1.0), repeat=3)):
        d = np.zeros((3, 3))
        for axis, (phys, sign) in enumerate(zip(perm, signs, strict=True)):
            d[phys, axis] = sign
        out.append(tuple(d.flatten()))
    return out


def test_same_physical_anatomy_in_all_48_orientations():
    _, reference = make_phantom_case(5, 1, size=SMALL, direction=np.eye(3).flatten())
    ref = sitk.GetArrayFromImage(reference)
    seen = set()
    for direction in _all_directions():
        image, label = make_phantom_case(5, 1, size=SMALL, direction=direction)
        assert label.GetDirection() == pytest.approx(direction)
        seen.add(sitk.GetArrayFromImage(label).shape)
        c = _physical_centroids(label)
        assert c["kidney_left"][0] > c["spine"][0] > c["kidney_right"][0]
        # Reordering the voxels back to LPS by permutation/flip gives the identical label map.
        canonical = sitk.DICOMOrient(label, "LPS")
        assert np.array(canonical.GetOrigin()) == pytest.approx(reference.GetOrigin(), abs=1e-6)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(canonical), ref)
    assert len(seen) == 3  # the slice axis moves between voxel axes


def test_oblique_direction_keeps_anatomy_sides():
    angle = np.radians(20)
    rot = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    _, label = make_phantom_case(2, 0, size=SMALL, direction=rot.flatten())
    c = _physical_centroids(label)
    assert c["kidney_left"][0] > c["spine"][0] > c["kidney_right"][0]


def test_deterministic_for_a_seed(tmp_path):
    a = make_phantoms(tmp_path / "a", cases=2, seed=7, size=SMALL)
    b = make_phantoms(tmp_path / "b", cases=2, seed=7, size=SMALL)
    c = make_phantoms(tmp_path / "c", cases=2, seed=8, size=SMALL)
    assert (a / "dataset.json").read_text() == (b / "dataset.json").read_text()
    for (ia, la), (ib, lb), (ic, _) in zip(_cases(a), _cases(b), _cases(c), strict=True):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(ia), sitk.GetArrayFromImage(ib))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(la), sitk.GetArrayFromImage(lb))
        assert ia.GetOrigin() == ib.GetOrigin() and ia.GetDirection() == ib.GetDirection()
        assert ia.GetSize() != ic.GetSize() or not np.array_equal(
            sitk.GetArrayFromImage(ia), sitk.GetArrayFromImage(ic)
        )
    # Case i does not depend on how many cases are written.
    image, _ = make_phantom_case(7, 1, size=SMALL)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(ia))


def test_refuses_non_empty_output_folder_untouched(tmp_path):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(MaskSAMError, match="not empty"):
        make_phantoms(out, cases=1, size=SMALL)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["existing"]


def test_failure_midway_leaves_nothing_behind(tmp_path):
    def stop(done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_phantoms(tmp_path / "out", cases=3, size=SMALL, on_case=stop)
    assert list(tmp_path.iterdir()) == []


def test_empty_existing_folder_is_filled_and_options_are_validated(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    make_phantoms(out, cases=1, size=SMALL, vary_orientation=False)
    image = sitk.ReadImage(str(out / "imagesTr" / "phantom_000_0000.nii.gz"))
    assert image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    for bad in ({"cases": 0}, {"size": (8, 80, 30)}, {"slice_spacing": (5.0, 2.0)}):
        with pytest.raises(MaskSAMError):
            make_phantoms(tmp_path / "bad", **{"size": SMALL, **bad})
    assert not (tmp_path / "bad").exists()
