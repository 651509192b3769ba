"""Reading volumes safely: header first, then pixels; DICOM series; writers re-exported.

Every refusal is a one-line :class:`MaskSAMError` naming the file and what to do. Headers are
checked (dimension, components, size budget) before a single pixel is allocated. Arrays come
back as ``(z, y, x)`` with their :class:`Geometry` (see ``geometry.py`` for conventions).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import MaskSAMError
from .dicom_checks import (
    COMPRESSED_SYNTAXES,
    check_series_geometry,
    quiet_native_stderr,
    refuse_unsupported_dicom,
    transfer_syntax,
)
from .geometry import Geometry, Volume
from .header_checks import check_grid, check_nrrd_directions, nifti_nonfinite_voxels
from .nifti_checks import incomplete_nifti
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


def _series_error(
    name: str, series: DicomSeries, exc: Exception, noise: list[str]
) -> MaskSAMError:
    syntax = transfer_syntax(series.files[0])
    decoder = f" (the decoder said: {noise[0][:80]})" if noise else ""
    if syntax in COMPRESSED_SYNTAXES:
        return MaskSAMError(
            f"{name}: the {COMPRESSED_SYNTAXES[syntax]}-compressed pixel data could not be decoded"
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
