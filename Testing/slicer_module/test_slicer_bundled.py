"""The Auto-segment tab's model list offers the models shipped in Resources/Models, with their
description and licence, and skips a damaged one with a message."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "MaskSAMSlicer"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from MaskSAMSlicerLib.modelRegistry import ModelRegistry  # noqa: E402

REGISTRY = REPO / "Resources" / "models.json"
BUNDLED = json.loads(REGISTRY.read_text()).get("bundledModels", [])
pytestmark = pytest.mark.skipif(not BUNDLED, reason="no bundled model in Resources/models.json")


def test_fresh_install_offers_the_bundled_model(tmp_path):
    registry = ModelRegistry(registryFile=REGISTRY, userModelsDir=tmp_path / "empty")
    models = registry.models()
    bundled = [m for m in models if m.source == "bundled"]
    assert [m.name for m in bundled] == [e["name"] for e in BUNDLED]
    first = bundled[0]
    assert first.available and "CC BY-NC-SA 4.0" in first.licence and first.description
    assert first.classNames() == BUNDLED[0]["classes"]
    assert not registry.problems


def test_damaged_bundled_model_is_skipped_with_a_message(tmp_path):
    entry = BUNDLED[0]
    copy = tmp_path / "Resources"
    shutil.copytree(REGISTRY.parent / entry["folder"], copy / entry["folder"])
    shutil.copy(REGISTRY, copy / "models.json")
    weights = copy / entry["folder"] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    registry = ModelRegistry(registryFile=copy / "models.json", userModelsDir=tmp_path / "empty")
    assert not [m for m in registry.models() if m.source == "bundled"]
    assert any("damaged" in p for p in registry.problems)
