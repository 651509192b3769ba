"""3D adapters that let a frozen 2D SAM see across slices.

Both adapters take tokens of ``B*T`` slices (slices of one volume are consecutive in the batch),
mix information along the slice axis, and return a tensor of the input's shape. Their output
projection is zero-initialised, so a fresh adapter adds exactly zero: at init the network is the
pretrained SAM.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class DepthConvAdapter(nn.Module):
    """3D depth-convolution adapter (image tokens).

    ``xs = GELU(Linear(C -> C/r)(x))``; ``xt = GELU(LN(DWConv3d_3x3x3(xs)))`` over
    ``(b, C/r, T, h, w)``; ``out = Linear(C/r -> C)(xs + xt)``.

    Args:
        dim: token channels C.
        num_slices: T, the number of consecutive slices per volume in the batch.
        reduction: bottleneck ratio r.
    """

    def __init__(self, *, dim: int, num_slices: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(dim // reduction, 1)
        self.num_slices = num_slices
        self.down = nn.Linear(dim, hidden)
        self.conv = nn.Conv3d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.norm = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        """x: ``(B*T, h, w, C)`` or ``(B*T, h*w, C)`` with ``hw=(h, w)``; returns the same shape."""
        shape = x.shape
        if x.dim() == 3:
            if hw is None:
                raise ValueError("hw=(h, w) is required for (B*T, L, C) tokens")
            x = x.reshape(shape[0], hw[0], hw[1], shape[-1])
        bt, h, w, _ = x.shape
        t = self.num_slices
        if bt % t:
            raise ValueError(f"batch {bt} is not a multiple of num_slices {t}")
        xs = F.gelu(self.down(x))  # (BT, h, w, c)
        vol = xs.reshape(bt // t, t, h, w, -1).permute(0, 4, 1, 2, 3)  # (B, c, T, h, w)
        vol = self.conv(vol).permute(0, 2, 3, 4, 1).reshape(bt, h, w, -1)
        xt = F.gelu(self.norm(vol))
        return self.up(xs + xt).reshape(shape)


class DepthMLPAdapter(nn.Module):
    """3D depth-MLP adapter (decoder tokens).

    ``xs = GELU(Linear(C -> C/r)(x))``; with slices last,
    ``xt = Linear(4T -> T)(GELU(Linear(T -> 4T)(xs)))``; ``out = Linear(C/r -> C)(xs + xt)``.

    The batch is ordered ``(B, T, Q)``: ``Q`` prompts per slice, slices of one volume together.
    ``Q`` is read from the batch size at call time, so prompts can go through in chunks.
    """

    def __init__(self, *, dim: int, num_slices: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(dim // reduction, 1)
        self.num_slices = num_slices
        self.down = nn.Linear(dim, hidden)
        self.depth_in = nn.Linear(num_slices, 4 * num_slices)
        self.depth_out = nn.Linear(4 * num_slices, num_slices)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, num_prompts: int) -> torch.Tensor:
        """x: ``(B*T*Q, L, C)`` ordered (B, T, Q); returns the same shape."""
        n, length, _ = x.shape
        t = self.num_slices
        if n % (t * num_prompts):
            raise ValueError(f"batch {n} is not a multiple of T*Q = {t}*{num_prompts}")
        xs = F.gelu(self.down(x))  # (BTQ, L, c)
        b = n // (t * num_prompts)
        vol = xs.reshape(b, t, num_prompts, length, -1).permute(0, 2, 3, 4, 1)  # (B,Q,L,c,T)
        vol = self.depth_out(F.gelu(self.depth_in(vol)))
        xt = vol.permute(0, 4, 1, 2, 3).reshape(n, length, -1)
        return self.up(xs + xt)
