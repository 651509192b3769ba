"""Preprocessing a case for the network, and undoing it on the predicted label map.

Forward (:func:`preprocess_case`), for the channels of one case (all on one grid):

1. reorient to the canonical LPS-axial frame by permutation/flips (``orientation.py``);
2. crop to the box of voxels non-zero in any channel (``normalization.crop_to_nonzero``);
3. normalise each channel by its scheme (CT: clip + dataset z-score, else per-image z-score);
4. resample to ``config.target_spacing`` (cubic; anisotropic spacing handled per slice).

Backward (:func:`postprocess_labels`): labels are resampled to the cropped shape, put back into
the uncropped canonical array and un-reoriented, so the result has exactly the input's size,
spacing, origin and direction. Everything needed is in the JSON-safe ``properties`` dict.

The building blocks are re-exported here: ``to_canonical``, ``CanonicalTransform``,
``fingerprint``, ``resample_image``, ``resample_labels``, ``CTNormStats``,
``compute_ct_stats``, ``crop_to_nonzero``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import MaskSAMError
from .geometry import Geometry, Volume
from .normalization import (
    CTNormStats,
    compute_ct_stats,
    crop,
    crop_to_nonzero,
    nonzero_bbox,
    normalize,
    scheme_for_channel,
    uncrop,
)
from .orientation import CanonicalTransform, canonical_transform, to_canonical
from .resampling import (
    ANISOTROPY_THRESHOLD,
    fingerprint,
    resample_image,
    resample_image_to_shape,
    resample_labels,
    resample_labels_to_shape,
    resampled_shape,
)
from .writers import label_dtype

__all__ = [
    "CTNormStats",
    "CanonicalTransform",
    "PreprocessConfig",
    "canonical_transform",
    "compute_ct_stats",
    "crop_to_nonzero",
    "fingerprint",
    "original_geometry",
    "postprocess_image",
    "postprocess_labels",
    "preprocess_case",
    "preprocess_label",
    "resample_image",
    "resample_labels",
    "resampled_shape",
    "to_canonical",
]

CANONICAL_FRAME = "LPS-axial"


@dataclass
class PreprocessConfig:
    """Everything that turns a case into network input, saved in the model's config.json.

    ``target_spacing`` is ``(x, y, z)`` mm in the canonical frame; ``normalization`` holds one
    scheme per channel (``"CT"`` or ``"zscore"``, derived from ``channel_names`` when empty)
    and ``ct_stats`` one :class:`CTNormStats` per CT channel (None for the others).

    ``fit_size`` (the "fit" plan of the 2D-pretrained backbones): when set, each case's
    in-plane spacing is chosen so that its (cropped) slice just fits ``fit_size x fit_size``
    pixels, as those backbones were pretrained (a whole slice in the input); the slice spacing
    stays ``target_spacing[2]``. ``None`` keeps the fixed ``target_spacing`` (nnU-Net's plan).
    """

    target_spacing: tuple[float, float, float]
    channel_names: list[str]
    normalization: list[str] = field(default_factory=list)
    ct_stats: list[CTNormStats | None] = field(default_factory=list)
    crop_nonzero: bool = True
    order: int = 3
    order_z: int = 0
    anisotropy_threshold: float = ANISOTROPY_THRESHOLD
    fit_size: int | None = None

    def __post_init__(self) -> None:
        self.target_spacing = tuple(float(s) for s in self.target_spacing)  # type: ignore[assignment]
        if len(self.target_spacing) != 3 or min(self.target_spacing) <= 0:
            raise ValueError(f"target_spacing must be 3 positive numbers: {self.target_spacing}")
        self.channel_names = [str(n) for n in self.channel_names]
        if not self.channel_names:
            raise ValueError("at least one channel is needed")
        if not self.normalization:
            self.normalization = [scheme_for_channel(n) for n in self.channel_names]
        if not self.ct_stats:
            self.ct_stats = [None] * len(self.channel_names)
        if not len(self.normalization) == len(self.ct_stats) == len(self.channel_names):
            raise ValueError("normalization and ct_stats need one entry per channel")
        for name, scheme, stats in zip(
            self.channel_names, self.normalization, self.ct_stats, strict=True
        ):
            if scheme not in ("CT", "zscore"):
                raise ValueError(f"channel {name}: unknown normalization {scheme!r}")
            if scheme == "CT" and stats is None:
                raise ValueError(f"channel {name}: CT normalization needs ct_stats")
        if self.order not in range(6) or self.order_z not in (0, 1):
            raise ValueError("order must be 0-5 and order_z 0 or 1")
        if self.fit_size is not None:
            self.fit_size = int(self.fit_size)
            if self.fit_size < 8:
                raise ValueError(f"fit_size must be at least 8 pixels, got {self.fit_size}")

    def case_spacing(
        self, spacing: Sequence[float], shape_zyx: Sequence[int]
    ) -> tuple[float, float, float]:
        """Target ``(x, y, z)`` spacing of a case of ``shape_zyx`` voxels at ``spacing`` (x, y, z).

        The fixed ``target_spacing``; with ``fit_size``, the in-plane spacing at which the
        larger in-plane extent spans ``fit_size`` pixels (the slice spacing stays planned).
        """
        if self.fit_size is None:
            return self.target_spacing
        extent = max(float(spacing[0]) * int(shape_zyx[-1]), float(spacing[1]) * int(shape_zyx[-2]))
        inplane = extent / self.fit_size * (1 + 1e-9)
        return (inplane, inplane, self.target_spacing[2])

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (the inverse of :meth:`from_dict`)."""
        return {
            "canonical_frame": CANONICAL_FRAME,
            "target_spacing": list(self.target_spacing),
            "channel_names": list(self.channel_names),
            "normalization": list(self.normalization),
            "ct_stats": [s.to_dict() if s is not None else None for s in self.ct_stats],
            "crop_nonzero": self.crop_nonzero,
            "order": self.order,
            "order_z": self.order_z,
            "anisotropy_threshold": self.anisotropy_threshold,
            "fit_size": self.fit_size,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        """Rebuild from :meth:`to_dict`; a damaged dict is a :class:`MaskSAMError`."""
        try:
            frame = data.get("canonical_frame", CANONICAL_FRAME)
            if frame != CANONICAL_FRAME:
                raise ValueError(f"canonical frame {frame!r} is not {CANONICAL_FRAME!r}")
            return cls(
                target_spacing=tuple(data["target_spacing"]),
                channel_names=list(data["channel_names"]),
                normalization=list(data.get("normalization") or []),
                ct_stats=[
                    CTNormStats.from_dict(s) if s is not None else None
                    for s in data.get("ct_stats") or []
                ],
                crop_nonzero=bool(data.get("crop_nonzero", True)),
                order=int(data.get("order", 3)),
                order_z=int(data.get("order_z", 0)),
                anisotropy_threshold=float(data.get("anisotropy_threshold", ANISOTROPY_THRESHOLD)),
                fit_size=data.get("fit_size"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MaskSAMError(
                f"The preprocessing settings are invalid ({exc}); the model's config.json is "
                "damaged: restore it or export the model again."
            ) from exc

    def cache_key(self) -> str:
        """Short hash of the settings: preprocessed caches are valid only for the same key."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _stack_channels(images: Sequence[Volume], config: PreprocessConfig) -> np.ndarray:
    if len(images) != len(config.channel_names):
        raise MaskSAMError(
            f"Expected {len(config.channel_names)} channel file(s) "
            f"({', '.join(config.channel_names)}), got {len(images)}; pass one file per channel."
        )
    reference = images[0].geometry
    for index, image in enumerate(images[1:], start=1):
        diff = image.geometry.differences(reference)
        if diff:
            raise MaskSAMError(
                f"Channel {index} ({config.channel_names[index]}) is not on channel 0's grid "
                f"({'; '.join(diff)}); resample it onto channel 0 first."
            )
    data = np.stack([np.asarray(v.array, dtype=np.float32) for v in images], axis=0)
    if not np.all(np.isfinite(data)):
        raise MaskSAMError("The image contains NaN or Inf values; replace them and try again.")
    return data


def preprocess_case(
    images: Sequence[Volume], config: PreprocessConfig
) -> tuple[np.ndarray, dict[str, Any]]:
    """Channels of one case -> network input ``(C, z, y, x)`` float32 plus ``properties``.

    ``properties`` (JSON-safe) records the original grid, the canonical transform, the crop
    box and the shapes, for :func:`preprocess_label` and :func:`postprocess_labels`.
    """
    data = _stack_channels(images, config)
    geometry = images[0].geometry
    canonical, transform = to_canonical(data, geometry)
    if config.crop_nonzero:
        box = nonzero_bbox(canonical)
    else:
        box = tuple((0, s) for s in canonical.shape[1:])
    cropped = crop(canonical, box)
    normalized = np.stack(
        [
            normalize(c, s, t)
            for c, s, t in zip(cropped, config.normalization, config.ct_stats, strict=True)
        ]
    )
    spacing = transform.canonical.spacing
    target = config.case_spacing(spacing, normalized.shape)
    shape = resampled_shape(normalized.shape, spacing, target)
    out = resample_image_to_shape(
        normalized,
        shape,
        spacing=spacing,
        order=config.order,
        order_z=config.order_z,
        anisotropy_threshold=config.anisotropy_threshold,
    )
    properties = {
        "transform": transform.to_dict(),
        "bbox": [list(b) for b in box],
        "cropped_shape": list(normalized.shape[1:]),
        "resampled_shape": list(shape),
        "preprocessed_geometry": _resampled_geometry(transform.canonical, box, shape).to_dict(),
    }
    return np.ascontiguousarray(out, dtype=np.float32), properties


def _resampled_geometry(
    canonical: Geometry, box: Sequence[Sequence[int]], shape: Sequence[int]
) -> Geometry:
    """Grid of the preprocessed array: the crop box of ``canonical`` cut into ``shape`` voxels."""
    old = np.asarray([b - a for a, b in box], dtype=np.float64)[::-1]  # x, y, z
    new = np.asarray(shape, dtype=np.float64)[::-1]
    start = np.asarray([a for a, _ in box], dtype=np.float64)[::-1]
    first_center = start + 0.5 * old / new - 0.5
    return Geometry(
        size=tuple(int(n) for n in new),
        spacing=tuple(np.asarray(canonical.spacing) * old / new),
        origin=tuple(canonical.physical_point(first_center)[:3]),
        direction=canonical.direction,
    )


def _transform(properties: dict[str, Any]) -> CanonicalTransform:
    return CanonicalTransform.from_dict(properties["transform"])


def preprocess_label(label: Volume, properties: dict[str, Any]) -> np.ndarray:
    """A case's label map onto its preprocessed grid ``(z, y, x)`` (same steps, no normalising)."""
    transform = _transform(properties)
    diff = label.geometry.differences(transform.original)
    if diff:
        raise MaskSAMError(
            f"The label map is not on the image grid ({'; '.join(diff)}); resample it onto "
            "the image first."
        )
    array = np.asarray(label.array)
    if not np.issubdtype(array.dtype, np.integer):  # e.g. a label map saved as float32
        if not np.all(array == np.round(array)) or (array.size and array.min() < 0):
            raise MaskSAMError("The label map holds non-integer or negative values; fix it.")
        array = array.astype(label_dtype(int(array.max()) if array.size else 0))
    canonical = transform.apply(array)
    cropped = crop(canonical, [tuple(b) for b in properties["bbox"]])  # type: ignore[arg-type]
    return resample_labels_to_shape(np.ascontiguousarray(cropped), properties["resampled_shape"])


def postprocess_labels(label_array: np.ndarray, properties: dict[str, Any]) -> np.ndarray:
    """Predicted labels on the preprocessed grid ``(z, y, x)`` -> the original grid exactly.

    Undoes resampling (label-safe), cropping (outside is background) and reorientation; the
    result has ``Geometry.from_dict(properties['transform']['original']).shape`` and dtype
    uint8/uint16.
    """
    expected = tuple(properties["resampled_shape"])
    if tuple(label_array.shape) != expected:
        raise ValueError(f"label array {label_array.shape} is not the preprocessed {expected}")
    transform = _transform(properties)
    top = int(label_array.max()) if label_array.size else 0
    labels = np.asarray(label_array).astype(label_dtype(top), copy=False)
    restored = resample_labels_to_shape(labels, properties["cropped_shape"])
    box = [tuple(b) for b in properties["bbox"]]
    full = uncrop(restored, box, transform.canonical.shape, fill=0)  # type: ignore[arg-type]
    return np.ascontiguousarray(transform.invert(full))


def postprocess_image(
    array: np.ndarray, properties: dict[str, Any], *, order: int = 1, fill: float = 0.0
) -> np.ndarray:
    """Image-like data ``(..., z, y, x)`` on the preprocessed grid -> the original grid.

    For probabilities or logits (float32); outside the crop box is ``fill``.
    """
    transform = _transform(properties)
    spacing = Geometry.from_dict(properties["preprocessed_geometry"]).spacing
    restored = resample_image_to_shape(
        array, properties["cropped_shape"], spacing=spacing, order=order, order_z=min(order, 1)
    )
    box = [tuple(b) for b in properties["bbox"]]
    full = uncrop(restored, box, transform.canonical.shape, fill=fill)  # type: ignore[arg-type]
    return np.ascontiguousarray(transform.invert(full))


def original_geometry(properties: dict[str, Any]) -> Geometry:
    """The input grid a case's outputs must land on."""
    return Geometry.from_dict(properties["transform"]["original"])
