"""Interactive prompts: boxes and points (LPS mm) on a volume -> 3D masks in its exact grid.

- :mod:`.prompts`: prompt sets (JSON), their checks, the volume's canonical frame;
- :mod:`.engine`: :class:`SliceSegmenter` (LiteMedSAM or SAM ViT) with a slice-embedding cache;
- :mod:`.session`: :class:`PromptSession`, propagation and interpolation over slices;
- :mod:`.run`: ``masksam prompt`` (files in, label map and sidecar out);
- :mod:`.worker`: ``masksam worker``, the long-lived process for the Slicer module.

No Qt or slicer imports.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "EmbeddingCache": "engine",
    "SliceSegmenter": "engine",
    "StructurePrompts": "prompts",
    "prompts_from_dict": "prompts",
    "read_prompts_file": "prompts",
    "PromptSession": "session",
    "PropagationOptions": "session",
    "StructureResult": "session",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:  # lazy: `masksam --help` must not import torch
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)
