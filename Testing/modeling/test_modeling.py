"""The MaskSAM network: shapes, trainable parameters, identity at init, semantic inference."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from MaskSAMLib.config import ModelConfig, make_labels, make_model_config
from MaskSAMLib.errors import MaskSAMError
from MaskSAMLib.modeling.build import build_masksam
from MaskSAMLib.modeling.masksam import OUTPUT_AXES, is_trainable_name, pad_slices
from MaskSAMLib.modeling.sam_import import sam_builders, sam_modeling
from MaskSAMLib.modeling.sam_vit import SamViTEncoder
from MaskSAMLib.modeling.semantic import semantic_labels, semantic_probabilities


def _check_outputs(out: dict, b: int, t: int, n: int, k: int, size: int, mask_res: int) -> None:
    assert set(out) == {"pred_logits", "pred_masks", "aux_masks", "aux_boxes"}
    assert out["pred_logits"].shape == (b, n, t, k + 1)  # every key (B, N, T, ...)
    assert out["pred_masks"].shape == (b, n, t, size, size)
    assert out["aux_masks"].shape == (b, n, t, mask_res, mask_res)
    assert out["aux_boxes"].shape == (b, n, t, 4)
    for key, axes in OUTPUT_AXES.items():  # one documented order for every key
        assert axes[:3] == ("B", "N", "T") and out[key].dim() == len(axes), key
    for v in out.values():
        assert v.dtype == torch.float32
        assert torch.isfinite(v).all()
    boxes = out["aux_boxes"]
    assert (boxes >= 0).all() and (boxes <= 1).all()
    assert (boxes[..., 2] >= boxes[..., 0]).all() and (boxes[..., 3] >= boxes[..., 1]).all()


def test_tiny_output_shapes(tiny_model):
    cfg = tiny_model.config
    x = torch.randn(2, 1, cfg.num_slices, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        out = tiny_model(x)
    mask_res = 4 * cfg.img_size // cfg.backbone.patch_size
    _check_outputs(out, 2, cfg.num_slices, cfg.num_queries, 3, cfg.img_size, mask_res)


def test_decoder_chunks_give_the_same_result(tiny_model):
    cfg = tiny_model.config
    x = torch.randn(1, 1, cfg.num_slices, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        whole = tiny_model(x)
        chunked = tiny_model(x, decoder_chunk=2)
    for key in whole:
        torch.testing.assert_close(whole[key], chunked[key], atol=1e-5, rtol=1e-5)


def test_wrong_input_shape_is_refused(tiny_model):
    with pytest.raises(ValueError, match="expected"):
        tiny_model(torch.zeros(1, 1, 2, 64, 64))


@pytest.mark.parametrize("backbone,size,mask_res", [("vit_b", 256, 64), ("litemedsam", 256, 256)])
def test_backbone_output_shapes(backbone, size, mask_res):
    torch.manual_seed(0)
    cfg = make_model_config(backbone=backbone, labels=make_labels(["background", "a"]),
                            img_size=size, num_slices=1, num_queries=2)
    model = build_masksam(cfg).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 1, size, size))
    _check_outputs(out, 1, 1, 2, 2, size, mask_res)


def test_trainable_and_frozen_parameter_counts():
    cfg = make_model_config(backbone="vit_b", labels=make_labels(["background", "a", "b"]),
                            img_size=512, num_slices=3)
    model = build_masksam(cfg)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    # Everything of the official SAM ViT-B is frozen: 93.7M parameters.
    official = sum(p.numel() for p in sam_builders().build_sam_vit_b().parameters())
    assert frozen == official
    assert 93_000_000 < official < 94_500_000
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    sam_trainable = {n for n in trainable if n.startswith(("image_encoder.", "mask_decoder."))}
    assert sam_trainable and all("adapter" in n or "depth_embed" in n for n in sam_trainable)
    assert any(n.startswith("stem.") for n in trainable)
    assert any(n.startswith("prompt_generator.") for n in trainable)
    assert "global_class_token" in trainable and "class_head.weight" in trainable
    # Two depth-conv adapters in each of the 12 encoder blocks.
    assert sum(1 for n in trainable if n.endswith("space_adapter.up.weight")) == 12
    assert sum(1 for n in trainable if n.endswith("mlp_adapter.up.weight")) >= 12


def test_gradients_reach_exactly_the_trainable_parameters():
    # The pretrained-backbone recipe (freeze_sam) on the small tiny architecture.
    cfg = make_model_config(backbone="tiny", labels=make_labels(["background", "a", "b"]))
    cfg.freeze_sam = True
    model = build_masksam(cfg)
    model.zero_grad(set_to_none=True)
    model.train()
    cfg = model.config
    x = torch.randn(1, 1, cfg.num_slices, cfg.img_size, cfg.img_size)
    out = model(x)
    loss = sum(v.float().square().mean() for v in out.values())
    loss.backward()
    model.eval()
    for name, p in model.named_parameters():
        if is_trainable_name(name, freeze_sam=True):
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name

    # The random tiny backbone has nothing to preserve: it trains fully.
    tiny = build_masksam(make_model_config(backbone="tiny", labels=make_labels(["background",
                                                                                 "a"])))
    tiny.train()
    cfg = tiny.config
    out = tiny(torch.randn(1, 1, cfg.num_slices, cfg.img_size, cfg.img_size))
    sum(v.float().square().mean() for v in out.values()).backward()
    for name, p in tiny.named_parameters():
        assert p.requires_grad == (p.grad is not None), name
        if name.startswith("image_encoder.blocks.0.attn"):
            assert p.requires_grad, name


def _random_fill(module: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def test_identity_at_init_small_encoder():
    """Fresh adapters: MaskSAM's per-slice features equal the official encoder's (fp32)."""
    m = sam_modeling()
    official = m.ImageEncoderViT(
        depth=4, embed_dim=96, img_size=224, mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=3, patch_size=16, qkv_bias=True,
        use_rel_pos=True, global_attn_indexes=(1, 3), window_size=5, out_chans=64,
    ).eval()
    _random_fill(official, 1)  # pos_embed and rel_pos tables too (the builder leaves them 0)
    assert official.pos_embed.abs().sum() > 0 and official.blocks[0].attn.rel_pos_h.abs().sum() > 0
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        expected = official(x)
        ours = SamViTEncoder(sam_encoder=official, num_slices=2, feature_indexes=[1, 3]).eval()
        neck, feats = ours(x)
    assert (neck - expected).abs().max().item() <= 1e-4
    assert [tuple(f.shape) for f in feats] == [(4, 96, 14, 14)] * 2


@pytest.mark.slow
def test_identity_at_init_vit_b_1024():
    official = sam_builders().build_sam_vit_b().image_encoder.eval()
    _random_fill(official, 2)
    x = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        expected = official(x)
        ours = SamViTEncoder(sam_encoder=official, num_slices=1,
                             feature_indexes=[2, 5, 8, 11]).eval()
        neck, _ = ours(x)
    assert (neck - expected).abs().max().item() <= 1e-4


def test_identity_survives_adapter_training_only_in_sam_parts():
    """An encoder adapter that moved changes features; the SAM weights did not move."""
    cfg = make_model_config(backbone="tiny", labels=make_labels(["background", "a"]))
    model = build_masksam(cfg)
    enc = model.image_encoder
    x = torch.randn(cfg.num_slices, 3, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        before, _ = enc(x)
        enc.blocks[0].space_adapter.up.weight.fill_(0.1)
        after, _ = enc(x)
    assert (before - after).abs().max() > 1e-3


def test_semantic_inference_hand_computed():
    # 2 queries, 3 classes (+ no object), one slice of 1x2 pixels.
    logits = torch.tensor([[[[10.0, -10, -10, -10]], [[-10, 10, -10, -10]]]])  # (1,2,1,4) BNTK
    masks = torch.tensor([[[[[-10.0, 10]]], [[[10.0, -10]]]]])  # (1,2,1,1,2)
    probs = semantic_probabilities(logits, masks)
    assert probs.shape == (1, 3, 1, 1, 2)
    assert semantic_labels(logits, masks).tolist() == [[[[1, 0]]]]
    # no-object queries contribute nothing
    empty = torch.tensor([[[[-10.0, -10, -10, 10]], [[-10, -10, -10, 10]]]])
    assert semantic_probabilities(empty, masks).max() < 1e-3


def test_too_few_queries_are_refused():
    with pytest.raises(MaskSAMError, match="queries"):
        make_model_config(backbone="tiny", labels=make_labels(["background", "a", "b", "c"]),
                          num_queries=3)


def test_config_round_trip_and_unknown_backbone(tmp_path):
    cfg = make_model_config(backbone="tiny", labels=make_labels(["background", "liver"]))
    cfg.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == cfg
    data = cfg.to_dict()
    data["backbone"]["name"] = "vit_x"
    with pytest.raises(MaskSAMError, match="unknown backbone 'vit_x'"):
        ModelConfig.from_dict(data)


def test_pad_slices_pads_short_volumes():
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 1, 2, 8, 8)
    padded, valid = pad_slices(x, 5)
    assert padded.shape == (1, 1, 5, 8, 8)
    assert valid.tolist() == [True, True, False, False, False]
    assert torch.equal(padded[:, :, :2], x) and padded[:, :, 2:].eq(0).all()
    same, valid = pad_slices(padded, 5)
    assert same is padded and valid.all()
