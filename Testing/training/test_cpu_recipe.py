"""The CPU recipe: frozen per-slice encoder whose output is cached, the fit plan, and the
cached training path; each must give what the uncached path gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from MaskSAMLib.config import ModelConfig, make_labels
from MaskSAMLib.data.geometry import Geometry, Volume
from MaskSAMLib.data.loader import Case
from MaskSAMLib.data.phantoms import make_phantoms
from MaskSAMLib.data.preprocessing import PreprocessConfig, postprocess_labels, preprocess_case
from MaskSAMLib.errors import MaskSAMError
from MaskSAMLib.inference.sliding_window import sliding_window_labels
from MaskSAMLib.modeling.build import create_model, load_model_dir
from MaskSAMLib.training.encoder_cache import CachedPatchSampler, encode_cases, padded_slices

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def frozen_model():
    torch.manual_seed(0)
    model = create_model(backbone="tiny", labels=make_labels(["background", "a", "b"]),
                         recipe="cpu", seed=3)
    # Random non-zero adapters, so that a wrong slice order or a stale encoding shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adapter" in name:
                p.normal_(0, 0.05)
    return model.eval()


def test_cpu_recipe_is_recorded_and_reloads(frozen_model, tmp_path):
    cfg = frozen_model.config
    assert cfg.encoder_mode == "frozen" and cfg.prompt_generator_depth_kernel == 1
    assert cfg.provenance["recipe"] == "cpu"
    assert not any(p.requires_grad for p in frozen_model.image_encoder.parameters())
    assert all(p.requires_grad for p in frozen_model.encoder_adapter.parameters())
    data = cfg.to_dict()
    again = ModelConfig.from_dict(json.loads(json.dumps(data)))
    assert again.encoder_mode == "frozen"
    # A config.json written before these fields existed still loads, as the paper recipe.
    for key in ("encoder_mode", "prompt_generator_depth_kernel"):
        data.pop(key)
    assert ModelConfig.from_dict(data).encoder_mode == "adapters"
    with pytest.raises(MaskSAMError, match="encoder_mode"):
        ModelConfig.from_dict({**cfg.to_dict(), "encoder_mode": "sideways"})


def test_precomputed_encoder_output_gives_the_same_outputs(frozen_model):
    x = torch.randn(2, 1, 3, 64, 64)
    with torch.no_grad():
        plain = frozen_model(x)
        slices = x.transpose(1, 2).reshape(6, 1, 64, 64)
        cached = frozen_model(x, frozen_model.encode_slices(slices))
    for key in plain:
        assert torch.equal(plain[key], cached[key]), key


class _NoCache(torch.nn.Module):
    """The same network, seen by the sliding window as a model without an encoder cache."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.num_slices, self.img_size = model.num_slices, model.img_size
        self.num_classes = model.num_classes

    def forward(self, x):
        return self.model(x)


@pytest.mark.parametrize("mirror_axes", [(), (2, 3, 4)])
def test_sliding_window_encodes_each_slice_once_with_identical_labels(frozen_model, mirror_axes):
    image = torch.randn(1, 11, 90, 70)
    calls = []
    original = frozen_model.encode_slices

    def counting(x):
        calls.append(x.shape[0])
        return original(x)

    frozen_model.encode_slices = counting
    try:
        store: dict = {}
        cached = sliding_window_labels(image, frozen_model, mirror_axes=mirror_axes,
                                       encoder_cache=store)
    finally:
        del frozen_model.encode_slices
    plain = sliding_window_labels(image, _NoCache(frozen_model), mirror_axes=mirror_axes)
    assert np.array_equal(cached, plain)
    tiles = 2 * 2  # 90 x 70 slices at 64 input, step 0.5: 2 x 2 tiles
    variants = 1 + len([a for a in mirror_axes if a != 2])  # slice reversal reuses encodings
    assert sum(calls) == len(store) == 11 * tiles * variants


