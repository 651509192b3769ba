"""The composed MaskSAM network (one 3D patch of T slices in, the output dict out).

``x (B, C_in, T, H, W)`` -> modality stem -> SAM image encoder (slices folded into the batch)
-> prompt generator (auxiliary masks, boxes, classifier tokens per query) -> one SAM prompt per
query and slice (box + binarised mask) -> SAM mask decoder with a classifier token -> class
head and full-resolution output head.

The output dict (Mask2Former style) crosses every boundary unchanged, and every key has one
axis order, **batch, query, slice, then the key's own axes** ``(B, N, T, ...)`` (Mask2Former's
``(B, Q, ...)`` with the slice axis after the query, as the masks have it for the 3D heads):

* ``pred_logits``: ``(B, N, T, K+1)`` per-slice class logits (K includes background).
* ``pred_masks``: ``(B, N, T, H, W)`` mask logits at input resolution.
* ``aux_masks``: ``(B, N, T, 4h, 4w)`` auxiliary mask logits (h = H / encoder stride).
* ``aux_boxes``: ``(B, N, T, 4)`` auxiliary boxes, normalised xyxy.

:data:`OUTPUT_AXES` names them; the training losses match per slice and transpose to
``(B, T, N, ...)`` inside.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..config import ModelConfig
from .adapters import DepthConvAdapter
from .mask_decoder import attach_decoder_adapters, decode_prompts
from .prompt_generator import PromptGenerator, prompt_boxes
from .stem import ModalityStem

#: Axis names of every key of the output dict (module docstring): one order for all.
OUTPUT_AXES = {
    "pred_logits": ("B", "N", "T", "K+1"),
    "pred_masks": ("B", "N", "T", "H", "W"),
    "aux_masks": ("B", "N", "T", "h", "w"),
    "aux_boxes": ("B", "N", "T", "xyxy"),
}

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
            depth_kernel=config.prompt_generator_depth_kernel,
        )
        # encoder_mode "frozen": the encoder sees each slice alone (cacheable); one depth
        # adapter on its output mixes the slices instead of the adapters inside it.
        self.encoder_mode = config.encoder_mode
        self.encoder_adapter = (
            DepthConvAdapter(dim=dim, num_slices=t, reduction=config.adapter_reduction)
            if config.encoder_mode == "frozen" else None
        )
        self.global_class_token = nn.Parameter(torch.zeros(1, dim))
        nn.init.normal_(self.global_class_token, std=0.02)
        self.decoder_depth_pe = nn.Parameter(torch.zeros(t, dim, 1, 1))
        self.class_head = nn.Linear(dim, k + 1)
        mask_res = 4 * (config.img_size // image_encoder.out_stride)
        self.output_head = OutputHead(num_queries=n, upsample=config.img_size // mask_res)
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

    @property
    def caches_encoder(self) -> bool:
        """Whether each slice's encoder output depends on that slice alone (can be cached)."""
        return self.encoder_mode == "frozen"

    def encode_slices(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encoder output of independent slices (``encoder_mode="frozen"`` only).

        Args:
            x: ``(S, C_in, H, W)`` normalised intensities, any number ``S`` of slices.
        Returns:
            ``neck (S, D, h, w)`` and the multi-level features, each ``(S, Ci, hi, wi)``: what
            :meth:`forward` takes as ``encoded`` (slices of a window in order).
        """
        if not self.caches_encoder:
            raise ValueError("encode_slices needs encoder_mode='frozen'")
        fixed = self.stem.fixed_path(x[:, :, None])[:, :, 0]  # (S, 3, H, W)
        return self._run_encoder(fixed)

    def _run_encoder(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # The encoder in "frozen" mode has no trainable part: never keep its activations.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.caches_encoder):
            neck, features = self.image_encoder(images)
        return neck, list(features)

    def forward(
        self,
        x: torch.Tensor,
        encoded: tuple[torch.Tensor, list[torch.Tensor]] | None = None,
        *,
        decoder_chunk: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """x: ``(B, C_in, T, H, W)`` normalised intensities. Returns the output dict.

        ``decoder_chunk``: queries per decoder pass (None: all at once; fewer need less
        memory and give the same result).

        ``encoded``: with ``encoder_mode="frozen"``, the encoder output of the ``B*T`` slices
        (from :meth:`encode_slices`, ordered (B, T)) when it was computed already (cached).
        """
        b, _, t, h_in, w_in = x.shape
        if t != self.num_slices or h_in != self.img_size or w_in != self.img_size:
            raise ValueError(
                f"expected (B, C, {self.num_slices}, {self.img_size}, {self.img_size}) input, "
                f"got {tuple(x.shape)}"
            )
        stem = self.stem(x)
        if self.caches_encoder:
            if encoded is None:
                fixed = self.stem.fixed_path(x)
                encoded = self._run_encoder(fixed.transpose(1, 2).reshape(b * t, 3, h_in, w_in))
            neck, features = encoded
            neck = neck.to(stem.dtype)
            features = [f.to(stem.dtype) for f in features]
            tokens = neck.permute(0, 2, 3, 1)
            neck = neck + self.encoder_adapter(tokens).permute(0, 3, 1, 2)
        else:
            if encoded is not None:
                raise ValueError("precomputed encoder output needs encoder_mode='frozen'")
            neck, features = self._run_encoder(
                stem.transpose(1, 2).reshape(b * t, 3, h_in, w_in)
            )
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
        chunk = decoder_chunk or n
        mask_prompt_size = (4 * h, 4 * w)
        logits, lows = [], []
        for q0 in range(0, n, chunk):
            q1 = min(n, q0 + chunk)
            qc = q1 - q0
            # the decoder's batch is (B*T) x chunk: slices first, like the encoder's
            sparse = pe_encoder._embed_boxes(boxes[:, q0:q1].transpose(1, 2).reshape(-1, 4) * scale)
            masks_in = aux_masks[:, q0:q1].transpose(1, 2).reshape(-1, 1, *aux_masks.shape[-2:])
            masks_in = (masks_in > 0).to(neck.dtype)
            if masks_in.shape[-2:] != mask_prompt_size:  # a prompt generator of fewer stages
                masks_in = F.interpolate(masks_in, size=mask_prompt_size, mode="nearest")
            dense = pe_encoder._embed_masks(masks_in)
            tokens = self.global_class_token + aux_tokens[:, q0:q1].transpose(1, 2)
            tokens = tokens.reshape(-1, neck.shape[1])
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
        return {  # every key (B, N, T, ...): OUTPUT_AXES
            "pred_logits": torch.cat(logits, dim=2).transpose(1, 2),
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
