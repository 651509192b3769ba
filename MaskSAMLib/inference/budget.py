"""Memory budget of one prediction, estimated from headers before any pixel is allocated.

The estimate adds what is alive at the peak of each stage and keeps the largest:

* reading: the input channels in their file pixel type;
* preprocessing: the float32 channel stack, its canonical copy, the normalised crop and the
  resampled array (``preprocess_case`` holds all four at once while resampling);
* inference: the input channels and resampled array, the network weights and activations of a
  batch of windows (per-backbone constants measured on CPU, scaled by window pixels and
  queries), the class scores of the slices still open (``T`` + 1 slices of ``K`` float32 maps)
  and the uint8/uint16 label map on the preprocessed grid;
* restoring: the label-safe resampling back to the input grid (float32 memberships over the
  cropped grid) and the label map in the input grid;

plus the Python/torch runtime itself (about 0.5 GB resident before any data).

It is deliberately generous (1.4x the sum): refusing a volume that would
have fitted costs a rerun with ``--memory-budget``, running out of memory half-way costs more.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from ..backbones import backbone_spec
from ..config import ModelConfig
from ..data.geometry import Geometry
from ..data.orientation import canonical_transform
from ..data.preprocessing import PreprocessConfig
from ..data.resampling import resampled_shape
from ..errors import MaskSAMError

GB = 1024**3
SAFETY = 1.4
RUNTIME_BYTES = 500 * 2**20

_BYTES_PER_PIXEL = {
    "8-bit unsigned integer": 1,
    "8-bit signed integer": 1,
    "16-bit unsigned integer": 2,
    "16-bit signed integer": 2,
    "32-bit unsigned integer": 4,
    "32-bit signed integer": 4,
    "64-bit unsigned integer": 8,
    "64-bit signed integer": 8,
    "32-bit float": 4,
    "64-bit float": 8,
}


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak bytes of one prediction and the stage where it occurs."""

    peak_bytes: int
    stage: str
    stages: dict[str, int]

    @property
    def peak_gb(self) -> float:
        return self.peak_bytes / GB


def available_memory_bytes() -> int | None:
    """Memory the OS can give this process now (psutil, else /proc/meminfo), or None."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def pixel_bytes(pixel_type: str) -> int:
    """Bytes per voxel of a SimpleITK pixel type name (8 when unknown)."""
    return _BYTES_PER_PIXEL.get(pixel_type, 8)


def estimate_prediction_memory(
    geometry: Geometry,
    *,
    config: ModelConfig,
    preprocessing: PreprocessConfig,
    input_bytes_per_voxel: int = 4,
    batch_windows: int = 2,
) -> MemoryEstimate:
    """Peak bytes to predict a volume on ``geometry`` (header only; see the module doc)."""
    channels = config.in_channels
    v = geometry.num_voxels
    canonical = canonical_transform(geometry).canonical
    target = preprocessing.case_spacing(canonical.spacing, canonical.shape)
    shape = resampled_shape(canonical.shape, canonical.spacing, target)
    vr = int(np.prod(np.asarray(shape, dtype=np.int64)))
    t, s, k = config.num_slices, config.img_size, config.num_classes
    slice_pixels = max(shape[1], s) * max(shape[2], s)
    label_bytes = 1 if k < 256 else 2

    inputs = channels * v * input_bytes_per_voxel
    reading = inputs
    preprocess = inputs + channels * 4 * (3 * v + vr)
    # Peak activations of one forward per slice of a window (the backbone table's estimate).
    ref_size, per_slice = backbone_spec(config.backbone.name).activation_per_slice
    activations = int(per_slice * (s / ref_size) ** 2 * max(config.num_queries, 16) / 16)
    weights = _parameter_bytes(config)
    open_scores = (t + 1) * (k + 1) * slice_pixels * 4
    inference = (
        inputs + channels * 4 * vr + weights + batch_windows * t * activations + open_scores
        + vr * label_bytes
    )
    restoring = inputs + vr * label_bytes + v * (2 * 4 + 3 * label_bytes)
    stages = {"reading": reading, "preprocessing": preprocess, "inference": inference,
              "restoring": restoring}
    stages = {key: int((val + RUNTIME_BYTES) * SAFETY) for key, val in stages.items()}
    stage = max(stages, key=stages.__getitem__)
    return MemoryEstimate(stages[stage], stage, stages)


def _parameter_bytes(config: ModelConfig) -> int:
    b = config.backbone
    encoder = backbone_spec(b.name).encoder_parameters or 12 * b.depth * b.embed_dim**2
    return 4 * (encoder + 8_000_000)


def check_memory_budget(
    estimate: MemoryEstimate, name: str, budget_bytes: int | None
) -> None:
    """Refuse (MaskSAMError) when the estimate exceeds ``budget_bytes`` (None: no check)."""
    if budget_bytes is None or estimate.peak_bytes <= budget_bytes:
        return
    need = math.ceil(estimate.peak_gb * 10) / 10
    have = budget_bytes / GB
    raise MaskSAMError(
        f"{name} needs about {need:.1f} GB of memory at its peak ({estimate.stage}), more than "
        f"the {have:.1f} GB budget; free memory, crop or downsample the volume, use --fast, or "
        "raise --memory-budget GB if you know it fits."
    )
