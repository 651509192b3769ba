"""``masksam worker``: a long-lived prompting process speaking INTERFACES.md's worker protocol.

One JSON request per line on stdin, ``{"v": 1, "id": "...", "request": "...", ...}``, answered by
progress events (INTERFACES.md) on stdout, each carrying the request's ``id`` and ending in
``done`` or ``error``. Nothing but events is written to stdout; logs go to stderr.

Requests:

- ``ping``: ``done`` with the backbone, the device and what the embedding cache holds;
- ``load``: ``{"volume": PATH, "window": [LOW, HIGH] (optional), "series_uid": ...}`` reads a
  volume (a file or a DICOM folder) and loads the backbone; ``done`` gives its size and spacing;
- ``segment``: ``{"volume": PATH (optional after a load), "prompts": {"structures": [...]}``
  (the prompts file's content, ``prompts.py``) ``, "structures": [names] (optional filter),
  "labels": [{value, name, ...}] (optional), "out": PATH, "overwrite": bool, "initial": PATH
  (optional label map being corrected), "window": ...}``; writes the label map and its sidecar
  as ``masksam prompt`` does; ``done`` carries ``output``, ``segments`` and ``timings_s``;
- ``cancel``: ``{"request": "cancel", "id": ID}`` stops request ``ID`` between two slices (or
  drops it if it has not started): that request ends with an ``error`` event with
  ``"cancelled": true`` and nothing is written;
- ``stop`` (or a closed stdin) ends the worker after cancelling what runs; exit code 0. SIGTERM
  does the same with exit code 130.

The backbone and the slice-embedding cache live as long as the worker, so later prompts on a
volume (corrections, other structures) run only the decoder.
"""

from __future__ import annotations

import json
import queue
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, TextIO

from ..errors import Interrupted, MaskSAMError
from ..progress import Progress
from .prompts import prompts_from_dict, select_structures
from .run import PromptRequest, PromptRunner

PROTOCOL_VERSION = 1
_REQUESTS = ("ping", "load", "segment", "cancel", "stop")


class RequestProgress(Progress):
    """JSON events for one request: every event carries the request's ``id``."""

    def __init__(self, request_id: Any, stream: TextIO, lock: threading.Lock) -> None:
        super().__init__("json", quiet=True, stream=stream)
        self.request_id = request_id
        self._lock = lock

    def emit(self, event: str, **fields: Any) -> None:
        with self._lock:
            super().emit(event, id=self.request_id, **fields)

    def error(self, message: str, **fields: Any) -> None:  # type: ignore[override]
        self.emit("error", stage=self._stage, message=message, **fields)
        print(f"error: [{self.request_id}] {message}", file=sys.stderr, flush=True)


