"""``masksam segment``: inputs -> cases -> predictions -> files, one case at a time.

One case: every problem is an error (one line, non-zero exit, nothing written). A batch
(several inputs or a folder of images; ``out`` is a folder): cases whose output already exists
are skipped (unless ``overwrite``), a bad case is reported on one line and the others go on, and
the summary says whether all succeeded. SIGTERM (and a caller's ``should_stop``) stops cleanly
between window batches: finished outputs stay, the current one is never half-written.
"""

from __future__ import annotations

import signal
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.geometry import Geometry
from ..devices import device_info, resolve_device
from ..errors import Interrupted, MaskSAMError
from ..progress import Progress
from .budget import GB, available_memory_bytes
from .inputs import discover_cases, read_case
from .outputs import PlannedOutput, plan_outputs, write_outputs
from .predictor import PredictOptions, Predictor


@dataclass
class SegmentRequest:
    """What the user asked for (the CLI's arguments)."""

    inputs: list[Path]
    model: Path
    out: Path
    device: str = "auto"
    series_uid: str | None = None
    fast: bool = False
    tta: bool = False
    step: float = 0.5
    overwrite: bool = False
    fmt: str | None = None
    memory_budget_gb: float | None = None
    batch_windows: int = 2
    debug: bool = False


@dataclass
class SegmentSummary:
    """Outcome per case: written outputs, skipped ones (already there), failures."""

    written: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    batch: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed

    def message(self) -> str:
        text = f"Segmented {len(self.written)} case(s)"
        if self.skipped:
            text += f", skipped {len(self.skipped)} whose output exists (--overwrite redoes them)"
        if self.failed:
            text += f", {len(self.failed)} failed: {', '.join(c for c, _ in self.failed)}"
        return text + "."


def _memory_budget(request: SegmentRequest) -> int | None:
    if request.memory_budget_gb is not None:
        if not 0 < request.memory_budget_gb < 1e6:  # also refuses nan and inf
            raise MaskSAMError(f"--memory-budget must be a positive, finite number of GB, got "
                               f"{request.memory_budget_gb}.")
        return int(request.memory_budget_gb * GB)
    return available_memory_bytes()


class _StopFlag:
    """SIGTERM (and an optional caller's callback) -> a flag polled between window batches."""

    def __init__(self, extra: Callable[[], bool] | None) -> None:
        self.extra = extra
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _StopFlag:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handler(self, _signum: int, _frame: Any) -> None:
        self.requested = True

    def __call__(self) -> bool:
        return self.requested or bool(self.extra and self.extra())


def segment(
    request: SegmentRequest,
    progress: Progress,
    *,
    should_stop: Callable[[], bool] | None = None,
) -> SegmentSummary:
    """Run ``request``; raises MaskSAMError for a bad single case or a bad model/device."""
    options = PredictOptions(step=request.step, fast=request.fast, tta=request.tta,
                             batch_windows=request.batch_windows)
    budget = _memory_budget(request)  # options first: nothing loaded or written for a typo
    device = resolve_device(request.device)
    progress.start("load", **device_info(device))
    predictor = Predictor.from_model_dir(request.model, device=device)
    cases, batch = discover_cases(request.inputs, predictor.num_channels)
    planned = plan_outputs(cases, request.out, batch=batch, fmt=request.fmt,
                           model_dir=request.model, overwrite=request.overwrite)
    summary = SegmentSummary(batch=batch)
    if batch:
        progress.log(f"{len(cases)} cases; model {request.model} "
                     f"({predictor.config.backbone.name}) on {device}")
    with _StopFlag(should_stop) as stop:
        for index, item in enumerate(planned, start=1):
            if stop():
                raise Interrupted("Segmentation stopped on request.")
            if item.exists and not request.overwrite:
                summary.skipped.append(item.path)
                progress.log(f"[{index}/{len(planned)}] {item.case.case_id}: {item.path} exists, "
                             "skipped")
                continue
            try:
                info = _run_case(item, predictor, options, request, budget, progress, stop)
            except Interrupted:
                raise
            except (MaskSAMError, MemoryError, Exception) as exc:  # noqa: BLE001 - reported
                if not batch:
                    raise
                if request.debug:
                    traceback.print_exc()
                message = _one_line(exc)
                summary.failed.append((item.case.case_id, message))
                progress.log(f"error: [{index}/{len(planned)}] {item.case.case_id}: {message}",
                             case=item.case.case_id, status="failed")
                continue
            summary.written.append(info)
            progress.log(f"[{index}/{len(planned)}] {item.case.case_id}: wrote {item.path} "
                         f"({info['timings_s']['total']:.1f} s)")
    return summary


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, MaskSAMError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "Out of memory; use --fast, free memory or crop the volume."
    return f"Unexpected error: {type(exc).__name__}: {' '.join(str(exc).split())}"


def _run_case(
    item: PlannedOutput,
    predictor: Predictor,
    options: PredictOptions,
    request: SegmentRequest,
    budget: int | None,
    progress: Progress,
    stop: Callable[[], bool],
) -> dict[str, Any]:
    case = item.case
    progress.start("read", case=case.case_id)

    def check_memory(geometry: Geometry, name: str, input_bytes: int) -> None:
        predictor.check_memory(geometry, name, budget, options, input_bytes)

    read = read_case(case, check_memory, series_uid=request.series_uid)

    def on_windows(done: int, total: int) -> None:
        if done == 0:
            progress.start("segment", total=total, case=case.case_id)
        else:
            progress.update(done, total)

    prediction = predictor.predict(read.volumes, options=options, progress=on_windows,
                                   should_stop=stop)
    read.volumes.clear()  # the pixels are not needed any more
    progress.start("write", case=case.case_id)
    item.path.parent.mkdir(exist_ok=True)  # an output folder appears with its first output
    return write_outputs(prediction, item, overwrite=request.overwrite, series=read.series,
                         read_seconds=read.seconds)
