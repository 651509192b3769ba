"""What every section of the panel shares: the panel shell, its widgets, settings, messages.

A section (``autoSegmentSection``, ``trainSection``, ``promptSection``) owns the widgets of one
part of the panel and the jobs it starts; the shell (``widget.py``) loads the .ui, owns the
timer and the parameter node, and asks each section to poll and to update its buttons.
qt; only loads inside Slicer (or against the PySide6 stand-ins of the tests).
"""

from __future__ import annotations

import qt

SETTINGS_PREFIX = "MaskSAMSlicer/"


def settingsValue(key: str, default: str = "") -> str:
    value = qt.QSettings().value(SETTINGS_PREFIX + key, default)
    return str(value) if value is not None else default


def setSettingsValue(key: str, value: str) -> None:
    qt.QSettings().setValue(SETTINGS_PREFIX + key, value)


def selectComboText(combo, text: str) -> None:
    index = combo.findText(text)
    if index >= 0:
        combo.setCurrentIndex(index)


class PanelSection:
    """Base of the panel's sections: reach the shell's widgets, logic and helpers.

    Subclasses implement ``setup`` (connect their widgets), ``poll`` (one timer tick; True
    while they still need the timer), ``isBusy``, ``applyStates`` (write the button states)
    and ``cleanup`` (stop what they started).
    """

    def __init__(self, panel) -> None:
        self.panel = panel

    @property
    def ui(self):
        return self.panel.ui

    @property
    def logic(self):
        return self.panel.logic

    @property
    def moduleWidget(self):
        return self.panel.moduleWidget

    @property
    def _incompatibility(self) -> str | None:
        return self.panel._incompatibility

    @property
    def _timer(self):
        return self.panel._timer

    def showError(self, message: str, statusLabel=None, title: str = "MaskSAMSlicer") -> None:
        self.panel.showError(message, statusLabel, title)

    def appendLog(self, text: str, train: bool = False) -> None:
        self.panel.appendLog(text, train)

    def updateButtonStates(self, *_args) -> None:
        self.panel.updateButtonStates()

    @staticmethod
    def showProgress(progressBar, statusLabel, percent: int | None, text: str) -> None:
        """A percentage (or a busy bar when there is none) and its line of text."""
        if percent is None:
            progressBar.setRange(0, 0)
        else:
            progressBar.setRange(0, 100)
            progressBar.value = percent
        statusLabel.text = text

    def registry(self):
        return self.panel.registry()

    def installer(self):
        return self.panel.installer()

    def ensureDependencies(self, statusLabel) -> bool:
        return self.panel.ensureDependencies(statusLabel)

    # ------------------------------------------------------------------ to implement
    def setup(self) -> None:
        raise NotImplementedError

    def poll(self) -> bool:
        return False

    def isBusy(self) -> bool:
        return False

    def applyStates(self, states) -> None:
        pass

    def cleanup(self) -> None:
        pass
