"""Fault injection for the reliability tests: a process kills itself at a named point.

Read once at import and inert when unset: ``MASKSAM_FAULT="<point>[@<file name>]:<n>"`` makes
the process SIGKILL itself the n-th time it reaches ``<point>`` (for that file name, if given).
Points: ``"write:before_rename"`` (:func:`MaskSAMLib.files.atomic_path` and
:func:`~MaskSAMLib.files.publish_together`: temp file complete, not yet renamed) and
``"checkpoint:before_rename"`` (``training/checkpoint.py``). Used by
``Testing/test_reliability_faults.py``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def _parse_fault(spec: str | None) -> tuple[str, str | None, int] | None:
    if not spec:
        return None
    point, _, count = spec.rpartition(":")
    point, _, name = point.partition("@")
    return (point, name or None, int(count)) if count.isdigit() else None


_FAULT = _parse_fault(os.environ.get("MASKSAM_FAULT"))
_FAULT_HITS: dict[str, int] = {}


def fault_point(point: str, path: str | os.PathLike | None = None) -> None:
    """Test hook: SIGKILL this process at the point MASKSAM_FAULT names (no-op when unset)."""
    if _FAULT is None or _FAULT[0] != point:
        return
    if _FAULT[1] is not None and (path is None or Path(path).name != _FAULT[1]):
        return
    _FAULT_HITS[point] = _FAULT_HITS.get(point, 0) + 1
    if _FAULT_HITS[point] == _FAULT[2]:
        os.kill(os.getpid(), signal.SIGKILL)
