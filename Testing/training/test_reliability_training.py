"""Reliability round 2 (issue 13), section 6 and the weights of section 4: training.

Every option is checked before ``--out`` is touched; a fresh run that fails while it sets up
leaves nothing behind (the corrected command is not refused); SIGTERM to the whole process
group (``timeout``, Slurm, systemd) still gives a stop checkpoint and exit 130; a damaged
``checkpoint.pt`` names a way out that works; weights stored as integers or holding NaN/Inf are
refused at load and never written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from MaskSAMLib.cli import main
from MaskSAMLib.data.phantoms import CASE_PREFIX, make_phantoms
from MaskSAMLib.errors import MaskSAMError
from MaskSAMLib.training.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
SMALL = (32, 32, 16)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return make_phantoms(tmp_path_factory.mktemp("data") / "ds", cases=3, seed=2, size=SMALL)


def train_args(dataset: Path, out: Path, *extra: object) -> list[str]:
    return ["train", str(dataset), "--out", str(out), "--backbone", "tiny", "--iterations", "2",
            "--checkpoint-every", "1", "--val-fraction", "0", "--num-points", "64",
            "--batch-size", "1", "--workers", "0", "--device", "cpu", "--quiet",
            *[str(e) for e in extra]]


def run(capsys, args: list[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def _split(tmp_path: Path, content: object) -> Path:
    path = tmp_path / "split.json"
    path.write_text(json.dumps(content))
    return path


BAD_OPTIONS = {
    "--val-fraction 2": (["--val-fraction", "2"], "--val-fraction"),
    "--val-fraction nan": (["--val-fraction", "nan"], "--val-fraction"),
    "--split with unknown cases": (lambda t: ["--split", _split(t, {"train": ["nope"]})],
                                   "not in"),
    "--split not a mapping": (lambda t: ["--split", _split(t, ["a", "b"])], "must be JSON like"),
    "--split case in train and val": (
        lambda t: ["--split", _split(t, {"train": [f"{CASE_PREFIX}_000"],
                                         "val": [f"{CASE_PREFIX}_000"]})],
        "more than once"),
    "--num-points 0": (["--num-points", "0"], "--num-points"),
    "--decoder-chunk -1": (["--decoder-chunk", "-1"], "--decoder-chunk"),
    "--lr inf": (["--lr", "inf"], "--lr"),
    "--lr nan": (["--lr", "nan"], "--lr"),
    "--lr -1": (["--lr", "-1"], "--lr"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS), ids=list(BAD_OPTIONS))
def test_bad_options_are_refused_before_out_is_touched(capsys, tmp_path, phantoms, case):
    extra, expected = BAD_OPTIONS[case]
    extra = extra(tmp_path) if callable(extra) else extra
    out = tmp_path / "run"
    code, err = run(capsys, train_args(phantoms, out, *extra))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and expected in lines[0], err  # usage errors
    assert not out.exists()


# Refused before --out is touched or any case is preprocessed (issue 10): the exit code, and
# the corrected command that then starts in the same (empty) --out.
REFUSED_EARLY = {
    "--val-fraction 2": (["--val-fraction", "2"], 2, "--val-fraction"),
    "--split naming an unknown case": (
        lambda t: ["--split", _split(t, {"train": ["nope"]})], 2, "not in the dataset"),
    "--split with no training case": (
        lambda t: ["--split", _split(t, {"train": [], "val": [f"{CASE_PREFIX}_000"]})], 2,
        "no training case"),
    "--img-size the backbone cannot take": (["--img-size", "60"], 1, "img_size 60"),
}


@pytest.mark.parametrize("case", list(REFUSED_EARLY), ids=list(REFUSED_EARLY))
def test_a_refused_command_writes_nothing_and_the_corrected_one_starts(
        capsys, tmp_path, phantoms, case):
    extra, exit_code, expected = REFUSED_EARLY[case]
    extra = extra(tmp_path) if callable(extra) else extra
    out, cache = tmp_path / "run", tmp_path / "cache"
    out.mkdir()  # an empty folder the user made: not even a lock file may appear in it
    before = out.stat().st_mtime_ns
    code, err = run(capsys, train_args(phantoms, out, "--cache-dir", cache, *extra))
    lines = err.strip().splitlines()
    assert code == exit_code and len(lines) == 1 and expected in lines[0], err
    assert not any(out.iterdir()) and out.stat().st_mtime_ns == before  # nothing came and went
    assert not cache.exists()  # no case was preprocessed
    code, err = run(capsys, train_args(phantoms, out, "--cache-dir", cache, "--iterations", "1"))
    assert code == 0, err
    assert (out / "model.safetensors").is_file() and (out / "training" / "split.json").is_file()


def _log_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "training" / "log.jsonl").read_text().splitlines()]


def test_resume_reuses_the_stored_split_and_refuses_another(capsys, tmp_path, phantoms):
    out = tmp_path / "run"
    code, err = run(capsys, train_args(phantoms, out, "--val-fraction", "0.34"))
    assert code == 0, err
    stored = json.loads((out / "training" / "split.json").read_text())
    assert len(stored["train"]) == 2 and len(stored["val"]) == 1
    # --val-fraction 0 would leave no validation case: the resumed run keeps the stored split
    # (and so validates at its last iteration, 3).
    code, err = run(capsys, train_args(phantoms, out, "--iterations", "3", "--resume"))
    assert code == 0, err
    assert json.loads((out / "training" / "split.json").read_text()) == stored
    assert any(r.get("iteration") == 3 and "validation" in r for r in _log_records(out))
    other = _split(tmp_path, {"train": stored["train"] + stored["val"]})
    code, err = run(capsys, train_args(phantoms, out, "--iterations", "4", "--resume",
                                       "--split", other))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "differs from the split" in lines[0], err
    assert load_checkpoint(out / "training" / "checkpoint.pt")["iteration"] == 3
    same = _split(tmp_path, stored)
    code, err = run(capsys, train_args(phantoms, out, "--iterations", "4", "--resume",
                                       "--split", same))
    assert code == 0, err


def test_training_settings_are_saved_and_read_back_on_init(capsys, tmp_path, phantoms,
                                                          monkeypatch):
    from MaskSAMLib.training import trainer as trainer_module
    from MaskSAMLib.training.settings import TrainConfig

    first = tmp_path / "first"
    code, err = run(capsys, train_args(phantoms, first))
    assert code == 0, err
    saved = json.loads((first / "training" / "settings.json").read_text())
    assert saved["loss"] == {**saved["loss"], "weight_class": 0.2, "no_object_weight": 0.1}
    assert saved["matching"]["cost_mask"] == 1.2 and saved["augment"]["p_rotation"] == 0.2
    assert saved["options"]["iterations"] == 2 and saved["options"]["num_points"] == 64
    saved["loss"]["weight_class"] = 0.7
    saved["matching"]["cost_dice"] = 2.5
    (first / "training" / "settings.json").write_text(json.dumps(saved))

    used = {}
    real = trainer_module.SetCriterion

    def recording(**kwargs):
        used.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(trainer_module, "SetCriterion", recording)
    second = tmp_path / "second"
    code, err = run(capsys, ["train", str(phantoms), "--out", str(second), "--init", str(first),
                             *train_args(phantoms, second)[6:]])
    assert code == 0, err
    assert used["weights"].weight_class == 0.7 and used["matcher"].cost_dice == 2.5
    again = TrainConfig.load(second / "training" / "settings.json")
    assert again.loss.weight_class == 0.7 and again.matching.cost_dice == 2.5


def test_settings_of_a_newer_format_are_refused_naming_the_version(tmp_path):
    from MaskSAMLib.training.settings import TrainConfig

    path = tmp_path / "settings.json"
    path.write_text(json.dumps({**TrainConfig().to_dict(), "format_version": 7}))
    with pytest.raises(MaskSAMError, match="format_version 7"):
        TrainConfig.load(path)
    path.write_text(json.dumps({**TrainConfig().to_dict(),
                                "loss": {"weight_class": float("nan")}}))
    with pytest.raises(MaskSAMError, match="weight_class"):
        TrainConfig.load(path)


def test_a_fresh_run_failing_in_setup_leaves_nothing_and_the_rerun_works(
        capsys, tmp_path, phantoms, monkeypatch):
    from MaskSAMLib.training import run as run_module

    out = tmp_path / "run"

    def broken(*_a, **_k):
        raise MaskSAMError("simulated failure while preprocessing")

    monkeypatch.setattr(run_module, "prepare_cases", broken)
    code, err = run(capsys, train_args(phantoms, out))
    assert code == 1 and "simulated failure" in err
    assert not out.exists()  # base weights and config.json were written, then removed
    out.mkdir()  # an empty folder given by the user stays
    code, err = run(capsys, train_args(phantoms, out))
    assert code == 1 and out.is_dir() and not any(out.iterdir())
    monkeypatch.undo()
    code, err = run(capsys, train_args(phantoms, out))
    assert code == 0, err
    assert (out / "model.safetensors").is_file()


def test_truncated_checkpoint_names_a_way_out_that_works(capsys, tmp_path, phantoms):
    out = tmp_path / "run"
    code, err = run(capsys, train_args(phantoms, out, "--iterations", "3"))
    assert code == 0, err
    checkpoint = out / "training" / "checkpoint.pt"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])
    code, err = run(capsys, train_args(phantoms, out, "--iterations", "3", "--resume"))
    assert code == 1 and "delete it" in err and "--resume" in err, err
    checkpoint.unlink()  # what the message says
    code, err = run(capsys, train_args(phantoms, out, "--iterations", "3", "--resume"))
    assert code == 0, err
    assert load_checkpoint(checkpoint)["iteration"] == 3


def test_sigterm_to_the_process_group_gives_a_stop_checkpoint_and_130(tmp_path, phantoms):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", MASKSAM_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = train_args(phantoms, out, "--iterations", "400", "--checkpoint-every", "1000",
                      "--workers", "1")
    proc = subprocess.Popen([sys.executable, "-m", "MaskSAMLib", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, like a job
    log = out / "training" / "log.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and log.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()
    os.killpg(proc.pid, signal.SIGTERM)  # the main process and its data-loader worker
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "DataLoader" not in err and "Training stopped (SIGTERM)" in err, err
    state = load_checkpoint(out / "training" / "checkpoint.pt")
    assert 2 <= state["iteration"] < 400


def _quick_model_dir(tmp_path: Path) -> Path:
    from MaskSAMLib.config import make_labels
    from MaskSAMLib.modeling.build import create_model, save_model_dir

    net = create_model(backbone="tiny", labels=make_labels(["background", "liver"]), seed=0,
                       img_size=32)
    return save_model_dir(net, tmp_path / "model")


@pytest.mark.parametrize("damage", ["int64", "nan", "inf"])
def test_weights_that_would_load_silently_wrong_are_refused(tmp_path, damage):
    from MaskSAMLib.modeling.build import load_model_dir

    model = _quick_model_dir(tmp_path)
    state = load_file(str(model / "model.safetensors"))
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 4)
    if damage == "int64":
        state[name] = (state[name] * 1000).to(torch.int64)
    else:
        state[name] = state[name].clone()
        state[name].view(-1)[3] = float(damage)
    save_file(state, str(model / "model.safetensors"))
    with pytest.raises(MaskSAMError, match="model folder .* is damaged") as info:
        load_model_dir(model)
    assert name in str(info.value)
    assert ("int64" in str(info.value)) == (damage == "int64")


def test_diverged_weights_are_never_written(tmp_path):
    from MaskSAMLib.modeling.build import load_model_dir
    from MaskSAMLib.training.trainer import Trainer

    net = load_model_dir(_quick_model_dir(tmp_path))
    with torch.no_grad():
        next(net.parameters()).fill_(float("nan"))
    trainer = SimpleNamespace(rank=0, model=net, out_dir=tmp_path, iteration=7)
    with pytest.raises(MaskSAMError, match="diverged"):
        Trainer.save_weights(trainer, "model_last.safetensors")
    assert not (tmp_path / "model_last.safetensors").exists()
