"""Reading volumes safely: header first, then pixels; DICOM series; writers re-exported.

Every refusal is a one-line :class:`MaskSAMError` naming the file and what to do. Headers are
checked (dimension, components, size budget) before a single pixel is allocated. Arrays come
back as ``(z, y, x)`` with their :class:`Geometry` (see ``geometry.py`` for conventions).
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
from ..files import incomplete_nifti
from .geometry import Geometry, Volume
from .writers import LABEL_EXTENSIONS, write_label_map, write_volume

__all__ = [
    "DEFAULT_MAX_VOXELS",
    "LABEL_EXTENSIONS",
    "DicomSeries",
    "Geometry",
    "ImageInfo",
    "Volume",
    "list_dicom_series",
    "read_any",
    "read_dicom_series",
    "read_image_info",
    "read_volume",
    "write_label_map",
    "write_volume",
]

#: Largest number of voxels a header may claim (2**31: 8 GiB as float32).
DEFAULT_MAX_VOXELS = 2**31

_SPLIT_HINT = (
    "split it into one 3D file per channel named CASE_0000, CASE_0001, ... "
    "(e.g. with SimpleITK: sitk.WriteImage(img[:, :, :, c], f'CASE_{c:04d}.nii.gz'))"
)


@dataclass(frozen=True)
class ImageInfo:
    """What a file's header says, before any pixel is read."""

    path: Path
    dimension: int
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    components: int
    pixel_type: str

    @property
    def num_voxels(self) -> int:
        return int(np.prod(np.asarray(self.size, dtype=np.int64))) if self.size else 0

    @property
    def geometry(self) -> Geometry:
        """The 3D grid (only for the 3D images that :func:`read_image_info` lets through)."""
        return Geometry(self.size, self.spacing, self.origin, self.direction)


def _size_text(size: Sequence[int]) -> str:
    return " x ".join(str(int(s)) for s in size)


def _check_header(
    name: str,
    dimension: int,
    size: Sequence[int],
    components: int,
    pixel_type: str,
    max_voxels: int,
    is_dicom: bool = False,
) -> None:
    """Refuse what MaskSAM cannot use; ``name`` is how the message names the input."""
    if dimension == 4:
        raise MaskSAMError(
            f"{name} is a 4D image ({_size_text(size)}): MaskSAM reads one 3D volume per channel; "
            f"{_SPLIT_HINT}."
        )
    if dimension != 3:
        hint = " (pass the folder that holds the whole DICOM series)" if is_dicom else ""
        raise MaskSAMError(
            f"{name} is a {dimension}D image ({_size_text(size)}); MaskSAM needs a 3D volume{hint}."
        )
    if components != 1:
        raise MaskSAMError(
            f"{name} has {components} components per voxel ({pixel_type}); MaskSAM needs scalar "
            f"voxels: for several channels {_SPLIT_HINT}."
        )
    if "complex" in pixel_type.lower():
        raise MaskSAMError(f"{name} has complex-valued voxels; save the magnitude image instead.")
    voxels = int(np.prod(np.asarray(size, dtype=np.int64)))
    if voxels == 0:
        raise MaskSAMError(f"{name} has zero voxels (size {_size_text(size)}); the file is empty.")
    if voxels > max_voxels:
        raise MaskSAMError(
            f"{name} claims a size of {_size_text(size)} ({voxels:,} voxels), more than the "
            f"limit of {max_voxels:,}; the header is probably corrupt, or crop/downsample the "
            "volume first."
        )
    if min(size) < 2:
        hint = " (pass the folder that holds the whole DICOM series)" if is_dicom else ""
        raise MaskSAMError(
            f"{name} has a single slice ({_size_text(size)}), a 2D image; MaskSAM needs a 3D "
            f"volume with several slices{hint}."
        )


def _reader_error(path: Path, exc: Exception) -> MaskSAMError:
    text = str(exc)
    for marker in ("sitk::ERROR:", "Description:"):
        if marker in text:
            text = text.split(marker, 1)[1]
    detail = " ".join(text.split())[:200]
    return MaskSAMError(
        f"{path} is not an image file SimpleITK can read ({detail}); check the file is a "
        "complete NIfTI/NRRD/MHA/DICOM volume."
    )


def _require_file(path: Path) -> None:
    if not path.exists():
        raise MaskSAMError(f"{path} does not exist; check the path.")
    if path.is_dir():
        raise MaskSAMError(
            f"{path} is a folder, not an image file; for a DICOM series use read_any/the folder."
        )
    if path.stat().st_size == 0:
        raise MaskSAMError(f"{path} is an empty file (0 bytes); export the volume again.")


