"""Target spacing (nnU-Net-style fingerprint) and resampling of images and label maps.

Spacings are in ``(x, y, z)`` order like :class:`Geometry.spacing`; arrays are ``(z, y, x)``,
optionally with leading channel axes ``(C, z, y, x)``. Grids are aligned by their outer voxel
edges (scipy's ``grid_mode=True``): new voxel ``n`` of ``N`` along an axis of ``M`` old voxels
samples old coordinate ``(n + 0.5) * M / N - 0.5``, so resampling to a shape and back to the
original shape lands on the original grid.

Images: cubic spline (order 3) on the whole volume, except when the spacing is anisotropic
(largest / smallest spacing > 3, in the input or the target): then each slice across the coarse
axis is resampled in-plane with order 3 and the coarse axis separately with ``order_z`` (0 =
nearest, the nnU-Net default; 1 = linear), so thick slices are not smeared by a wide spline.

Label maps never pass through a spline: each label's 0/1 mask (and the background's) is
interpolated linearly inside its own bounding box and every voxel takes the label with the
largest membership. Like nnU-Net's ``>= 0.5`` rule, foreground wins exact ties with the
background, so a one-voxel structure survives a 2x downsampling (at the price of a half-voxel
growth where an edge falls exactly between two new voxels). Output values are always the
input's integer values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

ANISOTROPY_THRESHOLD = 3.0
Triple = tuple[float, float, float]


def fingerprint(
    spacings: Sequence[Sequence[float]], *, anisotropy_threshold: float = ANISOTROPY_THRESHOLD
) -> Triple:
    """Target spacing ``(x, y, z)`` for a dataset from its cases' (canonical) spacings.

    Rule: the per-axis median. When the medians are anisotropic (largest / smallest >
    ``anisotropy_threshold``), the coarse axis (largest median) takes the 10th percentile of
    its spacings instead (finer, so thin-slice cases are not thrown away), but never below
    the largest of the other two medians.
    """
    values = np.asarray(spacings, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != 3 or len(values) == 0:
        raise ValueError("fingerprint needs a non-empty list of (x, y, z) spacings")
    if not np.all(values > 0):
        raise ValueError("spacings must be positive")
    target = np.median(values, axis=0)
    if target.max() / target.min() > anisotropy_threshold:
        coarse = int(np.argmax(target))
        others = [a for a in range(3) if a != coarse]
        floor = max(target[others])
        target[coarse] = max(float(np.percentile(values[:, coarse], 10)), floor)
    return tuple(float(t) for t in target)  # type: ignore[return-value]


def resampled_shape(
    shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]
) -> tuple[int, int, int]:
    """Array shape ``(z, y, x)`` covering the same extent at ``target_spacing`` (x, y, z)."""
    old = np.asarray(shape[-3:], dtype=np.float64)
    ratio = np.asarray(spacing, dtype=np.float64)[::-1] / np.asarray(target_spacing)[::-1]
    return tuple(max(1, int(round(s))) for s in old * ratio)  # type: ignore[return-value]


def _anisotropic_axis(
    spacing: Sequence[float], target_spacing: Sequence[float], threshold: float
) -> int | None:
    """Array axis (0-2 of z, y, x) to treat separately, or None."""
    for values in (spacing, target_spacing):
        values = np.asarray(values, dtype=np.float64)
        if values.max() / values.min() > threshold:
            return 2 - int(np.argmax(values))
    return None


def _source_coords(old: int, new: int) -> np.ndarray:
    """Old-grid coordinates (clipped) sampled by the ``new`` voxels of an edge-aligned grid."""
    coords = (np.arange(new, dtype=np.float64) + 0.5) * (old / new) - 0.5
    return np.clip(coords, 0.0, old - 1.0)


def _interp_axis(array: np.ndarray, axis: int, coords: np.ndarray, order: int) -> np.ndarray:
    """Sample ``array`` along ``axis`` at ``coords`` (nearest for order 0, else linear)."""
    if order == 0:
        index = np.clip(np.floor(coords + 0.5).astype(np.intp), 0, array.shape[axis] - 1)
        return np.take(array, index, axis=axis)
    low = np.floor(coords).astype(np.intp)
    high = np.minimum(low + 1, array.shape[axis] - 1)
    shape = [1] * array.ndim
    shape[axis] = len(coords)
    weight = (coords - low).astype(np.float32).reshape(shape)
    below = np.take(array, low, axis=axis).astype(np.float32, copy=False)
    above = np.take(array, high, axis=axis).astype(np.float32, copy=False)
    return below + (above - below) * weight


def _zoom(array: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    factors = [n / o for n, o in zip(shape, array.shape, strict=True)]
    out = ndimage.zoom(
        array, factors, order=order, mode="nearest", grid_mode=True, output=np.float32
    )
    if out.shape != tuple(shape):  # guard against a rounding surprise in scipy's shape logic
        raise RuntimeError(f"zoom produced {out.shape}, expected {tuple(shape)}")
    return out


def _resample_3d(
    array: np.ndarray, shape: tuple[int, int, int], coarse: int | None, order: int, order_z: int
) -> np.ndarray:
    data = array.astype(np.float32, copy=False)
    if coarse is None:
        return _zoom(data, shape, order)
    plane = [shape[a] for a in range(3) if a != coarse]
    moved = np.moveaxis(data, coarse, 0)
    if tuple(plane) != moved.shape[1:]:
        moved = np.stack([_zoom(s, plane, order) for s in moved], axis=0)
    if moved.shape[0] != shape[coarse]:
        coords = _source_coords(moved.shape[0], shape[coarse])
        moved = _interp_axis(moved, 0, coords, order_z)
    return np.ascontiguousarray(np.moveaxis(moved, 0, coarse), dtype=np.float32)


def resample_image_to_shape(
    array: np.ndarray,
    shape: Sequence[int],
    *,
    spacing: Sequence[float],
    order: int = 3,
    order_z: int = 0,
    anisotropy_threshold: float = ANISOTROPY_THRESHOLD,
) -> np.ndarray:
    """Resample an image ``(..., z, y, x)`` with ``spacing`` (x, y, z) to ``shape`` (z, y, x).

    Returns float32. Leading axes (channels) are resampled independently.
    """
    shape = tuple(int(s) for s in shape[-3:])
    old = array.shape[-3:]
    if tuple(old) == shape:
        return array.astype(np.float32, copy=True)
    target = [sp * o / n for sp, o, n in zip(spacing, old[::-1], shape[::-1], strict=True)]
    coarse = _anisotropic_axis(spacing, target, anisotropy_threshold)
    flat = array.reshape((-1, *old))
    out = np.stack([_resample_3d(c, shape, coarse, order, order_z) for c in flat], axis=0)
    return out.reshape((*array.shape[:-3], *shape))


def resample_image(
    array: np.ndarray,
    spacing: Sequence[float],
    target_spacing: Sequence[float],
    *,
    order: int = 3,
    order_z: int = 0,
    anisotropy_threshold: float = ANISOTROPY_THRESHOLD,
) -> np.ndarray:
    """Resample an image ``(..., z, y, x)`` from ``spacing`` to ``target_spacing`` (x, y, z)."""
    shape = resampled_shape(array.shape, spacing, target_spacing)
    return resample_image_to_shape(
        array,
        shape,
        spacing=spacing,
        order=order,
        order_z=order_z,
        anisotropy_threshold=anisotropy_threshold,
    )


def _interp_region(mask: np.ndarray, coords: list[np.ndarray]) -> np.ndarray:
    out = mask.astype(np.float32)
    for axis in range(3):
        out = _interp_axis(out, axis, coords[axis], 1)
    return out


def resample_labels_to_shape(labels: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resample a label map ``(z, y, x)`` to ``shape`` keeping integer values (see module doc)."""
    shape = tuple(int(s) for s in shape)
    if labels.ndim != 3 or len(shape) != 3:
        raise ValueError("resample_labels_to_shape works on 3D (z, y, x) label maps")
    if tuple(labels.shape) == shape:
        return labels.copy()
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise ValueError("label maps must hold non-negative integers")
    coords = [_source_coords(o, n) for o, n in zip(labels.shape, shape, strict=True)]
    best = _interp_region(labels == 0, coords)
    out = np.zeros(shape, dtype=labels.dtype)
    boxes = ndimage.find_objects(labels) if labels.max() > 0 else []
    for index, box in enumerate(boxes):
        if box is None:
            continue
        value = index + 1
        region_new, region_old, sub_coords = [], [], []
        for axis, sl in enumerate(box):
            # The mask is non-zero between old voxels start-1 and stop (exclusive), so a one
            # voxel margin holds every sample with a non-zero membership.
            lo, hi = max(sl.start - 1, 0), min(sl.stop, labels.shape[axis] - 1)
            c = coords[axis]
            picked = np.flatnonzero((c >= lo) & (c <= hi))
            if len(picked) == 0:
                break
            region_new.append(slice(int(picked[0]), int(picked[-1]) + 1))
            region_old.append(slice(lo, hi + 1))
            sub_coords.append(c[picked[0] : picked[-1] + 1] - lo)
        else:
            member = _interp_region(labels[tuple(region_old)] == value, sub_coords)
            current = best[tuple(region_new)]  # views: updated in place
            assigned = out[tuple(region_new)]
            tie = (assigned == 0) & (member > 0) & (member >= current - 1e-6)
            win = (member > current) | tie
            current[win] = member[win]
            assigned[win] = value
    return out


def resample_labels(
    labels: np.ndarray, spacing: Sequence[float], target_spacing: Sequence[float]
) -> np.ndarray:
    """Resample a label map ``(z, y, x)`` from ``spacing`` to ``target_spacing`` (x, y, z)."""
    return resample_labels_to_shape(labels, resampled_shape(labels.shape, spacing, target_spacing))
