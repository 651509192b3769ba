"""Synthetic DICOM CT series for tests (pydicom): geometry faults on demand."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

pydicom = __import__("pytest").importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

JPEG2000 = "1.2.840.10008.1.2.4.90"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def write_series(
    folder: Path,
    *,
    slices: int = 6,
    spacing: float = 2.0,
    positions: Sequence[Sequence[float]] | None = None,
    sideways_per_slice: float = 0.0,
    pixel_spacing: Sequence[Sequence[float]] | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    sop_class: str = CTImageStorage,
    edit: Callable[[Dataset, int], None] | None = None,
    size: int = 16,
) -> Path:
    """One series in ``folder`` (``s000.dcm`` ...): axial slices ``spacing`` mm apart, unless
    ``positions`` are given; ``sideways_per_slice`` mm of y shift per slice is a gantry tilt."""
    folder.mkdir(parents=True, exist_ok=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    if positions is None:
        positions = [[0.0, sideways_per_slice * k, spacing * k] for k in range(slices)]
    for k, position in enumerate(positions):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = transfer_syntax
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID = series, study, frame
        ds.PatientName, ds.PatientID, ds.InstanceNumber = "Test", "1", k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = list(pixel_spacing[k]) if pixel_spacing else [0.8, 0.8]
        ds.SliceThickness = spacing
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        pixels = (np.arange(size * size).reshape(size, size) % 200 + 10 * k).astype(np.int16)
        if transfer_syntax == JPEG2000:  # a codestream that cannot be decoded
            ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 40])
        else:
            ds.PixelData = pixels.tobytes()
        if edit is not None:
            edit(ds, k)
        ds.save_as(folder / f"s{k:03d}.dcm", enforce_file_format=True)
    return folder
