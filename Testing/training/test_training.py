"""`masksam train`: bad data, locks, clean stops, exact resume after SIGKILL, fine-tuning with
new classes, and a 2-process gloo run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file

from MaskSAMLib.config import make_labels
from MaskSAMLib.data.phantoms import make_phantoms
from MaskSAMLib.errors import MaskSAMError
from MaskSAMLib.locks import FolderLock
from MaskSAMLib.modeling.build import create_model, save_model_dir
from MaskSAMLib.modeling.surgery import extend_classes
from MaskSAMLib.training.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
SMALL = (40, 40, 16)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return make_phantoms(tmp_path_factory.mktemp("data") / "ds", cases=3, seed=1, size=SMALL)


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MASKSAM_CACHE": str(tmp / "cache"),
                "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", "")})
    return env


def _train_args(dataset: Path, out: Path, iterations: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "MaskSAMLib", "train", str(dataset), "--out", str(out),
            "--iterations", str(iterations), "--checkpoint-every", "2", "--val-fraction", "0",
            "--num-points", "256", "--batch-size", "1", "--workers", "1", "--device", "cpu",
            "--quiet", *extra]


def _run(args: list[str], tmp: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=_env(tmp), cwd=REPO,
                          timeout=timeout)


def _wait_for_iteration(log: Path, iteration: int, proc: subprocess.Popen, limit: float = 240):
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.stderr.read()}")
        if log.is_file():
            lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
            if any(rec.get("iteration", 0) >= iteration for rec in lines):
                return
        time.sleep(0.05)
    raise AssertionError("training did not reach the iteration in time")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_sigkill_then_resume_equals_an_uninterrupted_run(phantoms, tmp_path):
    straight = tmp_path / "straight"
    first = _run(_train_args(phantoms, straight, 8, "--backbone", "tiny"), tmp_path)
    assert first.returncode == 0, first.stderr

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_args(phantoms, killed, 8, "--backbone", "tiny"),
                            env=_env(tmp_path), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_iteration(killed / "training" / "log.jsonl", 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    state = load_checkpoint(killed / "training" / "checkpoint.pt")  # weights_only: not corrupt
    assert 2 <= state["iteration"] < 8
    resumed = _run(_train_args(phantoms, killed, 8, "--resume"), tmp_path)
    assert resumed.returncode == 0, resumed.stderr

    a = _weights(straight / "model_last.safetensors")
    b = _weights(killed / "model_last.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert load_checkpoint(killed / "training" / "checkpoint.pt")["iteration"] == 8


def test_stop_file_saves_a_checkpoint_and_exits_130(phantoms, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_train_args(phantoms, out, 200, "--backbone", "tiny"),
                            env=_env(tmp_path), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_iteration(out / "training" / "log.jsonl", 1, proc)
    (out / "STOP").touch()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err.strip().splitlines()[-1]
    assert not (out / "STOP").exists()
    stopped_at = load_checkpoint(out / "training" / "checkpoint.pt")["iteration"]
    assert 1 <= stopped_at < 200
    assert (out / "model_last.safetensors").is_file() and (out / "config.json").is_file()


def test_sigint_saves_a_checkpoint_and_exits_130(phantoms, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_train_args(phantoms, out, 200, "--backbone", "tiny",
                                        "--workers", "2"),
                            env=_env(tmp_path), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_iteration(out / "training" / "log.jsonl", 1, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "SIGINT" in err
    assert load_checkpoint(out / "training" / "checkpoint.pt")["iteration"] >= 1


def test_a_second_run_on_a_locked_folder_is_refused(phantoms, tmp_path):
    out = tmp_path / "run"
    first = _run(_train_args(phantoms, out, 2, "--backbone", "tiny"), tmp_path)
    assert first.returncode == 0, first.stderr
    with FolderLock(out):  # a live run holds the lock
        second = _run(_train_args(phantoms, out, 4, "--resume"), tmp_path)
    assert second.returncode == 1
    assert "Another training run" in second.stderr
    # A lock file left by a killed run (no live holder) does not block --resume.
    (out / ".masksam.lock").write_text("999999")
    third = _run(_train_args(phantoms, out, 4, "--resume"), tmp_path)
    assert third.returncode == 0, third.stderr


def test_existing_output_and_missing_checkpoint(phantoms, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    proc = _run(_train_args(phantoms, out, 2, "--backbone", "tiny"), tmp_path)
    assert proc.returncode == 1 and "not empty" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    proc = _run(_train_args(phantoms, tmp_path / "none", 2, "--resume"), tmp_path)
    assert proc.returncode == 1 and "no training checkpoint" in proc.stderr
    assert not (tmp_path / "none").exists()


def _copy_dataset(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage,message", [
    ("undeclared_label", "not declared"),
    ("geometry", "origin"),
    ("escape", "outside"),
])
def test_bad_datasets_write_nothing(phantoms, tmp_path, damage, message):
    ds = _copy_dataset(phantoms, tmp_path / "ds")
    case_label = sorted((ds / "labelsTr").iterdir())[0]
    if damage == "undeclared_label":
        img = sitk.ReadImage(str(case_label))
        arr = sitk.GetArrayFromImage(img)
        arr[0, 0, 0] = 42
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(img)
        sitk.WriteImage(out, str(case_label))
    elif damage == "geometry":
        img = sitk.ReadImage(str(case_label))
        img.SetOrigin(tuple(o + 25.0 for o in img.GetOrigin()))
        sitk.WriteImage(img, str(case_label))
    else:  # a symlink leading out of the dataset folder
        outside = tmp_path / "outside.nii.gz"
        case_label.rename(outside)
        case_label.symlink_to(outside)
    out = tmp_path / "run"
    proc = _run(_train_args(ds, out, 2, "--backbone", "tiny"), tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not out.exists()


def test_fine_tuning_grows_the_class_head_and_refuses_removed_classes():
    model = create_model(backbone="tiny", labels=make_labels(["background", "liver", "spleen"]),
                         num_queries=6)
    head = model.class_head.weight.detach().clone()
    added = extend_classes(model, make_labels(["background", "liver", "spleen", "kidney_left"]))
    assert added == ["kidney_left"]
    assert model.class_head.out_features == 5 and model.num_classes == 4
    assert torch.equal(model.class_head.weight[:3], head[:3])
    assert torch.equal(model.class_head.weight[4], head[3])  # no-object row kept
    assert [lab.name for lab in model.config.labels][-1] == "kidney_left"
    with pytest.raises(MaskSAMError, match="lacks classes"):
        extend_classes(model, make_labels(["background", "liver"]))


def test_fine_tune_cli_with_new_class(phantoms, tmp_path):
    base = create_model(backbone="tiny", labels=make_labels(["background", "liver", "spleen"]),
                        num_queries=9)
    save_model_dir(base, tmp_path / "base")
    out = tmp_path / "tuned"
    proc = _run(_train_args(phantoms, out, 2, "--init", str(tmp_path / "base")), tmp_path)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "config.json").read_text())
    names = [lab["name"] for lab in config["labels"]]
    assert names[:3] == ["background", "liver", "spleen"] and "kidney_left" in names
    tuned = _weights(out / "model.safetensors")
    assert tuned["class_head.weight"].shape[0] == len(names) + 1


def test_spacing_override_is_what_the_model_keeps(phantoms, tmp_path):
    out = tmp_path / "coarse"
    proc = _run(_train_args(phantoms, out, 2, "--backbone", "tiny", "--spacing", "2", "2.5", "4"),
                tmp_path)
    assert proc.returncode == 0, proc.stderr
    pre = json.loads((out / "config.json").read_text())["preprocessing"]
    assert pre["target_spacing"] == [2.0, 2.5, 4.0]  # segment resamples to this grid
    proc = _run(_train_args(phantoms, out, 4, "--resume", "--spacing", "1", "1", "1"), tmp_path)
    assert proc.returncode == 1 and "--spacing cannot change on --resume" in proc.stderr


@pytest.mark.parametrize("values", [["0", "1", "1"], ["1", "1", "nan"], ["1", "1", "99"]])
def test_bad_spacing_is_refused_before_anything_is_written(phantoms, tmp_path, values):
    out = tmp_path / "never"
    proc = _run(_train_args(phantoms, out, 2, "--backbone", "tiny", "--spacing", *values),
                tmp_path)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "--spacing needs three values" in proc.stderr
    assert not out.exists()


def test_two_process_gloo_run(phantoms, tmp_path):
    out = tmp_path / "ddp"
    args = _train_args(phantoms, out, 4, "--backbone", "tiny")[3:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(29500 + os.getpid() % 1000), "-m", "MaskSAMLib", *args]
    proc = _run(cmd, tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(x) for x in (out / "training" / "log.jsonl").read_text().splitlines()]
    assert [rec["iteration"] for rec in log] == [1, 2, 3, 4]  # rank 0 alone writes
    assert (out / "model.safetensors").is_file()
    assert load_checkpoint(out / "training" / "checkpoint.pt")["iteration"] == 4


def test_checkpoints_hold_only_safe_types(phantoms, tmp_path):
    out = tmp_path / "run"
    proc = _run(_train_args(phantoms, out, 2, "--backbone", "tiny"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    state = torch.load(out / "training" / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "iteration"} <= set(state)
    assert isinstance(state["rng"]["torch"], torch.Tensor)
    assert np.isfinite(state["best"]["dice"])
