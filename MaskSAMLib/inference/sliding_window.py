"""Sliding-window inference over a preprocessed volume, streaming slab by slab.

Windows of ``T`` slices x ``S x S`` pixels (``S`` = the model's input size) cover the volume
with overlap (``step`` as a fraction of the window); in-plane tiles cover slices larger than
``S``, and smaller ones are padded. Each window's MaskFormer class scores are weighted by a
Gaussian importance map and accumulated per slice. Windows run in z order, so a slice is final
as soon as no later window reaches it: it is turned into class indices at once and its scores
are dropped. Class scores are therefore held for a few slices only, never for the whole
volume, whatever its size.

A model whose encoder sees each slice alone (``encoder_mode="frozen"``) has each slice (and
tile, and mirrored copy) encoded once, however many windows hold it: overlapping windows and
test-time mirroring along the slices reuse the encoder's output instead of recomputing it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from ..modeling.semantic import semantic_probabilities


def window_starts(length: int, window: int, step: float) -> list[int]:
    """Start positions covering ``length`` with windows of ``window`` at ``step`` overlap.

    nnU-Net's rule: as few windows as keep neighbours at most ``window * step`` apart, spread
    evenly from 0 to ``length - window``. The target stride is not rounded down first, so
    T=3 slices at step 0.5 advance 1 or 2 slices alternately (1.5 on average), not 1.
    """
    if length <= window:
        return [0]
    last = length - window
    count = math.ceil(last / max(window * step, 1.0)) + 1
    return sorted({round(i * last / (count - 1)) for i in range(count)})


def gaussian_weights(t: int, size: int, sigma_scale: float = 0.125) -> torch.Tensor:
    """``(T, S, S)`` importance map: Gaussian in-plane, flat-topped Gaussian across slices.

    Each factor is floored at 1e-3 of its peak separately, so even at a tile's corner the
    across-slice weighting still prefers a window's middle slice to its edge slices.
    """
    def g(n: int) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
        sigma = max(n * sigma_scale, 0.5)
        return torch.exp(-0.5 * (x / sigma) ** 2)

    side = (g(size) / g(size).max()).clamp_min(1e-3)
    inplane = side[:, None] * side[None, :]
    across = (g(t) / g(t).max()).clamp_min(1e-3) if t > 2 else torch.ones(t)
    return across[:, None, None] * inplane[None]


def _windows(z: int, y: int, x: int, t: int, s: int, step: float) -> Iterator[tuple[int, int, int]]:
    for z0 in window_starts(z, t, step):
        for y0 in window_starts(y, s, step):
            for x0 in window_starts(x, s, step):
                yield z0, y0, x0


def count_windows(shape: tuple[int, int, int], t: int, s: int, step: float) -> int:
    z, y, x = shape
    return len(window_starts(z, t, step)) * len(window_starts(y, s, step)) * len(
        window_starts(x, s, step))


@torch.no_grad()
def sliding_window_labels(
    image: torch.Tensor,
    model: torch.nn.Module,
    *,
    step: float = 0.5,
    batch_windows: int = 2,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    mirror_axes: tuple[int, ...] = (),
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    timings: dict[str, float] | None = None,
    encoder_cache: dict | None = None,
    decoder_chunk: int | None = None,
) -> np.ndarray:
    """Class indices of a preprocessed volume.

    Args:
        image: ``(C, Z, Y, X)`` float32 normalised intensities (slices along Z).
        model: a MaskSAM (``num_slices``, ``img_size``, ``num_classes`` attributes).
        step: window overlap as a fraction of the window (0.5 = half overlap).
        batch_windows: windows per forward pass.
        mirror_axes: test-time mirroring over these axes of a ``(B, C, T, H, W)`` window
            (2 = slices, 3 = Y, 4 = X); the caller leaves out the left-right axis when the
            labels are lateralized.
        progress: called with ``(windows done, windows total)``.
        should_stop: polled between batches; returning True raises ``InterruptedError``.
        timings: when given, ``"network"`` (model forwards) and ``"stitch"`` (MaskFormer class
            scores, blending, argmax) seconds are added to it (CUDA is synchronised to time).
        encoder_cache: for a model that caches its encoder, a dict that keeps the encoded
            slices of this volume beyond the call (e.g. validation during training, which
            sees the same volume again); by default slices are dropped once no later window
            needs them.
        decoder_chunk: queries per decoder pass (None: all at once).
    Returns:
        ``(Z, Y, X)`` uint8 (uint16 for more than 255 classes) class indices.
    """
    t, s, k = model.num_slices, model.img_size, model.num_classes
    c, z, y, x = image.shape
    # Volumes smaller than a window are padded symmetrically (content centred in the window).
    pad_z, pad_y, pad_x = max(t - z, 0), max(s - y, 0), max(s - x, 0)
    z0_, y0_, x0_ = pad_z // 2, pad_y // 2, pad_x // 2
    if pad_z or pad_y or pad_x:
        fill = float(image.min())
        padded = image.new_full((c, z + pad_z, y + pad_y, x + pad_x), fill)
        padded[:, z0_:z0_ + z, y0_:y0_ + y, x0_:x0_ + x] = image
        image = padded
    zz, yy, xx = image.shape[1:]
    weights = gaussian_weights(t, s)
    out = np.zeros((zz, yy, xx), dtype=np.uint8 if k < 256 else np.uint16)
    pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    windows = list(_windows(zz, yy, xx, t, s, step))
    total = len(windows)
    autocast = (
        torch.autocast(device_type=torch.device(device).type, dtype=amp_dtype)
        if amp_dtype is not None else contextlib.nullcontext()
    )

    clock = _Clock(timings, torch.device(device))
    encodings = None
    if getattr(model, "caches_encoder", False):
        encodings = _SliceEncodings(model, {} if encoder_cache is None else encoder_cache,
                                    evict=encoder_cache is None)

    def finalize(before: int) -> None:
        for zi in sorted(i for i in pending if i < before):
            scores, wsum = pending.pop(zi)
            out[zi] = (scores / wsum.clamp_min(1e-8)).argmax(0).numpy().astype(out.dtype)

    done = 0
    for start in range(0, total, batch_windows):
        if should_stop is not None and should_stop():
            raise InterruptedError("stopped")
        batch = windows[start:start + batch_windows]
        finalize(batch[0][0])
        if encodings is not None:
            encodings.drop_before(batch[0][0])
        crops = torch.stack([image[:, z0:z0 + t, y0:y0 + s, x0:x0 + s] for z0, y0, x0 in batch])
        crops = crops.to(device)
        with autocast:
            probs = _predict(model, crops, mirror_axes, clock,
                             None if encodings is None else encodings.bind(batch),
                             decoder_chunk=decoder_chunk)
        probs = probs.float().cpu()  # (B, K, T, S, S)
        for (z0, y0, x0), p in zip(batch, probs, strict=True):
            for dz in range(t):
                zi = z0 + dz
                if zi not in pending:
                    pending[zi] = (torch.zeros(k, yy, xx), torch.zeros(yy, xx))
                scores, wsum = pending[zi]
                scores[:, y0:y0 + s, x0:x0 + s] += p[:, dz] * weights[dz]
                wsum[y0:y0 + s, x0:x0 + s] += weights[dz]
        done += len(batch)
        if progress is not None:
            progress(done, total)
    finalize(zz)
    clock.lap("stitch")
    return out[z0_:z0_ + z, y0_:y0_ + y, x0_:x0_ + x]


class _Clock:
    """Adds the seconds since the last lap to ``timings[name]`` (no-op without timings)."""

    def __init__(self, timings: dict[str, float] | None, device: torch.device) -> None:
        self.timings = timings
        self.sync = device.type == "cuda" and timings is not None
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.timings is None:
            return
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.last
        self.last = now


class _SliceEncodings:
    """Encoder output per (slice, tile, mirroring) of one volume, computed once each."""

    def __init__(self, model: torch.nn.Module, store: dict, *, evict: bool) -> None:
        self.model, self.store, self.evict = model, store, evict
        self.windows: list[tuple[int, int, int]] = []

    def drop_before(self, z: int) -> None:
        if self.evict:
            for key in [k for k in self.store if k[0] < z]:
                del self.store[key]

    def bind(self, windows: list[tuple[int, int, int]]) -> _SliceEncodings:
        self.windows = windows
        return self

    def __call__(self, crops: torch.Tensor, flips: tuple[int, ...]):
        """Encoder output of the ``B*T`` slices of ``crops`` (mirrored by ``flips``)."""
        t = crops.shape[2]
        keys, missing = [], {}
        for b, (z0, y0, x0) in enumerate(self.windows):
            for dz in range(t):
                zi = z0 + (t - 1 - dz if 2 in flips else dz)
                key = (zi, y0, x0, 3 in flips, 4 in flips)
                keys.append(key)
                if key not in self.store and key not in missing:
                    missing[key] = crops[b, :, dz]
        if missing:
            neck, feats = self.model.encode_slices(torch.stack(list(missing.values())))
            for i, key in enumerate(missing):
                self.store[key] = (neck[i], [f[i] for f in feats])
        entries = [self.store[k] for k in keys]
        neck = torch.stack([e[0] for e in entries]).to(crops.device)
        feats = [torch.stack([e[1][j] for e in entries]).to(crops.device)
                 for j in range(len(entries[0][1]))]
        return neck, feats


def _predict(
    model: torch.nn.Module,
    crops: torch.Tensor,
    mirror_axes: tuple[int, ...],
    clock: _Clock | None = None,
    encodings: _SliceEncodings | None = None,
    decoder_chunk: int | None = None,
) -> torch.Tensor:
    """Mean class scores ``(B, K, T, S, S)`` over the identity and each mirrored copy."""
    clock = clock or _Clock(None, crops.device)
    chunk = {} if decoder_chunk is None else {"decoder_chunk": decoder_chunk}
    probs = None
    for flips in [(), *((axis,) for axis in mirror_axes)]:
        clock.lap("stitch")
        view = crops.flip(flips) if flips else crops
        if encodings is not None:
            o = model(view, encodings(view, flips), **chunk)
        else:
            o = model(view, **chunk)
        clock.lap("network")
        p = semantic_probabilities(o["pred_logits"], o["pred_masks"])
        p = p.flip(flips) if flips else p
        probs = p if probs is None else probs + p
    return probs / (1 + len(mirror_axes))
