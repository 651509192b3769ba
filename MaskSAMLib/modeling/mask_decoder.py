"""SAM's mask decoder run MaskSAM's way: a classifier token and 3D depth adapters.

The parameters stay SAM's (``mask_decoder.transformer.layers.i.*``, ``iou_token``,
``mask_tokens``, ``output_upscaling``, ``output_hypernetworks_mlps`` ...), so official
checkpoints load unchanged. :func:`attach_decoder_adapters` adds, inside each two-way block, a
:class:`DepthMLPAdapter` after token self-attention, after token-to-image attention and in
parallel to the MLP (scale 0.5), one after the final token-to-image attention, and a
:class:`DepthConvAdapter` on the image tokens after image-to-token attention. All adapters are
zero-initialised.

Token order into the transformer: ``[iou, mask x4, box corners x2, classifier]``. Only mask
token 0 is used (multimask off). Prompts are ordered ``(B, T, Q)`` so that the depth adapters can
regroup the T slices of one query; ``Q`` may be a chunk of the N queries.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .adapters import DepthConvAdapter, DepthMLPAdapter


def attach_decoder_adapters(
    mask_decoder: nn.Module, *, num_slices: int, reduction: int = 4
) -> None:
    """Add the depth adapters to a SAM ``MaskDecoder`` (in place)."""
    transformer = mask_decoder.transformer
    dim = transformer.embedding_dim
    for layer in transformer.layers:
        layer.self_adapter = DepthMLPAdapter(dim=dim, num_slices=num_slices, reduction=reduction)
        layer.cross_adapter = DepthMLPAdapter(dim=dim, num_slices=num_slices, reduction=reduction)
        layer.mlp_adapter = DepthMLPAdapter(dim=dim, num_slices=num_slices, reduction=reduction)
        layer.image_adapter = DepthConvAdapter(
            dim=dim, num_slices=num_slices, reduction=reduction
        )
    transformer.final_adapter = DepthMLPAdapter(
        dim=dim, num_slices=num_slices, reduction=reduction
    )


def attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SAM two-way ``Attention`` through ``scaled_dot_product_attention`` (same parameters)."""
    q = attn.q_proj(q)
    k = attn.k_proj(k)
    v = attn.v_proj(v)
    heads = attn.num_heads

    def split(x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, heads, c // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    b, _, n, _ = out.shape
    return attn.out_proj(out.transpose(1, 2).reshape(b, n, -1))


def _two_way_block(
    layer: nn.Module,
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_pe: torch.Tensor,
    key_pe: torch.Tensor,
    num_prompts: int,
    hw: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    if layer.skip_first_layer_pe:
        queries = attend(layer.self_attn, queries, queries, queries)
    else:
        q = queries + query_pe
        queries = queries + attend(layer.self_attn, q, q, queries)
    queries = queries + layer.self_adapter(queries, num_prompts)
    queries = layer.norm1(queries)

    q = queries + query_pe
    k = keys + key_pe
    queries = queries + attend(layer.cross_attn_token_to_image, q, k, keys)
    queries = queries + layer.cross_adapter(queries, num_prompts)
    queries = layer.norm2(queries)

    queries = queries + layer.mlp(queries) + 0.5 * layer.mlp_adapter(queries, num_prompts)
    queries = layer.norm3(queries)

    q = queries + query_pe
    k = keys + key_pe
    keys = keys + attend(layer.cross_attn_image_to_token, k, q, queries)
    keys = keys + layer.image_adapter(keys, hw)
    keys = layer.norm4(keys)
    return queries, keys


def run_two_way_transformer(
    transformer: nn.Module,
    image_embedding: torch.Tensor,
    image_pe: torch.Tensor,
    point_embedding: torch.Tensor,
    num_prompts: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's ``TwoWayTransformer`` with depth adapters.

    Args:
        image_embedding: ``(n, C, h, w)`` with ``n = B*T*Q`` ordered (B, T, Q).
        image_pe: ``(n, C, h, w)``.
        point_embedding: ``(n, L, C)`` tokens.
    Returns:
        processed tokens ``(n, L, C)`` and image tokens ``(n, h*w, C)``.
    """
    hw = tuple(image_embedding.shape[-2:])
    keys = image_embedding.flatten(2).transpose(1, 2)
    key_pe = image_pe.flatten(2).transpose(1, 2)
    queries = point_embedding
    for layer in transformer.layers:
        queries, keys = _two_way_block(
            layer, queries, keys, point_embedding, key_pe, num_prompts, hw
        )
    q = queries + point_embedding
    k = keys + key_pe
    queries = queries + attend(transformer.final_attn_token_to_image, q, k, keys)
    queries = queries + transformer.final_adapter(queries, num_prompts)
    queries = transformer.norm_final_attn(queries)
    return queries, keys


def decode_prompts(
    mask_decoder: nn.Module,
    *,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse_embeddings: torch.Tensor,
    dense_embeddings: torch.Tensor,
    class_tokens: torch.Tensor,
    num_prompts: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run SAM's mask decoder on ``n = B*T*Q`` prompts with a classifier token each.

    Args:
        image_embeddings: ``(B*T, C, h, w)``, one per slice (repeated per prompt here).
        image_pe: ``(B*T, C, h, w)`` dense positional encoding (with depth PE) per slice.
        sparse_embeddings: ``(n, 2, C)`` box-corner tokens.
        dense_embeddings: ``(n, C, h, w)`` mask-prompt embeddings.
        class_tokens: ``(n, C)`` classifier tokens.
        num_prompts: Q, prompts per slice.
    Returns:
        low-resolution mask logits ``(n, 4h, 4w)`` and classifier-token outputs ``(n, C)``.
    """
    output_tokens = torch.cat([mask_decoder.iou_token.weight, mask_decoder.mask_tokens.weight])
    n = sparse_embeddings.shape[0]
    tokens = torch.cat(
        [
            output_tokens.unsqueeze(0).expand(n, -1, -1),
            sparse_embeddings,
            class_tokens.unsqueeze(1),
        ],
        dim=1,
    )
    src = torch.repeat_interleave(image_embeddings, num_prompts, dim=0) + dense_embeddings
    pos = torch.repeat_interleave(image_pe, num_prompts, dim=0)
    hs, src = run_two_way_transformer(mask_decoder.transformer, src, pos, tokens, num_prompts)
    b, c, h, w = dense_embeddings.shape
    upscaled = mask_decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper = mask_decoder.output_hypernetworks_mlps[0](hs[:, 1])  # mask token 0
    masks = torch.einsum("nc,nchw->nhw", hyper, upscaled)
    return masks, hs[:, -1]
