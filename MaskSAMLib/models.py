"""Which models exist and where: bundled, user and registry models, found by name.

``--model`` takes a model folder or a name. Names are looked up, in this order, among

* **bundled** models: folders under ``Resources/Models/`` listed in ``Resources/models.json``
  (``bundledModels``) with the SHA-256 of each file, verified before use;
* **user** models: folders in ``$MASKSAM_HOME/models`` (default ``~/.masksam/models``), e.g.
  what the Slicer Train tab writes;
* **registry** models: the downloadable ``models`` of ``models.json`` (listed; fetched by the
  Slicer module only when the user asks, never by the library).

This module reads JSON only (no torch), so the Slicer side can use it as it is.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MaskSAMError
from .files import read_small_file, sha256_file
from .labels import as_int, parse_labels

#: The files of a model folder (INTERFACES.md "Model directory").
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: Resources/ of a checkout or of the Slicer extension (next to MaskSAMLib/).
RESOURCES = Path(__file__).resolve().parent.parent / "Resources"
REGISTRY_NAME = "models.json"


def registry_path() -> Path:
    """``$MASKSAM_REGISTRY`` or ``Resources/models.json``."""
    return Path(os.environ.get("MASKSAM_REGISTRY") or RESOURCES / REGISTRY_NAME)


def user_models_dir() -> Path:
    """``$MASKSAM_HOME/models`` (default ``~/.masksam/models``)."""
    home = os.environ.get("MASKSAM_HOME") or str(Path.home() / ".masksam")
    return Path(home) / "models"


@dataclass
class ModelEntry:
    """One model offered by name."""

    name: str
    source: str  # "bundled", "user" or "registry"
    path: Path | None  # the model folder (None: a registry model not on this machine)
    classes: list[str] = field(default_factory=list)
    licence: str = ""
    description: str = ""
    files: dict[str, str] = field(default_factory=dict)  # file name -> SHA-256 (bundled)
    info: dict[str, Any] = field(default_factory=dict)

    def verify(self) -> None:
        """Check every listed file against its SHA-256 (bundled models); one-line errors."""
        if self.path is None:
            return
        for name, digest in self.files.items():
            file = self.path / name
            if not file.is_file():
                raise MaskSAMError(f"The bundled model {self.name!r} lacks {name} ({file}); "
                                   "reinstall MaskSAMSlicer.")
            if sha256_file(file) != digest:
                raise MaskSAMError(
                    f"The bundled model {self.name!r} is damaged: {name} does not match its "
                    "SHA-256 in models.json; reinstall MaskSAMSlicer."
                )


def _read_registry() -> dict[str, Any]:
    path = registry_path()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MaskSAMError(f"{path} is not readable JSON ({exc}); reinstall MaskSAMSlicer."
                           ) from exc
    return data if isinstance(data, dict) else {}


def model_labels(raw: Any, source: str) -> list[dict[str, Any]]:
    """The ``labels`` of a model's ``config.json``, checked: ``[{value, name, color,
    terminology}]`` sorted by value, background 0 present, values and names unique.

    The one reading of a model's label list without torch (the Slicer module uses it too).
    """
    if not isinstance(raw, list) or not raw:
        raise MaskSAMError(f"{source} lists no labels; re-create the model.")
    checked = []
    for entry in raw:
        value = as_int(entry.get("value")) if isinstance(entry, dict) else None
        name = entry.get("name") if isinstance(entry, dict) else None
        if value is None or not isinstance(name, str) or not name.strip():
            raise MaskSAMError(f"{source}: a label lacks an integer value or a name.")
        color = entry.get("color") or [128, 128, 128]
        if not (isinstance(color, (list, tuple)) and len(color) == 3
                and all(as_int(c) is not None and 0 <= int(c) <= 255 for c in color)):
            raise MaskSAMError(f"{source}: label '{name}' has an invalid colour {color!r}.")
        checked.append({"value": value, "name": name, "color": [int(c) for c in color],
                        "terminology": entry.get("terminology") or None})
    names = [lab["name"] for lab in checked]
    repeated = next((n for n in names if names.count(n) > 1), None)
    if repeated is not None:
        raise MaskSAMError(f"{source}: label name '{repeated}' is repeated; re-create the model.")
    # The dataset rules for the rest: values 0-65535 used once, background 0, distinct names.
    parse_labels({lab["name"]: lab["value"] for lab in checked}, source)
    return sorted(checked, key=lambda lab: lab["value"])


def read_model_labels(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The checked labels of the model folder ``folder`` (see :func:`model_labels`)."""
    path = Path(folder) / CONFIG_NAME
    try:
        data = json.loads(read_small_file(path, max_bytes=16 << 20, what=CONFIG_NAME))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MaskSAMError(f"{path} is not readable JSON ({exc}); copy the model again."
                           ) from exc
    if not isinstance(data, dict):
        raise MaskSAMError(f"{path} must hold a JSON object; copy the model again.")
    return model_labels(data.get("labels"), str(path))


def _config_classes(folder: Path) -> list[str]:
    try:
        return [lab["name"] for lab in read_model_labels(folder) if lab["value"] != 0]
    except MaskSAMError:
        return []


def available_models() -> list[ModelEntry]:
    """Every model that can be named: bundled, then user, then registry ones."""
    registry = _read_registry()
    root = registry_path().parent
    entries: list[ModelEntry] = []
    for item in registry.get("bundledModels", []) or []:
        folder = (root / str(item.get("folder", ""))).resolve()
        entries.append(ModelEntry(
            name=str(item["name"]), source="bundled", path=folder,
            classes=list(item.get("classes") or _config_classes(folder)),
            licence=str(item.get("licence", "")), description=str(item.get("description", "")),
            files=dict(item.get("files") or {}), info=dict(item),
        ))
    user = user_models_dir()
    if user.is_dir():
        for folder in sorted(p for p in user.iterdir() if (p / CONFIG_NAME).is_file()):
            entries.append(ModelEntry(name=folder.name, source="user", path=folder,
                                      classes=_config_classes(folder)))
    for item in registry.get("models", []) or []:
        if isinstance(item, dict) and item.get("name"):
            entries.append(ModelEntry(
                name=str(item["name"]), source="registry", path=None,
                classes=list(item.get("classes") or []), licence=str(item.get("licence", "")),
                description=str(item.get("description", "")), info=dict(item),
            ))
    return entries


def resolve_model(spec: str | os.PathLike) -> Path:
    """The model folder meant by ``--model``: a folder path, or a model name (verified)."""
    path = Path(spec)
    name = str(spec)
    if path.is_dir() or os.sep in name or "/" in name or path.exists():
        return path  # a path: the model loader says what is wrong with it
    entries = available_models()
    for entry in entries:
        if entry.name == name and entry.path is not None:
            entry.verify()
            return entry.path
    for entry in entries:
        if entry.name == name:
            raise MaskSAMError(
                f"The registry model {name!r} is not on this machine; download it in the Slicer "
                "module's Auto-segment tab, or pass its folder to --model."
            )
    names = ", ".join(e.name for e in entries) or "none"
    raise MaskSAMError(
        f"--model {name!r} is neither a model folder nor a known model name; known models: "
        f"{names} (see 'masksam models')."
    )
