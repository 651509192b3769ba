"""Reorientation, spacing, resampling, normalisation and the exact inverse to the input grid."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from MaskSAMLib.data.geometry import Geometry, Volume
from MaskSAMLib.data.io import read_volume
from MaskSAMLib.data.normalization import normalize, scheme_for_channel, uncrop
from MaskSAMLib.data.preprocessing import (
    CanonicalTransform,
    CTNormStats,
    PreprocessConfig,
    compute_ct_stats,
    crop_to_nonzero,
    fingerprint,
    original_geometry,
    postprocess_image,
    postprocess_labels,
    preprocess_case,
    preprocess_label,
    resample_image,
    resample_labels,
    to_canonical,
)
from MaskSAMLib.data.resampling import resample_image_to_shape, resample_labels_to_shape
from MaskSAMLib.errors import MaskSAMError

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "totalseg_examples"
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# Reference anatomy in the canonical frame: array (z, y, x) = (S, P, L).
REF_GEOMETRY = Geometry((7, 6, 5), (0.5, 0.8, 2.0), (10.0, -20.0, 30.0), IDENTITY)
REF = np.random.default_rng(0).integers(0, 1000, REF_GEOMETRY.shape).astype(np.int16)


def reoriented(perm: tuple[int, ...], signs: tuple[int, ...]) -> tuple[np.ndarray, Geometry]:
    """The reference anatomy stored with index axis k along physical axis perm[k] * signs[k]."""
    size = [REF_GEOMETRY.size[perm[k]] for k in range(3)]
    direction = np.zeros((3, 3))
    ref_index: list[np.ndarray] = [np.empty(0)] * 3
    grid = np.indices(size[::-1])  # (z, y, x) index arrays of the new grid
    first = [0, 0, 0]
    for k in range(3):
        direction[perm[k], k] = signs[k]
        new_index = grid[2 - k]
        ref_index[perm[k]] = new_index if signs[k] > 0 else size[k] - 1 - new_index
        first[perm[k]] = 0 if signs[k] > 0 else size[k] - 1
    array = REF[ref_index[2], ref_index[1], ref_index[0]]
    geometry = Geometry(
        size,
        [REF_GEOMETRY.spacing[perm[k]] for k in range(3)],
        REF_GEOMETRY.physical_point(first)[:3],
        direction.reshape(-1),
    )
    return array, geometry


ORIENTATIONS = list(
    itertools.product(itertools.permutations(range(3)), itertools.product((1, -1), repeat=3))
)


@pytest.mark.parametrize(("perm", "signs"), ORIENTATIONS)
def test_all_48_orientations_reach_the_same_canonical_anatomy(perm, signs) -> None:
    array, geometry = reoriented(perm, signs)
    canonical, transform = to_canonical(array, geometry)
    assert np.array_equal(canonical, REF)  # the same anatomy, voxel for voxel
    assert transform.canonical.allclose(REF_GEOMETRY, 1e-9)
    assert np.array_equal(transform.invert(canonical), array)  # and back exactly
    # A marker voxel lands at the same physical point in both grids.
    z, y, x = 3, 4, 1
    original = np.argwhere(array == REF[z, y, x])
    hits = [geometry.physical_point(idx[::-1]) for idx in original]
    point = REF_GEOMETRY.physical_point((x, y, z))
    assert any(np.allclose(h, point) for h in hits)


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = [i for i in range(3) if i != axis]
    matrix = np.eye(3)
    matrix[a, a], matrix[a, b], matrix[b, a], matrix[b, b] = c, -s, s, c
    return matrix


def test_oblique_is_permuted_and_flipped_but_never_straightened() -> None:
    # A sagittal-ish acquisition, tilted 20 degrees and 10 degrees.
    base = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=float)
    direction = _rotation(0, 20) @ _rotation(2, 10) @ base
    geometry = Geometry((4, 5, 6), (1.0, 1.5, 3.0), (5.0, 6.0, 7.0), direction.reshape(-1))
    array = np.random.default_rng(1).normal(size=geometry.shape).astype(np.float32)
    canonical, transform = to_canonical(array, geometry)
    new = transform.canonical.direction_matrix
    assert np.all(np.diag(new) > 0.9)  # nearest to +L, +P, +S
    columns = {tuple(np.round(c, 9)) for c in direction.T} | {
        tuple(np.round(-c, 9)) for c in direction.T
    }
    assert all(tuple(np.round(c, 9)) in columns for c in new.T)  # same axes, not resampled
    assert np.array_equal(transform.invert(canonical), array)
    # every voxel keeps its physical position
    last = tuple(n - 1 for n in transform.canonical.size)
    for idx in [(0, 0, 0), last, (1, 2, 1)]:
        value = canonical[idx[2], idx[1], idx[0]]
        (orig,) = np.argwhere(array == value)
        assert np.allclose(
            transform.canonical.physical_point(idx), geometry.physical_point(orig[::-1]), atol=1e-9
        )
    # channels ride along
    stacked = np.stack([array, array * 2])
    assert np.array_equal(transform.invert(transform.apply(stacked))[1], array * 2)


def test_fingerprint_rules() -> None:
    assert fingerprint([(1, 1, 1), (2, 2, 2), (3, 3, 3)]) == (2.0, 2.0, 2.0)
    # Anisotropic medians (0.75 vs 5): z takes its 10th percentile instead of the median.
    spacings = [(0.75, 0.75, 5.0)] * 8 + [(0.7, 0.7, 1.0), (0.8, 0.8, 1.25)]
    target = fingerprint(spacings)
    assert target[:2] == (0.75, 0.75)
    assert target[2] == pytest.approx(np.percentile([5.0] * 8 + [1.0, 1.25], 10))
    # ... but never finer than the in-plane spacing
    assert fingerprint([(2.0, 2.0, 7.0)] * 6 + [(2.0, 2.0, 0.5)] * 4)[2] == 2.0
    # ratio exactly 3 is not anisotropic
    assert fingerprint([(1, 1, 3), (1, 1, 3), (1, 1, 0.5)]) == (1.0, 1.0, 3.0)
    with pytest.raises(ValueError):
        fingerprint([])


def test_resample_image_shapes_and_smooth_signals() -> None:
    z, y, x = np.meshgrid(np.arange(10), np.arange(12), np.arange(14), indexing="ij")
    ramp = (0.5 * x + 0.25 * y + z).astype(np.float32)
    out = resample_image(ramp, (1.0, 1.0, 1.0), (0.5, 0.5, 0.5))
    assert out.shape == (20, 24, 28) and out.dtype == np.float32
    zz, yy, xx = np.meshgrid(*[(np.arange(n) + 0.5) / 2 - 0.5 for n in (20, 24, 28)], indexing="ij")
    inner = (slice(6, -6),) * 3  # the spline's edge handling fades within a few voxels
    assert np.allclose(out[inner], (0.5 * xx + 0.25 * yy + zz)[inner], atol=0.02)
    back = resample_image_to_shape(out, ramp.shape, spacing=(0.5, 0.5, 0.5))
    assert np.allclose(back[3:-3, 3:-3, 3:-3], ramp[3:-3, 3:-3, 3:-3], atol=0.02)
    const = resample_image(np.full((3, 4, 5), 7.0), (1, 1, 1), (0.3, 0.7, 1.9))
    assert np.allclose(const, 7.0, atol=1e-4)


def test_anisotropic_resampling_keeps_slices_apart() -> None:
    image = np.zeros((4, 16, 16), np.float32)
    image[1] = 100.0  # one thick slice
    out = resample_image(image, (0.5, 0.5, 5.0), (1.0, 1.0, 2.5))
    assert out.shape == (8, 8, 8)
    # order_z=0: every output slice equals exactly one input slice (no spline ringing in z)
    assert set(np.unique(np.round(out, 3))) <= {0.0, 100.0}
    assert np.allclose(out[2:4], 100.0) and np.allclose(out[4:], 0.0)
    linear = resample_image(image, (0.5, 0.5, 5.0), (1.0, 1.0, 2.5), order_z=1)
    assert 0 < linear[1, 4, 4] < 100 and linear.shape == (8, 8, 8)
    channels = resample_image(np.stack([image, -image]), (0.5, 0.5, 5.0), (1.0, 1.0, 2.5))
    assert channels.shape == (2, 8, 8, 8) and np.allclose(channels[1], -out)


def test_label_resampling_stays_integer_and_keeps_thin_structures() -> None:
    labels = np.zeros((20, 20, 20), np.uint16)
    labels[:, 3:15, 4:12] = 2
    labels[7, :, :] = 1  # a one-voxel-thick plane
    labels[10:14, 10:14, 10:14] = 300
    down = resample_labels(labels, (1, 1, 1), (2, 2, 2))
    assert down.shape == (10, 10, 10) and down.dtype == np.uint16
    assert set(np.unique(down)) == {0, 1, 2, 300}
    assert (down == 1).sum() >= 80  # the plane survives as a plane (10 x 10 minus overlaps)
    # upsampling by 2 and back is the identity
    up = resample_labels_to_shape(down, (20, 20, 20))
    assert np.array_equal(resample_labels_to_shape(up, (10, 10, 10)), down)
    # a block on a coarse grid keeps its place and extent when refined (corners round off,
    # as with any linear interpolation of one-hot masks)
    block = np.zeros((5, 6, 7), np.uint8)
    block[1:4, 2:5, 3:6] = 4
    fine = resample_labels(block, (3, 3, 3), (1, 1, 1))
    hits = np.argwhere(fine == 4)
    assert hits.min(0).tolist() == [3, 6, 9] and hits.max(0).tolist() == [11, 14, 17]
    assert 0.85 * 9**3 < len(hits) <= 9**3
    with pytest.raises(ValueError):
        resample_labels_to_shape(block.astype(np.float32), (2, 2, 2))


def test_ct_stats_and_normalization() -> None:
    rng = np.random.default_rng(2)
    image = rng.normal(40, 10, (30, 30, 30)).astype(np.float32)
    image[0] = -1000.0
    label = np.zeros(image.shape, np.uint8)
    label[5:25, 5:25, 5:25] = 1
    stats = compute_ct_stats([(image, label), (image + 10, label)], samples_per_case=5000)
    assert stats.mean == pytest.approx(45, abs=1) and stats.std == pytest.approx(11.2, abs=1)
    assert stats.percentile_00_5 < 20 < 70 < stats.percentile_99_5
    out = normalize(image, "CT", stats)
    assert out.dtype == np.float32
    assert out.min() == pytest.approx((stats.percentile_00_5 - stats.mean) / stats.std, rel=1e-5)
    z = normalize(image, "zscore")
    assert abs(z.mean()) < 1e-4 and z.std() == pytest.approx(1, abs=1e-4)
    assert scheme_for_channel(" ct ") == "CT" and scheme_for_channel("T2") == "zscore"
    with pytest.raises(MaskSAMError, match="No foreground voxels"):
        compute_ct_stats([(image, np.zeros_like(label))])
    assert CTNormStats.from_dict(json.loads(json.dumps(stats.to_dict()))) == stats


def test_crop_to_nonzero_round_trip() -> None:
    array = np.zeros((2, 6, 7, 8), np.float32)
    array[0, 1:3, 2, 4] = 1
    array[1, 4, 5, 6] = -2
    cropped, box = crop_to_nonzero(array)
    assert box == ((1, 5), (2, 6), (4, 7)) and cropped.shape == (2, 4, 4, 3)
    assert np.array_equal(uncrop(cropped, box, array.shape), array)
    empty, full = crop_to_nonzero(np.zeros((3, 4, 5)))
    assert full == ((0, 3), (0, 4), (0, 5)) and empty.shape == (3, 4, 5)


def test_config_json_round_trip_and_damage() -> None:
    stats = CTNormStats(10.0, 200.0, -900.0, 800.0)
    config = PreprocessConfig((0.8, 0.8, 2.5), ["CT", "T1"], ct_stats=[stats, None])
    assert config.normalization == ["CT", "zscore"]
    data = json.loads(json.dumps(config.to_dict()))
    again = PreprocessConfig.from_dict(data)
    assert again == config and again.cache_key() == config.cache_key()
    assert PreprocessConfig((0.8, 0.8, 3.0), ["CT"], ct_stats=[stats]).cache_key() != (
        PreprocessConfig((0.8, 0.8, 2.5), ["CT"], ct_stats=[stats]).cache_key()
    )
    del data["target_spacing"]
    with pytest.raises(MaskSAMError, match="preprocessing settings are invalid"):
        PreprocessConfig.from_dict(data)
    with pytest.raises(ValueError, match="CT normalization needs ct_stats"):
        PreprocessConfig((1, 1, 1), ["CT"])


def _phantom(geometry: Geometry) -> tuple[Volume, Volume]:
    """A phantom on any grid, defined in physical space (mm from the grid's centre)."""
    k, j, i = np.indices(geometry.shape)
    points = geometry.index_to_physical @ np.stack(
        [i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)]
    )
    centre = geometry.physical_point([(s - 1) / 2 for s in geometry.size])
    px, py, pz = (points[a].reshape(geometry.shape) - centre[a] for a in range(3))
    labels = np.zeros(geometry.shape, np.uint8)
    labels[(px + 8) ** 2 + (py + 6) ** 2 + pz**2 < 11**2] = 1  # sphere
    labels[((px - 12) / 9) ** 2 + ((py - 9) / 7) ** 2 + ((pz + 6) / 7) ** 2 < 1] = 2
    labels[(np.abs(px + 18) < 2) & (np.abs(py) < 15) & (np.abs(pz) < 15)] = 3  # thin bar
    image = -800.0 + 850.0 * (labels > 0) + 30.0 * labels
    return Volume(image.astype(np.float32), geometry), Volume(labels, geometry)


