"""Child-process runner for long MaskSAMLib jobs (segment, train, device probe).

The GUI must never block and never touch Qt from a worker thread, so the design is:

- the child is started with ``subprocess.Popen`` (stdout and stderr as pipes, line buffered);
- two reader threads drain stdout and stderr line by line into one ``queue.Queue`` (a child
  that fills an undrained pipe blocks forever, so both streams are always read);
- the GUI thread calls :meth:`ProcessRunner.poll` from a ``qt.QTimer``; ``poll`` empties the
  queue, parses the progress events (one JSON object per stdout line, INTERFACES.md) and
  returns them as plain dicts, and advances a pending cancel;
- :meth:`ProcessRunner.wait` is the blocking mode for scripts and tests (it loops on ``poll``).

Cancel is polite first: a stop file (training saves a checkpoint and exits) or SIGTERM (the
CLI stops cleanly and exits 130), then after a grace period the whole process tree is killed.
"The whole tree" does not depend on psutil, which is installed only on the first Apply (after
this module was imported): on Linux and macOS the child leads its own process group
(``start_new_session``), so signals go to the group (``os.killpg``), which holds the
``PythonSlicer`` launcher, the ``python-real`` it starts, and the data-loader workers; on
Windows ``taskkill /T`` ends the tree. psutil, when it can be imported at the time of the
cancel, additionally finds descendants that left the group. Nothing here waits on the GUI
thread: leftovers of a cancelled run are reaped by a daemon thread.

Nothing here imports qt, slicer or torch.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: Events the child emits (INTERFACES.md) plus the ones the runner adds itself.
CHILD_EVENTS = ("start", "progress", "metric", "log", "done", "error")
RUNNER_EVENTS = ("stdout", "stderr", "exit")

#: Exit code the CLI uses for an interrupted (cleanly stopped) run.
EXIT_INTERRUPTED = 130

_STDERR_TAIL_LINES = 40
_PIPE_LINGER_S = 2.0
_LEFTOVER_GRACE_S = 3.0


def importPsutil():
    """psutil if it can be imported now, else None.

    Imported at the time of use, never when this module loads: the first Apply installs it
    (requirements.txt) after the module was imported. ``sys.modules["psutil"] = None`` (as
    the tests do) makes it unavailable.
    """
    try:
        import psutil
    except ImportError:
        return None
    return psutil


def _signalGroup(pgid: int, sig: int) -> bool:
    """Send ``sig`` to a process group; False when the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


def _groupAlive(pgid: int) -> bool:
    """True while any process (zombies included) is left in the group."""
    return _signalGroup(pgid, 0)


def _taskkill(pid: int, force: bool) -> None:
    """Windows: end ``pid`` and its descendants (``taskkill /T``, ``/F`` to force)."""
    args = ["taskkill", "/PID", str(pid), "/T"]
    if force:
        args.append("/F")
    try:
        subprocess.run(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=10,
                       creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
    except (OSError, subprocess.SubprocessError):
        pass


def parseEventLine(line: str) -> dict[str, Any]:
    """Turn one stdout line into an event dict.

    A JSON object with an ``event`` key is returned as it is; anything else (a stray print in
    the child) becomes ``{"event": "stdout", "message": line}`` so nothing is lost.
    """
    text = line.rstrip("\r\n")
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("event"), str):
            return data
    return {"event": "stdout", "message": text}


def libraryParentDir() -> str | None:
    """The folder that holds the ``MaskSAMLib`` package (to put on the child's PYTHONPATH).

    Found without importing the package. In an installed extension MaskSAMLib sits next to the
    module in ``qt-scripted-modules``; in a source checkout it is at the repository root.
    """
    import importlib.util

    spec = importlib.util.find_spec("MaskSAMLib")
    if spec is not None and spec.submodule_search_locations:
        return str(Path(list(spec.submodule_search_locations)[0]).resolve().parent)
    here = Path(__file__).resolve()
    for candidate in (here.parents[1], here.parents[2]):
        if (candidate / "MaskSAMLib" / "__init__.py").is_file():
            return str(candidate)
    return None


def pythonExecutable() -> str:
    """``PythonSlicer`` inside Slicer (its Python with Slicer's packages), else this Python."""
    import shutil

    for name in ("PythonSlicer", "PythonSlicer.exe"):
        found = shutil.which(name)
        if found:
            return found
    return sys.executable