class Worker:
    """Reads requests on a thread, runs them one at a time on the calling thread."""

    def __init__(self, runner: PromptRunner, stdin: TextIO, stdout: TextIO) -> None:
        self.runner = runner
        self.stdin = stdin
        self.stdout = stdout
        self.lock = threading.Lock()
        self.requests: queue.Queue = queue.Queue()
        self.cancelled: set[Any] = set()
        self.stopping = threading.Event()
        self.current: Any = None
        self.finished: set[Any] = set()
        self.interrupted = False

    # ------------------------------------------------------------------ input
    def _reader(self) -> None:
        try:
            for line in iter(self.stdin.readline, ""):
                if not line.strip():
                    continue
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("not an object")
                except ValueError as exc:
                    self._progress(None).error(
                        f"A request is not a JSON object ({exc}): {line.strip()[:80]}"
                    )
                    continue
                kind = request.get("request")
                if kind == "cancel":
                    if request.get("id") not in self.finished:  # a late cancel changes nothing
                        self.cancelled.add(request.get("id"))
                elif kind == "stop":
                    break
                else:
                    self.requests.put(request)
        except (OSError, ValueError):
            pass
        self.stop()

    def stop(self) -> None:
        self.stopping.set()
        self.cancelled.add(self.current)
        self.requests.put(None)

    def _progress(self, request_id: Any) -> RequestProgress:
        return RequestProgress(request_id, self.stdout, self.lock)

    # ------------------------------------------------------------------ loop
    def serve(self) -> int:
        threading.Thread(target=self._reader, name="masksam-worker-stdin", daemon=True).start()
        while True:
            request = self.requests.get()
            if request is None or self.stopping.is_set():
                break
            self._handle(request)
        return 130 if self.interrupted else 0

    def _handle(self, request: dict[str, Any]) -> None:
        request_id = request.get("id")
        progress = self._progress(request_id)
        kind = request.get("request")
        if request_id in self.cancelled:
            self.cancelled.discard(request_id)
            progress.error(f"Request {request_id} was cancelled before it started; nothing was "
                           "written.", cancelled=True)
            return
        self.current = request_id
        try:
            if request.get("v", PROTOCOL_VERSION) != PROTOCOL_VERSION:
                raise MaskSAMError(f"Protocol version {request.get('v')} is not supported; "
                                   f"send \"v\": {PROTOCOL_VERSION}.")
            if kind == "ping":
                self._ping(progress)
            elif kind == "load":
                self._load(request, progress)
            elif kind == "segment":
                self._segment(request, progress)
            else:
                raise MaskSAMError(f"Unknown request {kind!r}; use one of {', '.join(_REQUESTS)}.")
        except Interrupted:
            progress.error(f"Request {request_id} was cancelled; nothing was written.",
                           cancelled=True)
        except MaskSAMError as exc:
            progress.error(str(exc))
        except MemoryError:
            progress.error("Out of memory; free memory or crop the volume.")
        except Exception as exc:  # noqa: BLE001 - the worker must survive one bad request
            traceback.print_exc(file=sys.stderr)
            progress.error(f"Unexpected error: {type(exc).__name__}: {' '.join(str(exc).split())}")
        finally:
            self.finished.add(request_id)
            self.cancelled.discard(request_id)
            self.current = None

    def _should_stop(self, request_id: Any) -> bool:
        return self.stopping.is_set() or request_id in self.cancelled

    # ------------------------------------------------------------------ requests
    def _ping(self, progress: RequestProgress) -> None:
        segmenter = self.runner._segmenter
        cache = segmenter.cache if segmenter is not None else None
        progress.done("ready", backbone=self.runner.backbone, device=self.runner.device,
                      loaded=segmenter is not None,
                      cache_slices=len(cache) if cache is not None else 0,
                      cache_mb=round(cache.nbytes / 2**20, 1) if cache is not None else 0.0)

    def _load(self, request: dict[str, Any], progress: RequestProgress) -> None:
        if not request.get("volume"):
            raise MaskSAMError("A load request needs \"volume\": the path of an image file or "
                               "DICOM folder.")
        progress.start("read")
        session = self.runner.load_volume(Path(request["volume"]),
                                          series_uid=request.get("series_uid"),
                                          window=request.get("window"), progress=progress)
        geometry = session.geometry
        progress.done(f"Loaded {request['volume']}", volume=str(request["volume"]),
                      size=list(geometry.size), spacing=list(geometry.spacing),
                      window=list(session.window))

    def _segment(self, request: dict[str, Any], progress: RequestProgress) -> None:
        request_id = request.get("id")
        volume = request.get("volume")
        if not volume:
            if self.runner._session is None or self.runner._volume_key is None:
                raise MaskSAMError("No volume is loaded; send a load request first or give "
                                   "\"volume\".")
            volume = self.runner._volume_key[0]
        if not request.get("out"):
            raise MaskSAMError("A segment request needs \"out\": the label map file to write.")
        if "prompts" not in request:
            raise MaskSAMError("A segment request needs \"prompts\": {\"structures\": [...]}.")
        structures = select_structures(prompts_from_dict(request["prompts"], "prompts"),
                                       request.get("structures"))
        labels = request.get("labels")
        if labels is not None:
            from ..data.writers import normalize_labels

            labels = normalize_labels(labels)
        prompt_request = PromptRequest(
            volume=Path(volume), out=Path(request["out"]), structures=structures, labels=labels,
            window=request.get("window"), overwrite=bool(request.get("overwrite", False)),
            series_uid=request.get("series_uid"),
            initial=Path(request["initial"]) if request.get("initial") else None,
        )
        info = self.runner.run(prompt_request, progress,
                               should_stop=lambda: self._should_stop(request_id))
        progress.done(f"Wrote {info['output']}", output=info["output"],
                      segments=info["segments"], timings_s=info["timings_s"])


def run_worker(runner: PromptRunner, stdin: TextIO | None = None,
               stdout: TextIO | None = None) -> int:
    """Serve requests until ``stop``, closed stdin or SIGTERM; returns the exit code."""
    out = stdout or sys.stdout
    if stdout is None:
        sys.stdout = sys.stderr  # a stray print must never corrupt the event stream
    worker = Worker(runner, stdin or sys.stdin, out)

    def on_term(_signum: int, _frame: Any) -> None:
        worker.interrupted = True
        worker.stop()

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        previous = None
    try:
        return worker.serve()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if stdout is None:
            sys.stdout = out
