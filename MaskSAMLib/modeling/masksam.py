"""The composed MaskSAM network (one 3D patch of T slices in, the output dict out).

``x (B, C_in, T, H, W)`` -> modality stem -> SAM image encoder (slices folded into the batch)
-> prompt generator (auxiliary masks, boxes, classifier tokens per query) -> one SAM prompt per
query and slice (box + binarised mask) -> SAM mask decoder with a classifier token -> class
head and full-resolution output head.

The output dict (Mask2Former style) crosses every boundary unchanged:

* ``pred_logits``: ``(B, T, N, K+1)`` per-slice class logits (K includes background).
* ``pred_masks``: ``(B, N, T, H, W)`` mask logits at input resolution.
* ``aux_masks``: ``(B, N, T, 4h, 4w)`` auxiliary mask logits (h = H / encoder stride).
* ``aux_boxes``: ``(B, T, N, 4)`` auxiliary boxes, normalised xyxy.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..config import ModelConfig
from .mask_decoder import attach_decoder_adapters, decode_prompts
from .prompt_generator import PromptGenerator, prompt_boxes
from .stem import ModalityStem

# Parameters inside SAM that train: adapters and depth embeddings. Everything else in SAM is
# frozen; everything outside SAM (stem, prompt generator, heads, tokens) trains fully.
SAM_PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
SAM_TRAINABLE_MARKERS = ("adapter", "depth_embed")
# SAM parameters MaskSAM never uses (point prompts, the no-mask embedding, IoU head and the
# multimask hypernetworks): never trained, so DDP sees no parameter without a gradient.
SAM_UNUSED = (
    "prompt_encoder.point_embeddings.0.", "prompt_encoder.point_embeddings.1.",
    "prompt_encoder.not_a_point_embed.", "prompt_encoder.no_mask_embed.",
    "mask_decoder.iou_prediction_head.", "mask_decoder.output_hypernetworks_mlps.1.",
    "mask_decoder.output_hypernetworks_mlps.2.", "mask_decoder.output_hypernetworks_mlps.3.",
)


def is_trainable_name(name: str, freeze_sam: bool = True) -> bool:
    """Whether the parameter ``name`` trains under MaskSAM's recipe."""
    if name.startswith(SAM_UNUSED):
        return False
    if not freeze_sam or not name.startswith(SAM_PARTS):
        return True
    return any(marker in name for marker in SAM_TRAINABLE_MARKERS)


class OutputHead(nn.Module):
    """Low-resolution masks ``(B, N, T, 4h, 4w)`` -> full-resolution logits ``(B, N, T, H, W)``.

    ``Conv3d N -> 64``, one ``ConvTranspose3d (1, 2, 2)`` per factor of two between the mask
    resolution and the input (none for a stride-4 backbone such as LiteMedSAM), ``Conv3d 64 ->
    N``, added to the bilinearly upsampled low-resolution masks. The last convolution starts at
    zero so that at init the head is plain upsampling.
    """

    def __init__(self, *, num_queries: int, upsample: int, hidden: int = 64) -> None:
        super().__init__()
        steps = int(round(math.log2(upsample))) if upsample > 1 else 0
        if 2**steps != upsample:
            raise ValueError(f"upsampling factor {upsample} is not a power of two")
        self.upsample = upsample
        layers: list[nn.Module] = [
            nn.Conv3d(num_queries, hidden, 3, padding=1),
            nn.LeakyReLU(0.01, inplace=True),
        ]
        for _ in range(steps):
            layers += [
                nn.ConvTranspose3d(hidden, hidden, (1, 2, 2), (1, 2, 2)),
                nn.LeakyReLU(0.01, inplace=True),
            ]
        layers.append(nn.Conv3d(hidden, num_queries, 1))
        self.layers = nn.Sequential(*layers)
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, low: torch.Tensor) -> torch.Tensor:
        b, n, t, h, w = low.shape
        base = low
        if self.upsample > 1:
            size = (h * self.upsample, w * self.upsample)
            base = F.interpolate(low.reshape(b, n * t, h, w), size=size, mode="bilinear",
                                 align_corners=False).reshape(b, n, t, *size)
        return base + self.layers(low)