def childEnvironment(
    *, forceCpu: bool = False, extraPythonPath: str | None = None, base: dict | None = None
) -> dict[str, str]:
    """Environment for a MaskSAMLib child.

    Unbuffered UTF-8 output (events arrive as they happen), MaskSAMLib importable, and
    ``CUDA_VISIBLE_DEVICES=-1`` when the user asked for the CPU, so no CUDA context is created.
    """
    env = dict(os.environ if base is None else base)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    libDir = extraPythonPath if extraPythonPath is not None else libraryParentDir()
    if libDir:
        current = env.get("PYTHONPATH", "")
        parts = [p for p in current.split(os.pathsep) if p]
        if libDir not in parts:
            env["PYTHONPATH"] = os.pathsep.join([libDir, *parts])
    if forceCpu:
        env["CUDA_VISIBLE_DEVICES"] = "-1"
    return env


class ProcessError(RuntimeError):
    """A child process could not be started."""


class ProcessRunner:
    """Run one child process; collect its events without blocking the caller.

    Args:
        args: the command line (``[python, "-m", "MaskSAMLib", ...]``).
        env: environment (see :func:`childEnvironment`); ``None`` inherits.
        cwd: working folder of the child.
        stopFile: a file whose creation asks the child to stop cleanly (training's ``STOP``).
        stopGraceS: seconds to wait after writing the stop file before terminating.
        terminateGraceS: seconds to wait after SIGTERM before killing the process tree.
        onEvent: optional callback called (on the thread that calls :meth:`poll`) per event.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        stopFile: str | os.PathLike | None = None,
        stopGraceS: float = 60.0,
        terminateGraceS: float = 10.0,
        onEvent: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.args = [str(a) for a in args]
        self.env = env
        self.cwd = str(cwd) if cwd is not None else None
        self.stopFile = Path(stopFile) if stopFile is not None else None
        self.stopGraceS = float(stopGraceS)
        self.terminateGraceS = float(terminateGraceS)
        self.onEvent = onEvent

        self.popen: subprocess.Popen | None = None
        self.returnCode: int | None = None
        self.cancelRequested = False
        self.lastError: str | None = None
        self.lastProgress: dict[str, Any] | None = None
        self.doneEvent: dict[str, Any] | None = None
        self.startEvent: dict[str, Any] | None = None
        self.stderrTail: list[str] = []
        self.startTime: float | None = None
        self.endTime: float | None = None

        self._queue: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._openStreams = 0
        self._cancelPhase: str | None = None  # None, "stopFile", "terminate", "kill"
        self._cancelDeadline = 0.0
        self._knownTree: dict[int, Any] = {}
        self._exitReported = False
        self._childExitSeenAt: float | None = None
        self._groupReaped = False
        self._reaper: threading.Thread | None = None

    # ------------------------------------------------------------------ state
    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def isRunning(self) -> bool:
        """True from :meth:`start` until the exit event has been returned by :meth:`poll`."""
        return self.popen is not None and not self._exitReported

    def succeeded(self) -> bool:
        return self._exitReported and self.returnCode == 0 and not self.cancelRequested

    def wasCancelled(self) -> bool:
        return self._exitReported and self.cancelRequested

    def failureMessage(self) -> str:
        """One line saying why the child failed (its error event, else the last stderr line)."""
        if self.lastError:
            return self.lastError
        for line in reversed(self.stderrTail):
            text = line.strip()
            if text:
                return text[len("error: "):] if text.startswith("error: ") else text
        return f"The process exited with code {self.returnCode}."

    #: Whether the child reads stdin (a pipe, see :class:`StdinProcessRunner`) or /dev/null.
    stdinPipe = False

    # ------------------------------------------------------------------ start
    def start(self) -> ProcessRunner:
        if self.popen is not None:
            raise ProcessError("This runner has already been started; create a new one.")
        if self.stopFile is not None and self.stopFile.exists():
            # A stop file left by an earlier run would stop this one at once.
            self.stopFile.unlink()
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0) | getattr(
                subprocess, "CREATE_NEW_PROCESS_GROUP", 0
            )
        else:
            # Own session: a Ctrl-C in Slicer's terminal does not reach the child, and the
            # child's tree can be signalled without touching Slicer.
            kwargs["start_new_session"] = True
        try:
            self.popen = subprocess.Popen(
                self.args,
                stdin=subprocess.PIPE if self.stdinPipe else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self.env,
                cwd=self.cwd,
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
                **kwargs,
            )
        except OSError as exc:
            raise ProcessError(f"Could not start {self.args[0]}: {exc}") from exc
        self.startTime = time.monotonic()
        for name, stream in (("stdout", self.popen.stdout), ("stderr", self.popen.stderr)):
            thread = threading.Thread(
                target=self._drain, args=(name, stream), name=f"MaskSAM-{name}", daemon=True
            )
            self._openStreams += 1
            thread.start()
            self._threads.append(thread)
        return self

    def _drain(self, name: str, stream) -> None:
        """Reader thread: every line into the queue, then ``None`` at end of stream."""
        try:
            for line in iter(stream.readline, ""):
                self._queue.put((name, line))
        except (OSError, ValueError):
            pass
        finally:
            self._queue.put((name, None))
            try:
                stream.close()
            except OSError:
                pass

    # ------------------------------------------------------------------ poll
    def poll(self, maxEvents: int = 1000) -> list[dict[str, Any]]:
        """Return the events that arrived since the last call (never blocks).

        Child events are the parsed JSON objects; the runner adds ``stderr`` lines
        (``{"event": "stderr", "message": ...}``), stray ``stdout`` lines and, once, an
        ``exit`` event ``{"event": "exit", "returncode": N, "cancelled": bool}`` after both
        streams are closed and the process has ended.
        """
        events: list[dict[str, Any]] = []
        if self.popen is None or self._exitReported:
            return events
        self._advanceCancel()
        for _ in range(maxEvents):
            try:
                name, line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._openStreams -= 1
                continue
            event = self._parse(name, line)
            if event is not None:
                events.append(event)
        if self.popen.poll() is not None and self._streamsFinished():
            self.returnCode = self.popen.returncode
            self.endTime = time.monotonic()
            # The reader threads have queued their end-of-stream marks (or a leftover
            # descendant holds a pipe open); they are daemons, so nothing is joined here.
            if self.cancelRequested:
                self._killLeftovers()
            self._exitReported = True
            events.append(
                {"event": "exit", "returncode": self.returnCode, "cancelled": self.cancelRequested}
            )
        if self.onEvent is not None:
            for event in events:
                self.onEvent(event)
        return events

    def _streamsFinished(self) -> bool:
        """Both pipes closed, or the child ended a while ago and a leftover descendant still
        holds a pipe open (then the exit is reported anyway and, after a cancel, the leftover
        is killed)."""
        if self._openStreams <= 0:
            return True
        now = time.monotonic()
        if self._childExitSeenAt is None:
            self._childExitSeenAt = now
        return now - self._childExitSeenAt > _PIPE_LINGER_S and self._queue.empty()

    def _parse(self, name: str, line: str) -> dict[str, Any] | None:
        if name == "stderr":
            text = line.rstrip("\r\n")
            self.stderrTail.append(text)
            del self.stderrTail[:-_STDERR_TAIL_LINES]
            return {"event": "stderr", "message": text}
        if not line.strip():
            return None
        event = parseEventLine(line)
        kind = event.get("event")
        if kind == "error":
            self.lastError = str(event.get("message") or "").strip() or self.lastError
        elif kind == "progress":
            self.lastProgress = event
        elif kind == "start":
            self.startEvent = event
            self.lastProgress = event
        elif kind == "done":
            self.doneEvent = event
        return event

    # ------------------------------------------------------------------ blocking mode
    def wait(self, timeout: float | None = None, pollIntervalS: float = 0.05) -> int:
        """Block until the child has exited (dispatching events to ``onEvent``).

        Raises ``TimeoutError`` after ``timeout`` seconds (the child keeps running; call
        :meth:`cancel` and :meth:`wait` again to stop it).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._exitReported:
            self.poll()
            if self._exitReported:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.args[0]} still running after {timeout} s")
            time.sleep(pollIntervalS)
        return int(self.returnCode if self.returnCode is not None else -1)

    def collect(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Blocking mode that also returns every event (for scripts and tests)."""
        events: list[dict[str, Any]] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._exitReported:
            events.extend(self.poll())
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.args[0]} still running after {timeout} s")
            if not self._exitReported:
                time.sleep(0.02)
        return events

    # ------------------------------------------------------------------ cancel
    def cancel(self) -> None:
        """Ask the child to stop; escalate on later :meth:`poll` calls (never blocks).

        1. the stop file is written when one is configured and its folder exists, else SIGTERM
           (the CLI saves what it must and exits 130);
        2. after the grace period: SIGTERM to the whole tree;
        3. after ``terminateGraceS`` more: SIGKILL to the whole tree.
        """
        if self.popen is None or self._exitReported or self.cancelRequested:
            return
        self.cancelRequested = True
        self._rememberTree()
        now = time.monotonic()
        if self.stopFile is not None and self.stopFile.parent.is_dir():
            try:
                self.stopFile.write_text("stop requested by MaskSAMSlicer\n", encoding="utf-8")
                self._cancelPhase = "stopFile"
                self._cancelDeadline = now + self.stopGraceS
                return
            except OSError:
                pass
        self._terminateTree()
        self._cancelPhase = "terminate"
        self._cancelDeadline = now + self.terminateGraceS

    def kill(self) -> None:
        """Kill the whole process tree now (no grace period); used when the app exits."""
        if self.popen is None or self._exitReported:
            return
        self.cancelRequested = True
        self._killTree()
        self._cancelPhase = "kill"
        self._cancelDeadline = time.monotonic() + 5.0

    def cancelAndWait(self, timeout: float | None = None) -> int:
        """Blocking cancel: request the stop and wait until the whole tree is gone."""
        self.cancel()
        return self.wait(timeout=timeout)

    def _advanceCancel(self) -> None:
        if self._cancelPhase is None or self.popen is None:
            return
        if self.popen.poll() is not None:
            return
        if time.monotonic() < self._cancelDeadline:
            return
        self._rememberTree()
        if self._cancelPhase == "stopFile":
            self._terminateTree()
            self._cancelPhase = "terminate"
            self._cancelDeadline = time.monotonic() + self.terminateGraceS
        elif self._cancelPhase == "terminate":
            self._killTree()
            self._cancelPhase = "kill"
            self._cancelDeadline = time.monotonic() + 5.0

    def _rememberTree(self) -> None:
        """Record the child and its descendants seen by psutil (an orphan is still ours)."""
        psutil = importPsutil()
        if psutil is None or self.popen is None:
            return
        try:
            parent = psutil.Process(self.popen.pid)
            procs = [parent, *parent.children(recursive=True)]
        except psutil.Error:
            return
        for proc in procs:
            self._knownTree.setdefault(proc.pid, proc)

    def _aliveTree(self) -> list:
        psutil = importPsutil()
        if psutil is None:
            return []
        alive = []
        for proc in self._knownTree.values():
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.Error:
                continue
        return alive

    def _groupId(self) -> int | None:
        """The child's process group (POSIX; it was started as a session leader)."""
        if os.name == "nt" or self.popen is None:
            return None
        return self.popen.pid

    def _signalTree(self, force: bool) -> None:
        """SIGTERM (or SIGKILL when ``force``) to the child's whole tree, psutil or not."""
        if self.popen is None:
            return
        if os.name == "nt":
            # Windows has no SIGTERM for console processes: taskkill /T /F ends the launcher
            # and the tree below it while the launcher is alive (the polite stop for training
            # is the stop file, written before this).
            if self.popen.poll() is None:
                _taskkill(self.popen.pid, force=True)
        else:
            pgid = self._groupId()
            if pgid is not None and not self._groupReaped:
                if not _signalGroup(pgid, signal.SIGKILL if force else signal.SIGTERM):
                    self._groupReaped = True  # empty group: never signal that id again
        psutil = importPsutil()
        if psutil is None:
            return
        self._rememberTree()
        for proc in self._aliveTree():
            try:
                if force:
                    proc.kill()
                else:
                    proc.terminate()
            except psutil.Error:
                continue

    def _terminateTree(self) -> None:
        self._signalTree(force=False)

    def _killTree(self) -> None:
        self._signalTree(force=True)

    def _killLeftovers(self) -> None:
        """After a cancelled run ends, no descendant may outlive it.

        The child itself has exited; grandchildren (``python-real`` under the launcher,
        loader workers) may not have. They get SIGTERM now and SIGKILL after a short grace
        period, on a daemon thread, so the GUI thread never waits here.
        """
        if self.popen is None:
            return
        self._rememberTree()
        ownPid = self.popen.pid
        leftovers = [p for p in self._aliveTree() if p.pid != ownPid]
        pgid = self._groupId()
        groupAlive = pgid is not None and not self._groupReaped and _groupAlive(pgid)
        if not leftovers and not groupAlive:
            self._groupReaped = True
            return
        self._signalTree(force=False)

        def reap() -> None:
            deadline = time.monotonic() + _LEFTOVER_GRACE_S
            while time.monotonic() < deadline:
                if not self._aliveTree() and not (groupAlive and _groupAlive(pgid)):
                    return
                time.sleep(0.05)
            self._signalTree(force=True)

        thread = threading.Thread(target=reap, name="MaskSAM-reaper", daemon=True)
        self._reaper = thread
        thread.start()

    def waitForLeftovers(self, timeout: float = 10.0) -> bool:
        """Blocking mode (tests, scripts): wait until the reaper of a cancelled run is done."""
        if self._reaper is None:
            return True
        self._reaper.join(timeout)
        return not self._reaper.is_alive()

    def treePids(self) -> list[int]:
        """Pids of the child and the descendants seen so far (for tests and diagnostics)."""
        self._rememberTree()
        return sorted(self._knownTree)


class StdinProcessRunner(ProcessRunner):
    """A :class:`ProcessRunner` whose child reads requests on stdin (a long-lived worker)."""

    stdinPipe = True

    def writeLine(self, text: str) -> bool:
        """Send one line to the child; False when it is gone (the exit event will follow)."""
        if self.popen is None or self.popen.stdin is None or self.popen.poll() is not None:
            return False
        try:
            self.popen.stdin.write(text.rstrip("\n") + "\n")
            self.popen.stdin.flush()
            return True
        except (OSError, ValueError):
            return False

    def closeStdin(self) -> None:
        if self.popen is not None and self.popen.stdin is not None:
            try:
                self.popen.stdin.close()
            except (OSError, ValueError):
                pass


class ChildLogic:
    """What the logic classes that run ``MaskSAMLib`` children share: scene, python, env.

    Args:
        scene: the MRML scene (default ``slicer.mrmlScene``, looked up when used).
        python: the interpreter for the child (default ``PythonSlicer`` or this Python).
        environment: base environment for the child (default ``os.environ``).
    """

    def __init__(self, scene=None, *, python: str | None = None,
                 environment: dict[str, str] | None = None) -> None:
        self._scene = scene
        self.python = python or pythonExecutable()
        self.environment = environment

    @property
    def scene(self):
        if self._scene is not None:
            return self._scene
        import slicer

        return slicer.mrmlScene


def runBlocking(
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    onEvent: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[int, list[dict[str, Any]], ProcessRunner]:
    """Start ``args``, wait for the end; return (exit code, all events, the runner)."""
    runner = ProcessRunner(args, env=env, onEvent=onEvent).start()
    try:
        events = runner.collect(timeout=timeout)
    except TimeoutError:
        runner.cancelAndWait(timeout=30.0)
        raise
    return int(runner.returnCode if runner.returnCode is not None else -1), events, runner


def masksamCommand(subcommand: str, *arguments: str, python: str | None = None) -> list[str]:
    """``[python, -m, MaskSAMLib, subcommand, ..., --progress, json]``."""
    args = [python or pythonExecutable(), "-m", "MaskSAMLib", subcommand, *arguments]
    if "--progress" not in args:
        args += ["--progress", "json"]
    return args


def formatEta(seconds: float | None) -> str:
    """``1 h 02 min``, ``3 min 05 s`` or ``12 s`` for a progress label."""
    if seconds is None or seconds != seconds or seconds < 0:
        return ""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {(seconds % 3600) // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


def describeProgress(event: dict[str, Any]) -> tuple[int | None, str]:
    """(percent or None, ``"stage: 3/40, ETA 12 s"``) for a progress bar and status line."""
    stage = str(event.get("stage") or "")
    done, total = event.get("done"), event.get("total")
    percent = None
    text = stage
    if isinstance(done, (int, float)) and isinstance(total, (int, float)) and total > 0:
        percent = max(0, min(100, int(100 * done / total)))
        text = f"{stage}: {int(done)}/{int(total)}" if stage else f"{int(done)}/{int(total)}"
    eta = formatEta(event.get("eta_s"))
    if eta:
        text += f", ETA {eta}"
    return percent, text
