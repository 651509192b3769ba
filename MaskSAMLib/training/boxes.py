"""Box helpers: tight boxes of binary masks and generalized IoU.

Boxes are ``xyxy`` and normalized to ``[0, 1]``: ``x`` runs along W, ``y`` along H. Pixel-edge
convention: pixel ``(i, j)`` (row ``i``, column ``j``) covers ``[j/W, (j+1)/W] x [i/H, (i+1)/H]``,
so the tight box of columns ``j0..j1`` and rows ``i0..i1`` (inclusive) is
``(j0/W, i0/H, (j1+1)/W, (i1+1)/H)`` and a mask covering the whole slice gives ``(0, 0, 1, 1)``.
This is the same convention as ``grid_sample(..., align_corners=False)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "box_xyxy_from_mask",
    "generalized_box_iou",
    "generalized_box_iou_elementwise",
    "spans_from_presence",
]

_EPS = 1e-7


def spans_from_presence(presence: Tensor) -> tuple[Tensor, Tensor]:
    """First index and one-past-last index of the True entries along the second-to-last dim.

    Args:
        presence: ``(..., L, C)`` bool, e.g. "row ``l`` contains class ``c``".

    Returns:
        ``(start, stop)``, each ``(..., C)`` int64; both are 0 where a column has no True entry.
    """
    length = presence.shape[-2]
    pos = torch.arange(length, device=presence.device).view(length, 1)
    any_ = presence.any(dim=-2)
    start = torch.where(presence, pos, length).amin(dim=-2)
    stop = torch.where(presence, pos + 1, 0).amax(dim=-2)
    zero = torch.zeros_like(start)
    return torch.where(any_, start, zero), torch.where(any_, stop, zero)


def box_xyxy_from_mask(masks: Tensor) -> Tensor:
    """Tight normalized xyxy box of each binary mask (pixel-edge convention, see module doc).

    Args:
        masks: ``(..., H, W)``; nonzero / True pixels belong to the mask.

    Returns:
        ``(..., 4)`` float32 boxes in ``[0, 1]``; an empty mask gives ``(0, 0, 0, 0)``.
    """
    if masks.dim() < 2:
        raise ValueError(f"masks must be (..., H, W), got shape {tuple(masks.shape)}")
    m = masks != 0
    height, width = m.shape[-2:]
    rows = m.any(dim=-1).unsqueeze(-1)  # (..., H, 1)
    cols = m.any(dim=-2).unsqueeze(-1)  # (..., W, 1)
    y0, y1 = spans_from_presence(rows)
    x0, x1 = spans_from_presence(cols)
    boxes = torch.cat([x0, y0, x1, y1], dim=-1).float()
    return boxes / boxes.new_tensor([width, height, width, height])


def _giou(a: Tensor, b: Tensor) -> Tensor:
    """Generalized IoU of broadcastable box tensors ``(..., 4)`` -> ``(...)``.

    Inverted boxes (``x1 < x0``) count as empty; denominators are clamped so that degenerate
    boxes give finite values.
    """
    a = a.float()
    b = b.float()
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=_EPS)
    lt_c = torch.minimum(a[..., :2], b[..., :2])
    rb_c = torch.maximum(a[..., 2:], b[..., 2:])
    wh_c = (rb_c - lt_c).clamp(min=0)
    area_c = wh_c[..., 0] * wh_c[..., 1]
    return iou - (area_c - union) / area_c.clamp(min=_EPS)


def generalized_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of xyxy boxes.

    Args:
        a: ``(..., N, 4)`` boxes.
        b: ``(..., M, 4)`` boxes (leading dims broadcast with ``a``'s).

    Returns:
        ``(..., N, M)`` float32 GIoU in ``[-1, 1]``.
    """
    return _giou(a.unsqueeze(-2), b.unsqueeze(-3))


def generalized_box_iou_elementwise(a: Tensor, b: Tensor) -> Tensor:
    """Generalized IoU of corresponding boxes: ``(..., 4)``, ``(..., 4)`` -> ``(...)``."""
    return _giou(a, b)
