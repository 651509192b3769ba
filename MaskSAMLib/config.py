"""Model configuration: one dataclass saved as ``config.json`` next to ``model.safetensors``.

Variants are config values (backbone, input size, slices T, queries N), never copied files, and
the config alone rebuilds the network (nanoGPT style). ``format_version`` guards the layout.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .backbones import BACKBONE_NAMES, ENCODER_MODES, backbone_spec
from .errors import MaskSAMError
from .labels import palette_color
from .terminology import terminology_for

if TYPE_CHECKING:
    from .data.preprocessing import PreprocessConfig

FORMAT_VERSION = 1
BACKBONES = BACKBONE_NAMES  # the names of the backbone table (MaskSAMLib/backbones.py)


@dataclass
class LabelSpec:
    """One class: label value in the label map, display name, RGB colour 0-255, terminology."""

    value: int
    name: str
    color: list[int]
    terminology: str | None = None


@dataclass
class BackboneConfig:
    """Architecture of the SAM part. Fields not used by a backbone keep their defaults."""

    name: str
    # ViT (SAM) encoder
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    global_attn_indexes: list[int] = field(default_factory=lambda: [2, 5, 8, 11])
    feature_indexes: list[int] = field(default_factory=lambda: [2, 5, 8, 11])
    window_size: int = 14
    patch_size: int = 16
    geometry: int = 1024  # the input size the ViT is built at (pos_embed grid = geometry/patch)
    # prompt encoder / mask decoder
    prompt_embed_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    decoder_depth: int = 2
    # the fixed input path the pretrained encoder expects (see modeling/stem.py)
    input_scaling: str = "sam_rgb"  # "sam_rgb": 0-255 RGB with SAM's mean/std; "unit": [0, 1]


def default_backbone(name: str) -> BackboneConfig:
    """The architecture of each named backbone (from the backbone table)."""
    arch = backbone_spec(name).architecture
    return BackboneConfig(name=name, **{k: list(v) if isinstance(v, list) else v
                                        for k, v in arch.items()})


def default_img_size(backbone: str) -> int:
    """Input size per backbone on CPU-first defaults (LiteMedSAM only works at 256)."""
    return backbone_spec(backbone).default_img_size


@dataclass
class ModelConfig:
    """Everything needed to rebuild a MaskSAM network and run it on a volume."""

    backbone: BackboneConfig
    labels: list[LabelSpec]
    img_size: int = 256
    num_slices: int = 3  # T: fixed by the depth-MLP adapters; volumes are padded, never T changed
    num_queries: int = 0  # N: 0 means derived from the labels
    # The modality channels in input order (their count is the network's input channels).
    channel_names: list[str] = field(default_factory=lambda: ["CT"])
    adapter_reduction: int = 4
    # Freeze SAM except adapters and depth embeddings (the recipe for pretrained backbones);
    # the random `tiny` backbone has nothing to preserve and trains fully.
    freeze_sam: bool = True
    prompt_generator_channels: list[int] = field(default_factory=lambda: [256, 128, 64])
    # Where the 3D depth adapters sit (see ENCODER_MODES): "adapters" is the paper's recipe
    # (inside the frozen encoder); "frozen" runs the encoder unchanged, one slice at a time, so
    # its output can be computed once per slice and cached (the CPU recipe), and puts one depth
    # adapter on the encoder's output instead.
    encoder_mode: str = "adapters"
    # Kernel of the prompt generator's convolutions along the slices: 3 (3D, the paper) or 1
    # (per-slice 2D convolutions, 3x cheaper; the depth adapters still mix slices).
    prompt_generator_depth_kernel: int = 3
    # The plan made from the training data (target spacing, normalisation and its statistics),
    # for the channels above; None for a model created by ``masksam init`` and never trained.
    preprocessing: PreprocessConfig | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.validate()

    @property
    def in_channels(self) -> int:
        """Input channels of the network: one per name in :attr:`channel_names`."""
        return len(self.channel_names)

    @property
    def trained(self) -> bool:
        """Whether the model holds a preprocessing plan (it was trained on a dataset)."""
        return self.preprocessing is not None

    def require_preprocessing(self) -> PreprocessConfig:
        """The plan, or a one-line MaskSAMError for a model created but never trained."""
        if self.preprocessing is None:
            raise MaskSAMError(
                "This model folder has no preprocessing plan (target spacing, normalisation): it "
                "was created by 'masksam init' but never trained; train it first with "
                "'masksam train DATASET --init MODEL_DIR --out NEW_MODEL'."
            )
        return self.preprocessing

    @property
    def num_classes(self) -> int:
        """K: classes including background (the no-object class is extra)."""
        return len(self.labels)

    @property
    def embedding_size(self) -> int:
        """Side of SAM's image embedding grid at this input size."""
        return self.img_size // self.backbone.patch_size

    def validate(self) -> None:
        """Raise MaskSAMError for an inconsistent configuration."""
        b = self.backbone
        if not isinstance(b, BackboneConfig) or not isinstance(self.labels, list) or not all(
                isinstance(lab, LabelSpec) for lab in self.labels):
            raise MaskSAMError("config.json: 'backbone' must be an object and 'labels' a list "
                               "of {value, name, color} entries.")
        if b.name not in BACKBONES:
            raise MaskSAMError(
                f"Unknown backbone {b.name!r}; choose one of {', '.join(BACKBONES)}."
            )
        _check_numbers(self)
        if not self.labels or self.labels[0].value != 0:
            raise MaskSAMError("The label list must start with background (value 0).")
        values = [lab.value for lab in self.labels]
        if len(set(values)) != len(values):
            raise MaskSAMError(f"Label values must be unique, got {values}.")
        names = [lab.name for lab in self.labels]
        from .labels import name_key

        if len({name_key(n) for n in names}) != len(names):
            raise MaskSAMError(f"Label names must be unique (ignoring case and spaces), got "
                               f"{names}.")
        if self.num_queries == 0:
            self.num_queries = derive_num_queries(len(self.labels))
        if self.num_queries < len(self.labels):
            raise MaskSAMError(
                f"num_queries={self.num_queries} is smaller than the {len(self.labels)} classes "
                "(background included) that can appear in one slice; use at least "
                f"{len(self.labels)} queries."
            )
        if self.num_slices < 1:
            raise MaskSAMError(f"num_slices must be >= 1, got {self.num_slices}.")
        if self.encoder_mode not in ENCODER_MODES:
            raise MaskSAMError(
                f"encoder_mode {self.encoder_mode!r} is unknown; choose one of "
                f"{', '.join(ENCODER_MODES)}."
            )
        if self.encoder_mode == "frozen" and not self.freeze_sam:
            raise MaskSAMError("encoder_mode 'frozen' needs freeze_sam: a cached encoder cannot "
                               "train.")
        if self.prompt_generator_depth_kernel not in (1, 3):
            raise MaskSAMError("prompt_generator_depth_kernel must be 1 or 3.")
        if not 1 <= len(self.prompt_generator_channels) <= 3:
            raise MaskSAMError("prompt_generator_channels needs 1 to 3 stage widths.")
        sizes = backbone_spec(b.name).img_sizes
        if sizes and self.img_size not in sizes:
            shown = " or ".join(str(n) for n in sizes)
            raise MaskSAMError(f"The {b.name} backbone only works at {shown}x{shown} input; use "
                               f"{shown}.")
        if self.encoder_mode not in backbone_spec(b.name).encoder_modes:
            raise MaskSAMError(f"The {b.name} backbone cannot run encoder_mode "
                               f"{self.encoder_mode!r}.")
        if self.img_size % b.patch_size or self.img_size < 4 * b.patch_size:
            raise MaskSAMError(
                f"img_size {self.img_size} must be a multiple of {b.patch_size} and at least "
                f"{4 * b.patch_size}."
            )
        if math.isqrt(b.prompt_embed_dim) ** 2 != b.prompt_embed_dim:
            raise MaskSAMError("prompt_embed_dim must be a square number (e.g. 64 or 256).")

    def to_dict(self) -> dict[str, Any]:
        """The config.json form (format 1): the channels are stored as ``in_channels`` and as
        ``preprocessing["channel_names"]`` (alone for an untrained model), as ever."""
        data = dataclasses.asdict(dataclasses.replace(self, preprocessing=None))
        names = data.pop("channel_names")
        pre = self.preprocessing.to_dict() if self.preprocessing is not None else {}
        ordered: dict[str, Any] = {}
        for key, value in data.items():
            if key == "adapter_reduction":
                ordered["in_channels"] = len(names)
            if key == "preprocessing":
                value = {**pre, "channel_names": list(names)}
            ordered[key] = value
        return ordered

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Parse a dict (from config.json), with one-line errors for malformed content."""
        if not isinstance(data, dict):
            raise MaskSAMError("config.json must hold a JSON object.")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise MaskSAMError(
                f"config.json has format_version {version!r}; this MaskSAMLib reads version "
                f"{FORMAT_VERSION}. Upgrade MaskSAMLib or re-create the model."
            )
        try:
            backbone_data = dict(data["backbone"])
            name = backbone_data.get("name")
            if name not in BACKBONES:
                raise MaskSAMError(
                    f"config.json asks for unknown backbone {name!r}; known: "
                    f"{', '.join(BACKBONES)}."
                )
            backbone = BackboneConfig(**backbone_data)
            labels = [LabelSpec(**lab) for lab in data["labels"]]
            rest = {k: v for k, v in data.items()
                    if k not in ("backbone", "labels", "in_channels", "preprocessing")}
            names, plan = _read_channels(data)
            return cls(backbone=backbone, labels=labels, channel_names=names, preprocessing=plan,
                       **rest)
        except MaskSAMError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise MaskSAMError(f"config.json is malformed ({exc}); re-create the model.") from exc

    def save(self, path: str | Path) -> None:
        from .files import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        from .files import read_small_file

        path = Path(path)
        try:
            text = read_small_file(path, max_bytes=16 << 20, what="config.json").decode("utf-8")
        except FileNotFoundError as exc:
            raise MaskSAMError(f"{path} is missing; this is not a MaskSAM model folder.") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise MaskSAMError(f"Cannot read {path} ({exc}); re-create the model.") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MaskSAMError(
                f"{path} is not valid JSON ({exc.msg}); re-create the model."
            ) from exc
        return cls.from_dict(data)


#: Named training recipes: the architecture values each sets (recorded in config.json).
#: "paper": MaskSAM as published (depth adapters inside the frozen encoder, a 3D prompt
#: generator of three stages); the recipe for GPUs. "cpu": the encoder frozen and unchanged so
#: that its output is computed once per slice and cached, one depth adapter after it, and a
#: two-stage prompt generator of per-slice convolutions (about 15x fewer operations); the
#: recipe that trains in hours on a few CPU cores.
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},
    "cpu": {  # and the backbone's cpu_prompt_generator_channels (backbones.py)
        "encoder_mode": "frozen",
        "prompt_generator_depth_kernel": 1,
    },
}


# Plausible ranges of the numbers a config holds: anything outside is a damaged or hand-edited
# config.json, refused in one line instead of failing deep inside the network or allocating
# absurd amounts of memory.
_LIMITS = {
    "img_size": (16, 4096), "num_slices": (1, 64), "num_queries": (0, 1024),
    "in_channels": (1, 16), "adapter_reduction": (1, 1024),
}
_BACKBONE_LIMITS = {
    "embed_dim": (1, 8192), "depth": (1, 256), "num_heads": (1, 256), "window_size": (0, 1024),
    "patch_size": (1, 64), "geometry": (16, 8192), "prompt_embed_dim": (1, 4096),
    "decoder_mlp_dim": (1, 65536), "decoder_num_heads": (1, 256), "decoder_depth": (1, 64),
}


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_numbers(config: ModelConfig) -> None:
    """Types and ranges of every number in ``config`` (MaskSAMError naming the field)."""
    names = config.channel_names
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise MaskSAMError(f"config.json: the channel names must be a list of names, got "
                           f"{names!r}.")
    checks = [(name, getattr(config, name), *limits) for name, limits in _LIMITS.items()]
    checks += [(f"backbone.{name}", getattr(config.backbone, name), *limits)
               for name, limits in _BACKBONE_LIMITS.items()]
    for name, value, low, high in checks:
        if not _whole(value) or not low <= value <= high:
            raise MaskSAMError(f"config.json: {name} must be a whole number from {low} to "
                               f"{high}, got {value!r}.")
    b = config.backbone
    for name in ("global_attn_indexes", "feature_indexes"):
        values = getattr(b, name)
        if not isinstance(values, list) or not all(_whole(v) and 0 <= v < b.depth
                                                   for v in values):
            raise MaskSAMError(f"config.json: backbone.{name} must list block numbers 0 to "
                               f"{b.depth - 1}, got {values!r}.")
    if b.embed_dim % b.num_heads or b.prompt_embed_dim % b.decoder_num_heads:
        raise MaskSAMError("config.json: embed_dim (prompt_embed_dim) must be a multiple of "
                           "num_heads (decoder_num_heads).")
    channels = config.prompt_generator_channels
    if not isinstance(channels, list) or not channels or not all(
            _whole(c) and 1 <= c <= 8192 for c in channels):
        raise MaskSAMError(f"config.json: prompt_generator_channels must list positive whole "
                           f"numbers, got {channels!r}.")
    for lab in config.labels:
        if not _whole(lab.value) or not 0 <= lab.value < 65536:
            raise MaskSAMError(f"config.json: label {lab.name!r} has value {lab.value!r}; "
                               "label values are whole numbers 0-65535.")
        if not isinstance(lab.name, str) or not lab.name.strip():
            raise MaskSAMError(f"config.json: label value {lab.value} has no name.")
    if not isinstance(config.provenance, dict):
        raise MaskSAMError("config.json: 'provenance' must be an object.")
    from .data.preprocessing import PreprocessConfig

    plan = config.preprocessing
    if plan is not None and not isinstance(plan, PreprocessConfig):
        raise MaskSAMError("config.json: 'preprocessing' must be a preprocessing plan.")
    if plan is not None and list(plan.channel_names) != list(names):
        raise MaskSAMError(f"config.json: the preprocessing plan is for channels "
                           f"{plan.channel_names}, the model takes {names}.")


def _read_channels(data: dict[str, Any]) -> tuple[list[str], PreprocessConfig | None]:
    """Channel names and preprocessing plan of a config.json (format 1).

    Format 1 stores the channel count as ``in_channels`` and the names in ``preprocessing``:
    a full plan for a trained model; ``{"channel_names": [...]}`` or ``{}`` (names unknown)
    for one created by ``masksam init`` and never trained, so "untrained" is the absence of
    ``target_spacing``.
    """
    from .data.preprocessing import PreprocessConfig

    count = data.get("in_channels", 1)
    if not _whole(count) or not 1 <= count <= 16:
        raise MaskSAMError(f"config.json: in_channels must be a whole number from 1 to 16, got "
                           f"{count!r}.")
    pre = data.get("preprocessing", {})
    if not isinstance(pre, dict):
        raise MaskSAMError("config.json: 'preprocessing' and 'provenance' must be objects.")
    names = pre.get("channel_names")
    if names is None:
        names = ["CT"] * count if count == 1 else [f"channel {i}" for i in range(count)]
    if not isinstance(names, list) or len(names) != count:
        raise MaskSAMError(f"config.json: in_channels is {count} but preprocessing names the "
                           f"channels {names!r}; restore the file or re-create the model.")
    plan = PreprocessConfig.from_dict(pre) if "target_spacing" in pre else None
    return [str(n) for n in names], plan


def make_model_config(
    *,
    backbone: str,
    labels: list[LabelSpec],
    img_size: int | None = None,
    num_slices: int = 3,
    num_queries: int = 0,
    channel_names: list[str] | None = None,
    preprocessing: PreprocessConfig | None = None,
    provenance: dict[str, Any] | None = None,
    recipe: str = "paper",
) -> ModelConfig:
    """A ModelConfig with each backbone's defaults (input size, decoder widths) and the
    architecture values of ``recipe`` (see :data:`RECIPES`).

    ``channel_names`` default to those of ``preprocessing``, else one CT channel.
    """
    if recipe not in RECIPES:
        raise MaskSAMError(f"Unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}.")
    arch = default_backbone(backbone)
    spec = backbone_spec(backbone)
    extra = {**RECIPES[recipe], "prompt_generator_channels": list(
        spec.cpu_prompt_generator_channels if recipe == "cpu" else spec.prompt_generator_channels)}
    return ModelConfig(
        backbone=arch,
        labels=labels,
        img_size=img_size or default_img_size(backbone),
        num_slices=num_slices,
        num_queries=num_queries,
        channel_names=list(channel_names or (preprocessing.channel_names if preprocessing
                                             else ["CT"])),
        freeze_sam=spec.freeze_sam or recipe == "cpu",
        preprocessing=preprocessing,
        provenance={**(provenance or {}), "recipe": recipe},
        **extra,
    )


def derive_num_queries(num_classes: int) -> int:
    """Default N: every class (background included) plus slack for 'no object' queries."""
    return num_classes + 2


_KNOWN_COLORS = {
    "liver": (221, 130, 101), "spleen": (157, 108, 162), "kidney_left": (185, 102, 83),
    "kidney_right": (185, 102, 83), "kidney": (185, 102, 83), "stomach": (216, 132, 105),
    "aorta": (224, 97, 76), "pancreas": (249, 180, 111), "gallbladder": (139, 150, 98),
    "inferior_vena_cava": (0, 151, 206), "esophagus": (211, 171, 143), "heart": (206, 110, 84),
    "urinary_bladder": (222, 154, 132), "lung": (197, 165, 145), "bone": (241, 214, 145),
    "vertebra": (241, 214, 145), "spine": (241, 214, 145), "duodenum": (255, 253, 229),
    "small_bowel": (205, 167, 142), "colon": (204, 168, 143), "prostate": (230, 158, 140),
}


def make_labels(names: list[str], values: list[int] | None = None) -> list[LabelSpec]:
    """LabelSpecs for names in order, background first (values default to the positions).

    Known structures get their standard colour and Slicer terminology (SNOMED CT codes,
    ``MaskSAMLib.terminology``); other names get a palette colour and no terminology.
    """
    if values is None:
        values = list(range(len(names)))
    if len(values) != len(names):
        raise MaskSAMError("make_labels needs one value per name.")
    labels = []
    for value, name in zip(values, names, strict=True):
        if value == 0:
            color = [0, 0, 0]
        else:
            key = name.lower()
            rgb = _KNOWN_COLORS.get(key) or palette_color(value)
            color = list(rgb)
        terminology = terminology_for(name) if value != 0 else None
        labels.append(LabelSpec(value=value, name=name, color=color, terminology=terminology))
    return labels
