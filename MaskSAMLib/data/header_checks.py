"""Header checks that catch a grid ITK would read wrongly or silently change.

- :func:`check_grid`: spacing that can only be metres (or is not positive), singular directions.
- :func:`check_nrrd_directions`: NRRD ``space directions`` that are sheared or zero (ITK
  straightens the first and asserts on the second).
- :func:`nifti_nonfinite_voxels`: NaN/Inf stored in a float NIfTI-1 file (ITK's reader turns
  them into 0, so only the raw data shows them).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import MaskSAMError

#: Smallest voxel spacing and physical extent taken for millimetres: below them the header
#: almost certainly holds metres (or is damaged), and the volume would be preprocessed to a
#: single voxel.
MIN_SPACING_MM = 0.01
MIN_EXTENT_MM = 5.0


def check_grid(
    name: str, size: Sequence[int], spacing: Sequence[float], direction: Sequence[float]
) -> None:
    """Refuse a grid that cannot be the millimetre grid of a scan (one-line MaskSAMError)."""
    spacing = [float(v) for v in spacing[:3]]
    if not all(np.isfinite(v) and v > 0 for v in spacing):
        raise MaskSAMError(f"{name} has voxel spacing {spacing}; spacings must be positive "
                           "numbers of mm: fix the header and save the volume again.")
    extent = max(float(n) * v for n, v in zip(size, spacing, strict=False))
    if min(spacing) < MIN_SPACING_MM or extent < MIN_EXTENT_MM:
        raise MaskSAMError(
            f"{name} has voxel spacing {[round(v, 6) for v in spacing]} (the whole volume spans "
            f"{extent:.4g} mm): implausibly small for millimetres; the header probably gives "
            "metres (NIfTI xyzt_units): convert the spacing to mm and save the volume again."
        )
    matrix = np.asarray(direction, dtype=np.float64)
    if matrix.size == 9 and (not np.all(np.isfinite(matrix))
                             or abs(np.linalg.det(matrix.reshape(3, 3))) < 1e-6):
        raise MaskSAMError(f"{name} has a singular direction matrix (a zero or repeated axis); "
                           "fix the header and save the volume again.")


def _nrrd_header(path: Path) -> list[str] | None:
    """The header lines of an NRRD file (up to the blank line), or None when not NRRD."""
    lower = path.name.lower()
    if not (lower.endswith(".nrrd") or lower.endswith(".nhdr")):
        return None
    try:
        with open(path, "rb") as handle:
            head = handle.read(1 << 16)
    except OSError:
        return None
    if not head.startswith(b"NRRD"):
        return None
    text = head.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0]
    return text.decode("latin-1").splitlines()


def check_nrrd_directions(path: Path) -> None:
    """Refuse NRRD ``space directions`` ITK would silently change: a zero (or ``none``) spatial
    axis and non-orthogonal (sheared) axes, which ITK straightens, so the label map would land
    on another grid than the image's."""
    lines = _nrrd_header(path)
    if not lines:
        return
    value = next((ln.split(":", 1)[1] for ln in lines
                  if ln.lower().startswith("space directions:")), None)
    if value is None:
        return
    vectors = []
    for token in re.findall(r"\(([^)]*)\)|none", value):
        try:
            vectors.append([float(v) for v in token.split(",")] if token else None)
        except ValueError:
            return  # malformed: ITK's reader explains it
    spatial = [v for v in vectors if v is not None]
    zero = [i for i, v in enumerate(spatial) if np.linalg.norm(v) < 1e-12]
    if zero or (len(vectors) == 3 and len(spatial) < 3):
        raise MaskSAMError(
            f"{path} has a zero or missing direction vector for axis {(zero or [2])[0]} in its "
            "'space directions'; the header is damaged: fix it (each axis needs a non-zero "
            "vector) and save the volume again."
        )
    if len(spatial) >= 3:
        axes = np.asarray(spatial[:3], dtype=np.float64)
        units = axes / np.linalg.norm(axes, axis=1, keepdims=True)
        cosines = np.abs(units @ units.T - np.eye(3))
        if cosines.max() > 1e-4:
            angle = float(np.degrees(np.arcsin(min(cosines.max(), 1.0))))
            raise MaskSAMError(
                f"{path} has sheared (non-orthogonal) axes in its 'space directions' (off by "
                f"{angle:.2f} degrees); ITK would straighten them and the label map would land "
                "on another grid: resample the volume onto an orthogonal grid first."
            )


_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}


def nifti_nonfinite_voxels(path: Path, chunk_bytes: int = 1 << 24) -> int:
    """NaN/Inf voxels stored in a float NIfTI-1 file, counted from its raw data.

    ITK's NIfTI reader silently replaces them by 0, so the image it returns is always finite:
    the file itself is read (in chunks, no full copy). 0 for non-float or non-NIfTI-1 files.
    """
    import gzip
    import struct
    import zlib

    lower = path.name.lower()
    if not (lower.endswith(".nii") or lower.endswith(".nii.gz")):
        return 0
    opener = gzip.open if lower.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            header = handle.read(348)
            if len(header) < 348:
                return 0
            order = "<" if struct.unpack("<i", header[:4])[0] == 348 else ">"
            if struct.unpack(order + "i", header[:4])[0] != 348:
                return 0  # NIfTI-2 or not NIfTI: left to ITK
            datatype = struct.unpack(order + "h", header[70:72])[0]
            if datatype not in _NIFTI_FLOAT_TYPES:
                return 0
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            handle.read(max(offset - 348, 0))
            dtype = np.dtype(order + _NIFTI_FLOAT_TYPES[datatype])
            step = max(chunk_bytes // dtype.itemsize, 1) * dtype.itemsize
            bad = 0
            for block in iter(lambda: handle.read(step), b""):
                usable = len(block) // dtype.itemsize * dtype.itemsize
                values = np.frombuffer(block[:usable], dtype=dtype)
                bad += int(values.size - np.count_nonzero(np.isfinite(values)))
    except (OSError, EOFError, zlib.error, struct.error):
        return 0  # unreadable: ITK's reader reports it
    return bad


