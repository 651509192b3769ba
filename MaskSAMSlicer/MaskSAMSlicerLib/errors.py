"""Errors the module shows to the user (status line plus ``slicer.util.errorDisplay``).

Each message says what is wrong and what to do, in one or two sentences. Logic classes raise
these; the widget catches them, shows them and leaves the scene as it was.
"""

from __future__ import annotations


class MaskSAMSlicerError(Exception):
    """A problem the user can fix."""


class InputError(MaskSAMSlicerError):
    """The chosen volume, segmentation or ROI cannot be used."""


class ModelError(MaskSAMSlicerError):
    """A model folder is missing, incomplete or corrupt."""


class TrainingCaseError(MaskSAMSlicerError):
    """Training cases cannot be exported (no cases, unmatched segment names, ...)."""


class ChildFailedError(MaskSAMSlicerError):
    """The MaskSAMLib child process failed; the message is its one-line error."""

    def __init__(self, message: str, returnCode: int | None = None) -> None:
        super().__init__(message)
        self.returnCode = returnCode


class CancelledError(MaskSAMSlicerError):
    """The user cancelled the run; nothing was changed."""


class ReplaceNotConfirmedError(MaskSAMSlicerError):
    """An existing segmentation would be replaced but the user has not confirmed it."""


class DependencyError(MaskSAMSlicerError):
    """Python dependencies are missing and could not (or may not) be installed."""