def read_image_info(path: str | os.PathLike, *, max_voxels: int = DEFAULT_MAX_VOXELS) -> ImageInfo:
    """Read and check a file's header only (no pixels).

    Refuses non-images, 2D, 4D, multi-component, zero-voxel and over-``max_voxels`` images.
    """
    info = read_image_info_unchecked(path)
    is_dicom = info.path.suffix.lower() in (".dcm", ".ima")
    _check_header(
        str(info.path),
        info.dimension,
        info.size,
        info.components,
        info.pixel_type,
        max_voxels,
        is_dicom,
    )
    problem = incomplete_nifti(info.path, size_only=True)  # before allocating the pixels
    if problem:
        raise MaskSAMError(f"{info.path} is truncated or corrupt ({problem}); export it again.")
    check_grid(str(info.path), info.size, info.spacing, info.direction)
    return info


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
    import re

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


def _nonfinite_message(name: str, bad: int) -> str:
    return (f"{name} contains NaN or Inf values in {bad:,} voxels; replace them (e.g. with 0 or "
            "the background value) and save the volume again.")


def _check_finite(name: str, array: np.ndarray) -> None:
    if np.issubdtype(array.dtype, np.floating):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise MaskSAMError(_nonfinite_message(name, bad))
    if array.size and array.dtype.itemsize > 4 and array.dtype.kind in "fiu":
        limit = float(np.finfo(np.float32).max)
        low, high = float(array.min()), float(array.max())
        if max(-low, high) > limit:
            raise MaskSAMError(
                f"{name} holds values up to {max(-low, high):.3g}, beyond the float32 range "
                f"(±{limit:.3g}) MaskSAM computes in; clip or rescale the volume and save it "
                "again."
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


def _volume_from_image(name: str, image: sitk.Image) -> Volume:
    array = sitk.GetArrayFromImage(image)
    _check_finite(name, array)
    return Volume(array, Geometry.from_sitk(image))


def read_volume(path: str | os.PathLike, *, max_voxels: int = DEFAULT_MAX_VOXELS) -> Volume:
    """Read one 3D scalar volume file: header checks, then pixels; NaN/Inf refused.

    Returns a :class:`Volume` whose array is ``(z, y, x)`` in the file's own pixel type.
    (ITK's NIfTI reader replaces non-finite voxels by 0, so a float NIfTI's raw data is checked
    first; NRRD/MHA/DICOM keep them and the array is checked.)
    """
    info = read_image_info(path, max_voxels=max_voxels)
    if info.path.name.lower().endswith(".nii.gz"):
        problem = incomplete_nifti(info.path)  # ITK would fill the missing voxels with 0
        if problem:
            raise MaskSAMError(
                f"{info.path} is truncated or corrupt ({problem}); export it again."
            )
    if "float" in info.pixel_type.lower():
        bad = nifti_nonfinite_voxels(info.path)  # ITK's reader would turn them into 0
        if bad:
            raise MaskSAMError(_nonfinite_message(str(info.path), bad))
    try:
        image = sitk.ReadImage(str(info.path))
    except RuntimeError as exc:
        raise MaskSAMError(
            f"{info.path} could not be read past its header (truncated or corrupt file: "
            f"{' '.join(str(exc).split())[-160:]}); export it again."
        ) from exc
    return _volume_from_image(str(info.path), image)


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


_COMPRESSED = {
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


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series found in a folder."""

    uid: str
    folder: Path
    files: tuple[str, ...]
    description: str = ""

    @property
    def num_slices(self) -> int:
        return len(self.files)

    def label(self) -> str:
        text = f"{self.uid} ({self.num_slices} slices"
        if self.description:
            text += f", '{self.description}'"
        return text + ")"


def _series_description(first_file: str) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(first_file)
    try:
        reader.LoadPrivateTagsOff()
        with quiet_native_stderr():
            reader.ReadImageInformation()
        if reader.HasMetaDataKey("0008|103e"):
            return reader.GetMetaData("0008|103e").strip()
    except RuntimeError:
        pass
    return ""


def list_dicom_series(folder: str | os.PathLike, *, recursive: bool = True) -> list[DicomSeries]:
    """All DICOM series under ``folder`` (and its sub-folders when ``recursive``)."""
    folder = Path(folder)
    directories = [folder]
    if recursive:
        directories = [Path(root) for root, _dirs, _files in os.walk(folder)]
    series: dict[str, DicomSeries] = {}
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # "No Series were found" per folder
    try:
        for directory in sorted(directories):
            with quiet_native_stderr():
                uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(directory)) or ()
            for uid in uids:
                with quiet_native_stderr():
                    files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(directory),
                                                                                uid))
                known = series.get(uid)
                if files and (known is None or len(files) > known.num_slices):
                    series[uid] = DicomSeries(uid, directory, files, _series_description(files[0]))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)
    return sorted(series.values(), key=lambda s: (-s.num_slices, s.uid))


def read_dicom_series(
    folder: str | os.PathLike,
    series_uid: str | None = None,
    *,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> Volume:
    """Read a DICOM series from ``folder`` (searched recursively).

    Without ``series_uid`` the series with the most slices is read; a tie is refused with a
    message listing the candidates (uid, slices, description).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MaskSAMError(f"{folder} is not a folder; pass the folder holding the DICOM files.")
    found = list_dicom_series(folder)
    if not found:
        raise MaskSAMError(
            f"No DICOM series found in {folder}; pass a folder that holds the .dcm files of one "
            "series (or an image file such as .nii.gz/.nrrd)."
        )
    if series_uid is not None:
        chosen = [s for s in found if s.uid == series_uid]
        if not chosen:
            listing = "; ".join(s.label() for s in found[:10])
            raise MaskSAMError(
                f"Series {series_uid} is not in {folder}; the series there are: {listing}."
            )
        series = chosen[0]
    else:
        competing = [s for s in found if s.num_slices == found[0].num_slices]
        if len(competing) > 1:
            listing = "; ".join(s.label() for s in found[:10])
            raise MaskSAMError(
                f"{folder} holds {len(found)} DICOM series and {len(competing)} have the most "
                f"slices: {listing}; choose one with --series-uid UID."
            )
        series = found[0]
    name = f"DICOM series {series.uid} in {series.folder}"
    # Budget check before reading pixels: one file's header times the number of files.
    first = read_image_info_unchecked(series.files[0])
    frames = first.size[2] if first.dimension >= 3 else 1
    claimed = (first.size[0], first.size[1], frames * series.num_slices)
    if int(np.prod(np.asarray(claimed, dtype=np.int64))) > max_voxels or first.components != 1:
        _check_header(
            name, 3, claimed, first.components, first.pixel_type, max_voxels, is_dicom=True
        )
    check_series_geometry(name, series.files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(series.files))
    reader.MetaDataDictionaryArrayUpdateOff()
    try:
        with quiet_native_stderr() as noise:
            image = reader.Execute()
    except RuntimeError as exc:
        raise _series_error(name, series, exc, noise) from exc
    _check_header(
        name,
        image.GetDimension(),
        image.GetSize(),
        image.GetNumberOfComponentsPerPixel(),
        image.GetPixelIDTypeAsString(),
        max_voxels,
    )
    return _volume_from_image(name, image)


def _transfer_syntax(path: str) -> str:
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


def _series_error(
    name: str, series: DicomSeries, exc: Exception, noise: list[str]
) -> MaskSAMError:
    syntax = _transfer_syntax(series.files[0])
    decoder = f" (the decoder said: {noise[0][:80]})" if noise else ""
    if syntax in _COMPRESSED:
        return MaskSAMError(
            f"{name}: the {_COMPRESSED[syntax]}-compressed pixel data could not be decoded"
            f"{decoder}; decompress the series (e.g. gdcmconv --raw or dcmdjpeg) or convert it "
            "with dcm2niix, then try again."
        )
    detail = " ".join(str(exc).split()).split("ERROR:")[-1].strip()[-160:]
    return MaskSAMError(
        f"{name} could not be read ({detail}){decoder}; check the files are complete and belong "
        "to one series."
    )


def read_image_info_unchecked(path: str | os.PathLike) -> ImageInfo:
    """Header of any SimpleITK-readable file, without the 3D checks (errors still one-line)."""
    path = Path(path)
    _require_file(path)
    check_nrrd_directions(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with quiet_native_stderr():
            reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _reader_error(path, exc) from exc
    refuse_unsupported_dicom(str(path), reader)
    return ImageInfo(
        path=path,
        dimension=reader.GetDimension(),
        size=tuple(int(s) for s in reader.GetSize()),
        spacing=tuple(float(s) for s in reader.GetSpacing()),
        origin=tuple(float(s) for s in reader.GetOrigin()),
        direction=tuple(float(s) for s in reader.GetDirection()),
        components=int(reader.GetNumberOfComponents()),
        pixel_type=sitk.GetPixelIDValueAsString(reader.GetPixelID()),
    )


def read_any(
    path: str | os.PathLike,
    *,
    series_uid: str | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> Volume:
    """A volume file, or a folder holding a DICOM series."""
    path = Path(path)
    if not path.exists():
        raise MaskSAMError(f"{path} does not exist; check the path.")
    if path.is_dir():
        return read_dicom_series(path, series_uid, max_voxels=max_voxels)
    return read_volume(path, max_voxels=max_voxels)