OBLIQUE_SAGITTAL = (_rotation(1, 12) @ np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]])).reshape(-1)


@pytest.mark.parametrize(
    "geometry",
    [
        Geometry((50, 40, 12), (1.2, 1.2, 5.0), (-5, -10, 0), (-1, 0, 0, 0, -1, 0, 0, 0, 1)),
        Geometry((14, 45, 36), (4.0, 1.1, 1.3), (60, -20, 70), OBLIQUE_SAGITTAL),
    ],
    ids=["ras-anisotropic", "oblique-sagittal"],
)
def test_preprocess_then_postprocess_lands_on_the_input_grid(geometry: Geometry) -> None:
    image, labels = _phantom(geometry)
    stats = compute_ct_stats([(image.array, labels.array)])
    config = PreprocessConfig((1.0, 1.0, 2.0), ["CT"], ct_stats=[stats])
    data, props = preprocess_case([image], config)
    props = json.loads(json.dumps(props))  # properties are JSON-safe
    assert data.dtype == np.float32 and data.shape[0] == 1
    pre = Geometry.from_dict(props["preprocessed_geometry"])
    assert data.shape[1:] == pre.shape
    assert np.allclose(pre.spacing, (1.0, 1.0, 2.0), rtol=0.1)
    target = preprocess_label(labels, props)
    assert target.shape == pre.shape and set(np.unique(target)) == {0, 1, 2, 3}
    # the sphere centre is at the same physical place in the preprocessed grid
    centre = np.argwhere(target == 1).mean(0)[::-1]
    expected = geometry.physical_point([(s - 1) / 2 for s in geometry.size])[:3] + (-8, -6, 0)
    assert np.allclose(pre.physical_point(centre)[:3], expected, atol=1.0)
    back = postprocess_labels(target, props)
    assert back.shape == geometry.shape and back.dtype == np.uint8
    assert original_geometry(props) == geometry
    for value, least in ((1, 0.95), (2, 0.9), (3, 0.8)):
        a, b = back == value, labels.array == value
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice > least, (value, dice)
    probabilities = postprocess_image(
        np.stack([target == 0, target == 1]).astype(np.float32), props
    )
    assert probabilities.shape == (2, *geometry.shape)
    assert ((probabilities[1] > 0.5) == (labels.array == 1)).mean() > 0.99


