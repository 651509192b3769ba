"""The library and the Slicer module under Python 3.12, the Python of Slicer 5.10.

Slicer 5.10 and later run MaskSAMLib (in the child process) and the module's plain classes
with Python 3.12. This test builds a Python 3.12 virtual environment (``.venv-py312`` at the
repository root, reused while its requirements are unchanged) and runs the torch-free part of
the suite in it: data I/O, datasets, preprocessing, phantoms, evaluation, ``.seg.nrrd``
writing, terminology, the Slicer module's packaging, installer, process runner and panel
decisions. Every library and module file is also byte-compiled by 3.12.

torch is not installed there: the only torch 2.13 wheel for Python 3.12 that can be installed
here is PyPI's CUDA build (several GB with its NVIDIA packages), so the torch-dependent tests
run under the main interpreter only. Skips, saying why, where no Python 3.12 is found.
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv-py312"

#: What the torch-free tests need (pinned to the versions of this environment where present).
PACKAGES = ("numpy", "SimpleITK", "scipy", "safetensors", "tqdm", "pytest", "pytest-timeout",
            "hypothesis", "slicerio", "psutil")

#: Test files whose tests need no torch (each imports only torch-free modules).
TORCH_FREE_TESTS = (
    "data/test_data_io.py", "data/test_dataset_json.py", "test_evaluation.py",
    "data/test_phantoms.py", "data/test_preprocessing.py", "test_terminology.py",
    "slicer_module/test_slicer_install.py", "slicer_module/test_slicer_packaging.py",
    "slicer_module/test_slicer_process.py", "slicer_module/test_slicer_panel_logic.py",
)


def findPython312() -> str | None:
    """``$MASKSAM_PYTHON312``, a working ``python3.12`` on PATH, or pyenv's 3.12."""
    candidates = [os.environ.get("MASKSAM_PYTHON312", "")]
    candidates.append(shutil.which("python3.12") or "")
    pyenvRoot = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates += sorted(glob.glob(os.path.join(pyenvRoot, "versions", "3.12*", "bin",
                                                "python3.12")), reverse=True)
    for candidate in candidates:
        if not candidate:
            continue
        try:
            out = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0 and out.stdout.strip() == "(3, 12)":
            return candidate
    return None


def requirements() -> list[str]:
    pins = []
    for name in PACKAGES:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def venvPython() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensureVenv(python312: str) -> Path:
    """The 3.12 venv with ``requirements()``; rebuilt when they change."""
    pins = requirements()
    stamp = VENV / "masksam-requirements.txt"
    wanted = "\n".join(pins) + "\n"
    if venvPython().is_file() and stamp.is_file() and stamp.read_text() == wanted:
        return venvPython()
    if VENV.exists():
        shutil.rmtree(VENV)
    subprocess.run([python312, "-m", "venv", str(VENV)], check=True, timeout=300)
    result = subprocess.run(
        [str(venvPython()), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         "--only-binary=:all:", *pins],
        capture_output=True, text=True, timeout=900,
    )
    if result.returncode != 0:
        shutil.rmtree(VENV, ignore_errors=True)
        pytest.fail(f"pip could not install {pins} for Python 3.12:\n{result.stderr[-3000:]}")
    stamp.write_text(wanted)
    return venvPython()


@pytest.fixture(scope="module")
def python312() -> Path:
    found = findPython312()
    if found is None:
        pytest.skip("no Python 3.12 found (set MASKSAM_PYTHON312, or install it with pyenv)")
    return ensureVenv(found)


def run312(python: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "QT_QPA_PLATFORM": "offscreen"}
    env.pop("PYTHONHOME", None)
    return subprocess.run([str(python), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.timeout(1500)
def test_every_library_and_module_file_compiles_under_python_312(python312):
    result = run312(python312, "-c", "import sys; print(sys.version)", timeout=60)
    assert result.stdout.startswith("3.12"), result.stdout + result.stderr
    code = ("import pathlib, sys\n"
            "bad = []\n"
            "for root in ('MaskSAMLib', 'MaskSAMSlicer'):\n"
            "    for path in sorted(pathlib.Path(root).rglob('*.py')):\n"
            "        try:\n"
            "            compile(path.read_text(encoding='utf-8'), str(path), 'exec')\n"
            "        except SyntaxError as exc:\n"
            "            bad.append(f'{path}: {exc}')\n"
            "print('\\n'.join(bad)); sys.exit(1 if bad else 0)\n")
    result = run312(python312, "-c", code, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(1500)
def test_torch_free_tests_pass_under_python_312(python312):
    files = [f"Testing/{name}" for name in TORCH_FREE_TESTS]
    missing = [f for f in files if not (REPO / f).is_file()]
    assert not missing, f"TORCH_FREE_TESTS names files that are gone: {missing}"
    probe = run312(python312, "-c", "import importlib.util, sys; "
                   "sys.exit(importlib.util.find_spec('torch') is not None)", timeout=60)
    assert probe.returncode == 0, "the 3.12 run must be torch-free (it would hide a torch import)"
    started = time.monotonic()
    result = run312(python312, "-m", "pytest", *files, "-q", "-m", "not slow", "-p",
                    "no:cacheprovider", "-o", "addopts=", timeout=1400)
    elapsed = time.monotonic() - started
    tail = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, f"Python 3.12 run failed after {elapsed:.0f} s:\n{tail}"
    summary = [line for line in result.stdout.splitlines() if " passed" in line]
    assert summary, tail
    print(f"Python 3.12: {summary[-1].strip()} ({elapsed:.0f} s)")
    assert " failed" not in summary[-1] and " error" not in summary[-1]
