"""Training patches: T slices x H x W, foreground oversampling and augmentation.

Every batch is a pure function of ``(seed, iteration)``: the random generator of batch item
``b`` at iteration ``i`` is seeded with ``(seed, i, b)``, so a resumed run sees exactly the
batches an uninterrupted run would, whatever the number of loader workers.

Cases are preprocessed arrays in the canonical orientation (``image (C, Z, Y, X)`` float32,
``label (Z, Y, X)`` class indices), slices along Z. Augmentation (nnU-Net's kinds):
in-plane rotation and scaling (one affine for the whole patch), Gaussian noise and blur,
brightness, contrast, gamma, and mirroring along the allowed axes. Mirroring across the
left-right axis is never done when the label set has lateralized classes (``*_left`` /
``*_right``), since it would swap them.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from ..labels import has_lateralized_classes

LEFT_RIGHT_AXIS = 3  # X in (C, T, Y, X) patches of the canonical orientation


@dataclass
class AugmentConfig:
    """Probabilities and ranges of the augmentations (``enabled=False`` turns all off)."""

    enabled: bool = True
    p_rotation: float = 0.2
    rotation_deg: float = 15.0
    p_scale: float = 0.2
    scale_range: tuple[float, float] = (0.85, 1.25)
    p_noise: float = 0.1
    noise_std: float = 0.1
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    p_gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    mirror_axes: tuple[int, ...] = (1, 2, 3)  # T (slices), Y, X of a (C, T, Y, X) patch


@dataclass
class Case:
    """One preprocessed case: ``image (C, Z, Y, X)`` float32, ``label (Z, Y, X)`` int."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    foreground: np.ndarray = field(default=None)  # (M, 3) voxel indices of foreground, sampled

    def __post_init__(self) -> None:
        if self.foreground is None:
            idx = np.argwhere(self.label > 0)
            if len(idx) > 20000:
                pick = np.random.default_rng(0).choice(len(idx), 20000, replace=False)
                idx = idx[np.sort(pick)]
            self.foreground = idx


