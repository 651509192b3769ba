"""`masksam init` and official checkpoint loading, end to end and with each bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from MaskSAMLib.cli import main
from MaskSAMLib.config import make_labels
from MaskSAMLib.errors import MaskSAMError
from MaskSAMLib.modeling.build import create_model, load_model_dir
from MaskSAMLib.modeling.sam_import import sam_builders

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vit_b_checkpoint(tmp_path_factory) -> Path:
    """A file in the format of Meta's sam_vit_b_01ec64.pth, every tensor random."""
    sam = sam_builders().build_sam_vit_b()
    gen = torch.Generator().manual_seed(3)
    state = {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in sam.state_dict().items()}
    path = tmp_path_factory.mktemp("ckpt") / "sam_vit_b_01ec64.pth"
    torch.save(state, path)
    return path


@pytest.fixture()
def labels_file(tmp_path) -> Path:
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2},
        "numTraining": 0, "file_ending": ".nii.gz",
    }))
    return path


def test_official_checkpoint_every_tensor_used(vit_b_checkpoint):
    state = torch.load(vit_b_checkpoint, weights_only=True)
    assert len(state) == 314
    model = create_model(backbone="vit_b", labels=make_labels(["background", "a"]),
                         sam_checkpoint=vit_b_checkpoint, img_size=256, num_slices=1)
    own = model.state_dict()
    for key, value in state.items():
        assert torch.equal(own[key], value), key
    # pos_embed is kept at the checkpoint's 64x64 grid and resampled at run time
    assert own["image_encoder.pos_embed"].shape == (1, 64, 64, 768)
    with torch.no_grad():
        out = model(torch.randn(1, 1, 1, 256, 256))
    assert out["pred_masks"].shape == (1, 4, 1, 256, 256)


def test_init_cli_end_to_end(tmp_path, labels_file, capsys):
    out = tmp_path / "model"
    assert main(["init", "--backbone", "tiny", "--labels", str(labels_file),
                 "--out", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert [lab["name"] for lab in config["labels"]] == ["background", "liver", "spleen"]
    assert config["preprocessing"]["channel_names"] == ["CT"]
    assert config["num_queries"] >= 3 and config["format_version"] == 1
    model = load_model_dir(out)
    reference = create_model(backbone="tiny", labels=make_labels(["background", "liver",
                                                                  "spleen"]), seed=0)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_init_from_official_checkpoint_records_provenance(tmp_path, labels_file,
                                                          vit_b_checkpoint):
    out = tmp_path / "vitb"
    assert main(["init", "--backbone", "vit_b", "--sam-checkpoint", str(vit_b_checkpoint),
                 "--labels", str(labels_file), "--out", str(out), "--img-size", "256",
                 "--quiet"]) == 0
    prov = json.loads((out / "config.json").read_text())["provenance"]
    assert prov["base_weights"] == "sam_vit_b_01ec64.pth"
    assert len(prov["base_weights_sha256"]) == 64


def _run_init(args: list[str], capsys) -> tuple[int, str]:
    code = main(["init", *args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_missing_checkpoint(tmp_path, labels_file, capsys):
    out = tmp_path / "m"
    code, err = _run_init(["--backbone", "vit_b", "--sam-checkpoint", str(tmp_path / "no.pth"),
                           "--labels", str(labels_file), "--out", str(out)], capsys)
    assert code == 1 and "does not exist" in err and not out.exists()


def test_truncated_checkpoint(tmp_path, labels_file, vit_b_checkpoint, capsys):
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(vit_b_checkpoint.read_bytes()[: 5_000_000])
    out = tmp_path / "m"
    code, err = _run_init(["--backbone", "vit_b", "--sam-checkpoint", str(bad),
                           "--labels", str(labels_file), "--out", str(out)], capsys)
    assert code == 1 and "truncated or corrupt" in err and not out.exists()


class _Payload:
    def __reduce__(self):
        marker = os.environ["MASKSAM_PAYLOAD_MARKER"]
        return (os.system, (f"touch {marker}",))


def test_pickle_payload_never_runs(tmp_path, labels_file, capsys, monkeypatch):
    marker = tmp_path / "payload-ran"
    monkeypatch.setenv("MASKSAM_PAYLOAD_MARKER", str(marker))
    bad = tmp_path / "evil.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1), "x": _Payload()}, bad)
    out = tmp_path / "m"
    code, err = _run_init(["--backbone", "vit_b", "--sam-checkpoint", str(bad),
                           "--labels", str(labels_file), "--out", str(out)], capsys)
    assert code == 1 and "Refused to load" in err
    assert not marker.exists() and not out.exists()


def test_checkpoint_of_another_backbone(tmp_path, labels_file, vit_b_checkpoint, capsys):
    out = tmp_path / "m"
    code, err = _run_init(["--backbone", "litemedsam", "--sam-checkpoint", str(vit_b_checkpoint),
                           "--labels", str(labels_file), "--out", str(out)], capsys)
    assert code == 1 and "is not a litemedsam checkpoint" in err and not out.exists()


def test_labels_without_background(tmp_path, capsys):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"liver": 1, "spleen": 2}))
    out = tmp_path / "m"
    code, err = _run_init(["--backbone", "tiny", "--labels", str(labels), "--out", str(out)],
                          capsys)
    assert code == 1 and "background" in err and not out.exists()


def test_region_labels_are_refused(tmp_path, capsys):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"labels": {"background": 0, "whole": [1, 2]}}))
    code, err = _run_init(["--backbone", "tiny", "--labels", str(labels),
                           "--out", str(tmp_path / "m")], capsys)
    assert code == 1 and "region-based" in err


def test_existing_non_empty_out_is_untouched(tmp_path, labels_file, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, err = _run_init(["--backbone", "tiny", "--labels", str(labels_file), "--out",
                           str(out)], capsys)
    assert code == 1 and "not empty" in err
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_failure_while_writing_leaves_no_folder(tmp_path, labels_file, monkeypatch):
    import safetensors.torch

    def broken_save(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    out = tmp_path / "m"
    with pytest.raises(MaskSAMError, match="No space left"):
        main_args = ["init", "--backbone", "tiny", "--labels", str(labels_file), "--out", str(out)]
        from MaskSAMLib import cli

        args = cli.build_parser().parse_args(main_args)
        args.modality = ["CT"]
        cli.init_entry(args)
    assert list(tmp_path.iterdir()) == [labels_file]


def test_usage_error_exit_code(capsys):
    assert main(["init", "--backbone", "nope"]) == 2


def test_console_entry_points():
    for cmd in ([sys.executable, "-m", "MaskSAMLib", "--help"],):
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
        assert proc.returncode == 0 and "init" in proc.stdout and "research" in proc.stdout.lower()
