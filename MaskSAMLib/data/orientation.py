"""Canonical orientation by axis permutation and flips only (never interpolation).

The canonical frame is **LPS with axial slices**: after :func:`to_canonical` the index axes
``(i, j, k)`` point as closely as possible to patient Left, Posterior and Superior, so the array
``(z, y, x)`` is ``(inferior->superior, anterior->posterior, right->left)``. Each ``array[z]`` is
then an axial slice shown the radiological way (patient's anterior at the top row, patient's
right on the left column), the way SAM-style 2D models see CT/MR slices, and the slice axis is
the one closest to superior-inferior.

The permutation is the one maximising ``sum |D[a, p(a)]|`` over the 6 axis assignments (so an
oblique scan gets its nearest axis-aligned frame); signs make each chosen column point to
+L/+P/+S. The direction matrix is only permuted and sign-flipped, never straightened: an oblique
grid stays oblique and every voxel keeps its physical position exactly.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from .geometry import Geometry


def _best_assignment(direction: np.ndarray) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """For each physical axis a (L, P, S): the index axis p[a] and the sign s[a] to use."""
    best: tuple[int, ...] | None = None
    best_score = -1.0
    for perm in itertools.permutations(range(3)):
        score = sum(abs(direction[a, perm[a]]) for a in range(3))
        if score > best_score + 1e-9:
            best, best_score = perm, score
    assert best is not None
    signs = tuple(1 if direction[a, best[a]] >= 0 else -1 for a in range(3))
    return tuple(best), signs  # type: ignore[return-value]


@dataclass(frozen=True)
class CanonicalTransform:
    """How a grid maps onto its canonical frame (and back, exactly).

    ``axes``: ``np.transpose`` order taking the original ``(z, y, x)`` array to canonical;
    ``flips``: for each canonical array axis, whether it is reversed after the transpose.
    ``original`` / ``canonical``: the two grids (same voxels, same physical points).
    """

    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    original: Geometry
    canonical: Geometry

    @property
    def is_identity(self) -> bool:
        return self.axes == (0, 1, 2) and not any(self.flips)

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Original-grid array ``(..., z, y, x)`` -> canonical ``(..., z', y', x')`` (a view)."""
        lead = array.ndim - 3
        if tuple(array.shape[lead:]) != self.original.shape:
            raise ValueError(f"array shape {array.shape} does not end with {self.original.shape}")
        out = np.transpose(array, tuple(range(lead)) + tuple(lead + a for a in self.axes))
        flip_axes = tuple(lead + m for m in range(3) if self.flips[m])
        return np.flip(out, flip_axes) if flip_axes else out

    def invert(self, array: np.ndarray) -> np.ndarray:
        """Canonical array ``(..., z', y', x')`` -> the original grid ``(..., z, y, x)`` exactly."""
        lead = array.ndim - 3
        if tuple(array.shape[lead:]) != self.canonical.shape:
            raise ValueError(f"array shape {array.shape} does not end with {self.canonical.shape}")
        flip_axes = tuple(lead + m for m in range(3) if self.flips[m])
        out = np.flip(array, flip_axes) if flip_axes else array
        inverse = tuple(int(a) for a in np.argsort(self.axes))
        return np.transpose(out, tuple(range(lead)) + tuple(lead + a for a in inverse))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        return {
            "axes": list(self.axes),
            "flips": list(self.flips),
            "original": self.original.to_dict(),
            "canonical": self.canonical.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CanonicalTransform:
        return cls(
            axes=tuple(int(a) for a in data["axes"]),  # type: ignore[arg-type]
            flips=tuple(bool(f) for f in data["flips"]),  # type: ignore[arg-type]
            original=Geometry.from_dict(data["original"]),
            canonical=Geometry.from_dict(data["canonical"]),
        )


def canonical_transform(geometry: Geometry) -> CanonicalTransform:
    """The permutation/flips taking ``geometry`` to the canonical LPS-axial frame (header only)."""
    direction = geometry.direction_matrix
    perm, signs = _best_assignment(direction)
    size = np.asarray(geometry.size)
    spacing = np.asarray(geometry.spacing)
    # The old index of the voxel that becomes the new index (0, 0, 0).
    first = np.zeros(3)
    for a in range(3):
        if signs[a] < 0:
            first[perm[a]] = size[perm[a]] - 1
    origin = geometry.physical_point(first)[:3]
    new_direction = np.stack([signs[a] * direction[:, perm[a]] for a in range(3)], axis=1)
    canonical = Geometry(
        size=tuple(int(size[perm[a]]) for a in range(3)),
        spacing=tuple(float(spacing[perm[a]]) for a in range(3)),
        origin=tuple(origin),
        direction=tuple(new_direction.reshape(-1)),
    )
    # Array axis m holds index axis 2 - m; canonical array axis m comes from old array axis
    # 2 - perm[2 - m] and is reversed when that axis' sign is negative.
    axes = tuple(2 - perm[2 - m] for m in range(3))
    flips = tuple(signs[2 - m] < 0 for m in range(3))
    return CanonicalTransform(axes, flips, geometry, canonical)  # type: ignore[arg-type]


def to_canonical(array: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, CanonicalTransform]:
    """Reorient ``array`` (``(..., z, y, x)`` on ``geometry``) to the canonical frame.

    Returns a contiguous copy on ``transform.canonical`` and the transform whose
    :meth:`CanonicalTransform.invert` restores the original array exactly.
    """
    transform = canonical_transform(geometry)
    return np.ascontiguousarray(transform.apply(array)), transform
