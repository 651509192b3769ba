"""MaskFormer semantic inference: class probabilities from mask classification outputs."""

from __future__ import annotations

import torch


def semantic_probabilities(pred_logits: torch.Tensor, pred_masks: torch.Tensor) -> torch.Tensor:
    """Per-class scores ``sum_q softmax(logits_q)[c] * sigmoid(mask_q)``.

    Args:
        pred_logits: ``(B, N, T, K+1)`` per-slice class logits (last = no object).
        pred_masks: ``(B, N, T, H, W)`` mask logits.
    Returns:
        ``(B, K, T, H, W)`` class scores (argmax over K gives the label map).
    """
    cls = torch.softmax(pred_logits.float(), dim=-1)[..., :-1]
    return torch.einsum("bntk,bnthw->bkthw", cls, torch.sigmoid(pred_masks.float()))


def semantic_labels(pred_logits: torch.Tensor, pred_masks: torch.Tensor) -> torch.Tensor:
    """``(B, T, H, W)`` class indices (0 = background)."""
    return semantic_probabilities(pred_logits, pred_masks).argmax(dim=1)
