"""Reliability (issue 6): SIGKILL, injected and real write failures, with nothing lost.

- ``train`` killed at 12 points (between iterations, inside checkpoint writes, inside the final
  weight and config writes) and resumed each time: every checkpoint left behind loads with
  ``weights_only``, at most one checkpoint interval is lost, and the final weights equal an
  uninterrupted run's.
- ``segment`` killed while it writes (label map before its rename, sidecar, and at a random
  moment): the output path holds the previous complete file or nothing.
- Disk full: ``OSError(ENOSPC)`` injected into the image, checkpoint and weight writers and into
  ``fsync`` (segment's output, a training checkpoint, ``init``), and a real kernel write limit
  (``RLIMIT_FSIZE`` -> EFBIG) on a child: one-line error, previous output intact.

Kills reach the few milliseconds a write lasts through ``MASKSAM_FAULT`` (MaskSAMLib/faults.py,
``fault_point``). Two ``train`` runs on one folder and a stale lock are in test_training.py.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file

from MaskSAMLib.cli import main
from MaskSAMLib.config import make_labels
from MaskSAMLib.data.normalization import CTNormStats
from MaskSAMLib.data.phantoms import PHANTOM_LABELS, make_phantom_case, make_phantoms
from MaskSAMLib.data.preprocessing import PreprocessConfig
from MaskSAMLib.modeling.build import create_model, save_model_dir
from MaskSAMLib.training.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
SMALL = (40, 40, 16)
ITERATIONS = 14
EVERY = 2


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return make_phantoms(tmp_path_factory.mktemp("data") / "ds", cases=3, seed=1, size=SMALL)


def _env(tmp: Path, fault: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MASKSAM_FAULT", None)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MASKSAM_CACHE": str(tmp / "cache"),
                "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", "")})
    if fault:
        env["MASKSAM_FAULT"] = fault
    return env


def _train_args(dataset: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "MaskSAMLib", "train", str(dataset), "--out", str(out),
            "--iterations", str(ITERATIONS), "--checkpoint-every", str(EVERY),
            "--val-fraction", "0", "--num-points", "256", "--batch-size", "1", "--workers", "0",
            "--device", "cpu", "--quiet", *extra]


def _logged(out: Path) -> list[dict]:
    log = out / "training" / "log.jsonl"
    if not log.is_file():
        return []
    return [json.loads(x) for x in log.read_text().splitlines() if x.strip()]


def _kill_at_iteration(proc: subprocess.Popen, out: Path, seen: int, iteration: int) -> None:
    """SIGKILL ``proc`` as soon as its log (past the first ``seen`` lines) reaches ``iteration``."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if any(r.get("iteration", 0) >= iteration for r in _logged(out)[seen:]):
            proc.send_signal(signal.SIGKILL)
            return
        time.sleep(0.01)


# (how the process dies, argument): "fault" = MASKSAM_FAULT spec, "after" = SIGKILL once the
# run has logged that many iterations past its checkpoint.
KILLS = [
    ("fault", "checkpoint:before_rename:1"),  # the first checkpoint: --resume restarts at 0
    ("after", 1),                             # before any checkpoint
    ("fault", "checkpoint:before_rename:2"),
    ("fault", "checkpoint:before_rename:1"),  # the same write again: no progress, nothing lost
    ("after", 3),
    ("fault", "checkpoint:before_rename:3"),
    ("after", 1),
    ("fault", "write:before_rename@checkpoint.pt:2"),
    ("fault", "write:before_rename@model_last.safetensors:1"),  # after the last checkpoint
    ("fault", "write:before_rename@model.safetensors:1"),
    ("fault", "write:before_rename@config.json:1"),
    ("fault", "write:before_rename@config.json:1"),
]


