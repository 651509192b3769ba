"""LiteMedSAM's TinyViT as MaskSAM's image encoder: depth embedding and depth adapters.

The TinyViT modules are adopted under their checkpoint names (``patch_embed``, ``layers``,
``neck``), so ``lite_medsam.pth`` loads unchanged. A zero-initialised depth embedding
``(1, T, C, 1, 1)`` is added after the patch embedding, and every attention block gets two
zero-initialised :class:`DepthConvAdapter` (after attention, parallel to the MLP). The stage
outputs are the multi-level features; the neck output is stride 4 (64x64 at 256 input).
BatchNorm layers are frozen parts: MaskSAM keeps them in eval mode during training.

With ``adapters=False`` (``encoder_mode="frozen"``) the encoder is plain LiteMedSAM: no depth
embedding, no adapters, so each slice's output depends on that slice alone and can be cached.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import DepthConvAdapter
from .tiny_vit import TinyViT, TinyViTBlock


class TinyViTEncoder(nn.Module):
    """``forward(x (B*T, 3, 256, 256)) -> (neck (B*T, 256, 64, 64), stage features)``."""

    def __init__(
        self, *, num_slices: int, adapter_reduction: int = 4, adapters: bool = True
    ) -> None:
        super().__init__()
        vit = TinyViT()
        self.num_slices = num_slices
        self.patch_embed = vit.patch_embed
        self.layers = vit.layers
        self.neck = vit.neck
        self.out_stride = vit.img_size // vit.embedding_size
        self.feature_channels = [
            layer.downsample.conv3.c.out_channels if layer.downsample is not None else dim
            for layer, dim in zip(self.layers, vit.embed_dims, strict=True)
        ]
        self.adapters = adapters
        self.depth_embed = (
            nn.Parameter(torch.zeros(1, num_slices, vit.embed_dims[0], 1, 1)) if adapters else None
        )
        for module in self.layers.modules() if adapters else ():
            if isinstance(module, TinyViTBlock):
                module.space_adapter = DepthConvAdapter(
                    dim=module.dim, num_slices=num_slices, reduction=adapter_reduction
                )
                module.mlp_adapter = DepthConvAdapter(
                    dim=module.dim, num_slices=num_slices, reduction=adapter_reduction
                )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.patch_embed(x)  # (BT, C, H, W)
        if self.depth_embed is not None:
            bt, c, h, w = x.shape
            t = self.num_slices
            x = (x.reshape(bt // t, t, c, h, w) + self.depth_embed).reshape(bt, c, h, w)
        features = []
        for layer in self.layers:
            x = layer(x)
            features.append(x)
        return self.neck(x), features
