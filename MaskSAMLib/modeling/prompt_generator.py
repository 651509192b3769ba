"""MaskSAM's 3D prompt generator: auxiliary masks, boxes and classifier tokens per query.

A U-Net-style 3D decoder over the encoder's neck output and multi-level features. It decodes
from the embedding grid (``h = H / stride``) up to SAM's mask-input resolution (``4h``: H/4 for
SAM ViTs, H for LiteMedSAM) in three stages joined by ``ConvTranspose3d`` with kernel and
stride ``(1, 2, 2)``; each encoder feature is projected and resampled to the stage it feeds
(deepest features to the coarsest stage), and the stem output joins the last stage. The
reference release decodes to full resolution; we stop at the resolution SAM consumes (the
auxiliary masks are mask prompts), which saves the two most expensive 3D stages.

Outputs (``N`` queries), in the network's one axis order ``(B, N, T, ...)``
(:data:`MaskSAMLib.modeling.masksam.OUTPUT_AXES`):

* ``aux_masks``: ``(B, N, T, 4h, 4w)`` logits (a 1x1x1 convolution).
* ``aux_boxes``: ``(B, N, T, 4)`` normalised xyxy, always valid: sigmoid ``(lx, ly, px, py)``
  from pooled coarse features, ``x1 = lx, x2 = lx + px * (1 - lx)`` (same for y).
* ``aux_tokens``: ``(B, N, T, D)``: a 1x1x1 convolution to ``N`` maps, average-pooled per slice
  to ``sqrt(D) x sqrt(D)`` and flattened (16x16 = 256 for SAM's decoder).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class ConvBlock3d(nn.Sequential):
    """Two (Conv3d kx3x3, InstanceNorm3d, LeakyReLU) layers (``k = depth_kernel``: 3, or 1 for
    per-slice 2D convolutions)."""

    def __init__(self, in_channels: int, out_channels: int, depth_kernel: int = 3) -> None:
        kernel, pad = (depth_kernel, 3, 3), (depth_kernel // 2, 1, 1)
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel, padding=pad),
            nn.InstanceNorm3d(out_channels, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(out_channels, out_channels, kernel, padding=pad),
            nn.InstanceNorm3d(out_channels, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
        )


def _stage_of(feature_rank: int, num_features: int, num_stages: int) -> int:
    """Stage fed by the feature of rank ``feature_rank`` (0 = deepest)."""
    return min(feature_rank * num_stages // max(num_features, 1), num_stages - 1)


class PromptGenerator(nn.Module):
    """Auxiliary masks, boxes and classifier tokens from encoder features.

    Args:
        neck_channels: channels of the encoder's neck output (SAM: 256).
        feature_channels: channels of each multi-level feature, shallowest first.
        stem_channels: channels of the stem output joined at the last stage.
        num_queries: N.
        token_dim: D, the decoder's token width (a square number).
        stage_channels: channels of the decoder stages, coarse to fine (one to three stages;
            the auxiliary masks come at ``h * 2 ** (stages - 1)``).
        num_slices: T.
        depth_kernel: kernel of the convolutions along the slices (3, or 1: per slice).
    """

    def __init__(
        self,
        *,
        neck_channels: int,
        feature_channels: list[int],
        stem_channels: int,
        num_queries: int,
        token_dim: int,
        stage_channels: list[int],
        num_slices: int,
        depth_kernel: int = 3,
    ) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.num_slices = num_slices
        self.num_stages = len(stage_channels)
        self.token_side = math.isqrt(token_dim)
        deepest_first = list(reversed(feature_channels))
        self.feature_stage = [
            _stage_of(r, len(deepest_first), self.num_stages) for r in range(len(deepest_first))
        ]
        self.feature_proj = nn.ModuleList(
            nn.Conv2d(c, stage_channels[s], 1)
            for c, s in zip(deepest_first, self.feature_stage, strict=True)
        )
        self.up = nn.ModuleList(
            nn.ConvTranspose3d(stage_channels[s - 1], stage_channels[s], (1, 2, 2), (1, 2, 2))
            for s in range(1, self.num_stages)
        )
        blocks = []
        for s, channels in enumerate(stage_channels):
            n_feats = sum(1 for fs in self.feature_stage if fs == s)
            incoming = (neck_channels if s == 0 else channels) + n_feats * channels
            if s == self.num_stages - 1:
                incoming += stem_channels
            blocks.append(ConvBlock3d(incoming, channels, depth_kernel))
        self.blocks = nn.ModuleList(blocks)
        self.mask_head = nn.Conv3d(stage_channels[-1], num_queries, 1)
        self.token_head = nn.Conv3d(stage_channels[0], num_queries, 1)
        self.box_pool = 8
        self.box_reduce = nn.Conv3d(stage_channels[0], 32, 1)
        self.box_head = nn.Sequential(
            nn.Linear(32 * self.box_pool**2, 256),
            nn.GELU(),
            nn.Linear(256, 4 * num_queries),
        )

    def _to_3d(self, x: torch.Tensor) -> torch.Tensor:
        """``(B*T, C, h, w)`` -> ``(B, C, T, h, w)``."""
        bt, c, h, w = x.shape
        t = self.num_slices
        return x.reshape(bt // t, t, c, h, w).transpose(1, 2)

    def forward(
        self, neck: torch.Tensor, features: list[torch.Tensor], stem: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """neck ``(B*T, C0, h, w)``; features shallowest first, each ``(B*T, Ci, hi, wi)``;
        stem ``(B, 3, T, H, W)``. Returns aux_masks, aux_boxes, aux_tokens (see module doc)."""
        h, w = neck.shape[-2:]
        deepest_first = list(reversed(features))
        x = self._to_3d(neck)
        coarse = None
        for s in range(self.num_stages):
            if s > 0:
                x = self.up[s - 1](x)
            size = (h * 2**s, w * 2**s)
            parts = [x]
            for proj, fs, feat in zip(
                self.feature_proj, self.feature_stage, deepest_first, strict=True
            ):
                if fs != s:
                    continue
                f = proj(feat)
                if f.shape[-2:] != size:
                    f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                parts.append(self._to_3d(f))
            if s == self.num_stages - 1:
                st = stem
                if st.shape[-2:] != size:
                    b, c, t = st.shape[:3]
                    st = F.adaptive_avg_pool2d(st.reshape(b, c * t, *st.shape[-2:]), size)
                    st = st.reshape(b, c, t, *size)
                parts.append(st)
            x = self.blocks[s](torch.cat(parts, dim=1))
            if s == 0:
                coarse = x
        b, _, t = coarse.shape[:3]
        n = self.num_queries
        aux_masks = self.mask_head(x)  # (B, N, T, 4h, 4w)

        tok = self.token_head(coarse)  # (B, N, T, h, w)
        tok = F.adaptive_avg_pool2d(tok.reshape(b, n * t, h, w), self.token_side)
        aux_tokens = tok.reshape(b, n, t, -1)  # (B, N, T, D)

        pooled = self.box_reduce(coarse).transpose(1, 2)  # (B, T, 32, h, w)
        pooled = F.adaptive_avg_pool2d(pooled.reshape(b * t, -1, h, w), self.box_pool)
        raw = torch.sigmoid(self.box_head(pooled.reshape(b * t, -1))).reshape(b, t, n, 4)
        raw = raw.transpose(1, 2)  # (B, N, T, 4)
        lx, ly, px, py = raw.unbind(-1)
        aux_boxes = torch.stack([lx, ly, lx + px * (1 - lx), ly + py * (1 - ly)], dim=-1)
        return {"aux_masks": aux_masks, "aux_boxes": aux_boxes, "aux_tokens": aux_tokens}


def boxes_from_masks(mask_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised xyxy boxes of thresholded masks.

    Args:
        mask_logits: ``(..., h, w)``.
    Returns:
        boxes ``(..., 4)`` in [0, 1] (pixel edges: a full mask gives (0, 0, 1, 1)) and
        ``nonempty (...)`` bool.
    """
    fg = mask_logits > 0
    h, w = fg.shape[-2:]
    rows = fg.any(dim=-1)  # (..., h)
    cols = fg.any(dim=-2)  # (..., w)
    nonempty = rows.any(dim=-1)
    ar_h = torch.arange(h, device=fg.device)
    ar_w = torch.arange(w, device=fg.device)
    y1 = torch.where(rows, ar_h, h).amin(dim=-1)
    y2 = torch.where(rows, ar_h, -1).amax(dim=-1) + 1
    x1 = torch.where(cols, ar_w, w).amin(dim=-1)
    x2 = torch.where(cols, ar_w, -1).amax(dim=-1) + 1
    boxes = torch.stack([x1 / w, y1 / h, x2 / w, y2 / h], dim=-1).to(mask_logits.dtype)
    return boxes.clamp(0, 1), nonempty


def prompt_boxes(aux_boxes: torch.Tensor, aux_masks: torch.Tensor) -> torch.Tensor:
    """The box each query prompts SAM with: the predicted box averaged with its mask's box.

    Args:
        aux_boxes: ``(B, N, T, 4)`` normalised xyxy.
        aux_masks: ``(B, N, T, h, w)`` logits.
    Returns:
        ``(B, N, T, 4)``; where a mask is empty (normal early in training) the predicted box alone.
    """
    mask_boxes, nonempty = boxes_from_masks(aux_masks.detach())
    averaged = 0.5 * (aux_boxes + mask_boxes)
    return torch.where(nonempty[..., None], averaged, aux_boxes)
