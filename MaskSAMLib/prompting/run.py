"""``masksam prompt``: a volume plus prompts -> a label map (and JSON sidecar) in its grid.

The same outputs and conventions as ``masksam segment``: ``--out`` is a ``.nii.gz``, ``.nii``,
``.nrrd``, ``.mha`` or ``.seg.nrrd`` label map (segment names, colours and terminology in the
``.seg.nrrd``), written atomically with a ``<name>.json`` sidecar (segments with volumes,
backbone, device, prompts, timings); an existing output is only replaced with ``--overwrite``;
an output never lands on the input. Every prompt is checked before the backbone is loaded, so a
bad one costs nothing and writes nothing.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import RESEARCH_NOTICE, __version__
from ..data.geometry import Geometry, Volume
from ..data.io import read_any
from ..data.orientation import canonical_transform
from ..data.writers import LABEL_EXTENSIONS, write_label_map
from ..errors import MaskSAMError
from ..files import atomic_write_text
from ..inference.outputs import output_extension, sidecar_path
from ..progress import Progress
from .engine import EmbeddingCache, SliceSegmenter
from .prompts import (
    StructurePrompts,
    assign_labels,
    canonical_structure,
    read_prompts_file,
    select_structures,
)
from .session import PromptSession, StructureResult


@dataclass
class PromptRequest:
    """What the user asked for (the CLI's arguments, or a worker request)."""

    volume: Path
    out: Path
    structures: list[StructurePrompts]
    labels: list[dict[str, Any]] | None = None  # from --labels; None: values from the prompts
    backbone: str = "litemedsam"
    sam_checkpoint: Path | None = None
    device: str = "auto"
    window: Sequence[float] | str | None = None
    overwrite: bool = False
    series_uid: str | None = None
    initial: Path | None = None  # a label map to correct (same grid as the volume)


def structures_from_arguments(
    *,
    prompts_file: str | Path | None,
    boxes: Sequence[Sequence[float]] | None,
    points: Sequence[Sequence[float]] | None,
    negative_points: Sequence[Sequence[float]] | None,
    name: str | None,
    only: Sequence[str] | None,
) -> list[StructurePrompts]:
    """``--prompts FILE [--structure NAME ...]`` or ``--box/--point ... --name NAME``."""
    inline = bool(boxes or points or negative_points)
    if prompts_file is not None and inline:
        raise MaskSAMError("Give either --prompts FILE or --box/--point prompts, not both.")
    if prompts_file is not None:
        return select_structures(read_prompts_file(prompts_file), only)
    if not inline:
        raise MaskSAMError("No prompt was given; pass --box XMIN YMIN ZMIN XMAX YMAX ZMAX (LPS "
                           "mm), --point X Y Z or --prompts FILE.")
    name = (name or "structure").strip()
    if only and any(n != name for n in only):
        unknown = next(n for n in only if n != name)
        raise MaskSAMError(f"Unknown structure '{unknown}': the prompts hold {name}; check "
                           "--structure.")
    return [StructurePrompts(
        name=name,
        boxes=[tuple(float(v) for v in b) for b in boxes or []],
        points=[tuple(float(v) for v in p) for p in points or []],  # type: ignore[misc]
        negative_points=[tuple(float(v) for v in p) for p in negative_points or []],  # type: ignore[misc]
    )]


def check_output(out: Path, volume_path: Path, overwrite: bool) -> None:
    """Refuse outputs we cannot or must not write (before any work)."""
    ext = output_extension(out)
    if ext is None or ext not in LABEL_EXTENSIONS:
        raise MaskSAMError(f"Cannot write {out}: use a label map file ending in "
                           f"{', '.join(LABEL_EXTENSIONS)}.")
    if not out.parent.is_dir():
        raise MaskSAMError(f"Cannot write {out}: the folder {out.parent} does not exist.")
    if out.exists() and out.resolve() == volume_path.resolve():
        raise MaskSAMError(f"--out {out} is the input volume; choose another output file.")
    if out.exists() and not overwrite:
        raise MaskSAMError(f"{out} already exists; pass --overwrite to replace it.")


def read_initial(path: Path, geometry: Geometry, labels: Sequence[dict[str, Any]]
                 ) -> dict[str, np.ndarray]:
    """Masks per structure name from a label map to correct (on the volume's grid)."""
    from ..data.io import read_volume

    label_map = read_volume(path)
    problems = label_map.geometry.differences(geometry)
    if problems:
        raise MaskSAMError(f"The label map {path} is not on the volume's grid "
                           f"({'; '.join(problems)}); correct a mask made for this volume.")
    return {str(e["name"]): label_map.array == int(e["value"]) for e in labels}


def check_prompts(structures: Sequence[StructurePrompts], geometry: Geometry) -> None:
    """Every structure's prompts against the grid (raises the first problem)."""
    canonical = canonical_transform(geometry).canonical
    for s in structures:
        canonical_structure(s, canonical)


def sidecar(
    request: PromptRequest,
    volume: Volume,
    labels: Sequence[dict[str, Any]],
    results: Sequence[StructureResult],
    segmenter: SliceSegmenter,
    label_map: np.ndarray,
    timings: dict[str, float],
    window: Sequence[float],
) -> dict[str, Any]:
    voxel_ml = float(np.prod(volume.geometry.spacing)) / 1000.0
    counts = np.bincount(label_map.reshape(-1), minlength=1)
    segments = []
    for entry, result in zip(labels, results, strict=True):
        value = int(entry["value"])
        n = int(counts[value]) if value < len(counts) else 0
        segments.append({"value": value, "name": entry["name"], "voxels": n,
                         "volume_ml": round(n * voxel_ml, 4), "slices": len(result.slices),
                         "encoder_runs": result.encoder_runs,
                         "seconds": round(result.seconds, 3)})
    times = {k: round(v, 3) for k, v in timings.items()}
    times["total"] = round(sum(timings.values()), 3)
    return {
        "format_version": 1,
        "notice": RESEARCH_NOTICE,
        "software": f"MaskSAMLib {__version__}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "case": Path(str(request.volume)).name,
        "inputs": [str(request.volume)],
        "output": str(request.out),
        "mode": "prompt",
        "model": {"backbone": segmenter.name, "img_size": segmenter.img_size,
                  "checkpoint": str(request.sam_checkpoint) if request.sam_checkpoint else None},
        "device": str(segmenter.device),
        "options": {"window": [float(w) for w in window]},
        "prompts": [s.to_dict() for s in request.structures],
        "geometry": volume.geometry.to_dict(),
        "segments": segments,
        "timings_s": times,
    }


@dataclass
class PromptRunner:
    """Runs prompt requests, keeping the backbone and its embedding cache between them."""

    device: str = "auto"
    backbone: str = "litemedsam"
    sam_checkpoint: Path | None = None
    cache_bytes: int = 2 << 30
    _segmenter: SliceSegmenter | None = field(default=None, repr=False)
    _session: PromptSession | None = field(default=None, repr=False)
    _volume_key: tuple | None = field(default=None, repr=False)

    def segmenter(self, progress: Progress | None = None) -> SliceSegmenter:
        if self._segmenter is None:
            from ..devices import device_info, resolve_device

            device = resolve_device(self.device)
            if progress is not None:
                progress.start("load", **device_info(device))
            self._segmenter = SliceSegmenter.load(
                self.backbone, checkpoint=self.sam_checkpoint, device=device,
                cache=EmbeddingCache(self.cache_bytes),
            )
        return self._segmenter

    def load_volume(self, path: Path, *, series_uid: str | None = None,
                    window: Sequence[float] | str | None = None,
                    progress: Progress | None = None) -> PromptSession:
        """Read (or reuse) the volume; its embeddings stay cached across requests."""
        path = Path(path)
        try:
            stat = path.stat()
        except OSError as exc:
            raise MaskSAMError(f"{path} does not exist; check the path.") from exc
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, series_uid,
               tuple(window) if isinstance(window, (list, tuple)) else window)
        if self._session is not None and self._volume_key == key:
            return self._session
        volume = read_any(path, series_uid=series_uid)
        segmenter = self.segmenter(progress)
        self._session = PromptSession(volume, segmenter, window=window)
        self._volume_key = key
        return self._session

    def run(
        self,
        request: PromptRequest,
        progress: Progress,
        *,
        should_stop: Callable[[], bool] | None = None,
    ) -> dict[str, Any]:
        """Check, segment, write; returns the sidecar content."""
        out = Path(request.out)
        check_output(out, Path(request.volume), request.overwrite)
        labels = assign_labels(request.structures, request.labels)
        start = time.perf_counter()
        progress.start("read")
        volume_path = Path(request.volume)
        if self._session is None or self._volume_key is None or self._volume_key[0] != str(
            volume_path.resolve()
        ):
            from ..data.io import read_image_info

            if volume_path.is_file():
                check_prompts(request.structures, read_image_info(volume_path).geometry)
        session = self.load_volume(volume_path, series_uid=request.series_uid,
                                   window=request.window, progress=progress)
        check_prompts(request.structures, session.geometry)
        initial = (read_initial(Path(request.initial), session.geometry, labels)
                   if request.initial is not None else None)
        read_s = time.perf_counter() - start
        segmenter = session.segmenter
        encoder_before = segmenter.encoder_seconds
        progress.start("segment", total=None)

        def on_slice(name: str, done: int, total: int) -> None:
            progress.update(done, total, structure=name)

        start = time.perf_counter()
        label_map, results = session.segment(request.structures, labels, initial=initial,
                                             progress=on_slice, should_stop=should_stop)
        segment_s = time.perf_counter() - start
        encoder_s = segmenter.encoder_seconds - encoder_before
        progress.start("write")
        start = time.perf_counter()
        write_label_map(label_map, session.geometry, out, overwrite=request.overwrite,
                        labels=labels)
        timings = {"read": read_s, "encoder": encoder_s, "decoder": segment_s - encoder_s,
                   "write": time.perf_counter() - start}
        info = sidecar(request, session.volume, labels, results, segmenter, label_map, timings,
                       session.window)
        atomic_write_text(sidecar_path(out), json.dumps(info, indent=2) + "\n")
        return info
