"""Progress reporting: JSON events for the Slicer GUI (INTERFACES.md) or tqdm in a terminal.

With ``--progress json`` every event is one JSON object per line on stdout and nothing else is
printed there; human-readable messages go to stderr. Event keys:
``{"v": 1, "event": "start|progress|metric|log|done|error", "stage", "done", "total",
"eta_s", "message", ...}`` plus event-specific keys (``loss``, ``dice``, ``device``, ...).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

EVENT_VERSION = 1
EVENTS = ("start", "progress", "metric", "log", "done", "error")


class Progress:
    """Emit progress for one command.

    Args:
        mode: ``"json"`` (events on stdout), ``"tqdm"`` (bars on stderr) or ``"none"``.
        quiet: suppress ``log`` messages on stderr (errors are always shown).
    """

    def __init__(self, mode: str = "tqdm", *, quiet: bool = False, stream: TextIO | None = None):
        if mode not in ("json", "tqdm", "none"):
            raise ValueError(f"unknown progress mode {mode!r}")
        self.mode = mode
        self.quiet = quiet
        self.stream = stream or sys.stdout
        self._bar = None
        self._stage: str | None = None
        self._stage_start = 0.0

    def emit(self, event: str, **fields: Any) -> None:
        """Write one event (json mode only); other modes ignore it."""
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}")
        if self.mode != "json":
            return
        payload = {"v": EVENT_VERSION, "event": event}
        payload.update({k: v for k, v in fields.items() if v is not None})
        self.stream.write(json.dumps(payload, default=_jsonable) + "\n")
        self.stream.flush()

    def start(self, stage: str, total: int | None = None, **fields: Any) -> None:
        """Begin a stage counting ``total`` units (windows, iterations, cases)."""
        self.close_bar()
        self._stage = stage
        self._stage_start = time.monotonic()
        self.emit("start", stage=stage, done=0, total=total, **fields)
        if self.mode == "tqdm" and total:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=stage, file=sys.stderr, leave=False,
                             dynamic_ncols=True)

    def update(self, done: int, total: int | None = None, **fields: Any) -> None:
        """Report ``done`` units of the current stage (with an ETA from the elapsed time)."""
        eta = None
        if total and done:
            elapsed = time.monotonic() - self._stage_start
            eta = round(elapsed / done * (total - done), 1)
        self.emit("progress", stage=self._stage, done=done, total=total, eta_s=eta, **fields)
        if self._bar is not None:
            self._bar.n = done
            postfix = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in fields.items()}
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.refresh()

    def metric(self, **fields: Any) -> None:
        self.emit("metric", stage=self._stage, **fields)

    def log(self, message: str, **fields: Any) -> None:
        """A human-readable message: stderr (unless quiet) and a ``log`` event."""
        self.emit("log", stage=self._stage, message=message, **fields)
        if not self.quiet:
            if self._bar is not None:
                self._bar.write(message, file=sys.stderr)
            else:
                print(message, file=sys.stderr, flush=True)

    def done(self, message: str | None = None, **fields: Any) -> None:
        self.close_bar()
        self.emit("done", stage=self._stage, message=message, **fields)

    def error(self, message: str) -> None:
        """The one-line error: always on stderr, and an ``error`` event in json mode."""
        self.close_bar()
        self.emit("error", stage=self._stage, message=message)
        print(f"error: {message}", file=sys.stderr, flush=True)

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)
