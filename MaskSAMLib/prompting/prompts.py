"""Prompts in physical space (LPS, mm), checked against a volume and put into its canonical frame.

A prompt set is a list of named structures; each structure may hold

- ``boxes``: boxes ``[xmin, ymin, zmin, xmax, ymax, zmax]`` in LPS millimetres. A box whose
  extent along the volume's slice axis covers one slice (e.g. ``zmin == zmax``) is a *slice box*
  (drawn on that slice); any other box is a *3D box* (at most one per structure);
- ``points`` and ``negative_points``: ``[x, y, z]`` LPS millimetres; a point acts on the slice
  it lies on (positive: add the region under it, negative: remove it).

The prompts file (``masksam prompt --prompts FILE``, the worker's ``segment`` request) is JSON::

    {"structures": [
        {"name": "liver", "value": 1, "color": [221, 130, 101], "terminology": "...",
         "boxes": [[-120.0, -40.0, -300.0, 10.0, 90.0, -150.0]],
         "points": [[-60.0, 20.0, -220.0]], "negative_points": []},
        ...]}

``value``, ``color`` and ``terminology`` are optional (values default to 1, 2, ... in file
order). An optional top-level ``"coordinates"`` must be ``"LPS"`` (the only convention: Slicer's
RAS positions are converted by the caller, x and y negated).

Refused, each with one line saying what to do: a box with a maximum below its minimum
(inverted), a box that holds no voxel centre in the slice plane (empty), a box or point outside
the volume's physical extent (prompts in another image's coordinates), duplicate names, and
unknown keys.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.geometry import Geometry
from ..errors import MaskSAMError

_STRUCTURE_KEYS = {"name", "value", "color", "terminology", "boxes", "points", "negative_points"}
_TOP_KEYS = {"structures", "coordinates", "format_version"}


@dataclass
class StructurePrompts:
    """The prompts of one structure, in LPS millimetres (as given)."""

    name: str
    boxes: list[tuple[float, ...]] = field(default_factory=list)
    points: list[tuple[float, float, float]] = field(default_factory=list)
    negative_points: list[tuple[float, float, float]] = field(default_factory=list)
    value: int | None = None
    color: list[int] | None = None
    terminology: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "boxes": [list(b) for b in self.boxes],
                               "points": [list(p) for p in self.points],
                               "negative_points": [list(p) for p in self.negative_points]}
        for key in ("value", "color", "terminology"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


# ----------------------------------------------------------------------------- canonical form
@dataclass(frozen=True)
class CanonicalBox:
    """A box in canonical continuous voxel indices (voxel centres at integers), clipped."""

    i0: float
    i1: float
    j0: float
    j1: float
    k0: int  # first slice (inclusive)
    k1: int  # last slice (inclusive)

    @property
    def is_slice_box(self) -> bool:
        return self.k0 == self.k1

    def rect(self) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` in SAM pixel coordinates (pixel i spans [i, i + 1])."""
        return (self.i0 + 0.5, self.j0 + 0.5, self.i1 + 0.5, self.j1 + 0.5)


@dataclass(frozen=True)
class CanonicalPoint:
    """A point on canonical slice ``k`` at pixel ``(x, y)`` (SAM coordinates), positive or not."""

    x: float
    y: float
    k: int
    positive: bool


@dataclass
class CanonicalStructure:
    """One structure's prompts in the volume's canonical frame."""

    name: str
    box3d: CanonicalBox | None
    slice_boxes: dict[int, CanonicalBox]
    points: list[CanonicalPoint]

    def point_slices(self) -> set[int]:
        return {p.k for p in self.points}