class MaskSAM(nn.Module):
    """MaskSAM over a SAM backbone.

    Args:
        config: the model configuration.
        image_encoder: ``forward(x (B*T, 3, H, W)) -> (neck (B*T, D, h, w), features)``, with
            ``feature_channels`` and ``out_stride`` attributes (SamViTEncoder, TinyViTEncoder).
        prompt_encoder: SAM ``PromptEncoder`` (its parameters as in the checkpoint).
        mask_decoder: SAM ``MaskDecoder`` (adapters are attached here).
    """

    def __init__(
        self,
        *,
        config: ModelConfig,
        image_encoder: nn.Module,
        prompt_encoder: nn.Module,
        mask_decoder: nn.Module,
    ) -> None:
        super().__init__()
        self.config = config
        t, n, k = config.num_slices, config.num_queries, config.num_classes
        dim = config.backbone.prompt_embed_dim
        self.num_slices, self.num_queries, self.num_classes = t, n, k
        self.img_size = config.img_size
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        attach_decoder_adapters(mask_decoder, num_slices=t, reduction=config.adapter_reduction)
        self.stem = ModalityStem(
            in_channels=config.in_channels, input_scaling=config.backbone.input_scaling
        )
        self.prompt_generator = PromptGenerator(
            neck_channels=dim,
            feature_channels=list(image_encoder.feature_channels),
            stem_channels=3,
            num_queries=n,
            token_dim=dim,
            stage_channels=list(config.prompt_generator_channels),
            num_slices=t,
        )
        self.global_class_token = nn.Parameter(torch.zeros(1, dim))
        nn.init.normal_(self.global_class_token, std=0.02)
        self.decoder_depth_pe = nn.Parameter(torch.zeros(t, dim, 1, 1))
        self.class_head = nn.Linear(dim, k + 1)
        mask_res = 4 * (config.img_size // image_encoder.out_stride)
        self.output_head = OutputHead(num_queries=n, upsample=config.img_size // mask_res)
        self.decoder_chunk: int | None = None  # queries per decoder pass (None: all)
        self.set_trainable()

    def set_trainable(self) -> None:
        """Freeze SAM except adapters and depth embeddings (``config.freeze_sam``); train
        everything else."""
        for name, param in self.named_parameters():
            param.requires_grad_(is_trainable_name(name, self.config.freeze_sam))

    def train(self, mode: bool = True) -> MaskSAM:
        super().train(mode)
        # Frozen BatchNorm (LiteMedSAM's TinyViT) must keep its running statistics.
        for module in self.image_encoder.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: ``(B, C_in, T, H, W)`` normalised intensities. Returns the output dict."""
        b, _, t, h_in, w_in = x.shape
        if t != self.num_slices or h_in != self.img_size or w_in != self.img_size:
            raise ValueError(
                f"expected (B, C, {self.num_slices}, {self.img_size}, {self.img_size}) input, "
                f"got {tuple(x.shape)}"
            )
        stem = self.stem(x)
        neck, features = self.image_encoder(stem.transpose(1, 2).reshape(b * t, 3, h_in, w_in))
        aux = self.prompt_generator(neck, features, stem)
        aux_masks, aux_boxes, aux_tokens = aux["aux_masks"], aux["aux_boxes"], aux["aux_tokens"]
        boxes = prompt_boxes(aux_boxes, aux_masks)

        pe_encoder = self.prompt_encoder
        h, w = neck.shape[-2:]
        pe = pe_encoder.pe_layer((h, w)).unsqueeze(0).to(neck.dtype)  # (1, D, h, w)
        image_pe = (pe + self.decoder_depth_pe).repeat(b, 1, 1, 1)  # (B*T, D, h, w)
        scale = torch.tensor(
            [pe_encoder.input_image_size[1], pe_encoder.input_image_size[0]] * 2,
            dtype=boxes.dtype, device=boxes.device,
        )
        n = self.num_queries
        chunk = self.decoder_chunk or n
        logits, lows = [], []
        for q0 in range(0, n, chunk):
            q1 = min(n, q0 + chunk)
            qc = q1 - q0
            sparse = pe_encoder._embed_boxes(boxes[:, :, q0:q1].reshape(-1, 4) * scale)
            masks_in = aux_masks[:, q0:q1].transpose(1, 2).reshape(-1, 1, *aux_masks.shape[-2:])
            dense = pe_encoder._embed_masks((masks_in > 0).to(neck.dtype))
            tokens = (self.global_class_token + aux_tokens[:, :, q0:q1]).reshape(-1, neck.shape[1])
            low, cls = decode_prompts(
                self.mask_decoder,
                image_embeddings=neck,
                image_pe=image_pe,
                sparse_embeddings=sparse.to(neck.dtype),
                dense_embeddings=dense,
                class_tokens=tokens,
                num_prompts=qc,
            )
            logits.append(self.class_head(cls).reshape(b, t, qc, -1))
            lows.append(low.reshape(b, t, qc, *low.shape[-2:]))
        low_masks = torch.cat(lows, dim=2).transpose(1, 2)  # (B, N, T, 4h, 4w)
        return {
            "pred_logits": torch.cat(logits, dim=2),
            "pred_masks": self.output_head(low_masks),
            "aux_masks": aux_masks,
            "aux_boxes": aux_boxes,
        }


def pad_slices(x: torch.Tensor, num_slices: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ``x (B, C, t, H, W)`` with zero slices to ``T = num_slices`` (never change T).

    Returns:
        the padded tensor and a ``(T,)`` bool mask of the real slices.
    """
    t = x.shape[2]
    if t > num_slices:
        raise ValueError(f"{t} slices do not fit a window of {num_slices}")
    valid = torch.arange(num_slices, device=x.device) < t
    if t == num_slices:
        return x, valid
    pad = x.new_zeros(*x.shape[:2], num_slices - t, *x.shape[3:])
    return torch.cat([x, pad], dim=2), valid
