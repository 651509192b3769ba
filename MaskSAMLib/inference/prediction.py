"""What a prediction is: a label map on the input's grid and the record of how it was made.

Kept apart from :mod:`~MaskSAMLib.inference.predictor` (and torch), so that the writers
(:mod:`~MaskSAMLib.inference.outputs`) need nothing but this record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..data.geometry import Geometry


@dataclass(frozen=True)
class PredictionInfo:
    """How a prediction was made: what the writers record (segment metadata, JSON sidecar).

    Made by :meth:`Predictor.describe`, so that writing an output needs no ``Predictor``.
    ``classes`` are writer entries ``{value, name, color, terminology}``, background first;
    ``mirror_axes`` are the TTA axes of a ``(B, C, T, H, W)`` window (empty without TTA).
    """

    classes: list[dict[str, Any]]
    model_dir: str | None
    backbone: str
    img_size: int
    num_slices: int
    num_queries: int
    provenance: dict[str, Any]
    device: str
    step: float
    fast: bool
    tta: bool
    mirror_axes: tuple[int, ...]
    target_spacing: tuple[float, float, float]


@dataclass
class Prediction:
    """A label map ``(z, y, x)`` of label values on the input's ``geometry``, with timings and
    ``info`` (how it was made)."""

    labels: np.ndarray
    geometry: Geometry
    info: PredictionInfo = field(kw_only=True)
    timings: dict[str, float] = field(default_factory=dict)
    windows: int = 0
    preprocessed_shape: tuple[int, int, int] = (0, 0, 0)

    def to_sitk(self) -> sitk.Image:
        return self.geometry.to_sitk(self.labels)

    def segment_volumes(self, labels: Sequence[dict[str, Any]] | None = None
                        ) -> list[dict[str, Any]]:
        """``[{value, name, voxels, volume_ml}]`` for every foreground label of ``labels``
        (default: the model's classes)."""
        labels = self.info.classes if labels is None else labels
        counts = np.bincount(self.labels.reshape(-1), minlength=1)
        voxel_ml = float(np.prod(self.geometry.spacing)) / 1000.0
        out = []
        for entry in labels:
            value = int(entry["value"])
            if value == 0:
                continue
            n = int(counts[value]) if value < len(counts) else 0
            out.append({"value": value, "name": entry["name"], "voxels": n,
                        "volume_ml": round(n * voxel_ml, 4)})
        return out
