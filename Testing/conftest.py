"""Shared fixtures: one tiny model per session, the shared data folder, small CPU settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "totalseg_examples"

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data/totalseg_examples``; tests using it skip where it is absent."""
    if not (SHARED_DATA / "ct_abdomen_3mm.nii.gz").is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA} (only present on the dev machines)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model():
    """The ``tiny`` MaskSAM (3 classes, T=3, 64x64), built once for all tests. Read-only use."""
    from MaskSAMLib.config import make_labels
    from MaskSAMLib.modeling.build import create_model

    return create_model(
        backbone="tiny", labels=make_labels(["background", "liver", "spleen"]), seed=0
    )