def _vector(values: Any, length: int, what: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise MaskSAMError(f"{what} must be {length} numbers, got {values!r}.") from exc
    if len(out) != length or not all(math.isfinite(v) for v in out):
        raise MaskSAMError(f"{what} must be {length} finite numbers (LPS mm), got {values!r}.")
    return out


def _physical_extent(geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """LPS bounding box of the volume (voxel edges, half a voxel beyond the outer centres)."""
    corners = np.array([[a, b, c] for a in (-0.5, geometry.size[0] - 0.5)
                        for b in (-0.5, geometry.size[1] - 0.5)
                        for c in (-0.5, geometry.size[2] - 0.5)])
    affine = geometry.index_to_physical
    lps = (affine[:3, :3] @ corners.T).T + affine[:3, 3]
    return lps.min(axis=0), lps.max(axis=0)


def _extent_text(geometry: Geometry) -> str:
    low, high = _physical_extent(geometry)
    return ", ".join(f"{'xyz'[a]} {low[a]:.1f} to {high[a]:.1f}" for a in range(3))


def _to_index(geometry: Geometry, points_lps: np.ndarray) -> np.ndarray:
    """LPS points (N, 3) -> continuous voxel indices (N, 3) of ``geometry`` (i, j, k)."""
    inverse = np.linalg.inv(geometry.index_to_physical)
    return (inverse[:3, :3] @ points_lps.T).T + inverse[:3, 3]


def _outside_hint(geometry: Geometry, point: np.ndarray) -> str:
    flipped = point * np.array([-1.0, -1.0, 1.0])
    index = _to_index(geometry, flipped[None])[0]
    if np.all(index >= -0.5) and np.all(index <= np.asarray(geometry.size) - 0.5):
        return (" (it would be inside if x and y were negated: were RAS coordinates given? "
                "Prompts are LPS)")
    return ""


def canonical_structure(prompts: StructurePrompts, canonical: Geometry) -> CanonicalStructure:
    """Check ``prompts`` against the canonical grid and express them in its voxel indices."""
    name = prompts.name
    size = np.asarray(canonical.size, dtype=float)
    box3d: CanonicalBox | None = None
    slice_boxes: dict[int, CanonicalBox] = {}
    for number, raw in enumerate(prompts.boxes, start=1):
        box = np.asarray(raw, dtype=float)
        what = f"Box {number} of '{name}'"
        low, high = box[:3], box[3:]
        inverted = [("xyz")[a] for a in range(3) if high[a] < low[a]]
        if inverted:
            raise MaskSAMError(
                f"{what} is inverted ({', '.join(f'{a} max < {a} min' for a in inverted)}); give "
                "[xmin, ymin, zmin, xmax, ymax, zmax] in LPS mm."
            )
        corners = np.array([[x, y, z] for x in (low[0], high[0]) for y in (low[1], high[1])
                            for z in (low[2], high[2])])
        index = _to_index(canonical, corners)
        lo, hi = index.min(axis=0), index.max(axis=0)
        if np.any(hi < -0.5) or np.any(lo > size - 0.5):
            raise MaskSAMError(
                f"{what} lies outside the volume (its extent is {_extent_text(canonical)} mm)"
                f"{_outside_hint(canonical, (low + high) / 2)}; give boxes in this image's "
                "physical coordinates (LPS mm)."
            )
        lo_c = np.maximum(lo, 0.0)
        hi_c = np.minimum(hi, size - 1.0)
        flat = hi[0] - lo[0] <= 1e-6 or hi[1] - lo[1] <= 1e-6
        no_centre = any(math.ceil(lo[a] - 1e-6) > math.floor(hi[a] + 1e-6) for a in (0, 1))
        if flat or no_centre or lo_c[0] > hi_c[0] or lo_c[1] > hi_c[1]:
            raise MaskSAMError(
                f"{what} is empty: it holds no voxel in the slice plane (it is "
                f"{(high[0] - low[0]):.2f} x {(high[1] - low[1]):.2f} mm); draw a box around "
                "the structure."
            )
        k0 = max(0, int(math.ceil(lo[2] - 1e-6)))
        k1 = min(int(size[2]) - 1, int(math.floor(hi[2] + 1e-6)))
        if k0 > k1:  # thinner than a slice, between two slice centres: the nearest slice
            k0 = k1 = int(min(max(round(float((lo[2] + hi[2]) / 2)), 0), size[2] - 1))
        cbox = CanonicalBox(float(lo_c[0]), float(hi_c[0]), float(lo_c[1]), float(hi_c[1]),
                            k0, k1)
        if cbox.is_slice_box:
            if k0 in slice_boxes:
                raise MaskSAMError(
                    f"'{name}' has two boxes on slice {k0}; keep one box per slice."
                )
            slice_boxes[k0] = cbox
        else:
            if box3d is not None:
                raise MaskSAMError(
                    f"'{name}' has more than one 3D box; give one 3D box (plus boxes on single "
                    "slices to correct it) or split it into several structures."
                )
            box3d = cbox
    points: list[CanonicalPoint] = []
    for positive, group in ((True, prompts.points), (False, prompts.negative_points)):
        for number, raw in enumerate(group, start=1):
            p = np.asarray(raw, dtype=float)
            index = _to_index(canonical, p[None])[0]
            if np.any(index < -0.5) or np.any(index > size - 0.5):
                kind = "Point" if positive else "Negative point"
                raise MaskSAMError(
                    f"{kind} {number} of '{name}' ({p[0]:.1f}, {p[1]:.1f}, {p[2]:.1f}) lies "
                    f"outside the volume (its extent is {_extent_text(canonical)} mm)"
                    f"{_outside_hint(canonical, p)}; place points on this image (LPS mm)."
                )
            k = int(min(max(round(float(index[2])), 0), size[2] - 1))
            points.append(CanonicalPoint(float(index[0]) + 0.5, float(index[1]) + 0.5, k,
                                         positive))
    if box3d is None and not slice_boxes and not points:
        raise MaskSAMError(f"'{name}' has no prompt; give a box or a point.")
    return CanonicalStructure(name, box3d, slice_boxes, points)


# ----------------------------------------------------------------------------- parsing
def structure_from_dict(data: Any, index: int, source: str) -> StructurePrompts:
    """One structure entry of a prompts file."""
    if not isinstance(data, dict):
        raise MaskSAMError(f"{source}: structure {index} must be an object with a 'name'.")
    unknown = sorted(set(data) - _STRUCTURE_KEYS)
    if unknown:
        raise MaskSAMError(
            f"{source}: structure {index} has unknown key(s) {', '.join(unknown)}; use "
            f"{', '.join(sorted(_STRUCTURE_KEYS))}."
        )
    name = data.get("name")
    if not isinstance(name, str) or not name.strip() or not name.strip().isprintable():
        raise MaskSAMError(f"{source}: structure {index} needs a 'name' (one line of text).")
    name = name.strip()

    def vectors(key: str, length: int) -> list[tuple[float, ...]]:
        raw = data.get(key) or []
        if not isinstance(raw, list):
            raise MaskSAMError(f"{source}: '{name}' {key} must be a list.")
        return [_vector(v, length, f"{source}: '{name}' {key}[{n}]") for n, v in enumerate(raw)]

    value = data.get("value")
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                              or not 0 < value < 65536):
        raise MaskSAMError(f"{source}: '{name}' value must be an integer 1-65535, got {value!r}.")
    return StructurePrompts(
        name=name,
        boxes=vectors("boxes", 6),
        points=vectors("points", 3),  # type: ignore[arg-type]
        negative_points=vectors("negative_points", 3),  # type: ignore[arg-type]
        value=value,
        color=data.get("color"),
        terminology=data.get("terminology"),
    )


def prompts_from_dict(data: Any, source: str = "prompts") -> list[StructurePrompts]:
    """Parse a prompts document (see the module docstring)."""
    if isinstance(data, list):
        data = {"structures": data}
    if not isinstance(data, dict) or not isinstance(data.get("structures"), list):
        raise MaskSAMError(f"{source}: expected {{\"structures\": [...]}} (see masksam prompt "
                           "--help).")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise MaskSAMError(f"{source}: unknown key(s) {', '.join(unknown)}; use 'structures'.")
    coordinates = str(data.get("coordinates", "LPS")).upper()
    if coordinates != "LPS":
        raise MaskSAMError(f"{source}: coordinates must be LPS (mm), not {coordinates}; negate x "
                           "and y of RAS positions.")
    structures = [structure_from_dict(s, n, source)
                  for n, s in enumerate(data["structures"], start=1)]
    if not structures:
        raise MaskSAMError(f"{source}: no structure is given.")
    names = [s.name for s in structures]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise MaskSAMError(f"{source}: the structure name '{duplicated[0]}' is used twice; give "
                           "each structure one entry.")
    return structures


def read_prompts_file(path: str | Path) -> list[StructurePrompts]:
    """A prompts JSON file -> structures (one-line errors for missing or malformed files)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise MaskSAMError(f"Prompts file {path} does not exist; check the path.") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MaskSAMError(f"Prompts file {path} is not valid JSON ({exc}); fix the file.") from exc
    return prompts_from_dict(data, str(path))


def select_structures(
    structures: Sequence[StructurePrompts], names: Sequence[str] | None
) -> list[StructurePrompts]:
    """Only the structures named in ``names`` (``--structure``), in that order.

    A name that the prompts do not hold is *unknown*: refused, listing the known names.
    """
    if not names:
        return list(structures)
    by_name = {s.name: s for s in structures}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise MaskSAMError(
            f"Unknown structure '{unknown[0]}': the prompts hold {', '.join(by_name)}; check "
            "--structure."
        )
    return [by_name[n] for n in dict.fromkeys(names)]


def assign_labels(
    structures: Sequence[StructurePrompts], labels: Sequence[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """Label entries ``{value, name, color, terminology}`` for the output, one per structure.

    With ``labels`` (from ``--labels``: a dataset.json or a label list) every structure must be
    one of its classes (else it is *unknown* and refused) and takes the class's value; without,
    values come from the structures (default 1, 2, ... in order).
    """
    out: list[dict[str, Any]] = []
    if labels is not None:
        by_name = {str(e["name"]): e for e in labels if int(e["value"]) != 0}
        for s in structures:
            if s.name not in by_name:
                raise MaskSAMError(
                    f"Unknown structure '{s.name}': it is not a class of the labels file "
                    f"({', '.join(by_name) or 'none'}); rename it or add it to the labels."
                )
            entry = dict(by_name[s.name])
            entry["color"] = s.color or entry.get("color")
            entry["terminology"] = s.terminology or entry.get("terminology")
            out.append(entry)
    else:
        used = {s.value for s in structures if s.value is not None}
        next_value = 1
        for s in structures:
            value = s.value
            if value is None:
                while next_value in used:
                    next_value += 1
                value = next_value
                used.add(value)
            out.append({"value": value, "name": s.name, "color": s.color,
                        "terminology": s.terminology})
    values = [e["value"] for e in out]
    duplicated = sorted({v for v in values if values.count(v) > 1})
    if duplicated:
        raise MaskSAMError(f"Two structures have the label value {duplicated[0]}; give each "
                           "structure its own value.")
    return out
