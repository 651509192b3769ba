"""Compact model folders (tensors that differ from the base) and --model NAME resolution."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from MaskSAMLib.config import make_labels
from MaskSAMLib.data.preprocessing import PreprocessConfig
from MaskSAMLib.errors import MaskSAMError
from MaskSAMLib.modeling.build import create_model, load_model_dir, save_model_dir
from MaskSAMLib.modeling.compact import save_compact_model_dir
from MaskSAMLib.modeling.semantic import semantic_probabilities
from MaskSAMLib.models import available_models, resolve_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_litemedsam(tmp_path_factory):
    """A LiteMedSAM cpu-recipe model with non-zero trained parts (random, as after training)."""
    model = create_model(backbone="litemedsam", recipe="cpu", seed=0, num_slices=1,
                         labels=make_labels(["background", "right_ventricle", "myocardium",
                                             "left_ventricle"]),
                         preprocessing=PreprocessConfig(target_spacing=(1.5, 1.5, 10.0),
                                                        channel_names=["MR"], fit_size=256))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "adapter" in name:
                p.normal_(0, 0.02)
    root = tmp_path_factory.mktemp("models")
    full = save_model_dir(model, root / "full")
    return model.eval(), full, root


def test_compact_folder_is_small_and_gives_the_same_outputs(trained_litemedsam):
    model, full, root = trained_litemedsam
    compact = save_compact_model_dir(load_model_dir(full), root / "compact")
    full_mb = (full / "model.safetensors").stat().st_size / 1e6
    compact_mb = (compact / "model.safetensors").stat().st_size / 1e6
    assert compact_mb < 0.15 * full_mb and compact_mb < 25
    entry = json.loads((compact / "config.json").read_text())["provenance"]["compact"]
    assert entry["base_weights"] == "lite_medsam.pth" and len(entry["base_weights_sha256"]) == 64
    again = load_model_dir(compact)
    x = torch.randn(1, 1, 1, 256, 256)
    with torch.no_grad():
        a, b = model(x), again(x)
    # float16 storage of the trained tensors: class logits agree closely; the label maps agree
    # on all but a few pixels (a float16 rounding can flip a thresholded mask prompt's pixel).
    assert torch.allclose(a["pred_logits"], b["pred_logits"], atol=2e-2)
    labels_a = semantic_probabilities(a["pred_logits"], a["pred_masks"]).argmax(1)
    labels_b = semantic_probabilities(b["pred_logits"], b["pred_masks"]).argmax(1)
    assert (labels_a == labels_b).float().mean().item() >= 0.995
    exact = load_model_dir(save_compact_model_dir(load_model_dir(full), root / "c32", half=False))
    with torch.no_grad():
        c = exact(x)
    assert torch.allclose(a["pred_masks"], c["pred_masks"], atol=1e-5)


def test_compact_model_with_a_foreign_base_is_refused(trained_litemedsam, tmp_path):
    _, full, root = trained_litemedsam
    compact = root / "compact-foreign"
    save_compact_model_dir(load_model_dir(full), compact)
    config = json.loads((compact / "config.json").read_text())
    config["provenance"]["compact"]["base_weights_sha256"] = "0" * 64
    (compact / "config.json").write_text(json.dumps(config))
    with pytest.raises(MaskSAMError, match="not the ones this compact model was made from"):
        load_model_dir(compact)


def _registry(tmp_path: Path, folder: Path, files: dict[str, str]) -> Path:
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"version": 1, "models": [], "bundledModels": [
        {"name": "heart", "folder": os.path.relpath(folder, tmp_path), "licence": "CC BY-NC-SA",
         "files": files}]}))
    return path


def test_model_names_resolve_and_damaged_bundles_are_refused(trained_litemedsam, tmp_path,
                                                             monkeypatch):
    from MaskSAMLib.files import sha256_file

    _, full, _ = trained_litemedsam
    files = {n: sha256_file(full / n) for n in ("config.json", "model.safetensors")}
    monkeypatch.setenv("MASKSAM_REGISTRY", str(_registry(tmp_path, full, files)))
    monkeypatch.setenv("MASKSAM_HOME", str(tmp_path / "home"))
    names = [(e.name, e.source) for e in available_models()]
    assert ("heart", "bundled") in names
    assert resolve_model("heart") == full.resolve()
    assert resolve_model(str(full)) == full
    with pytest.raises(MaskSAMError, match="known models: heart"):
        resolve_model("liver-ct")
    bad = dict(files, **{"model.safetensors": "f" * 64})
    monkeypatch.setenv("MASKSAM_REGISTRY", str(_registry(tmp_path, full, bad)))
    with pytest.raises(MaskSAMError, match="damaged"):
        resolve_model("heart")


def test_models_cli_lists_and_segment_names_unknown_models(tmp_path):
    env = {**os.environ, "MASKSAM_HOME": str(tmp_path / "home"),
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    listed = subprocess.run([sys.executable, "-m", "MaskSAMLib", "models", "--json"],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert all({"name", "source", "classes", "licence"} <= set(r) for r in rows)
    seg = subprocess.run([sys.executable, "-m", "MaskSAMLib", "segment", str(tmp_path / "x.nii.gz"),
                          "--model", "no-such-model", "--out", str(tmp_path / "o.nii.gz")],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert seg.returncode == 1
    assert "known models:" in seg.stderr and len(seg.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.nii.gz").exists()