def test_fit_plan_puts_a_whole_slice_in_the_input_and_restores_the_grid():
    geometry = Geometry(size=(300, 180, 7), spacing=(0.7, 0.7, 8.0), origin=(1.0, -2.0, 3.0),
                        direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    rng = np.random.default_rng(0)
    volume = Volume(rng.normal(size=(7, 180, 300)).astype(np.float32) + 5, geometry)
    config = PreprocessConfig(target_spacing=(1.5, 1.5, 8.0), channel_names=["MR"],
                              fit_size=128, crop_nonzero=False)
    image, properties = preprocess_case([volume], config)
    assert image.shape[1] == 7 and max(image.shape[2:]) == 128
    labels = (image[0] > 5).astype(np.uint8)
    restored = postprocess_labels(labels, properties)
    assert restored.shape == (7, 180, 300)
    assert PreprocessConfig.from_dict(config.to_dict()).fit_size == 128


def test_cached_sampler_matches_what_inference_encodes(frozen_model, tmp_path):
    rng = np.random.default_rng(1)
    cases = [Case(f"c{i}", rng.normal(size=(1, 5, 50, 60)).astype(np.float32),
                  (rng.random((5, 50, 60)) > 0.7).astype(np.uint8)) for i in range(2)]
    encoded = encode_cases(frozen_model, cases, tmp_path)
    again = encode_cases(frozen_model, cases, tmp_path)  # read back from the disk cache
    assert len(list((tmp_path / "encoded").rglob("neck.npy"))) == 2
    sampler = CachedPatchSampler(cases, encoded, num_slices=3, size=64, batch_size=2, seed=0)
    batch = sampler.batch(7)
    assert batch["image"].shape == (2, 1, 3, 64, 64) and batch["label"].shape == (2, 3, 64, 64)
    again_batch = CachedPatchSampler(cases, again, num_slices=3, size=64, batch_size=2,
                                     seed=0).batch(7)
    assert torch.equal(batch["image"], again_batch["image"])
    neck, feats = batch["encoded"]
    with torch.no_grad():
        fresh, _ = frozen_model.encode_slices(batch["image"].transpose(1, 2).reshape(6, 1, 64, 64))
    assert torch.allclose(neck, fresh, atol=2e-2 * fresh.abs().max().item())  # float16 cache
    padded, (front, top, left) = padded_slices(cases[0].image, 64, 3)
    assert padded.shape == (1, 5, 64, 64) and (top, left) == (7, 2)
    with pytest.raises(MaskSAMError, match="fit"):
        padded_slices(np.zeros((1, 3, 80, 10), np.float32), 64, 3)


def test_train_cli_cpu_recipe_end_to_end(tmp_path):
    data = make_phantoms(tmp_path / "ds", cases=3, seed=2, size=(40, 48, 16))
    out = tmp_path / "model"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASKSAM_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = [sys.executable, "-m", "MaskSAMLib", "train", str(data), "--out", str(out),
            "--backbone", "tiny", "--recipe", "cpu", "--iterations", "4", "--val-every", "2",
            "--val-fraction", "0.34", "--num-points", "256", "--batch-size", "1",
            "--device", "cpu", "--quiet"]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["encoder_mode"] == "frozen"
    assert config["preprocessing"]["fit_size"] == 64
    assert list((tmp_path / "cache" / "encoded").rglob("neck.npy"))
    model = load_model_dir(out)
    assert model.caches_encoder
    log = [json.loads(line) for line in (out / "training" / "log.jsonl").read_text().splitlines()]
    assert any("validation" in rec for rec in log)
    again = [a for a in args if a not in ("--backbone", "tiny")]
    again[again.index(str(out))] = str(tmp_path / "m2")
    refused = subprocess.run([*again, "--init", str(out)], capture_output=True, text=True,
                             env=env, cwd=REPO, timeout=120)
    assert refused.returncode == 1 and "--recipe applies to a new model" in refused.stderr
    assert not (tmp_path / "m2").exists()