def test_same_spacing_round_trip_is_exact() -> None:
    geometry = Geometry((30, 20, 10), (1.0, 1.0, 2.0), (3, 4, 5), (0, 1, 0, -1, 0, 0, 0, 0, -1))
    image, labels = _phantom(geometry)
    image.array[:, :2] = 0  # some zero border to crop away
    config = PreprocessConfig((1.0, 1.0, 2.0), ["MR"])
    data, props = preprocess_case([image], config)
    assert props["bbox"] != [[0, s] for s in data.shape[1:]]
    target = preprocess_label(labels, props)
    expected = np.where(np.asarray(image.array) != 0, labels.array, 0)
    assert np.array_equal(postprocess_labels(target, props), expected)
    as_float = Volume(labels.array.astype(np.float32), geometry)  # label files saved as float
    assert np.array_equal(preprocess_label(as_float, props), target)
    assert abs(float(data.mean())) < 1e-4  # z-score


def test_preprocess_refuses_mismatched_channels() -> None:
    geometry = Geometry((8, 8, 4), (1, 1, 1), (0, 0, 0), IDENTITY)
    image, labels = _phantom(geometry)
    config = PreprocessConfig((1, 1, 1), ["T1", "T2"])
    with pytest.raises(MaskSAMError, match=r"Expected 2 channel file\(s\) \(T1, T2\), got 1"):
        preprocess_case([image], config)
    moved = Volume(image.array, Geometry((8, 8, 4), (1, 1, 1), (0, 5, 0), IDENTITY))
    with pytest.raises(MaskSAMError, match=r"Channel 1 \(T2\) is not on channel 0's grid"):
        preprocess_case([image, moved], config)
    _, props = preprocess_case([image, image], config)
    with pytest.raises(MaskSAMError, match="label map is not on the image grid"):
        preprocess_label(Volume(labels.array, moved.geometry), props)
    nan = image.array.copy()
    nan[0, 0, 0] = np.nan
    with pytest.raises(MaskSAMError, match="NaN or Inf"):
        preprocess_case([Volume(nan, geometry), image], config)


