"""SAM's ViT image encoder with MaskSAM's depth embedding and 3D depth-convolution adapters.

The parameters are SAM's own modules (``patch_embed``, ``pos_embed``, ``blocks.i.*``,
``neck``), so Meta's official checkpoints load unchanged; only the forward is ours:

* fused attention (``scaled_dot_product_attention`` with SAM's decomposed relative position
  bias as an additive mask), equal to SAM's attention up to float rounding;
* a learnable depth embedding ``(1, T, 1, 1, C)`` (zero-init) added to every token;
* two :class:`DepthConvAdapter` per block, run on un-partitioned ``(B*T, h, w, C)`` tokens
  (the reference release ran them on window-partitioned tokens, mixing windows instead of
  slices): the space adapter on the attention output, the MLP adapter parallel to the MLP
  (``x = x + mlp(n2) + 0.5 * mlp_adapter(n2)``). Zero-initialised, so at init the encoder
  is exactly SAM;
* ``pos_embed`` is kept at the checkpoint's grid (64x64 for 1024 geometry) and resampled
  bilinearly at run time for other input sizes; ``rel_pos`` tables are interpolated by SAM's
  own ``get_rel_pos``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .adapters import DepthConvAdapter
from .sam_import import sam_image_encoder_module


def fused_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SAM ViT attention through ``scaled_dot_product_attention``.

    Args:
        attn: a ``segment_anything`` image-encoder ``Attention`` module (its parameters are used).
        x: ``(B, H, W, C)`` tokens.
    Returns:
        ``(B, H, W, C)``.
    """
    b, h, w, _ = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, heads, L, hd)
    bias = None
    if attn.use_rel_pos:
        get_rel_pos = sam_image_encoder_module().get_rel_pos
        rh = get_rel_pos(h, h, attn.rel_pos_h)  # (h, h, hd)
        rw = get_rel_pos(w, w, attn.rel_pos_w)  # (w, w, hd)
        rq = q.reshape(b, heads, h, w, -1)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", rq, rh)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", rq, rw)
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, heads, h * w, h * w)
        bias = bias.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
    out = out.transpose(1, 2).reshape(b, h, w, -1)
    return attn.proj(out)


class SamViTEncoder(nn.Module):
    """MaskSAM's image encoder over SAM's ViT.

    Args:
        sam_encoder: a ``segment_anything`` ``ImageEncoderViT`` (its modules are adopted).
        num_slices: T, consecutive slices per volume in the batch.
        feature_indexes: blocks whose outputs feed the prompt generator.
        adapter_reduction: bottleneck ratio of the depth-conv adapters.
        adapters: False for ``encoder_mode="frozen"``: plain SAM (no depth embedding or
            adapters), each slice encoded on its own.
    """

    def __init__(
        self,
        *,
        sam_encoder: nn.Module,
        num_slices: int,
        feature_indexes: list[int],
        adapter_reduction: int = 4,
        adapters: bool = True,
    ) -> None:
        super().__init__()
        self.img_size = sam_encoder.img_size
        self.num_slices = num_slices
        self.feature_indexes = list(feature_indexes)
        self.patch_embed = sam_encoder.patch_embed
        self.pos_embed = sam_encoder.pos_embed
        self.blocks = sam_encoder.blocks
        self.neck = sam_encoder.neck
        dim = self.patch_embed.proj.out_channels
        self.embed_dim = dim
        self.patch_size = self.patch_embed.proj.kernel_size[0]
        self.adapters = adapters
        self.depth_embed = nn.Parameter(torch.zeros(1, num_slices, 1, 1, dim)) if adapters else None
        for block in self.blocks if adapters else ():
            block.space_adapter = DepthConvAdapter(
                dim=dim, num_slices=num_slices, reduction=adapter_reduction
            )
            block.mlp_adapter = DepthConvAdapter(
                dim=dim, num_slices=num_slices, reduction=adapter_reduction
            )

    @property
    def out_stride(self) -> int:
        return self.patch_size

    @property
    def feature_channels(self) -> list[int]:
        return [self.embed_dim] * len(self.feature_indexes)

    def _pos_embed(self, h: int, w: int) -> torch.Tensor | None:
        if self.pos_embed is None:
            return None
        pos = self.pos_embed
        if pos.shape[1:3] != (h, w):
            pos = F.interpolate(
                pos.permute(0, 3, 1, 2), size=(h, w), mode="bilinear", align_corners=False
            ).permute(0, 2, 3, 1)
        return pos

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x: ``(B*T, 3, H, W)`` backbone-normalised slices.

        Returns:
            the neck output ``(B*T, 256, H/16, W/16)`` and the block outputs listed in
            ``feature_indexes``, each ``(B*T, C, H/16, W/16)``.
        """
        enc = sam_image_encoder_module()
        x = self.patch_embed(x)  # (BT, h, w, C)
        bt, h, w, c = x.shape
        pos = self._pos_embed(h, w)
        if pos is not None:
            x = x + pos
        t = self.num_slices
        if self.depth_embed is not None:
            x = (x.reshape(bt // t, t, h, w, c) + self.depth_embed).reshape(bt, h, w, c)
        features = []
        for i, block in enumerate(self.blocks):
            shortcut = x
            y = block.norm1(x)
            if block.window_size > 0:
                y, pad_hw = enc.window_partition(y, block.window_size)
                y = fused_attention(block.attn, y)
                y = enc.window_unpartition(y, block.window_size, pad_hw, (h, w))
            else:
                y = fused_attention(block.attn, y)
            if self.adapters:
                y = y + block.space_adapter(y)
            x = shortcut + y
            n2 = block.norm2(x)
            x = x + block.mlp(n2)
            if self.adapters:
                x = x + 0.5 * block.mlp_adapter(n2)
            if i in self.feature_indexes:
                features.append(x.permute(0, 3, 1, 2))
        neck = self.neck(x.permute(0, 3, 1, 2))
        return neck, features
