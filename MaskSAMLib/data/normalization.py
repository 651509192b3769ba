"""Intensity normalisation per modality and cropping to the non-zero region.

Schemes, chosen from ``dataset.json`` ``channel_names`` (case-insensitive):

- ``"CT"`` (channel named ``CT``): clip to the 0.5 and 99.5 percentiles of the *foreground*
  (label > 0) intensities of the training set, then subtract the foreground mean and divide by
  the foreground standard deviation (mean and std of the unclipped foreground samples). The
  statistics live in :class:`CTNormStats`, computed once by :func:`compute_ct_stats` and stored
  in the model config, so inference normalises exactly like training.
- ``"zscore"`` (everything else, e.g. MR sequences): per-image mean and std.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import MaskSAMError

SCHEMES = ("CT", "zscore")
Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def scheme_for_channel(name: str) -> str:
    """``"CT"`` for a channel named CT (any case), ``"zscore"`` otherwise."""
    return "CT" if str(name).strip().lower() == "ct" else "zscore"


@dataclass(frozen=True)
class CTNormStats:
    """Foreground intensity statistics of a CT training set (Hounsfield units)."""

    mean: float
    std: float
    percentile_00_5: float
    percentile_99_5: float

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CTNormStats:
        stats = cls(
            **{k: float(data[k]) for k in ("mean", "std", "percentile_00_5", "percentile_99_5")}
        )
        values = np.asarray([stats.mean, stats.std, stats.percentile_00_5, stats.percentile_99_5])
        if not np.all(np.isfinite(values)) or stats.percentile_00_5 > stats.percentile_99_5:
            raise ValueError(f"invalid CT statistics {data}")
        return stats


def compute_ct_stats(
    cases: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    samples_per_case: int = 10_000,
    seed: int = 0,
) -> CTNormStats:
    """Foreground statistics over ``(image, label)`` pairs (same-shape arrays, any layout).

    Up to ``samples_per_case`` foreground voxels are drawn per case (all of them when fewer)
    with a fixed ``seed``, so every case weighs about the same and the result is reproducible.
    """
    rng = np.random.default_rng(seed)
    samples = []
    for image, label in cases:
        if image.shape != label.shape:
            raise ValueError(f"image {image.shape} and label {label.shape} shapes differ")
        values = np.asarray(image)[np.asarray(label) > 0]
        if values.size > samples_per_case:
            values = values[rng.choice(values.size, samples_per_case, replace=False)]
        samples.append(values.astype(np.float64))
    pooled = np.concatenate(samples) if samples else np.zeros(0)
    if pooled.size == 0:
        raise MaskSAMError(
            "No foreground voxels in any training label, so CT normalisation statistics cannot "
            "be computed; check that the label files are not empty."
        )
    low, high = np.percentile(pooled, [0.5, 99.5])
    return CTNormStats(float(pooled.mean()), float(pooled.std()), float(low), float(high))


def normalize(array: np.ndarray, scheme: str, ct_stats: CTNormStats | None = None) -> np.ndarray:
    """Normalise one channel (any shape) with ``scheme``; returns float32."""
    data = np.asarray(array, dtype=np.float32)
    if scheme == "CT":
        if ct_stats is None:
            raise ValueError("CT normalisation needs CTNormStats")
        data = np.clip(data, ct_stats.percentile_00_5, ct_stats.percentile_99_5)
        return (data - np.float32(ct_stats.mean)) / np.float32(max(ct_stats.std, 1e-8))
    if scheme == "zscore":
        mean = float(data.mean(dtype=np.float64))
        std = float(data.std(dtype=np.float64))
        return (data - np.float32(mean)) / np.float32(max(std, 1e-8))
    raise ValueError(f"unknown normalisation scheme {scheme!r}; known: {SCHEMES}")


def nonzero_bbox(array: np.ndarray) -> Box:
    """Half-open ``((z0, z1), (y0, y1), (x0, x1))`` of voxels non-zero in any channel.

    ``array`` is ``(z, y, x)`` or ``(C, z, y, x)``; an all-zero array gives the full box.
    """
    spatial = array.shape[-3:]
    mask = array != 0
    if mask.ndim == 4:
        mask = mask.any(axis=0)
    if not mask.any():
        return tuple((0, int(s)) for s in spatial)  # type: ignore[return-value]
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append((int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def crop_to_nonzero(array: np.ndarray) -> tuple[np.ndarray, Box]:
    """Crop ``(..., z, y, x)`` to :func:`nonzero_bbox`; undo with :func:`uncrop`."""
    box = nonzero_bbox(array)
    return crop(array, box), box


def crop(array: np.ndarray, box: Box) -> np.ndarray:
    """``array[..., z0:z1, y0:y1, x0:x1]`` (a view)."""
    return array[(Ellipsis, *(slice(a, b) for a, b in box))]


def uncrop(array: np.ndarray, box: Box, shape: Sequence[int], fill: float | int = 0) -> np.ndarray:
    """Put a cropped ``(..., z, y, x)`` back into a ``shape`` (z, y, x) array of ``fill``."""
    spatial = tuple(int(s) for s in shape[-3:])
    expected = tuple(b - a for a, b in box)
    if tuple(array.shape[-3:]) != expected:
        raise ValueError(f"cropped array {array.shape} does not match box {box}")
    out = np.full((*array.shape[:-3], *spatial), fill, dtype=array.dtype)
    out[(Ellipsis, *(slice(a, b) for a, b in box))] = array
    return out
