"""Import segment-anything's model code with or without torchvision.

``import segment_anything`` runs the package ``__init__``, which imports the predictor and the
automatic mask generator, which import torchvision. The model code itself
(``segment_anything/modeling``) needs only torch. Inside Slicer (PyTorch extension) torchvision
is present and the normal import works; elsewhere we register the package without running its
``__init__`` and import only the model submodules.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from types import ModuleType

from ..errors import MaskSAMError

_INSTALL_HINT = "install it with: pip install segment-anything"


def _register_bare_package() -> None:
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        raise MaskSAMError(f"The segment-anything package is not installed; {_INSTALL_HINT}.")
    package = types.ModuleType("segment_anything")
    package.__path__ = list(spec.submodule_search_locations)
    package.__file__ = spec.origin
    package.__package__ = "segment_anything"
    package.__spec__ = spec
    sys.modules["segment_anything"] = package


def sam_modeling() -> ModuleType:
    """Return ``segment_anything.modeling`` (ImageEncoderViT, PromptEncoder, MaskDecoder, ...)."""
    if "segment_anything.modeling" in sys.modules:
        return sys.modules["segment_anything.modeling"]
    if "segment_anything" not in sys.modules:
        try:
            importlib.import_module("segment_anything")
        except ImportError:
            # torchvision missing or broken: drop any half-imported modules, then import bare.
            for name in [n for n in sys.modules if n.split(".")[0] == "segment_anything"]:
                del sys.modules[name]
            _register_bare_package()
    return importlib.import_module("segment_anything.modeling")


def sam_image_encoder_module() -> ModuleType:
    """Return ``segment_anything.modeling.image_encoder`` (window_partition, get_rel_pos, ...)."""
    sam_modeling()
    return importlib.import_module("segment_anything.modeling.image_encoder")


def sam_builders() -> ModuleType:
    """Return ``segment_anything.build_sam`` (official builders, for tests and benchmarks)."""
    sam_modeling()
    return importlib.import_module("segment_anything.build_sam")
