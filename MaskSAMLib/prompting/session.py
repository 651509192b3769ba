"""3D masks from few prompts: one volume, a :class:`SliceSegmenter`, slice-by-slice propagation.

Work happens on the volume's canonical LPS-axial slices (``data/orientation.py``: permutation
and flips only) and every mask is returned in the input's exact grid.

How a structure's prompts become a 3D mask (``CanonicalStructure``, ``prompts.py``):

- **region**: the slices of the 3D box if there is one; else, with boxes on two or more slices,
  the slices from the first to the last of them; else (one slice box) the whole volume;
- **slice boxes** are anchors: their slices use them as drawn; slices *between* two anchors use
  the box interpolated linearly between them;
- every other slice of the region is **propagated** from its segmented neighbour (nearest the
  anchor, or for a 3D box the central slice where the box's rectangle gets the decoder's best
  IoU estimate): its box is
  the neighbour's mask bounding box plus a margin, clipped to the 3D box, and only what lies
  within a few mm of the neighbour's mask is kept (a mask cannot jump or creep into an adjacent
  organ: on the shared CT this took the liver from Dice 0.79 to 0.94). Propagation stops where
  the structure ends: the mask vanishes or becomes small, the decoder's IoU estimate drops, or
  the mask no longer overlaps the neighbour's (it jumped to another structure);
- **points** join the prompt of the slice they lie on (positive: add the region, negative:
  remove it), so a correction also steers the propagation beyond that slice. A slice with points
  outside the region is segmented from the points (and, when correcting an existing mask, that
  mask's box on the slice); other slices of an existing mask are kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..data.geometry import Geometry, Volume
from ..data.orientation import CanonicalTransform, to_canonical
from ..errors import Interrupted, MaskSAMError
from .engine import SliceResult, SliceSegmenter, intensity_window, volume_digest
from .prompts import (
    CanonicalBox,
    CanonicalPoint,
    CanonicalStructure,
    StructurePrompts,
    canonical_structure,
)

Box2D = tuple[float, float, float, float]
ProgressFn = Callable[[int, int], None]


@dataclass
class PropagationOptions:
    """When propagation stops, and how much a neighbour's box grows (see the module doc)."""

    margin_fraction: float = 0.05  # of the neighbour's box size, per side
    margin_mm: float = 2.0  # plus this, per side
    min_area_mm2: float = 15.0  # smaller masks end the structure
    min_score: float = 0.5  # decoder IoU estimate below this ends it
    min_overlap: float = 0.3  # |mask & neighbour| / |mask| below this ends it
    max_growth: float = 0.0  # a mask this many times its neighbour's area: redo, tight box
    start_search: float = 0.5  # 3D box: best-scoring start among this central fraction
    mask_prompt: bool = False  # also give the neighbour's logits as a mask prompt
    max_shift_mm: float = 3.5  # keep only what lies this close to the neighbour's mask
    max_mean_change: float = 0.1  # mean intensity change (fraction of the window) ends it

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class StructureResult:
    """A structure's mask in the input grid and what it took."""

    name: str
    mask: np.ndarray  # bool, (z, y, x) of the input grid
    slices: list[int]  # canonical slices segmented
    seconds: float
    encoder_runs: int

    @property
    def voxels(self) -> int:
        return int(self.mask.sum())


def _bbox(mask: np.ndarray) -> Box2D | None:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