def test_training_killed_at_many_points_resumes_exactly(phantoms, tmp_path):
    straight = tmp_path / "straight"  # the uninterrupted run, alongside the killed ones
    first = subprocess.Popen(_train_args(phantoms, straight, "--backbone", "tiny"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=_env(tmp_path / "straight-cache"), cwd=REPO)

    out = tmp_path / "killed"
    checkpoint = out / "training" / "checkpoint.pt"
    kills, previous_iteration = 0, 0
    for kind, arg in KILLS:
        resume = checkpoint.is_file() or (out / "training" / "base.safetensors").is_file()
        args = _train_args(phantoms, out, "--resume") if resume else _train_args(
            phantoms, out, "--backbone", "tiny")
        seen = len(_logged(out))
        proc = subprocess.Popen(args, env=_env(tmp_path, arg if kind == "fault" else None),
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        if kind == "after":
            start = load_checkpoint(checkpoint)["iteration"] if checkpoint.is_file() else 0
            _kill_at_iteration(proc, out, seen, start + arg)
        proc.wait(timeout=300)
        stderr = proc.stderr.read()
        proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL, (kind, arg, proc.returncode, stderr)
        kills += 1
        # No corrupt checkpoint: whatever is there loads with weights_only.
        saved = load_checkpoint(checkpoint)["iteration"] if checkpoint.is_file() else 0
        assert saved >= previous_iteration, (kind, arg)
        # At most one checkpoint interval lost.
        reached = max([r.get("iteration", 0) for r in _logged(out)[seen:]], default=0)
        assert reached - saved <= EVERY, (kind, arg, reached, saved)
        previous_iteration = saved
        for leftover in out.glob("*.safetensors"):  # weights in place are always complete
            load_file(str(leftover))
    assert kills == len(KILLS) >= 10

    final = subprocess.run(_train_args(phantoms, out, "--resume"), capture_output=True,
                           text=True, env=_env(tmp_path), cwd=REPO, timeout=300)
    assert final.returncode == 0, final.stderr
    assert load_checkpoint(checkpoint)["iteration"] == ITERATIONS
    assert first.wait(timeout=300) == 0, first.stderr.read()
    first.stderr.close()
    for name in ("model_last.safetensors", "model.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(out / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    config = json.loads((out / "config.json").read_text())
    assert config["provenance"]["iterations"] == ITERATIONS


def test_orphaned_loader_workers_do_not_block_resume(phantoms, tmp_path):
    """SIGKILL leaves the data-loader worker alive for a few seconds; it must not hold the
    folder lock (locks.FolderLock drops it in forked children), so --resume starts at once."""
    out = tmp_path / "run"
    args = _train_args(phantoms, out, "--backbone", "tiny", "--workers", "1")
    proc = subprocess.Popen(args, env=_env(tmp_path), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _kill_at_iteration(proc, out, 0, 3)
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    resumed = subprocess.run(_train_args(phantoms, out, "--resume", "--iterations", "4"),
                             env=_env(tmp_path), cwd=REPO, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr


# -- segment ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random-weight tiny model with a preprocessing plan (the writes are what is tested)."""
    names = sorted(PHANTOM_LABELS, key=PHANTOM_LABELS.__getitem__)
    labels = make_labels(names, [PHANTOM_LABELS[n] for n in names])
    stats = CTNormStats(mean=60.0, std=200.0, percentile_00_5=-1000.0, percentile_99_5=1000.0)
    pre = PreprocessConfig(target_spacing=(2.0, 2.0, 4.5), channel_names=["CT"], ct_stats=[stats])
    model = create_model(backbone="tiny", labels=labels, preprocessing=pre, seed=0,
                         img_size=32)
    return save_model_dir(model, tmp_path_factory.mktemp("models") / "quick")


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("case") / "case_0000.nii.gz"
    sitk.WriteImage(make_phantom_case(3, 0, size=SMALL)[0], str(path), True)
    return path


def _segment_args(image: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "MaskSAMLib", "segment", str(image), "--model", str(model),
            "--out", str(out), "--device", "cpu", "--quiet", *extra]


def _complete(path: Path, reference: Path) -> None:
    """``path`` reads as a whole label map on the input grid."""
    out = sitk.ReadImage(str(path))
    ref = sitk.ReadImage(str(reference))
    assert out.GetSize() == ref.GetSize()
    from MaskSAMLib.data.nifti_checks import incomplete_nifti

    assert incomplete_nifti(path) is None


@pytest.mark.parametrize("fmt", ["nii.gz", "seg.nrrd"])
def test_segment_killed_while_writing_leaves_no_partial_output(model_dir, image, tmp_path, fmt):
    out = tmp_path / f"labels.{fmt}"
    env = _env(tmp_path, f"write:before_rename@{out.name}:1")
    killed = subprocess.run(_segment_args(image, model_dir, out), env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()  # the temporary file was complete but never renamed
    good = subprocess.run(_segment_args(image, model_dir, out), env=_env(tmp_path), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stderr
    _complete(out, image)
    before = out.read_bytes()
    sidecar = json.loads(out.with_name("labels.json").read_text())
    # Overwrite killed at the label map's rename, then at the sidecar's: old files intact.
    for target in (out.name, "labels.json"):
        env = _env(tmp_path, f"write:before_rename@{target}:1")
        again = subprocess.run(_segment_args(image, model_dir, out, "--overwrite"), env=env,
                               cwd=REPO, capture_output=True, text=True, timeout=300)
        assert again.returncode == -signal.SIGKILL, again.stderr
        _complete(out, image)
        assert json.loads(out.with_name("labels.json").read_text()).keys() == sidecar.keys()
    assert out.read_bytes() == before  # a random-weight model: the same labels each run


def test_segment_killed_at_a_random_moment(model_dir, image, tmp_path):
    """SIGKILL as soon as the temporary output appears: the output is whole or absent."""
    out = tmp_path / "out" / "labels.nrrd"
    out.parent.mkdir()
    proc = subprocess.Popen(_segment_args(image, model_dir, out), env=_env(tmp_path), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if any(".tmp-" in p.name for p in out.parent.iterdir()):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.0005)
    proc.wait(timeout=60)
    if out.exists():
        _complete(out, image)


# -- disk full --------------------------------------------------------------------------------
def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _partial_then_enospc(path_arg: int):
    def writer(*args, **_kwargs):
        Path(args[path_arg]).write_bytes(b"partial")
        _enospc()
    return writer


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("where", ["writer", "fsync"])
@pytest.mark.usefixtures("one_torch_thread")
def test_disk_full_while_segment_writes(model_dir, image, tmp_path, capsys, monkeypatch, where):
    out = tmp_path / "labels.nii.gz"
    assert main(["segment", str(image), "--model", str(model_dir), "--out", str(out),
                 "--device", "cpu", "--quiet"]) == 0
    before = out.read_bytes()
    capsys.readouterr()
    if where == "writer":
        monkeypatch.setattr(sitk, "WriteImage", _partial_then_enospc(1))
    else:
        monkeypatch.setattr(os, "fsync", _enospc)
    code = main(["segment", str(image), "--model", str(model_dir), "--out", str(out),
                 "--device", "cpu", "--quiet", "--overwrite"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 1 and "No space left" in line
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.json", "labels.nii.gz"]


@pytest.mark.parametrize("where", ["writer", "fsync"])
@pytest.mark.usefixtures("one_torch_thread")
def test_disk_full_while_writing_a_checkpoint(phantoms, tmp_path, capsys, monkeypatch, where):
    out = tmp_path / "run"
    base = ["train", str(phantoms), "--out", str(out), "--checkpoint-every", "2",
            "--val-fraction", "0", "--num-points", "256", "--batch-size", "1", "--workers", "0",
            "--device", "cpu", "--quiet", "--cache-dir", str(tmp_path / "cache")]
    assert main(base + ["--iterations", "2", "--backbone", "tiny"]) == 0
    checkpoint = out / "training" / "checkpoint.pt"
    before = checkpoint.read_bytes()
    capsys.readouterr()
    if where == "writer":
        monkeypatch.setattr(torch, "save", _partial_then_enospc(1))
    else:
        monkeypatch.setattr(os, "fsync", _enospc)
    code = main(base + ["--iterations", "4", "--resume"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 1 and "No space left" in line and "checkpoint.pt" in line
    assert checkpoint.read_bytes() == before
    assert load_checkpoint(checkpoint)["iteration"] == 2
    assert not [p for p in out.rglob("*.tmp-*")]
    monkeypatch.undo()
    assert main(base + ["--iterations", "4", "--resume"]) == 0  # and it continues afterwards


@pytest.mark.parametrize("where", ["writer", "fsync"])
def test_disk_full_during_init(tmp_path, capsys, monkeypatch, where):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(["background", "liver"]))
    out = tmp_path / "models" / "new"
    if where == "writer":
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", _partial_then_enospc(1))
    else:
        monkeypatch.setattr(os, "fsync", _enospc)
    code = main(["init", "--backbone", "tiny", "--labels", str(labels), "--out", str(out),
                 "--quiet"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 1 and "No space left" in line
    assert not out.exists() and list(out.parent.iterdir()) == []  # no half model folder


def _file_size_limit(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("fmt", ["nii", "nii.gz", "nrrd"])
def test_real_write_limit_keeps_the_previous_segmentation(model_dir, image, tmp_path, fmt):
    """A kernel file-size limit (EFBIG, like a full disk) on the child: ITK's NIfTI writer
    reports nothing, the others a bare RuntimeError; both must end in a clear error."""
    out = tmp_path / f"labels.{fmt}"
    good = subprocess.run(_segment_args(image, model_dir, out), env=_env(tmp_path), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stderr
    before = out.read_bytes()
    limit = 300 if fmt != "nii" else len(before) // 2
    limited = subprocess.run(_segment_args(image, model_dir, out, "--overwrite"),
                             env=_env(tmp_path), cwd=REPO, capture_output=True, text=True,
                             timeout=300, preexec_fn=_file_size_limit(limit))
    assert limited.returncode == 1, limited.stderr
    line = _one_error_line(limited.stderr)
    assert "Unexpected" not in line and "labels" in line
    assert out.read_bytes() == before
    _complete(out, image)


def test_real_write_limit_on_training(phantoms, tmp_path):
    """torch.save and safetensors raise their own types on EFBIG: still a one-line error."""
    out = tmp_path / "run"
    limited = subprocess.run(_train_args(phantoms, out, "--backbone", "tiny"),
                             env=_env(tmp_path), cwd=REPO, capture_output=True, text=True,
                             timeout=300, preexec_fn=_file_size_limit(20_000))
    assert limited.returncode == 1, limited.stderr
    line = _one_error_line(limited.stderr)
    assert "Unexpected" not in line and "size limit" in line, line
    assert not [p for p in out.rglob("*.tmp-*")]
