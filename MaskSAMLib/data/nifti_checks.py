"""NIfTI integrity: is a file as long as its header says (ITK reads a truncated one silently)."""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path


def incomplete_nifti(path: Path, *, size_only: bool = False) -> str | None:
    """Why the NIfTI file at ``path`` is shorter than its header says (None: complete/not NIfTI).

    ITK reads a truncated NIfTI without an error (the missing voxels become 0) and writes one
    without an error when the disk is full. ``size_only``: for ``.nii`` compare with the file
    size instead of reading it (``.nii.gz`` is then not checked).
    """
    lower = path.name.lower()
    if not (lower.endswith(".nii") or lower.endswith(".nii.gz")):
        return None
    compressed = lower.endswith(".gz")
    if size_only and compressed:
        return None
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as handle:
            header = handle.read(352)
            if len(header) < 348:
                return "the NIfTI header is incomplete"
            order = "<" if struct.unpack("<i", header[:4])[0] == 348 else ">"
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            vox_offset = int(struct.unpack(order + "f", header[108:112])[0])
            voxels = 1
            for d in dims[1 : 1 + max(0, min(dims[0], 7))]:
                voxels *= max(int(d), 1)
            expected = vox_offset + voxels * max(bitpix, 8) // 8
            if not compressed:
                length = os.fstat(handle.fileno()).st_size
            else:
                length = len(header)
                for block in iter(lambda: handle.read(1 << 20), b""):
                    length += len(block)
    except (OSError, EOFError, zlib.error, struct.error) as exc:
        return f"the file cannot be read back ({exc})"
    if length < expected:
        return f"the file holds {length} of the {expected} bytes its header describes"
    return None