class PatchSampler:
    """Makes the batch of iteration ``i`` from the cases (a pure function of seed and i).

    Args:
        cases: preprocessed cases.
        num_slices: T.
        size: H = W of a patch.
        batch_size: patches per batch.
        seed: run seed.
        augment: augmentation settings.
        class_names: used to forbid left-right mirroring of lateralized classes.
        foreground_fraction: probability that a patch is centred on a foreground voxel.
        item_offset: index of this process's first item in the global batch (DDP).
    """

    def __init__(
        self,
        cases: list[Case],
        *,
        num_slices: int,
        size: int,
        batch_size: int,
        seed: int,
        augment: AugmentConfig | None = None,
        class_names: list[str] | None = None,
        foreground_fraction: float = 0.33,
        item_offset: int = 0,
    ) -> None:
        if not cases:
            raise ValueError("no training cases")
        self.cases = cases
        self.num_slices = num_slices
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.augment = augment or AugmentConfig()
        self.foreground_fraction = foreground_fraction
        self.item_offset = item_offset  # DDP rank r draws items r*B .. r*B+B-1 of a global batch
        axes = tuple(self.augment.mirror_axes)
        if class_names and has_lateralized_classes(class_names):
            axes = tuple(a for a in axes if a != LEFT_RIGHT_AXIS)
        self.mirror_axes = axes

    def batch(self, iteration: int) -> dict[str, torch.Tensor]:
        """``image (B, C, T, H, W)`` float32, ``label (B, T, H, W)`` int64."""
        images, labels = [], []
        for b in range(self.batch_size):
            rng = np.random.default_rng([self.seed, iteration, self.item_offset + b])
            image, label = self._sample(rng)
            images.append(image)
            labels.append(label)
        return {"image": torch.stack(images), "label": torch.stack(labels)}

    def _sample(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        case = self.cases[int(rng.integers(len(self.cases)))]
        _, z, y, x = case.image.shape
        if rng.random() < self.foreground_fraction and len(case.foreground):
            center = case.foreground[int(rng.integers(len(case.foreground)))].astype(float)
        else:
            center = np.array([rng.uniform(0, z), rng.uniform(0, y), rng.uniform(0, x)])
        aug = self.augment
        angle = 0.0
        scale = 1.0
        if aug.enabled and rng.random() < aug.p_rotation:
            angle = math.radians(rng.uniform(-aug.rotation_deg, aug.rotation_deg))
        if aug.enabled and rng.random() < aug.p_scale:
            scale = rng.uniform(*aug.scale_range)
        # Crop a region large enough for any rotation/scale, then resample to size x size.
        region = int(math.ceil(self.size * max(scale, 1.0) * math.sqrt(2))) + 2
        region += (region - self.size) % 2  # keep pixel centres aligned with the crop
        z0 = int(round(center[0])) - self.num_slices // 2
        z0 = min(max(z0, 0), max(z - self.num_slices, 0))
        img = _crop(case.image, z0, self.num_slices, center[1:], region, pad_value=None)
        lab = _crop(case.label[None], z0, self.num_slices, center[1:], region, pad_value=0)[0]
        img_t = torch.from_numpy(img)  # (C, T, R, R)
        lab_t = torch.from_numpy(lab.astype(np.int64))
        img_t, lab_t = _affine(img_t, lab_t, self.size, region, angle, scale)
        if aug.enabled:
            img_t = _intensity(img_t, rng, aug)
            for axis in self.mirror_axes:
                if rng.random() < 0.5:
                    img_t = img_t.flip(axis)
                    lab_t = lab_t.flip(axis - 1)
        return img_t.contiguous(), lab_t.contiguous()


def _crop(
    vol: np.ndarray, z0: int, t: int, center_yx: np.ndarray, region: int, pad_value: float | None
) -> np.ndarray:
    """``vol (C, Z, Y, X)`` -> ``(C, t, region, region)`` around ``center_yx``, padded."""
    c, z, y, x = vol.shape
    fill = float(vol.min()) if pad_value is None else pad_value
    out = np.full((c, t, region, region), fill, dtype=vol.dtype)
    y0 = int(round(center_yx[0])) - region // 2
    x0 = int(round(center_yx[1])) - region // 2
    zs, ze = z0, min(z0 + t, z)
    ys, ye = max(y0, 0), min(y0 + region, y)
    xs, xe = max(x0, 0), min(x0 + region, x)
    out[:, : ze - zs, ys - y0 : ye - y0, xs - x0 : xe - x0] = vol[:, zs:ze, ys:ye, xs:xe]
    return out


def _affine(
    img: torch.Tensor, lab: torch.Tensor, size: int, region: int, angle: float, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate/scale in-plane and take the central ``size x size`` of a ``region`` crop."""
    c, t = img.shape[:2]
    ratio = size / region / scale
    cos, sin = math.cos(angle) * ratio, math.sin(angle) * ratio
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=torch.float32)
    grid = F.affine_grid(theta.expand(t, 2, 3), [t, 1, size, size], align_corners=False)
    img_out = F.grid_sample(img.transpose(0, 1).float(), grid, mode="bilinear",
                            padding_mode="border", align_corners=False)
    lab_out = F.grid_sample(lab[:, None].float(), grid, mode="nearest",
                            padding_mode="zeros", align_corners=False)
    return img_out.transpose(0, 1), lab_out[:, 0].round().long()


def _intensity(img: torch.Tensor, rng: np.random.Generator, aug: AugmentConfig) -> torch.Tensor:
    if rng.random() < aug.p_noise:
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        std = rng.uniform(0, aug.noise_std)
        img = img + torch.randn(img.shape, generator=gen) * std
    if rng.random() < aug.p_blur:
        sigma = rng.uniform(*aug.blur_sigma)
        img = _blur_inplane(img, sigma)
    if rng.random() < aug.p_brightness:
        img = img * rng.uniform(*aug.brightness_range)
    if rng.random() < aug.p_contrast:
        mean = img.mean()
        lo, hi = img.min(), img.max()
        img = ((img - mean) * rng.uniform(*aug.contrast_range) + mean).clamp(lo, hi)
    if rng.random() < aug.p_gamma:
        lo, hi = img.min(), img.max()
        span = (hi - lo).clamp_min(1e-6)
        img = ((img - lo) / span) ** rng.uniform(*aug.gamma_range) * span + lo
    return img


def _blur_inplane(img: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(2 * sigma)))
    xs = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (xs / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c, t, h, w = img.shape
    flat = img.reshape(c * t, 1, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return flat.reshape(c, t, h, w)


class _BatchDataset(Dataset):
    def __init__(self, sampler: PatchSampler, start: int, stop: int) -> None:
        self.sampler, self.start, self.stop = sampler, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.sampler.batch(self.start + index)


def _ignore_sigint(_: int) -> None:
    # Loader workers leave Ctrl-C and SIGTERM to the main process, which saves a checkpoint
    # and exits 130 (timeout, Slurm and systemd signal the whole process group: a worker that
    # died of it first made the run fail without a checkpoint). They exit with the main process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)


def batch_loader(
    sampler: PatchSampler, *, start: int, stop: int, workers: int = 0
) -> DataLoader:
    """Batches of iterations ``start .. stop-1`` in order, made by ``workers`` processes."""
    return DataLoader(
        _BatchDataset(sampler, start, stop),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        worker_init_fn=_ignore_sigint if workers else None,
        persistent_workers=False,
        prefetch_factor=2 if workers else None,
    )