@pytest.mark.shared_data
@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_real_volume_round_trip(modality: str) -> None:
    if not SHARED.is_dir():
        pytest.skip(f"shared example data not found at {SHARED}")
    image = read_volume(SHARED / f"{modality}_abdomen_3mm.nii.gz")
    labels = read_volume(SHARED / f"{modality}_abdomen_3mm_seg.nii.gz")
    channel = "CT" if modality == "ct" else "T1"
    stats = [compute_ct_stats([(image.array, labels.array)])] if modality == "ct" else []
    config = PreprocessConfig((1.5, 1.5, 3.0), [channel], ct_stats=stats)
    data, props = preprocess_case([image], config)
    transform = props["transform"]
    assert Geometry.from_dict(transform["canonical"]).direction == IDENTITY  # RAS/LPS -> LPS
    target = preprocess_label(labels, props)
    back = postprocess_labels(target, props)
    # 3 mm -> 1.5 mm in-plane is an exact 2x: labels come back voxel for voxel (outside the
    # non-zero crop box is background by design).
    canonical = CanonicalTransform.from_dict(transform)
    inside = np.zeros(canonical.canonical.shape, bool)
    inside[tuple(slice(a, b) for a, b in props["bbox"])] = True
    expected = np.where(canonical.invert(inside), labels.array, 0)
    assert np.array_equal(back, expected)
    assert (expected == labels.array).mean() > 0.99
