"""DICOM SEG output (via ``highdicom``, an optional dependency: ``pip install highdicom``).

The label map must lie on the grid of the DICOM series it was predicted from, with array
slice ``z`` belonging to ``files[z]`` (the order SimpleITK's series reader used). Each class of
the model becomes one segment (numbers 1..K-1 in label order) with its name, colour and, when
the label carries a Slicer terminology entry, its SNOMED CT category and type codes; otherwise
the generic "Anatomical Structure" code. Empty frames are omitted, as highdicom does by default.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MaskSAMError
from ..files import atomic_path

_ANATOMICAL_STRUCTURE = ("91723000", "SCT", "Anatomical Structure")


def highdicom_available() -> bool:
    try:
        import highdicom  # noqa: F401
    except ImportError:
        return False
    return True


def require_highdicom() -> None:
    """A one-line error naming the fix when highdicom is not installed."""
    if not highdicom_available():
        raise MaskSAMError(
            "Writing DICOM SEG (.dcm) needs the optional package highdicom; install it with "
            "'pip install highdicom' (or 'pip install masksam-slicer[dicom]'), or write "
            ".seg.nrrd/.nii.gz instead."
        )


def _codes(terminology: str | None) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
    """(category, type) as (value, scheme, meaning) from a Slicer terminology entry."""
    default = (_ANATOMICAL_STRUCTURE, _ANATOMICAL_STRUCTURE)
    if not terminology:
        return default
    fields = terminology.split("~")
    parsed = []
    for text in fields[1:3]:
        parts = text.split("^")
        if len(parts) != 3 or not parts[0] or not parts[1]:
            return default
        scheme, value, meaning = parts
        parsed.append((value, scheme, meaning))
    return (parsed[0], parsed[1]) if len(parsed) == 2 else default


def write_dicom_seg(
    labels: np.ndarray,
    label_entries: Sequence[dict[str, Any]],
    source_files: Sequence[str | os.PathLike],
    path: str | os.PathLike,
    *,
    spacing: Sequence[float] | None = None,
    overwrite: bool = False,
    software_version: str = "",
) -> Path:
    """Write ``labels`` ``(z, y, x)`` (label values) as a DICOM SEG referencing ``source_files``.

    ``label_entries``: ``[{value, name, color, terminology}]`` (background 0 is skipped).
    ``spacing`` ``(x, y, z)`` mm of the label grid stands in for a missing SliceThickness,
    which highdicom requires of the source images.
    """
    require_highdicom()
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    path = Path(path)
    if not path.parent.is_dir():
        raise MaskSAMError(f"Cannot write {path}: the folder {path.parent} does not exist.")
    if len(source_files) != labels.shape[0]:
        raise MaskSAMError(f"The label map has {labels.shape[0]} slices but the DICOM series "
                           f"{len(source_files)} files; DICOM SEG needs the series' own grid.")
    entries = [e for e in label_entries if int(e["value"]) != 0]
    lookup = np.zeros(int(max([int(e["value"]) for e in entries] + [int(labels.max())])) + 1,
                      dtype=np.uint16)
    descriptions = []
    algorithm = hd.AlgorithmIdentificationSequence(
        name="MaskSAM", family=codes.cid7162.ArtificialIntelligence,
        version=software_version or "unknown",
    )
    for number, entry in enumerate(entries, start=1):
        lookup[int(entry["value"])] = number
        category, kind = _codes(entry.get("terminology"))
        color = entry.get("color")
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=str(entry["name"])[:64],
            segmented_property_category=hd.sr.CodedConcept(*category),
            segmented_property_type=hd.sr.CodedConcept(*kind),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*color) if color else None,
        ))
    try:
        sources = [pydicom.dcmread(str(f)) for f in source_files]
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise MaskSAMError(f"Cannot re-read the DICOM series for the SEG ({exc}).") from exc
    pixels = lookup[labels].astype(np.uint8 if len(entries) < 256 else np.uint16)
    if spacing is not None:
        for source in sources:  # in-memory copies only; highdicom requires the attribute
            if "SliceThickness" not in source or source.SliceThickness in (None, ""):
                source.SliceThickness = round(float(spacing[2]), 6)
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=900,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="MaskSAMSlicer",
            manufacturer_model_name="MaskSAM",
            software_versions=software_version or "unknown",
            device_serial_number="none",
            series_description="MaskSAM auto-segmentation (research use)",
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise MaskSAMError(
            f"highdicom could not build a DICOM SEG from this series ({exc}); write .seg.nrrd "
            "or .nii.gz instead."
        ) from exc
    with atomic_path(path, overwrite=overwrite) as tmp:
        seg.save_as(str(tmp))
    return path
