"""Predictor: geometry round trips (48 orientations, oblique, anisotropic), options, refusals.

Geometry is checked model-independently with deterministic stand-in networks that keep the
MaskSAM output format: ``_RampNet`` labels each voxel by the canonical axis along which the
intensity rises (1 = +x, 2 = +y, 3 = +z of the window), so it sees whether the predictor really
hands it the canonical LPS-axial frame; ``_BinNet`` labels voxels by intensity (100 HU = class
1, ...). Test volumes are built from physical coordinates only (never with the library's
orientation code), and the label map must land voxel for voxel on the reference. One test runs
the real trained ``tiny`` model end to end.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from MaskSAMLib.config import make_labels, make_model_config
from MaskSAMLib.data.geometry import Geometry, Volume
from MaskSAMLib.data.normalization import CTNormStats
from MaskSAMLib.data.preprocessing import PreprocessConfig
from MaskSAMLib.errors import MaskSAMError
from MaskSAMLib.inference.predictor import PredictOptions, Predictor

S_PHYS = np.array([1.0, 1.5, 2.5])  # mm along L, P, S
N_PHYS = np.array([22, 18, 12])  # voxels along L, P, S
# (class, ramp axis, low, high): half-open boxes in physical-axis voxel indices (L, P, S).
REGIONS = [
    (1, 0, (2, 3, 2), (9, 8, 6)),
    (2, 1, (12, 2, 3), (19, 10, 8)),
    (3, 2, (4, 11, 4), (11, 16, 10)),
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


class _StandIn(nn.Module):
    """MaskSAM's interface and output format around a per-voxel class rule."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.num_slices, self.img_size = config.num_slices, config.img_size
        self.num_classes = self.num_queries = config.num_classes
        self.image_encoder = nn.Identity()
        self.calls = 0

    def classes(self, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, decoder_chunk: int | None = None) -> dict[str, torch.Tensor]:
        self.calls += 1
        b, _, t = x.shape[:3]
        k = self.num_classes
        cls = self.classes(x[:, 0])  # (B, T, H, W)
        masks = torch.nn.functional.one_hot(cls, k).permute(0, 4, 1, 2, 3).float() * 16 - 8
        logits = torch.full((b, k, t, k + 1), -10.0)  # (B, N, T, K+1): query i is class i
        logits[:, torch.arange(k), :, torch.arange(k)] = 10.0
        return {"pred_logits": logits, "pred_masks": masks}


class _RampNet(_StandIn):
    """Class = the axis along which intensity rises (forward differences inside the window), so
    a window's last slice has no 'next' slice: predict with :data:`EVERY_SLICE_CENTRED`."""

    def classes(self, v: torch.Tensor) -> torch.Tensor:
        diffs = torch.stack([
            torch.diff(v, dim=d, append=v.narrow(d, v.shape[d] - 1, 1)) for d in (3, 2, 1)
        ], dim=1)  # forward differences along window x, y, z
        best, axis = diffs.max(dim=1)
        return torch.where((v > 0.05) & (best > 0.5), axis + 1, torch.zeros_like(axis))


class _BinNet(_StandIn):
    def classes(self, v: torch.Tensor) -> torch.Tensor:
        return torch.round(v).clamp(0, self.num_classes - 1).long()


def _config(target=tuple(S_PHYS), order=3, names=("x_axis", "y_axis", "z_axis"), channels=1):
    stats = CTNormStats(mean=0.0, std=100.0, percentile_00_5=-1000.0, percentile_99_5=3000.0)
    channel_names = ["CT"] + [f"MR{i}" for i in range(1, channels)]
    pre = PreprocessConfig(target_spacing=target, channel_names=channel_names,
                           ct_stats=[stats] + [None] * (channels - 1), order=order)
    return make_model_config(backbone="tiny", labels=make_labels(["background", *names]),
                             img_size=32, preprocessing=pre)


# T=3 windows one slice apart: every slice is some window's middle slice, where the ramp rule
# sees both neighbours (the default step 0.5 advances 1.5 slices and leaves some slices at
# window edges only, which this stand-in cannot classify; the real network has learned edges).
EVERY_SLICE_CENTRED = PredictOptions(step=1 / 3)


