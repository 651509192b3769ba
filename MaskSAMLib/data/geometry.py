"""Image grids in physical space: :class:`Geometry` and the array-plus-grid :class:`Volume`.

Conventions (the same as SimpleITK, physical space is LPS in millimetres):

- ``size``, ``spacing`` and ``origin`` are in index order ``(x, y, z)`` = ``(i, j, k)``.
- ``direction`` is the 3x3 direction matrix as a row-major 9-tuple; column ``k`` is the physical
  unit vector of index axis ``k``. A voxel ``(i, j, k)`` lies at
  ``origin + D @ (spacing * (i, j, k))``.
- Arrays are ``(z, y, x)`` (``sitk.GetArrayFromImage`` order): ``array.shape == size[::-1]``.

"The same grid" (INTERFACES.md: every output lands in the input's exact grid) has one rule,
:meth:`Geometry.differences`, with one tolerance, :data:`GRID_TOL`: equal sizes, spacings within
a relative ``GRID_TOL``, origins within ``GRID_TOL`` times the largest spacing (a thousandth of a
voxel) and direction cosines within ``GRID_TOL``. It absorbs the float32 rounding of file headers,
never a real shift. Datasets, preprocessing, prompting and ``evaluate`` all use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

Triple = tuple[float, float, float]
GRID_TOL = 1e-3  # the one "same grid" tolerance (see the module docstring)


def _triple(values: Sequence[float], name: str) -> Triple:
    out = tuple(float(v) for v in values)
    if len(out) != 3:
        raise ValueError(f"{name} must have 3 values, got {len(out)}")
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class Geometry:
    """A 3D voxel grid: size (x, y, z), spacing and origin (mm, LPS), direction (row-major)."""

    size: tuple[int, int, int]
    spacing: Triple
    origin: Triple
    direction: tuple[float, ...]

    def __post_init__(self) -> None:
        size = tuple(int(s) for s in self.size)
        if len(size) != 3:
            raise ValueError(f"size must have 3 values, got {len(size)}")
        direction = tuple(float(v) for v in self.direction)
        if len(direction) != 9:
            raise ValueError(f"direction must have 9 values, got {len(direction)}")
        spacing = _triple(self.spacing, "spacing")
        origin = _triple(self.origin, "origin")
        if any(s < 0 for s in size):
            raise ValueError(f"size must not be negative, got {size}")
        if not all(np.isfinite(v) and v > 0 for v in spacing):
            raise ValueError(f"spacing must be positive and finite (mm), got {spacing}")
        if not all(np.isfinite(v) for v in origin + direction):
            raise ValueError("origin and direction must be finite numbers")
        matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)
        norms = np.linalg.norm(matrix, axis=0)
        if np.any(norms < 1e-6) or abs(np.linalg.det(matrix / norms)) < 1e-6:
            raise ValueError(f"direction {direction} is singular (a zero or repeated axis); "
                             "its columns must be three independent unit vectors")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)

    # -- conversions -------------------------------------------------------------------------
    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Geometry:
        """The grid of a 3D SimpleITK image."""
        if image.GetDimension() != 3:
            raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
        return cls(
            size=image.GetSize(),
            spacing=image.GetSpacing(),
            origin=image.GetOrigin(),
            direction=image.GetDirection(),
        )

    def to_sitk(self, array: np.ndarray) -> sitk.Image:
        """A SimpleITK image of ``array`` (shape ``(z, y, x)`` = ``size[::-1]``) on this grid."""
        if tuple(array.shape) != self.shape:
            raise ValueError(f"array shape {tuple(array.shape)} does not match grid {self.shape}")
        image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=False)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (lists of numbers)."""
        return {
            "size": list(self.size),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Geometry:
        """Inverse of :meth:`to_dict`."""
        return cls(data["size"], data["spacing"], data["origin"], data["direction"])

    # -- derived quantities --------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(z, y, x)``."""
        return (self.size[2], self.size[1], self.size[0])

    @property
    def num_voxels(self) -> int:
        return int(self.size[0]) * int(self.size[1]) * int(self.size[2])

    @property
    def direction_matrix(self) -> np.ndarray:
        """(3, 3) float64; column k is the physical direction of index axis k."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def index_to_physical(self) -> np.ndarray:
        """(4, 4) affine from continuous index ``(i, j, k, 1)`` to LPS millimetres."""
        affine = np.eye(4)
        affine[:3, :3] = self.direction_matrix * np.asarray(self.spacing)[None, :]
        affine[:3, 3] = self.origin
        return affine

    def physical_point(self, index: Sequence[float]) -> np.ndarray:
        """LPS position (mm) of index ``(i, j, k)`` (x, y, z order, not array order)."""
        return self.index_to_physical @ np.append(np.asarray(index, dtype=np.float64), 1.0)

    def allclose(self, other: Geometry, tol: float = GRID_TOL) -> bool:
        """Same grid within ``tol``: see :meth:`differences`."""
        return not self.differences(other, tol)

    def differences(self, other: Geometry, tol: float = GRID_TOL) -> list[str]:
        """Human-readable list of what differs (empty when the grids agree).

        Sizes must be equal; spacings agree within a relative ``tol``; origins within ``tol``
        times the largest spacing (a fraction of a voxel); directions within ``tol`` absolute.
        """
        problems = []
        if self.size != other.size:
            problems.append(f"size {_fmt(self.size)} vs {_fmt(other.size)}")
        a, b = np.asarray(self.spacing), np.asarray(other.spacing)
        if not np.allclose(a, b, rtol=tol, atol=0.0):
            problems.append(f"spacing {_fmt(self.spacing)} vs {_fmt(other.spacing)}")
        origin_tol = tol * max(max(self.spacing), max(other.spacing), 1e-6)
        if not np.allclose(self.origin, other.origin, rtol=0.0, atol=origin_tol):
            problems.append(f"origin {_fmt(self.origin)} vs {_fmt(other.origin)}")
        if not np.allclose(self.direction, other.direction, rtol=0.0, atol=tol):
            problems.append(f"direction {_fmt(self.direction)} vs {_fmt(other.direction)}")
        return problems


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


@dataclass
class Volume:
    """A 3D array ``(z, y, x)`` with the grid it lives on."""

    array: np.ndarray
    geometry: Geometry

    def __post_init__(self) -> None:
        if tuple(self.array.shape) != self.geometry.shape:
            raise ValueError(
                f"array shape {tuple(self.array.shape)} does not match grid {self.geometry.shape}"
            )

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Volume:
        return cls(sitk.GetArrayFromImage(image), Geometry.from_sitk(image))

    def to_sitk(self) -> sitk.Image:
        return self.geometry.to_sitk(self.array)
