"""``Predictor``: a model folder in, label maps in the input's exact grid out.

A stateful numpy-facing wrapper kept apart from the torch modules (SamPredictor style)::

    predictor = Predictor.from_model_dir("models/abdomen", device="auto")
    prediction = predictor.predict(sitk.ReadImage("ct.nii.gz"))   # or a list, one per channel
    sitk.WriteImage(prediction.to_sitk(), "labels.nii.gz")

Flow: channels ``(z, y, x)`` on one grid -> ``preprocess_case`` with the model's saved
settings (canonical LPS-axial frame by permutation/flips, crop, normalisation, target spacing)
-> streaming sliding window (class indices only, never a full-resolution float array per class)
-> class index to label value -> ``postprocess_labels`` back to the input's exact size, spacing,
origin and direction (uint8, or uint16 beyond 255).

``fast`` trades accuracy for speed: windows without overlap (step 1.0) and an in-plane target
spacing 1.5x coarser (the slice spacing, which the depth adapters learned, is kept).
``tta`` averages the identity with mirrored copies over slices, Y and X; X (left-right in the
canonical frame) is left out when the model has lateralized classes (``*_left``/``*_right``),
so those are never mirrored onto each other.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from ..data.geometry import Geometry, Volume
from ..data.preprocessing import PreprocessConfig, postprocess_labels, preprocess_case
from ..data.writers import label_dtype
from ..devices import decoder_chunk_for, half_dtype, resolve_device
from ..errors import Interrupted, MaskSAMError
from ..labels import has_lateralized_classes
from ..modeling.masksam import MaskSAM
from .budget import MemoryEstimate, check_memory_budget, estimate_prediction_memory
from .prediction import Prediction, PredictionInfo
from .sliding_window import count_windows, sliding_window_labels

ImageLike = sitk.Image | Volume | np.ndarray
FAST_STEP = 1.0
FAST_INPLANE_SPACING = 1.5


@dataclass
class PredictOptions:
    """How to run one prediction (validated on construction)."""

    step: float = 0.5
    fast: bool = False
    tta: bool = False
    batch_windows: int = 2

    def __post_init__(self) -> None:
        if not 0.05 <= self.step <= 1.0:
            raise MaskSAMError(f"The window step must be in [0.05, 1], got {self.step}.")
        if self.batch_windows < 1:
            raise MaskSAMError("batch_windows must be at least 1.")

    @property
    def effective_step(self) -> float:
        return max(self.step, FAST_STEP) if self.fast else self.step


class Predictor:
    """Runs a MaskSAM model on whole volumes.

    Args:
        model: a MaskSAM whose ``config.preprocessing`` holds the training preprocessing.
        device: where to run; half precision autocast on GPUs (bf16 where supported).
        decoder_chunk: queries per decoder pass (default 8 on CPU, all on GPU).
        model_dir: where the model came from (reported in sidecars).
    """

    def __init__(
        self,
        model: MaskSAM,
        *,
        device: str | torch.device = "cpu",
        decoder_chunk: int | None = None,
        model_dir: str | Path | None = None,
    ) -> None:
        self.device = torch.device(device) if not isinstance(device, torch.device) else device
        self.model = model.to(self.device).eval()
        self.config = model.config
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.decoder_chunk = decoder_chunk_for(self.device.type, decoder_chunk)
        self.amp_dtype = half_dtype(self.device)
        self.preprocessing = self.config.require_preprocessing()
        self.lateralized = has_lateralized_classes([lab.name for lab in self.config.labels])
        top = max(lab.value for lab in self.config.labels)
        self._values = np.asarray([lab.value for lab in self.config.labels],
                                  dtype=label_dtype(top))

    @classmethod
    def from_model_dir(
        cls, model_dir: str | Path, device: str | torch.device = "auto", **kwargs: Any
    ) -> Predictor:
        """Load ``config.json`` + ``model.safetensors`` from ``model_dir`` onto ``device``."""
        from ..modeling.build import load_model_dir

        resolved = device if isinstance(device, torch.device) else resolve_device(device)
        model = load_model_dir(model_dir, device="cpu")
        return cls(model, device=resolved, model_dir=model_dir, **kwargs)

    # ------------------------------------------------------------------ description
    @property
    def labels(self) -> list[dict[str, Any]]:
        """The model's classes as writer entries ``{value, name, color, terminology}``."""
        return [dataclasses.asdict(lab) for lab in self.config.labels]

    @property
    def num_channels(self) -> int:
        return self.config.in_channels

    def mirror_axes(self) -> tuple[int, ...]:
        """TTA mirror axes of a ``(B, C, T, H, W)`` window: slices, Y and X unless lateralized."""
        return (2, 3) if self.lateralized else (2, 3, 4)

    def preprocess_config(self, options: PredictOptions) -> PreprocessConfig:
        """The model's preprocessing, with the coarser in-plane spacing of ``fast``."""
        if not options.fast:
            return self.preprocessing
        sx, sy, sz = self.preprocessing.target_spacing
        f = FAST_INPLANE_SPACING
        return dataclasses.replace(self.preprocessing, target_spacing=(sx * f, sy * f, sz))

    def describe(self, options: PredictOptions) -> PredictionInfo:
        """The record of this model, device and ``options`` that every prediction carries."""
        cfg = self.config
        return PredictionInfo(
            classes=self.labels,
            model_dir=str(self.model_dir) if self.model_dir else None,
            backbone=cfg.backbone.name, img_size=cfg.img_size, num_slices=cfg.num_slices,
            num_queries=cfg.num_queries, provenance=dict(cfg.provenance), device=str(self.device),
            step=options.effective_step, fast=options.fast, tta=options.tta,
            mirror_axes=self.mirror_axes() if options.tta else (),
            target_spacing=tuple(self.preprocess_config(options).target_spacing),  # type: ignore[arg-type]
        )

    def estimate_memory(
        self, geometry: Geometry, options: PredictOptions | None = None, input_bytes: int = 4
    ) -> MemoryEstimate:
        """Peak memory estimate for a volume on ``geometry`` (from its header alone)."""
        options = options or PredictOptions()
        return estimate_prediction_memory(
            geometry, config=self.config, preprocessing=self.preprocess_config(options),
            input_bytes_per_voxel=input_bytes, batch_windows=options.batch_windows,
        )

    def check_memory(
        self, geometry: Geometry, name: str, budget_bytes: int | None,
        options: PredictOptions | None = None, input_bytes: int = 4,
    ) -> MemoryEstimate:
        """Refuse (MaskSAMError) a volume whose estimated peak exceeds ``budget_bytes``."""
        estimate = self.estimate_memory(geometry, options, input_bytes)
        check_memory_budget(estimate, name, budget_bytes)
        return estimate

    # ------------------------------------------------------------------ prediction
    def predict(
        self,
        image: ImageLike | Sequence[ImageLike],
        *,
        geometry: Geometry | None = None,
        options: PredictOptions | None = None,
        progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Prediction:
        """Label map of one case in the input's exact grid.

        Args:
            image: a SimpleITK image, a :class:`Volume`, or a ``(z, y, x)`` array with
                ``geometry``; or a list of those, one per model channel, all on one grid.
            geometry: the grid of array inputs.
            options: step, fast, tta, windows per batch.
            progress: called with ``(0, windows total)`` first, then after each batch.
            should_stop: polled between window batches; True stops with :class:`Interrupted`.
        Returns:
            :class:`Prediction` with ``labels`` ``(z, y, x)`` uint8/uint16 label values.
        """
        options = options or PredictOptions()
        volumes = as_volumes(image, geometry)
        if len(volumes) != self.num_channels:
            names = ", ".join(self.preprocessing.channel_names)
            raise MaskSAMError(
                f"The model takes {self.num_channels} channel(s) ({names}) but {len(volumes)} "
                "image(s) were given; pass one file per channel, in that order."
            )
        timings: dict[str, float] = {}
        start = time.perf_counter()
        data, properties = preprocess_case(volumes, self.preprocess_config(options))
        timings["preprocess"] = time.perf_counter() - start

        shape = tuple(data.shape[1:])
        total = count_windows(shape, self.model.num_slices, self.model.img_size,
                              options.effective_step)
        if progress is not None:
            progress(0, total)
        encoder_time = _EncoderTimer(self.model, self.device)
        try:
            indices = sliding_window_labels(
                torch.from_numpy(data), self.model, step=options.effective_step,
                batch_windows=options.batch_windows, device=self.device,
                amp_dtype=self.amp_dtype, mirror_axes=self.mirror_axes() if options.tta else (),
                progress=progress, should_stop=should_stop, timings=timings,
                decoder_chunk=self.decoder_chunk,
            )
        except InterruptedError as exc:
            raise Interrupted("Segmentation stopped on request; nothing was written.") from exc
        finally:
            encoder_time.remove()
        del data
        network = timings.pop("network", 0.0)
        timings["encoder"] = min(encoder_time.seconds, network)
        timings["decoder"] = network - timings["encoder"]
        start = time.perf_counter()
        labels = postprocess_labels(self._values[indices], properties)
        timings["postprocess"] = time.perf_counter() - start
        return Prediction(labels=labels, geometry=volumes[0].geometry, timings=timings,
                          windows=total, preprocessed_shape=shape,  # type: ignore[arg-type]
                          info=self.describe(options))


def as_volumes(image: ImageLike | Sequence[ImageLike], geometry: Geometry | None) -> list[Volume]:
    """Normalise the accepted input forms to a list of 3D scalar :class:`Volume` channels."""
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise MaskSAMError("No image was given.")
    out = []
    for index, item in enumerate(items):
        name = f"Input {index}" if len(items) > 1 else "The input"
        if isinstance(item, Volume):
            volume = item
        elif isinstance(item, sitk.Image):
            if item.GetNumberOfComponentsPerPixel() != 1:
                raise MaskSAMError(f"{name} has several components per voxel; pass one scalar "
                                   "3D image per channel.")
            if item.GetDimension() != 3:
                raise MaskSAMError(f"{name} is a {item.GetDimension()}D image; MaskSAM needs a "
                                   "3D volume.")
            volume = Volume.from_sitk(item)
        elif isinstance(item, np.ndarray):
            if geometry is None:
                raise MaskSAMError(f"{name} is an array without a geometry; pass geometry=.")
            if item.ndim != 3 or tuple(item.shape) != geometry.shape:
                raise MaskSAMError(f"{name} has shape {item.shape}; the geometry needs "
                                   f"{geometry.shape} (z, y, x).")
            volume = Volume(item, geometry)
        else:
            raise MaskSAMError(f"{name} is a {type(item).__name__}; pass a SimpleITK image, a "
                               "Volume or a numpy array with its geometry.")
        if volume.array.size == 0 or min(volume.array.shape) < 2:
            raise MaskSAMError(f"{name} has shape {volume.array.shape}; MaskSAM needs a 3D "
                               "volume with at least 2 voxels along each axis.")
        out.append(volume)
    return out


class _EncoderTimer:
    """Seconds spent inside ``model.image_encoder`` (forward hooks; CUDA synchronised)."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.seconds = 0.0
        self._sync = device.type == "cuda"
        self._starts: list[float] = []
        encoder = getattr(model, "image_encoder", None)
        self._handles = []
        if isinstance(encoder, torch.nn.Module):
            self._handles = [encoder.register_forward_pre_hook(self._pre),
                             encoder.register_forward_hook(self._post)]

    def _now(self) -> float:
        if self._sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _pre(self, *_: Any) -> None:
        self._starts.append(self._now())

    def _post(self, *_: Any) -> None:
        self.seconds += self._now() - self._starts.pop()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