class PromptSession:
    """Prompted segmentation of one volume; the encoder output of its slices is cached.

    Args:
        volume: the image (any orientation; oblique grids are kept as they are).
        segmenter: the backbone (its cache is shared by every session that uses it).
        window: intensity window (two numbers), or None/``"auto"`` (see ``engine``).
    """

    def __init__(
        self,
        volume: Volume,
        segmenter: SliceSegmenter,
        *,
        window: Sequence[float] | str | None = None,
        options: PropagationOptions | None = None,
    ) -> None:
        if volume.array.ndim != 3 or min(volume.array.shape) < 1:
            raise MaskSAMError("Prompting needs a 3D volume.")
        self.volume = volume
        self.segmenter = segmenter
        self.options = options or PropagationOptions()
        canonical, transform = to_canonical(volume.array, volume.geometry)
        self.canonical: np.ndarray = canonical
        self.transform: CanonicalTransform = transform
        self.window = intensity_window(canonical, window)
        self.digest = volume_digest(canonical)
        spacing = transform.canonical.spacing
        self.pixel_spacing = (float(spacing[1]), float(spacing[0]))  # (row, column) mm
        self._prep_key = ("window", self.window, self.pixel_spacing)

    @property
    def geometry(self) -> Geometry:
        return self.volume.geometry

    @property
    def canonical_geometry(self) -> Geometry:
        return self.transform.canonical

    # ------------------------------------------------------------------ one slice
    def _slice(self, k: int, box: Box2D | None,
               points: Sequence[CanonicalPoint] = (), mask_prompt=None) -> SliceResult:
        image = self.canonical[k]
        embedding = self.segmenter.embedding((self.digest, int(k), self._prep_key), image,
                                             self.window, self.pixel_spacing)
        return self.segmenter.decode(embedding, image.shape, self.pixel_spacing, box=box,
                                     points=[(p.x, p.y, p.positive) for p in points],
                                     mask_prompt=mask_prompt)

    def _grow(self, box: Box2D, limit: CanonicalBox | None, scale: float = 1.0) -> Box2D:
        """A neighbour's box plus the margin, clipped to the 3D box and the slice."""
        h, w = self.canonical.shape[1:]
        fx = self.options.margin_fraction * (box[2] - box[0])
        fy = self.options.margin_fraction * (box[3] - box[1])
        mx = scale * (fx + self.options.margin_mm / self.pixel_spacing[1])
        my = scale * (fy + self.options.margin_mm / self.pixel_spacing[0])
        x0, y0, x1, y1 = box[0] - mx, box[1] - my, box[2] + mx, box[3] + my
        if limit is not None:
            lx0, ly0, lx1, ly1 = limit.rect()
            x0, y0, x1, y1 = max(x0, lx0), max(y0, ly0), min(x1, lx1), min(y1, ly1)
        return (max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1))

    def _ends(self, result: SliceResult, previous: np.ndarray) -> bool:
        mask = result.mask
        area = int(mask.sum())
        pixel_mm2 = self.pixel_spacing[0] * self.pixel_spacing[1]
        if area * pixel_mm2 < self.options.min_area_mm2 or result.score < self.options.min_score:
            return True
        overlap = int((mask & previous).sum()) / max(area, 1)
        return overlap < self.options.min_overlap

    def _intensity_jump(self, k: int, mask: np.ndarray, k_prev: int,
                        previous: np.ndarray) -> bool:
        """The mean (windowed) intensity changed more than ``max_mean_change`` of the window."""
        if self.options.max_mean_change <= 0 or not mask.any() or not previous.any():
            return not mask.any()
        low, high = self.window
        now = np.clip(self.canonical[k][mask].astype(np.float32), low, high).mean()
        before = np.clip(self.canonical[k_prev][previous].astype(np.float32), low, high).mean()
        return abs(float(now - before)) > self.options.max_mean_change * (high - low)

    def _near(self, mask: np.ndarray) -> np.ndarray:
        """Pixels within ``max_shift_mm`` of ``mask`` (an elliptic structuring element)."""
        from scipy import ndimage

        ry = max(1, int(round(self.options.max_shift_mm / self.pixel_spacing[0])))
        rx = max(1, int(round(self.options.max_shift_mm / self.pixel_spacing[1])))
        yy, xx = np.ogrid[-ry : ry + 1, -rx : rx + 1]
        footprint = (yy / ry) ** 2 + (xx / rx) ** 2 <= 1.0
        return ndimage.binary_dilation(mask, structure=footprint)

    @staticmethod
    def _limit_mask(shape: tuple[int, int], limit: CanonicalBox | None) -> np.ndarray | None:
        if limit is None:
            return None
        keep = np.zeros(shape, dtype=bool)
        x0, y0, x1, y1 = limit.rect()
        keep[max(0, int(np.floor(y0))) : int(np.ceil(y1)),
             max(0, int(np.floor(x0))) : int(np.ceil(x1))] = True
        return keep

    # ------------------------------------------------------------------ one structure
    def segment_structure(
        self,
        prompts: StructurePrompts,
        *,
        initial: np.ndarray | None = None,
        progress: ProgressFn | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> StructureResult:
        """The 3D mask of one structure (bool, input grid).

        ``initial``: an existing mask of the structure (input grid) being corrected: slices the
        prompts do not reach keep it, and points on other slices start from its box there.
        """
        start = time.perf_counter()
        runs_before = self.segmenter.encoder_runs
        cs = canonical_structure(prompts, self.canonical_geometry)
        nz = self.canonical.shape[0]
        if initial is not None:
            if tuple(initial.shape) != self.geometry.shape:
                raise MaskSAMError(
                    f"The mask to correct has shape {tuple(initial.shape)}, the volume "
                    f"{self.geometry.shape}; give a mask on the volume's grid."
                )
            out = np.ascontiguousarray(self.transform.apply(initial.astype(bool)))
        else:
            out = np.zeros(self.canonical.shape, dtype=bool)
        points_by_k: dict[int, list[CanonicalPoint]] = {}
        for p in cs.points:
            points_by_k.setdefault(p.k, []).append(p)
        anchors = dict(sorted(cs.slice_boxes.items()))
        region = self._region(cs, anchors, nz)
        planned = (region[1] - region[0] + 1) if region else 0
        total = planned + len([k for k in points_by_k
                               if region is None or not region[0] <= k <= region[1]])
        done_slices: list[int] = []

        def step(k: int, box: Box2D | None, limit: CanonicalBox | None,
                 mask_prompt=None) -> SliceResult:
            if should_stop is not None and should_stop():
                raise Interrupted("Prompted segmentation was cancelled; nothing was written.")
            result = self._slice(k, box, points_by_k.get(k, ()), mask_prompt)
            mask = result.mask
            keep = self._limit_mask(mask.shape, limit)
            if keep is not None:
                mask = mask & keep
            done_slices.append(k)
            if progress is not None:
                progress(len(done_slices), max(total, len(done_slices)))
            return SliceResult(mask, result.score, result.low_res)

        if region is not None:
            lo, hi = region
            limit = cs.box3d
            out[lo : hi + 1] = False
            if anchors:
                keys = list(anchors)
                for k in keys:
                    out[k] = step(k, anchors[k].rect(), None).mask
                for a, b in zip(keys[:-1], keys[1:], strict=True):
                    for k in range(a + 1, b):
                        t = (k - a) / (b - a)
                        ra, rb = np.asarray(anchors[a].rect()), np.asarray(anchors[b].rect())
                        box = tuple(float(v) for v in (1 - t) * ra + t * rb)
                        out[k] = step(k, box, None).mask  # type: ignore[arg-type]
                if cs.box3d is not None or len(keys) == 1:
                    self._propagate(out, keys[0], -1, lo, limit, step)
                    self._propagate(out, keys[-1], +1, hi, limit, step)
            else:
                assert cs.box3d is not None
                middle = self._start_slice(cs.box3d, points_by_k)
                first = step(middle, cs.box3d.rect(), limit)
                out[middle] = first.mask
                self._propagate(out, middle, -1, lo, limit, step, first.low_res)
                self._propagate(out, middle, +1, hi, limit, step, first.low_res)
        for k, points in sorted(points_by_k.items()):
            if region is not None and region[0] <= k <= region[1]:
                continue  # already part of the prompt of a segmented slice
            near = _bbox(out[k])
            box = self._grow(near, None) if near is not None else None
            if box is None and not any(p.positive for p in points):
                continue  # only negative points on an empty slice: nothing to remove
            out[k] = step(k, box, None).mask
        mask = np.ascontiguousarray(self.transform.invert(out))
        return StructureResult(cs.name, mask, sorted(done_slices), time.perf_counter() - start,
                               self.segmenter.encoder_runs - runs_before)

    def _start_slice(self, box: CanonicalBox, points_by_k: dict[int, list[CanonicalPoint]]
                     ) -> int:
        """The middle slice of a 3D box, or the best-scoring one near it (``start_search``)."""
        middle = (box.k0 + box.k1) // 2
        half = int(round(self.options.start_search * (box.k1 - box.k0) / 2))
        if half <= 0:
            return middle
        best, best_score = middle, -1.0
        for k in range(max(box.k0, middle - half), min(box.k1, middle + half) + 1):
            score = self._slice(k, box.rect(), points_by_k.get(k, ())).score
            if score > best_score:
                best, best_score = k, score
        return best

    @staticmethod
    def _region(cs: CanonicalStructure, anchors: dict[int, CanonicalBox],
                nz: int) -> tuple[int, int] | None:
        if cs.box3d is not None:
            lo, hi = cs.box3d.k0, cs.box3d.k1
            if anchors:  # a slice box outside the 3D box widens the region to it
                lo, hi = min(lo, min(anchors)), max(hi, max(anchors))
            return lo, hi
        if len(anchors) >= 2:
            return min(anchors), max(anchors)
        if len(anchors) == 1:
            return 0, nz - 1
        return None

    def _propagate(self, out: np.ndarray, k_from: int, direction: int, k_end: int,
                   limit: CanonicalBox | None, step: Callable[..., SliceResult],
                   logits: Any = None) -> None:
        previous = out[k_from]
        k = k_from + direction
        while (k >= k_end) if direction < 0 else (k <= k_end):
            near = _bbox(previous)
            if near is None:
                return
            prompt = logits if self.options.mask_prompt else None
            result = step(k, self._grow(near, limit), limit, prompt)
            growth = self.options.max_growth
            if growth > 0 and result.mask.sum() > growth * max(1, int(previous.sum())):
                result = step(k, self._grow(near, limit, 0.0), limit)  # leaking: tight box
            if self._ends(result, previous):
                return
            if self.options.max_shift_mm > 0:
                result = SliceResult(result.mask & self._near(previous), result.score,
                                     result.low_res)
            if self._intensity_jump(k, result.mask, k - direction, previous):
                return
            out[k] = result.mask
            previous = result.mask
            logits = result.low_res
            k += direction

    # ------------------------------------------------------------------ several structures
    def segment(
        self,
        structures: Sequence[StructurePrompts],
        labels: Sequence[dict[str, Any]],
        *,
        initial: dict[str, np.ndarray] | None = None,
        progress: Callable[[str, int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> tuple[np.ndarray, list[StructureResult]]:
        """A label map (input grid; later structures win where masks overlap) and the results.

        All prompts are checked before anything runs, so a bad one costs no encoder time.
        """
        for s in structures:
            canonical_structure(s, self.canonical_geometry)
        values = [int(e["value"]) for e in labels]
        dtype = np.uint8 if max(values, default=0) < 256 else np.uint16
        label_map = np.zeros(self.geometry.shape, dtype=dtype)
        results = []
        for s, value in zip(structures, values, strict=True):
            def on_slice(done: int, total: int, name: str = s.name) -> None:
                if progress is not None:
                    progress(name, done, total)

            result = self.segment_structure(
                s, initial=(initial or {}).get(s.name), progress=on_slice,
                should_stop=should_stop,
            )
            label_map[result.mask] = value
            results.append(result)
        return label_map, results
