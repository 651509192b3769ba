"""DICOM checks before ITK stacks a series: objects that are not images, compressed pixel data,
and slice geometry an evenly spaced, unsheared grid would misplace; C libraries' own prints.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import MaskSAMError


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[list[str]]:
    """Collect what C libraries print on file descriptor 2 (GDCM, OpenJPEG: dozens of lines
    such as "Stream too short" for one undecodable JPEG 2000 file) instead of showing it; the
    one-line error then names the cause. Yields a list that holds the lines afterwards."""
    lines: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield lines
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read(1 << 16).decode("utf-8", "replace")
            lines.extend(ln.strip() for ln in text.splitlines() if ln.strip())


_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "a DICOM SEG (a segmentation, not an image)",
    "1.2.840.10008.5.1.4.1.1.66": "a DICOM raw data object, not an image",
    "1.2.840.10008.5.1.4.1.1.481.3": "an RT structure set (contours, not an image)",
    "1.2.840.10008.5.1.4.1.1.2.1": "an enhanced multi-frame CT",
    "1.2.840.10008.5.1.4.1.1.2.2": "a legacy-converted enhanced (multi-frame) CT",
    "1.2.840.10008.5.1.4.1.1.4.1": "an enhanced multi-frame MR",
    "1.2.840.10008.5.1.4.1.1.4.4": "a legacy-converted enhanced (multi-frame) MR",
    "1.2.840.10008.5.1.4.1.1.130": "an enhanced multi-frame PET",
    "1.2.840.10008.5.1.4.1.1.128.1": "a legacy-converted enhanced (multi-frame) PET",
}


def refuse_unsupported_dicom(name: str, reader: sitk.ImageFileReader) -> None:
    """A DICOM object MaskSAM cannot segment as an image gets its own one-line error (ITK reads
    a multi-frame file or a SEG as a 3D/4D image, which then got an unrelated hint)."""
    if not reader.HasMetaDataKey("0008|0016"):
        return
    sop = reader.GetMetaData("0008|0016").strip().rstrip("\x00")
    frames = reader.GetMetaData("0028|0008").strip() if reader.HasMetaDataKey(
        "0028|0008") else "1"
    what = _SOP_CLASSES.get(sop)
    if what is None and frames.isdigit() and int(frames) > 1:
        what = f"a multi-frame DICOM object ({frames} frames in one file)"
    if what is None:
        return
    if "segmentation" in what or "not an image" in what:
        raise MaskSAMError(f"{name} is {what}; pass the CT/MR image series it belongs to.")
    raise MaskSAMError(
        f"{name} is {what}, which MaskSAM does not read; convert it to NIfTI (e.g. dcm2niix) or "
        "to classic single-frame DICOM, then segment that."
    )


COMPRESSED_SYNTAXES = {
    "1.2.840.10008.1.2.4.90": "JPEG 2000", "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.4.50": "JPEG", "1.2.840.10008.1.2.4.51": "JPEG",
    "1.2.840.10008.1.2.4.57": "JPEG lossless", "1.2.840.10008.1.2.4.70": "JPEG lossless",
    "1.2.840.10008.1.2.4.80": "JPEG-LS", "1.2.840.10008.1.2.4.81": "JPEG-LS",
    "1.2.840.10008.1.2.5": "RLE",
}


@dataclass(frozen=True)
class _SliceHeader:
    file: str
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    shape: tuple[int, int]
    image_type: str


def _slice_headers(files: Sequence[str]) -> list[_SliceHeader] | None:
    """Position, orientation, pixel spacing and size of every slice (None: not all have them)."""
    reader = sitk.ImageFileReader()
    reader.LoadPrivateTagsOff()
    out = []
    for name in files:
        reader.SetFileName(name)
        try:
            with quiet_native_stderr():
                reader.ReadImageInformation()
            get = reader.GetMetaData
            position = np.array([float(v) for v in get("0020|0032").split("\\")])
            orientation = np.array([float(v) for v in get("0020|0037").split("\\")])
            spacing = tuple(float(v) for v in get("0028|0030").split("\\"))
            shape = (int(get("0028|0010")), int(get("0028|0011")))
        except (RuntimeError, ValueError):
            return None
        if position.size != 3 or orientation.size != 6 or len(spacing) != 2:
            return None
        kind = get("0008|0008") if reader.HasMetaDataKey("0008|0008") else ""
        out.append(_SliceHeader(name, position, orientation, spacing, shape, kind))  # type: ignore[arg-type]
    return out


#: Tolerances for one evenly spaced, unsheared stack (as dcm2niix checks series).
_GAP_RTOL = 0.02
_GAP_ATOL_MM = 0.02
_TILT_MAX_DEGREES = 0.1


def check_series_geometry(name: str, files: Sequence[str]) -> None:
    """Refuse a DICOM series ITK would read onto a wrong grid (one-line MaskSAMError).

    ITK stacks the slices evenly from the first two positions, without shear: a missing slice,
    uneven gaps, a repeated position, a localizer or a slice of another size/orientation in
    the series, mixed pixel spacing or a gantry tilt would misplace voxels silently.
    """
    headers = _slice_headers(files)
    if headers is None or len(headers) < 2:
        return  # ITK's reader decides (it reports missing geometry itself)
    first = headers[0]
    advice = ("remove the odd files or choose the series with --series-uid, or convert it with "
              "dcm2niix, which handles such series")
    for h in headers[1:]:
        if h.shape != first.shape or np.abs(h.orientation - first.orientation).max() > 1e-4:
            kind = " (a localizer/scout)" if "LOCALIZER" in h.image_type.upper() else ""
            raise MaskSAMError(
                f"{name}: slice {Path(h.file).name}{kind} has another size or orientation than "
                f"{Path(first.file).name}; the series mixes images that do not stack: {advice}."
            )
        if np.abs(np.subtract(h.pixel_spacing, first.pixel_spacing)).max() > 1e-4:
            raise MaskSAMError(
                f"{name}: slices {Path(first.file).name} and {Path(h.file).name} have different "
                f"pixel spacing ({list(first.pixel_spacing)} vs {list(h.pixel_spacing)} mm): "
                f"{advice}."
            )
    row, col = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row, col)
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        raise MaskSAMError(f"{name}: the slice orientation (0020,0037) is degenerate; the files "
                           "are damaged.")
    normal = normal / norm
    ordered = sorted(headers, key=lambda h: float(h.position @ normal))
    depth = np.array([float(h.position @ normal) for h in ordered])
    gaps = np.diff(depth)
    for k, gap in enumerate(gaps):
        if gap < _GAP_ATOL_MM:
            raise MaskSAMError(
                f"{name}: slices {Path(ordered[k].file).name} and "
                f"{Path(ordered[k + 1].file).name} lie at the same position "
                f"({depth[k]:.3f} mm); the series holds duplicates (or several acquisitions): "
                f"{advice}."
            )
    typical = float(np.median(gaps))
    off = np.abs(gaps - typical) > max(_GAP_RTOL * typical, _GAP_ATOL_MM)
    if off.any():
        k = int(np.flatnonzero(off)[0])
        ratio = gaps[k] / typical
        what = (f"about {round(ratio) - 1} slice(s) missing" if ratio > 1.5
                and abs(ratio - round(ratio)) < 0.1 else "uneven slice spacing")
        raise MaskSAMError(
            f"{name}: {what} between {Path(ordered[k].file).name} and "
            f"{Path(ordered[k + 1].file).name} (gap {gaps[k]:.3f} mm, the others "
            f"{typical:.3f} mm); an evenly spaced grid would misplace slices: re-export the "
            "complete series, or convert it with dcm2niix, which resamples such series."
        )
    steps = np.diff(np.array([h.position for h in ordered]), axis=0)
    along = steps @ normal
    sideways = np.linalg.norm(steps - along[:, None] * normal[None, :], axis=1)
    angle = float(np.degrees(np.arctan2(sideways.max(), float(np.median(along)))))
    if angle > _TILT_MAX_DEGREES:
        raise MaskSAMError(
            f"{name}: the slices are shifted sideways by {angle:.1f} degrees (gantry tilt); the "
            "grid would be sheared away: correct the tilt first (e.g. dcm2niix does) and segment "
            "the result."
        )


def transfer_syntax(path: str) -> str:
    """The transfer syntax UID from a DICOM file's meta header (tag 0002,0010), or ''."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return ""
    at = head.find(b"\x02\x00\x10\x00UI")
    if at < 0:
        return ""
    length = int.from_bytes(head[at + 6:at + 8], "little")
    return head[at + 8:at + 8 + length].decode("ascii", "replace").strip("\x00 ")


