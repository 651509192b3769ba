"""Errors the user can act on.

Every failure a user can fix is raised as :class:`MaskSAMError` with a one-line message saying
what is wrong and what to do. The CLI prints that line (no traceback unless ``--debug``) and
exits with :attr:`MaskSAMError.exit_code` (INTERFACES.md: 1 for fixable failures, 2 for usage).
"""

from __future__ import annotations


class MaskSAMError(Exception):
    """A failure the user can fix (bad input, missing or corrupt file, out of memory)."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        # Keep the message on one line, whatever the caller formatted.
        super().__init__(" ".join(str(message).split()))


class UsageError(MaskSAMError):
    """A command-line usage error (exit code 2)."""

    exit_code = 2


class Interrupted(MaskSAMError):
    """The run was stopped cleanly on request (Ctrl-C, SIGTERM, stop file): exit code 130."""

    exit_code = 130
