"""Modality stem: learned 3D convolutions as a zero residual on the backbone's fixed input path.

A randomly initialised stem would hide what the pretrained encoder expects to see. So the
encoder input is ``fixed_path(x) + stem(x)``: the fixed path maps normalised intensities to
the backbone's own input (per-slice min-max to [0, 1], three equal channels, then SAM's RGB
mean/std for SAM ViTs or nothing for LiteMedSAM), and the stem's last convolution starts at
zero, so at init the encoder sees exactly what it was trained on.
"""

from __future__ import annotations

import torch
from torch import nn

_SAM_MEAN = (123.675, 116.28, 103.53)
_SAM_STD = (58.395, 57.12, 57.375)


class ModalityStem(nn.Module):
    """``(B, C_in, T, H, W)`` normalised intensities -> ``(B, 3, T, H, W)`` backbone input.

    Args:
        in_channels: modality channels (e.g. 1 for CT, several MR sequences).
        input_scaling: ``"sam_rgb"`` (0-255 RGB standardised with SAM's mean/std) or ``"unit"``
            ([0, 1], LiteMedSAM).
        hidden: channels of the learned branch.
    """

    def __init__(self, *, in_channels: int, input_scaling: str, hidden: int = 8) -> None:
        super().__init__()
        if input_scaling not in ("sam_rgb", "unit"):
            raise ValueError(f"unknown input_scaling {input_scaling!r}")
        self.input_scaling = input_scaling
        self.learned = nn.Sequential(
            nn.Conv3d(in_channels, hidden, kernel_size=3, padding=1),
            nn.InstanceNorm3d(hidden, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(hidden, 3, kernel_size=3, padding=1),
        )
        nn.init.zeros_(self.learned[-1].weight)
        nn.init.zeros_(self.learned[-1].bias)
        mean = torch.tensor(_SAM_MEAN).view(1, 3, 1, 1, 1)
        std = torch.tensor(_SAM_STD).view(1, 3, 1, 1, 1)
        self.register_buffer("rgb_mean", mean, persistent=False)
        self.register_buffer("rgb_std", std, persistent=False)

    def fixed_path(self, x: torch.Tensor) -> torch.Tensor:
        """Per-slice, per-channel min-max to [0, 1], channel mean, 3 channels, backbone scaling."""
        lo = x.amin(dim=(-2, -1), keepdim=True)
        hi = x.amax(dim=(-2, -1), keepdim=True)
        unit = ((x - lo) / (hi - lo).clamp_min(1e-6)).mean(dim=1, keepdim=True)
        unit = unit.expand(-1, 3, -1, -1, -1)
        if self.input_scaling == "unit":
            return unit
        return (unit * 255.0 - self.rgb_mean) / self.rgb_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fixed_path(x) + self.learned(x)
