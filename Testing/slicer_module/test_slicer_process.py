"""Cancel reaches the whole child tree, with or without psutil (MaskSAMSlicerLib.process).

Inside Slicer the child is ``PythonSlicer -m MaskSAMLib ...``: a launcher that starts
``python-real``, which does the work (and may start data-loader workers). psutil is installed
only on the first Apply, after the module was imported, so a cancel must not depend on it:
the stand-in launcher below starts a worker and waits for it, exactly like that launcher, and
the tests check that the worker is gone after a cancel while ``import psutil`` fails.
No Slicer, no psutil and no torch needed; POSIX only (Windows uses ``taskkill /T``).
"""

from __future__ import annotations

import ast
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "MaskSAMSlicer"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from MaskSAMSlicerLib import process  # noqa: E402
from MaskSAMSlicerLib.process import ProcessRunner  # noqa: E402

pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX process groups")

PY = sys.executable

LAUNCHER = textwrap.dedent(
    """
    # Stand-in for the PythonSlicer launcher: starts the real interpreter and waits for it.
    import signal, subprocess, sys
    if sys.argv[2] == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    worker = subprocess.Popen([sys.executable, "-c", WORKER, sys.argv[1]])
    sys.exit(worker.wait())
    """
)
WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    open(sys.argv[1], "w").write(str(os.getpid()))
    print(json.dumps({"v": 1, "event": "start", "stage": "segment"}), flush=True)
    while True:  # "computing"
        time.sleep(0.05)
    """
)


def pidAlive(pid: int) -> bool:
    """Alive and not a zombie (works without psutil)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


@pytest.fixture
def noPsutil(monkeypatch):
    """``import psutil`` raises ImportError, as in Slicer before the first Apply."""
    monkeypatch.setitem(sys.modules, "psutil", None)
    assert process.importPsutil() is None


def startLauncher(tmp_path: Path, mode: str = "plain", **kwargs) -> tuple[ProcessRunner, int]:
    script = tmp_path / "launcher.py"
    script.write_text(f"WORKER = {WORKER!r}\n" + LAUNCHER)
    pidFile = tmp_path / "worker.pid"
    runner = ProcessRunner([PY, str(script), str(pidFile), mode], **kwargs).start()
    deadline = time.monotonic() + 30
    while not (pidFile.exists() and pidFile.read_text()):
        runner.poll()
        assert time.monotonic() < deadline, "the stand-in launcher did not start its worker"
        time.sleep(0.02)
    return runner, int(pidFile.read_text())


def test_process_module_does_not_import_psutil_when_it_loads():
    tree = ast.parse((MODULE_DIR / "MaskSAMSlicerLib" / "process.py").read_text())
    topLevel = [node for node in tree.body
                if isinstance(node, (ast.Import, ast.ImportFrom, ast.Try))]
    names = set()
    for node in topLevel:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import):
                names |= {a.name for a in sub.names}
            elif isinstance(sub, ast.ImportFrom) and sub.module:
                names.add(sub.module)
    assert "psutil" not in names


@pytest.mark.parametrize("mode", ["plain", "ignore-term"])
def test_cancel_without_psutil_ends_the_worker_behind_the_launcher(tmp_path, noPsutil, mode):
    runner, worker = startLauncher(tmp_path, mode, terminateGraceS=0.5)
    assert pidAlive(worker)
    started = time.monotonic()
    runner.cancel()
    runner.wait(timeout=20)
    assert runner.waitForLeftovers(timeout=10)
    assert runner.wasCancelled()
    assert time.monotonic() - started < 10
    deadline = time.monotonic() + 5
    while pidAlive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pidAlive(worker), "the worker kept computing after Cancel"


def test_kill_without_psutil_ends_the_worker_at_once(tmp_path, noPsutil):
    runner, worker = startLauncher(tmp_path, "ignore-term", stopFile=tmp_path / "STOP",
                                   stopGraceS=600)
    runner.cancel()  # polite: a stop file this child ignores
    with pytest.raises(TimeoutError):
        runner.wait(timeout=0.3)
    started = time.monotonic()
    runner.kill()
    runner.wait(timeout=10)
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 5
    while pidAlive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pidAlive(worker)


def test_poll_does_not_block_after_a_cancelled_run(tmp_path, noPsutil):
    """The exit is reported without waiting on threads or leftovers on the GUI thread."""
    runner, worker = startLauncher(tmp_path, "plain", terminateGraceS=0.5)
    runner.cancel()
    slowest = 0.0
    deadline = time.monotonic() + 20
    while runner.isRunning():
        t0 = time.monotonic()
        runner.poll()
        slowest = max(slowest, time.monotonic() - t0)
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert slowest < 0.5, f"poll() blocked for {slowest:.2f} s"
    runner.waitForLeftovers(timeout=10)
    assert not pidAlive(worker)


def test_with_psutil_an_orphan_that_left_the_group_is_also_ended(tmp_path):
    psutil = pytest.importorskip("psutil")
    script = tmp_path / "detach.py"
    pidFile = tmp_path / "orphan.pid"
    script.write_text(textwrap.dedent(
        f"""
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c",
            "import os, time; os.setsid(); open({str(pidFile)!r}, 'w').write(str(os.getpid()));"
            " time.sleep(600)"])
        print("up", flush=True)
        time.sleep(600)
        """))
    runner = ProcessRunner([PY, str(script)], terminateGraceS=0.5).start()
    deadline = time.monotonic() + 30
    while not (pidFile.exists() and pidFile.read_text()):
        runner.poll()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    orphan = int(pidFile.read_text())
    assert orphan in runner.treePids()
    runner.cancel()
    runner.wait(timeout=20)
    runner.waitForLeftovers(timeout=10)
    deadline = time.monotonic() + 5
    while pidAlive(orphan) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not psutil.pid_exists(orphan) or not pidAlive(orphan)