def _predictor(net=_RampNet, **kwargs) -> Predictor:
    return Predictor(net(_config(**kwargs)), device="cpu")


def _orientations() -> list[np.ndarray]:
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            d = np.zeros((3, 3))
            for k, a in enumerate(perm):
                d[a, k] = signs[k]
            out.append(d)
    return out


def _case(direction: np.ndarray, ramp: bool, spacing=S_PHYS, counts=N_PHYS, rotate=None):
    """(image sitk, expected labels (z, y, x)) of the physical scene stored in ``direction``."""
    axis_of = np.argmax(np.abs(direction), axis=0)  # physical axis of each voxel axis
    n, s = np.asarray(counts)[axis_of], np.asarray(spacing)[axis_of]
    centre = np.asarray(spacing) * (np.asarray(counts) - 1) / 2
    origin = centre - direction @ (s * (n - 1) / 2)
    zz, yy, xx = np.indices((n[2], n[1], n[0]))
    ijk = np.stack([xx, yy, zz]).astype(np.float64)
    points = origin[:, None, None, None] + np.einsum("ak,k...->a...", direction * s, ijk)
    q = np.rint(points / np.asarray(spacing)[:, None, None, None]).astype(int)
    scale = np.asarray(counts) / N_PHYS
    image = np.zeros(ijk.shape[1:], np.int16)
    expected = np.zeros(ijk.shape[1:], np.uint8)
    for cls, axis, low, high in REGIONS:
        lo = np.rint(np.asarray(low) * scale).astype(int)
        hi = np.rint(np.asarray(high) * scale).astype(int)
        inside = np.all([(q[a] >= lo[a]) & (q[a] < hi[a]) for a in range(3)], axis=0)
        if ramp:
            image[inside] = (100 + 100 * (q[axis] - lo[axis]))[inside]
            expected[inside & (q[axis] + 1 < hi[axis])] = cls
        else:
            image[inside] = 100 * cls
            expected[inside] = cls
    img = sitk.GetImageFromArray(image)
    img.SetSpacing([float(v) for v in s])
    final = direction if rotate is None else rotate @ direction
    img.SetOrigin([float(v) for v in (centre - final @ (s * (n - 1) / 2))])
    img.SetDirection([float(v) for v in final.reshape(-1)])
    return img, expected


@pytest.mark.parametrize("index", range(48))
def test_label_map_lands_on_the_reference_in_all_48_orientations(index):
    direction = _orientations()[index]
    image, expected = _case(direction, ramp=True)
    prediction = _predictor().predict(image, options=EVERY_SLICE_CENTRED)
    assert prediction.geometry == Geometry.from_sitk(image)
    assert prediction.labels.dtype == np.uint8
    assert prediction.labels.shape == expected.shape
    # The stand-in only finds class 1 where intensity rises towards patient left, 2 towards
    # posterior, 3 towards superior: equality means the network saw the LPS-axial frame and
    # every voxel came back to its own place.
    np.testing.assert_array_equal(prediction.labels, expected)


def test_oblique_direction_is_kept_and_labels_land_voxel_for_voxel():
    angle = np.deg2rad(17.0)
    axis = np.array([1.0, 2.0, 0.5]) / np.linalg.norm([1.0, 2.0, 0.5])
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    base = _orientations()[13]
    image, expected = _case(base, ramp=True, rotate=rotation)
    assert not np.allclose(np.abs(np.asarray(image.GetDirection())) % 1, 0)  # truly oblique
    prediction = _predictor().predict(image, options=EVERY_SLICE_CENTRED)
    out = prediction.to_sitk()
    assert out.GetDirection() == image.GetDirection()
    assert out.GetOrigin() == image.GetOrigin() and out.GetSpacing() == image.GetSpacing()
    np.testing.assert_array_equal(prediction.labels, expected)


def _centroid_mm(labels: np.ndarray, value: int, geometry: Geometry) -> np.ndarray:
    zyx = np.argwhere(labels == value).mean(axis=0)
    return geometry.physical_point(zyx[::-1])[:3]


