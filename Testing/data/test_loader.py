"""Training patches: deterministic batches, aligned augmentation, no left-right swaps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from MaskSAMLib.data.loader import (
    AugmentConfig,
    Case,
    PatchSampler,
    batch_loader,
)
from MaskSAMLib.labels import has_lateralized_classes


def _case(seed: int = 0) -> Case:
    lab = np.zeros((16, 72, 80), np.uint8)
    lab[4:12, 20:45, 10:30] = 1  # patient's right side (low X in LPS-like canonical order)
    lab[4:12, 20:45, 50:70] = 2
    rng = np.random.default_rng(seed)
    img = (lab[None] * 100.0 + rng.normal(size=(1, *lab.shape))).astype(np.float32)
    return Case("case", img, lab)


def test_batches_are_a_pure_function_of_seed_and_iteration():
    sampler = PatchSampler([_case()], num_slices=3, size=32, batch_size=2, seed=7)
    a, b = sampler.batch(11), sampler.batch(11)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(sampler.batch(12)["image"], a["image"])
    assert a["image"].shape == (2, 1, 3, 32, 32) and a["label"].shape == (2, 3, 32, 32)
    # background workers give the same batches in the same order
    loaded = list(batch_loader(sampler, start=10, stop=13, workers=2))
    for offset, batch in enumerate(loaded):
        assert torch.equal(batch["image"], sampler.batch(10 + offset)["image"])


def test_geometric_augmentation_keeps_image_and_label_aligned():
    case = _case()
    case.image = case.label[None].astype(np.float32)  # the image is the label map itself
    aug = AugmentConfig(p_rotation=1, p_scale=1, p_noise=0, p_blur=0, p_brightness=0,
                        p_contrast=0, p_gamma=0)
    sampler = PatchSampler([case], num_slices=3, size=48, batch_size=8, seed=1, augment=aug,
                           foreground_fraction=1.0)
    batch = sampler.batch(0)
    mismatch = (batch["image"][:, 0].round().long() != batch["label"]).float().mean().item()
    assert mismatch < 0.01
    assert batch["label"].unique().tolist() == [0, 1, 2]


def test_lateralized_classes_are_never_mirrored_left_right():
    assert has_lateralized_classes(["background", "kidney_left", "kidney_right"])
    assert not has_lateralized_classes(["background", "liver", "spleen"])
    aug = AugmentConfig(p_rotation=0, p_scale=0, p_noise=0, p_blur=0, p_brightness=0,
                        p_contrast=0, p_gamma=0)
    sampler = PatchSampler([_case()], num_slices=3, size=80, batch_size=16, seed=3, augment=aug,
                           class_names=["background", "kidney_right", "kidney_left"],
                           foreground_fraction=1.0)
    assert 3 not in sampler.mirror_axes
    for it in range(3):
        label = sampler.batch(it)["label"]
        for item in label:
            xs_right = torch.nonzero(item == 1)[:, 2]
            xs_left = torch.nonzero(item == 2)[:, 2]
            if len(xs_right) and len(xs_left):
                assert xs_right.float().mean() < xs_left.float().mean()
    free = PatchSampler([_case()], num_slices=3, size=80, batch_size=1, seed=3, augment=aug,
                        class_names=["background", "liver", "spleen"])
    assert 3 in free.mirror_axes


@pytest.mark.parametrize("fraction,low,high", [(1.0, 0.99, 1.0), (0.0, 0.0, 0.7)])
def test_foreground_oversampling(fraction, low, high):
    case = _case()
    case.label[:] = 0
    case.label[8, 36, 40] = 1  # a single foreground voxel in a large volume
    case.foreground = np.argwhere(case.label > 0)
    aug = AugmentConfig(enabled=False)
    sampler = PatchSampler([case], num_slices=3, size=16, batch_size=50, seed=0, augment=aug,
                           foreground_fraction=fraction)
    hits = (sampler.batch(0)["label"].flatten(1) > 0).any(dim=1).float().mean().item()
    assert low <= hits <= high
