"""PNG snapshots of label maps over an image: three orthogonal slices, no plotting library.

Slices are taken in the canonical LPS-axial frame (``data.orientation``) and shown the
radiological way: axial with anterior up and the patient's right on the left, coronal and
sagittal with superior up. Each panel is resampled (nearest neighbour) to square pixels of the
finest spacing so anisotropic volumes keep their physical proportions. The PNG encoder is a few
lines of ``zlib`` (8-bit RGB, no interlace).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .data.geometry import Geometry
from .data.orientation import to_canonical
from .files import atomic_write_bytes


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an ``(H, W, 3)`` uint8 image."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 1:
        raise ValueError(f"expected an (H, W, 3) image, got {rgb.shape}")
    height, width = rgb.shape[:2]
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, -1)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(b"IEND", b""))


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write an ``(H, W, 3)`` uint8 image as PNG, atomically."""
    atomic_write_bytes(path, encode_png(rgb))
    return Path(path)


def _to_square_pixels(plane: np.ndarray, row_mm: float, col_mm: float, pixel_mm: float):
    rows = max(1, int(round(plane.shape[0] * row_mm / pixel_mm)))
    cols = max(1, int(round(plane.shape[1] * col_mm / pixel_mm)))
    r = np.minimum((np.arange(rows) + 0.5) * plane.shape[0] / rows, plane.shape[0] - 1)
    c = np.minimum((np.arange(cols) + 0.5) * plane.shape[1] / cols, plane.shape[1] - 1)
    return plane[r.astype(int)][:, c.astype(int)]


def _blend(gray: np.ndarray, labels: np.ndarray, colors: dict[int, Sequence[int]],
           alpha: float) -> np.ndarray:
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    for value, color in colors.items():
        mask = labels == value
        if mask.any():
            rgb[mask] = (1 - alpha) * rgb[mask] + alpha * np.asarray(color, np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _centre(labels: np.ndarray) -> tuple[int, int, int]:
    """Centre of mass of the foreground (the middle voxel when empty), ``(z, y, x)``."""
    points = np.argwhere(labels > 0)
    if len(points) == 0:
        return tuple(s // 2 for s in labels.shape)  # type: ignore[return-value]
    return tuple(int(round(v)) for v in points.mean(axis=0))  # type: ignore[return-value]


def orthogonal_panels(
    image: np.ndarray,
    label_maps: Sequence[np.ndarray],
    geometry: Geometry,
    label_entries: Sequence[dict[str, Any]],
    *,
    window: tuple[float, float] = (-160.0, 240.0),
    alpha: float = 0.45,
    gap: int = 4,
    min_height: int = 0,
) -> np.ndarray:
    """An RGB figure: one row per label map, columns axial | coronal | sagittal.

    ``image`` and each label map are ``(z, y, x)`` on ``geometry``; every row cuts through the
    foreground centre of the *first* label map, so rows show the same slices. ``window`` is
    the grey-level window (HU by default). Small volumes are enlarged (nearest neighbour) so a
    row is at least ``min_height`` pixels high.
    """
    img, transform = to_canonical(np.asarray(image, np.float32), geometry)
    canon = [to_canonical(np.asarray(lab), geometry)[0] for lab in label_maps]
    sx, sy, sz = transform.canonical.spacing
    pixel = min(sx, sy, sz)
    tallest = max(img.shape[1] * sy, img.shape[0] * sz) / pixel
    pixel /= max(1.0, min_height / max(tallest, 1.0))
    lo, hi = window
    gray = np.clip((img - lo) / max(hi - lo, 1e-6) * 255.0, 0, 255)
    colors = {int(e["value"]): e.get("color") or (255, 0, 0) for e in label_entries
              if int(e["value"]) != 0}
    z, y, x = _centre(canon[0])
    # (plane getter, row spacing, column spacing); superior up for coronal and sagittal.
    views = [
        (lambda a: a[z], sy, sx),
        (lambda a: a[::-1, y, :], sz, sx),
        (lambda a: a[::-1, :, x], sz, sy),
    ]
    rows = []
    for labels in canon:
        panels = [
            _blend(_to_square_pixels(get(gray), rmm, cmm, pixel),
                   _to_square_pixels(get(labels), rmm, cmm, pixel), colors, alpha)
            for get, rmm, cmm in views
        ]
        height = max(p.shape[0] for p in panels)
        padded = [np.pad(p, ((0, height - p.shape[0]), (0, gap), (0, 0))) for p in panels]
        rows.append(np.concatenate(padded, axis=1)[:, :-gap] if gap else
                    np.concatenate(padded, axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, gap), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return np.concatenate(rows, axis=0)[:-gap] if gap else np.concatenate(rows, axis=0)
