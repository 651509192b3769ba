"""Resume checkpoints: tensors, numbers, strings, lists and dicts only.

Everything a run needs to continue exactly where it stopped (trainable weights, optimizer,
scheduler, scaler, RNG states as tensors, iteration, best score, history) in one file that
loads with ``torch.load(weights_only=True)``. Written atomically (temporary file, then
``os.replace``), so a kill during a write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MaskSAMError
from ..faults import fault_point
from ..files import atomic_path, write_torch

# Test hook: called with a stage name while a checkpoint is written ("before_rename"). In a
# child process, MASKSAM_FAULT="checkpoint:before_rename:N" SIGKILLs it at the N-th write
# (faults.fault_point; inert when unset).
WRITE_HOOK = None


def rng_state() -> dict[str, Any]:
    """torch, numpy and python RNG states as tensors and plain values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
        "python": {
            "version": int(py_state[0]),
            "state": torch.tensor(py_state[1], dtype=torch.int64),
            "gauss": py_state[2],
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically (temp file with the real extension last, then rename)."""
    with atomic_path(path) as tmp:
        write_torch(payload, tmp)
        if WRITE_HOOK is not None:
            WRITE_HOOK("before_rename")
        fault_point("checkpoint:before_rename", path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a resume checkpoint safely; a damaged file is a one-line MaskSAMError."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise MaskSAMError(f"No checkpoint at {path}; start without --resume.") from exc
    except Exception as exc:  # noqa: BLE001 - any unpickling/zip failure means a bad file
        raise MaskSAMError(
            f"Checkpoint {path} cannot be read ({type(exc).__name__}: truncated or damaged); "
            f"delete it (or move it away) and run again with --resume: the run then restarts "
            "from iteration 0 from its saved starting weights."
        ) from exc