def test_anisotropic_input_resampled_and_restored_to_its_own_grid():
    spacing, counts = np.array([0.7, 0.8, 4.0]), np.array([32, 24, 8])
    direction = _orientations()[29]
    image, expected = _case(direction, ramp=False, spacing=spacing, counts=counts)
    predictor = _predictor(_BinNet, target=(1.2, 1.2, 1.5), order=1)
    prediction = predictor.predict(image)
    geometry = Geometry.from_sitk(image)
    assert prediction.geometry == geometry and prediction.labels.shape == expected.shape
    assert prediction.preprocessed_shape != expected.shape  # it really was resampled
    for value in (1, 2, 3):
        p, r = prediction.labels == value, expected == value
        dice = 2 * np.count_nonzero(p & r) / (np.count_nonzero(p) + np.count_nonzero(r))
        assert dice > 0.85, (value, dice)
        shift = _centroid_mm(prediction.labels, value, geometry) - _centroid_mm(
            expected, value, geometry)
        assert np.linalg.norm(shift) < 0.5 * spacing.max(), (value, shift)


def test_array_input_with_geometry_and_volume_input_agree():
    image, expected = _case(_orientations()[5], ramp=True)
    geometry = Geometry.from_sitk(image)
    array = sitk.GetArrayFromImage(image)
    predictor = _predictor()
    from_array = predictor.predict(array, geometry=geometry, options=EVERY_SLICE_CENTRED)
    from_volume = predictor.predict(Volume(array, geometry), options=EVERY_SLICE_CENTRED)
    np.testing.assert_array_equal(from_array.labels, expected)
    np.testing.assert_array_equal(from_volume.labels, expected)
    with pytest.raises(MaskSAMError, match="without a geometry"):
        predictor.predict(array)


def test_fast_uses_fewer_windows_and_keeps_the_grid():
    image, expected = _case(_orientations()[0], ramp=False)
    predictor = _predictor(_BinNet)
    standard = predictor.predict(image)
    fast = predictor.predict(image, options=PredictOptions(fast=True))
    assert fast.windows < standard.windows
    assert fast.geometry == standard.geometry
    assert fast.labels.shape == standard.labels.shape
    np.testing.assert_array_equal(standard.labels, expected)
    assert {int(v) for v in np.unique(fast.labels)} == {0, 1, 2, 3}


