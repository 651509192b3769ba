"""Shared fixtures: one tiny model per session, the shared data folder, small CPU settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

try:
    import torch
except ImportError:  # the torch-free Python 3.12 run (Testing/test_python312.py)
    torch = None

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "totalseg_examples"

if torch is not None:  # the cores this process may use (a taskset/cgroup limit), at most 2
    _usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(min(2, _usable or 1))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny networks: as fast as two, and no stall when the
    cores are busy. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


#: Phantoms for the shared trained model: small so the session trains in well under a minute.
TRAINED_PHANTOM_SIZE = (48, 48, 20)
TRAINED_PHANTOM_CASES = 4
TRAINED_ITERATIONS = 40


@pytest.fixture(scope="session")
def trained_tiny_model_dir(tmp_path_factory) -> Path:
    """A real ``tiny`` model trained once per session on phantoms (``masksam train``'s API).

    4 phantoms of 48 x 48 x 20 voxels (seed 0), 40 iterations, no validation split. Phantom
    case index 4 (same seed and size) was never trained on: tests use it as a held-out case.
    Read-only: tests must not write into the folder.
    """
    from MaskSAMLib.data.phantoms import make_phantoms
    from MaskSAMLib.progress import Progress
    from MaskSAMLib.training.run import TrainRequest, train
    from MaskSAMLib.training.trainer import TrainOptions

    root = tmp_path_factory.mktemp("trained_tiny")
    dataset = make_phantoms(root / "phantoms", cases=TRAINED_PHANTOM_CASES, seed=0,
                            size=TRAINED_PHANTOM_SIZE)
    out = root / "model"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: one thread is as fast, and immune to busy cores
    try:
        train(
            TrainRequest(dataset=dataset, out=out, backbone="tiny", device="cpu",
                         val_fraction=0.0, cache_dir=root / "cache"),
            TrainOptions(iterations=TRAINED_ITERATIONS, batch_size=2, num_points=1024,
                         val_every=TRAINED_ITERATIONS, checkpoint_every=TRAINED_ITERATIONS,
                         workers=0),
            Progress("none"),
        )
    finally:
        torch.set_num_threads(threads)
    return out
