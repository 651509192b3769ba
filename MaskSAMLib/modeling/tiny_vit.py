"""LiteMedSAM's TinyViT image encoder, key-compatible with ``lite_medsam.pth`` (image_encoder.*).

Written from the published architecture (TinyViT, Wu et al. 2022; MobileSAM / LiteMedSAM
variants), not copied. LiteMedSAM differs from the ImageNet TinyViT and from MobileSAM:

* the patch embedding is two 1x1 Conv+BN layers with stride 1, so stage 0 runs at the full
  input resolution (256x256);
* stage resolutions are 256 -> 128 -> 64 -> 64: the PatchMerging that feeds the last stage has
  stride 1;
* a SAM-style neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) maps 320 -> 256 channels, so
  the image embedding is 256 x 64 x 64 at 256 input (output stride 4, not 16).

The stride is not stored in the weights: a wrongly strided model loads the same keys silently.

Layout (parameter names match the checkpoint after stripping ``image_encoder.``)::

    patch_embed.seq.{0,2}.{c,bn}                    Conv+BN, GELU, Conv+BN (1x1, stride 1)
    layers.0.blocks.i.conv{1,2,3}.{c,bn}            MBConv (1x1 expand, 3x3 depthwise, 1x1)
    layers.{0,1,2}.downsample.conv{1,2,3}.{c,bn}    PatchMerging (1x1, 3x3 dw strided, 1x1)
    layers.{1,2,3}.blocks.j.attn.{attention_biases,norm,qkv,proj}
    layers.{1,2,3}.blocks.j.mlp.{norm,fc1,fc2}
    layers.{1,2,3}.blocks.j.local_conv.{c,bn}       3x3 depthwise Conv+BN
    neck.{0,1,2,3}

BatchNorm layers hold running statistics: a frozen encoder must stay in eval mode while the rest
of the network trains. Call :meth:`TinyViT.freeze_batchnorm_stats` once (it survives later
``.train()`` calls) or :func:`set_batchnorm_eval` after every ``.train()``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "Attention",
    "Conv2dBN",
    "LayerNorm2d",
    "MBConv",
    "Mlp",
    "PatchEmbed",
    "PatchMerging",
    "TinyViT",
    "TinyViTBlock",
    "set_batchnorm_eval",
]


def set_batchnorm_eval(module: nn.Module) -> nn.Module:
    """Put every BatchNorm layer inside ``module`` in eval mode (running stats used, not updated).

    ``module.train()`` switches BatchNorm back to training mode, so call this after it, or use
    :meth:`TinyViT.freeze_batchnorm_stats`, which re-applies it on every ``train()`` call.
    Returns ``module`` for chaining.
    """
    for sub in module.modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            sub.eval()
    return module


class Conv2dBN(nn.Module):
    """``Conv2d`` without bias followed by ``BatchNorm2d`` (keys ``c.*`` and ``bn.*``).

    ``(B, C_in, H, W) -> (B, C_out, H', W')``.
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        *,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.c = nn.Conv2d(
            in_chans,
            out_chans,
            kernel_size,
            stride=stride,
            padding=padding,
            groups=groups,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(out_chans)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c(x))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of ``(B, C, H, W)`` maps (SAM's neck norm, eps 1e-6)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class PatchEmbed(nn.Module):
    """LiteMedSAM stem: ``Conv1x1+BN -> GELU -> Conv1x1+BN``, stride 1.

    ``(B, in_chans, H, W) -> (B, embed_dim, H, W)``.
    """

    def __init__(self, *, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, embed_dim // 2),
            nn.GELU(),
            Conv2dBN(embed_dim // 2, embed_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block of stage 0.

    ``y = GELU(x + BN(Conv1x1(GELU(BN(DWConv3x3(GELU(BN(Conv1x1(x)))))))))``; the last BN is
    zero-initialised so a fresh block is ``GELU(x)``. ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, *, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden)
        self.conv2 = Conv2dBN(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.conv3 = Conv2dBN(hidden, dim, bn_weight_init=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv1(x))
        y = F.gelu(self.conv2(y))
        y = self.conv3(y)
        return F.gelu(x + y)


class PatchMerging(nn.Module):
    """Downsampling between stages: ``Conv1x1+BN, GELU, DWConv3x3(stride)+BN, GELU, Conv1x1+BN``.

    ``(B, dim, H, W) -> (B, out_dim, H/stride, W/stride)`` (3x3 conv, padding 1).
    """

    def __init__(self, *, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(
            out_dim, out_dim, kernel_size=3, stride=stride, padding=1, groups=out_dim
        )
        self.conv3 = Conv2dBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        return self.conv3(x)


def _relative_offset_index(window_size: int) -> torch.Tensor:
    """``(N, N)`` index (N = window_size**2) into the per-offset bias table.

    For tokens at (r1, c1) and (r2, c2) the offset ``(|r1-r2|, |c1-c2|)`` has index
    ``|r1-r2| * window_size + |c1-c2|`` -- the order in which TinyViT enumerates offsets (first
    seen when scanning pairs row-major, which for the first token visits every offset in
    row-major order), so the checkpoint's ``attention_biases`` columns line up.
    """
    coords = torch.arange(window_size)
    rows = coords.repeat_interleave(window_size)  # (N,)
    cols = coords.repeat(window_size)  # (N,)
    d_rows = (rows[:, None] - rows[None, :]).abs()
    d_cols = (cols[:, None] - cols[None, :]).abs()
    return d_rows * window_size + d_cols


class Attention(nn.Module):
    """Multi-head self-attention in one window with a learned bias per relative offset.

    ``LayerNorm -> qkv -> softmax(q k^T / sqrt(d_k) + bias) v -> proj``. The ``qkv`` output is
    laid out per head as ``[q_h | k_h | v_h]`` (not all q, then all k, then all v).
    ``(B_w, N, C) -> (B_w, N, C)`` with ``N = window_size**2`` tokens per window.
    """

    def __init__(self, *, dim: int, num_heads: int, window_size: int, attn_ratio: float = 1.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.key_dim = dim // num_heads
        self.value_dim = int(attn_ratio * self.key_dim)
        self.scale = self.key_dim**-0.5
        self.window_size = window_size
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, num_heads * (2 * self.key_dim + self.value_dim))
        self.proj = nn.Linear(num_heads * self.value_dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        self.register_buffer(
            "attention_bias_idxs", _relative_offset_index(window_size), persistent=False
        )
        self.attention_bias_idxs: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        if n != self.window_size**2:
            raise ValueError(f"expected {self.window_size**2} tokens per window, got {n}")
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, -1)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=3)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B_w, heads, N, d)
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)  # (heads, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, n, self.num_heads * self.value_dim)
        return self.proj(out)


class Mlp(nn.Module):
    """``LayerNorm -> Linear(C -> hidden) -> GELU -> Linear(hidden -> C)``: ``(..., C) -> same``."""

    def __init__(self, *, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


def _window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(B, H, W, C) -> (B * nH * nW, ws*ws, C)``, zero-padding H and W up to multiples of ws.

    Returns the windows and the padded size ``(Hp, Wp)``. Padding happens on the raw tokens
    (before the attention's LayerNorm), and padded tokens take part in attention as keys, as in
    TinyViT.
    """
    b, h, w, c = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    nh, nw = hp // window_size, wp // window_size
    x = x.view(b, nh, window_size, nw, window_size, c).transpose(2, 3)
    return x.reshape(b * nh * nw, window_size * window_size, c), (hp, wp)


def _window_unpartition(
    windows: torch.Tensor, window_size: int, padded_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`_window_partition`: ``(B*nH*nW, ws*ws, C) -> (B, H, W, C)``."""
    hp, wp = padded_hw
    nh, nw = hp // window_size, wp // window_size
    c = windows.shape[-1]
    b = windows.shape[0] // (nh * nw)
    x = windows.view(b, nh, nw, window_size, window_size, c).transpose(2, 3)
    x = x.reshape(b, hp, wp, c)
    h, w = hw
    if hp != h or wp != w:
        x = x[:, :h, :w]
    return x


class TinyViTBlock(nn.Module):
    """TinyViT attention block with optional MaskSAM depth adapters.

    On tokens ``x: (B, H*W, C)`` (``B`` = slices folded into the batch)::

        a = unwindow(attn(window(x)))                 # windowed attention, zero padding
        a = a + space_adapter(a, hw)                  # if space_adapter is set
        x = x + a
        x = tokens(local_conv(image(x)))              # 3x3 depthwise Conv+BN, no residual
        x = x + mlp(x) + 0.5 * mlp_adapter(mlp.norm(x), hw)   # adapter term if set

    Adapter placement (our choice): the space adapter sees the un-windowed attention output, so
    its depth convolution mixes the same pixel across slices (never different windows). The MLP
    adapter runs in parallel to the MLP *after* the local conv, because that is the MLP's input
    in TinyViT; it receives the MLP's normalised input ``mlp.norm(x)`` (TinyViT keeps the
    pre-MLP LayerNorm inside ``mlp``), matching MaskSAM's ``mlp_adapter(norm2(x))``. With both
    adapters ``None`` (default, and no state-dict keys) the block is plain TinyViT.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float = 4.0,
        local_conv_size: int = 3,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.attn = Attention(dim=dim, num_heads=num_heads, window_size=window_size)
        self.mlp = Mlp(dim=dim, hidden_dim=int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(
            dim, dim, kernel_size=local_conv_size, padding=local_conv_size // 2, groups=dim
        )
        self.space_adapter: nn.Module | None = None
        self.mlp_adapter: nn.Module | None = None

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """``x: (B, H*W, C)`` tokens of an ``hw = (H, W)`` grid; returns the same shape."""
        b, length, c = x.shape
        h, w = hw
        if length != h * w:
            raise ValueError(f"{length} tokens do not form a {h}x{w} grid")
        windows, padded_hw = _window_partition(x.view(b, h, w, c), self.window_size)
        a = _window_unpartition(self.attn(windows), self.window_size, padded_hw, hw)
        a = a.reshape(b, length, c)
        if self.space_adapter is not None:
            a = a + self.space_adapter(a, hw)
        x = x + a

        img = x.transpose(1, 2).reshape(b, c, h, w)
        x = self.local_conv(img).flatten(2).transpose(1, 2)  # (B, H*W, C)

        out = x + self.mlp(x)
        if self.mlp_adapter is not None:
            out = out + 0.5 * self.mlp_adapter(self.mlp.norm(x), hw)
        return out


class ConvStage(nn.Module):
    """Stage 0: MBConv blocks then an optional PatchMerging; ``(B, C, H, W) -> (B, C', H', W')``."""

    def __init__(
        self, *, dim: int, depth: int, expand_ratio: float, downsample: PatchMerging | None
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            MBConv(dim=dim, expand_ratio=expand_ratio) for _ in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class AttentionStage(nn.Module):
    """Stages 1-3: TinyViT blocks then an optional PatchMerging.

    ``(B, C, H, W) -> (B, C', H', W')`` (tokens inside, image maps at the boundaries).
    """

    def __init__(
        self,
        *,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        local_conv_size: int,
        downsample: PatchMerging | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(
                dim=dim,
                num_heads=num_heads,
                window_size=window_size,
                mlp_ratio=mlp_ratio,
                local_conv_size=local_conv_size,
            )
            for _ in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        for block in self.blocks:
            tokens = block(tokens, (h, w))
        x = tokens.transpose(1, 2).reshape(b, c, h, w)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class TinyViT(nn.Module):
    """LiteMedSAM's TinyViT image encoder (about 5.7M parameters).

    ``forward(x: (B, in_chans, img_size, img_size)) -> (B, out_chans, img_size/4, img_size/4)``:
    with the defaults ``(B, 3, 256, 256) -> (B, 256, 64, 64)``. Input as LiteMedSAM expects:
    min-max scaled to [0, 1], 3 channels.

    Stage resolutions (defaults): stem 256 -> stage 0 at 256 (64 ch) -> PatchMerging stride 2 ->
    stage 1 at 128 (128 ch) -> stride 2 -> stage 2 at 64 (160 ch) -> stride 1 -> stage 3 at 64
    (320 ch) -> neck (256 ch). The PatchMerging into the last stage has stride 1, the others 2.
    ``window_sizes[0]`` is unused (stage 0 is convolutional), kept for config compatibility.

    Depth adapters: every :class:`TinyViTBlock` (stages 1-3) has ``space_adapter`` and
    ``mlp_adapter`` attributes, ``None`` by default; see :class:`TinyViTBlock`.
    """

    def __init__(
        self,
        *,
        img_size: int = 256,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        n = len(embed_dims)
        if n < 2 or not (len(depths) == len(num_heads) == len(window_sizes) == n):
            raise ValueError(
                "embed_dims, depths, num_heads and window_sizes need the same length (>= 2)"
            )
        strides = [2] * (n - 2) + [1]  # PatchMerging after stage i (i < n-1)
        total_stride = 1
        for s in strides:
            total_stride *= s
        if img_size % total_stride:
            raise ValueError(f"img_size {img_size} is not a multiple of {total_stride}")
        self.img_size = img_size
        self.in_chans = in_chans
        self.embed_dims = tuple(embed_dims)
        self.out_chans = out_chans
        self.embedding_size = img_size // total_stride
        self.batchnorm_frozen = False

        self.patch_embed = PatchEmbed(in_chans=in_chans, embed_dim=embed_dims[0])
        layers: list[nn.Module] = []
        for i in range(n):
            downsample = (
                PatchMerging(dim=embed_dims[i], out_dim=embed_dims[i + 1], stride=strides[i])
                if i < n - 1
                else None
            )
            if i == 0:
                layers.append(
                    ConvStage(
                        dim=embed_dims[0],
                        depth=depths[0],
                        expand_ratio=mbconv_expand_ratio,
                        downsample=downsample,
                    )
                )
            else:
                layers.append(
                    AttentionStage(
                        dim=embed_dims[i],
                        depth=depths[i],
                        num_heads=num_heads[i],
                        window_size=window_sizes[i],
                        mlp_ratio=mlp_ratio,
                        local_conv_size=local_conv_size,
                        downsample=downsample,
                    )
                )
        self.layers = nn.ModuleList(layers)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def blocks(self) -> list[TinyViTBlock]:
        """All attention blocks (stages 1-3), shallowest first: where depth adapters go."""
        return [m for m in self.modules() if isinstance(m, TinyViTBlock)]

    def freeze_batchnorm_stats(self, frozen: bool = True) -> None:
        """Keep every BatchNorm in eval mode, now and after any later ``train()`` call.

        Use when the encoder (or part of it) is frozen while other modules train, so the
        running statistics loaded from the checkpoint do not drift. ``frozen=False`` undoes it
        (BatchNorm then follows the module's mode again).
        """
        self.batchnorm_frozen = frozen
        if frozen:
            set_batchnorm_eval(self)
        else:
            self.train(self.training)

    def train(self, mode: bool = True) -> TinyViT:
        super().train(mode)
        if self.batchnorm_frozen:
            set_batchnorm_eval(self)
        return self

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image embedding and stage outputs.

        ``x: (B, in_chans, img_size, img_size)``. Returns ``(neck, stages)``: ``neck`` is
        ``(B, out_chans, img_size/4, img_size/4)``; ``stages`` holds the output of each stage
        *after* its PatchMerging, shallowest first. Defaults at 256 input:
        ``(B,128,128,128), (B,160,64,64), (B,320,64,64), (B,320,64,64)``.
        """
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected (B, {self.in_chans}, H, W) input, got {tuple(x.shape)}")
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"TinyViT expects {self.img_size}x{self.img_size} input, got "
                f"{x.shape[-2]}x{x.shape[-1]} (resize the longest side and pad)"
            )
        x = self.patch_embed(x)
        stages: list[torch.Tensor] = []
        for layer in self.layers:
            x = layer(x)
            stages.append(x)
        return self.neck(x), stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, img_size, img_size) -> (B, out_chans, img_size/4, img_size/4)``."""
        return self.forward_features(x)[0]