def test_tta_never_mirrors_lateralized_classes_left_right():
    assert _predictor(names=("liver", "spleen", "aorta")).mirror_axes() == (2, 3, 4)
    lateral = _predictor(names=("kidney_left", "kidney_right", "aorta"))
    assert lateral.mirror_axes() == (2, 3)
    image, expected = _case(_orientations()[7], ramp=False)
    net_predictor = _predictor(_BinNet, names=("kidney_left", "kidney_right", "aorta"))
    calls = net_predictor.model.calls
    out = net_predictor.predict(image, options=PredictOptions(tta=True))
    windows = out.windows
    batches = -(-windows // 2)
    assert net_predictor.model.calls - calls == 3 * batches  # identity + 2 mirrors per batch
    np.testing.assert_array_equal(out.labels, expected)


def test_multichannel_models_take_one_image_per_channel():
    image, expected = _case(_orientations()[2], ramp=False)
    second = sitk.Cast(image, sitk.sitkFloat32) * 0.5 + 7.0
    predictor = Predictor(_BinNet(_config(channels=2)), device="cpu")
    prediction = predictor.predict([image, second])
    np.testing.assert_array_equal(prediction.labels, expected)
    with pytest.raises(MaskSAMError, match="2 channel"):
        predictor.predict(image)
    shifted = sitk.Image(second)
    shifted.SetOrigin([v + 5.0 for v in second.GetOrigin()])
    with pytest.raises(MaskSAMError, match="not on channel 0's grid"):
        predictor.predict([image, shifted])


def test_bad_arrays_are_refused_with_one_line():
    predictor = _predictor()
    image, _ = _case(_orientations()[0], ramp=True)
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    array[3, 4, 5] = np.nan
    with pytest.raises(MaskSAMError, match="NaN or Inf"):
        predictor.predict(array, geometry=Geometry.from_sitk(image))
    flat = sitk.Image([20, 20], sitk.sitkInt16)
    with pytest.raises(MaskSAMError, match="2D image"):
        predictor.predict(flat)
    with pytest.raises(MaskSAMError, match="step"):
        PredictOptions(step=0.0)


def test_a_model_never_trained_has_no_preprocessing_plan():
    config = make_model_config(backbone="tiny", labels=make_labels(["background", "liver"]),
                               channel_names=["CT"])
    with pytest.raises(MaskSAMError, match="never trained"):
        Predictor(_BinNet(config), device="cpu")


def test_memory_estimate_scales_with_the_volume_and_refuses_beyond_budget():
    predictor = _predictor()
    small = Geometry((64, 64, 32), (1.0, 1.5, 2.5), (0, 0, 0), np.eye(3).reshape(-1))
    large = Geometry((512, 512, 300), (1.0, 1.5, 2.5), (0, 0, 0), np.eye(3).reshape(-1))
    a, b = predictor.estimate_memory(small), predictor.estimate_memory(large)
    # Preprocessing holds several float32 copies of the volume at once: they must be counted.
    assert b.peak_bytes - a.peak_bytes > 3 * 4 * 512 * 512 * 300
    predictor.check_memory(large, "big.nii.gz", budget_bytes=b.peak_bytes)
    with pytest.raises(MaskSAMError, match=r"big\.nii\.gz needs about .* GB"):
        predictor.check_memory(large, "big.nii.gz", budget_bytes=b.peak_bytes - 1)


def test_a_stop_request_interrupts_cleanly():
    from MaskSAMLib.errors import Interrupted

    image, _ = _case(_orientations()[0], ramp=True)
    with pytest.raises(Interrupted):
        _predictor().predict(image, should_stop=lambda: True)


def test_real_trained_tiny_model_end_to_end(trained_tiny_model_dir):
    from conftest import TRAINED_PHANTOM_CASES, TRAINED_PHANTOM_SIZE

    from MaskSAMLib.data.phantoms import make_phantom_case

    image, reference = make_phantom_case(0, TRAINED_PHANTOM_CASES, size=TRAINED_PHANTOM_SIZE)
    predictor = Predictor.from_model_dir(trained_tiny_model_dir, device="cpu")
    assert predictor.model.config.backbone.name == "tiny"
    seen = []
    prediction = predictor.predict(image, progress=lambda d, t: seen.append((d, t)))
    assert prediction.geometry == Geometry.from_sitk(image)
    assert prediction.labels.dtype == np.uint8
    assert set(np.unique(prediction.labels)) <= {lab.value for lab in predictor.config.labels}
    assert seen[0] == (0, prediction.windows) and seen[-1] == (prediction.windows,) * 2
    assert set(prediction.timings) >= {"preprocess", "encoder", "decoder", "stitch",
                                       "postprocess"}
    assert prediction.timings["encoder"] > 0 and prediction.timings["decoder"] > 0
    volumes = prediction.segment_volumes(predictor.labels)
    assert [v["name"] for v in volumes] == [lab.name for lab in predictor.config.labels[1:]]
    total_ml = sum(v["volume_ml"] for v in volumes)
    voxel_ml = np.prod(image.GetSpacing()) / 1000
    assert total_ml == pytest.approx(np.count_nonzero(prediction.labels) * voxel_ml, rel=1e-3)


@pytest.mark.parametrize("window,step", [(1, 0.5), (3, 0.5), (3, 1.0), (5, 0.3), (64, 0.5)])
def test_windows_cover_every_slice_and_keep_the_requested_stride(window, step):
    import math

    from MaskSAMLib.inference.sliding_window import window_starts

    for length in range(1, 160):
        starts = window_starts(length, window, step)
        covered = set()
        for s in starts:
            covered |= set(range(s, min(s + window, length)))
        assert covered == set(range(length)), (length, starts)
        assert starts[0] == 0 and starts[-1] == max(length - window, 0)
        widest = math.ceil(max(window * step, 1))
        assert all(0 < b - a <= widest for a, b in zip(starts, starts[1:], strict=False))


def test_three_slice_windows_at_half_overlap_advance_one_and_a_half_slices():
    from MaskSAMLib.inference.sliding_window import window_starts

    # 1.5 slices on average (not rounded down to 1): a third fewer network passes
    assert len(window_starts(51, 3, 0.5)) == 33
    assert len(window_starts(300, 3, 0.5)) == 199
