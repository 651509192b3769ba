"""Models the Auto-segment tab can use: the registry, the user's models folder, added folders.

A model is a MaskSAMLib model folder (INTERFACES.md): ``config.json`` (``labels`` as
``[{value, name, color, terminology}]`` with background 0, ``backbone.name``, ``provenance``)
and ``model.safetensors``. Folders are checked without torch: the JSON is parsed and the
safetensors header (8-byte length + JSON) is read, so a truncated or corrupt file is caught
before a child process is started.

Sources, in the order listed to the user:

- every model folder inside the user's models folder (``~/.masksam/models`` or
  ``$MASKSAM_HOME/models``; training writes new models there);
- folders added with "Add model..." (remembered in ``added-models.json`` in that folder);
- entries of ``Resources/models.json`` (name, url, sha256, backbone): they are listed as
  downloadable and are fetched only when the user asks, verified against their SHA-256, and
  can be imported from a local file on offline sites.

No qt, no slicer application object, no torch.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from MaskSAMLib.errors import MaskSAMError
from MaskSAMLib.files import sha256_file
from MaskSAMLib.models import CONFIG_NAME as CONFIG_FILE
from MaskSAMLib.models import WEIGHTS_NAME as WEIGHTS_FILE
from MaskSAMLib.models import ModelEntry, model_labels

from .errors import ModelError

REGISTRY_FORMAT_VERSION = 1
ADDED_MODELS_FILE = "added-models.json"
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def masksamHome() -> Path:
    """Where models, training cases and downloads live (outside the Slicer install)."""
    env = os.environ.get("MASKSAM_HOME")
    return Path(env).expanduser() if env else Path.home() / ".masksam"


def defaultModelsDir() -> Path:
    return masksamHome() / "models"


@dataclass
class ModelInfo:
    """One model the user can pick."""

    name: str
    path: Path | None
    backbone: str | None = None
    labels: list[dict[str, Any]] = field(default_factory=list)
    source: str = "user"  # "user", "added" or "registry"
    url: str | None = None
    sha256: str | None = None
    description: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    licence: str = ""
    files: dict[str, str] = field(default_factory=dict)  # bundled: file name -> SHA-256

    @property
    def available(self) -> bool:
        """True when the folder is on disk (a registry entry becomes available once fetched)."""
        return self.path is not None

    def classNames(self) -> list[str]:
        return [str(lab["name"]) for lab in self.labels if int(lab.get("value", 0)) != 0]

    def displayName(self) -> str:
        if not self.available:
            return f"{self.name} (download)"
        classes = self.classNames()
        if classes:
            shown = ", ".join(classes[:4]) + (", ..." if len(classes) > 4 else "")
            return f"{self.name} [{shown}]"
        return self.name


def _readSafetensorsHeader(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ModelError(f"{path} is truncated; copy the model folder again.")
        (length,) = struct.unpack("<Q", head)
        if length <= 0 or length > _MAX_SAFETENSORS_HEADER or 8 + length > size:
            raise ModelError(f"{path} is not a valid safetensors file; copy the model again.")
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path} has a corrupt header; copy the model folder again.") from exc
    if not isinstance(header, dict):
        raise ModelError(f"{path} has a corrupt header; copy the model folder again.")
    ends = [
        entry["data_offsets"][1]
        for key, entry in header.items()
        if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry
    ]
    if ends and 8 + length + max(ends) > size:
        raise ModelError(f"{path} is truncated; copy the model folder again.")
    return header


def readJsonObject(path: Path, error: type[Exception], advice: str) -> dict[str, Any]:
    """The JSON object in ``path``; ``error`` (one line ending in ``advice``) otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc}); {advice}") from exc
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object; {advice}")
    return data


def readModelDir(path: str | os.PathLike, *, source: str = "user") -> ModelInfo:
    """Check a model folder and describe it; ``ModelError`` says what is missing or corrupt."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelError(f"The model folder {folder} does not exist; choose a model folder.")
    configPath = folder / CONFIG_FILE
    if not configPath.is_file():
        raise ModelError(
            f"{folder} has no {CONFIG_FILE}; it is not a MaskSAM model folder (train one in the "
            "Train tab or create one with 'masksam init')."
        )
    config = readJsonObject(configPath, ModelError, "copy the model again.")
    try:
        labels = model_labels(config.get("labels"), str(configPath))
    except MaskSAMError as exc:
        raise ModelError(str(exc)) from exc
    backbone = config.get("backbone")
    backboneName = backbone.get("name") if isinstance(backbone, dict) else backbone
    if not isinstance(backboneName, str) or not backboneName:
        raise ModelError(f"{configPath} names no backbone; re-create the model.")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelError(
            f"{folder} has no {WEIGHTS_FILE} (the weights); copy the whole model folder."
        )
    _readSafetensorsHeader(weights)
    provenance = config.get("provenance") if isinstance(config.get("provenance"), dict) else {}
    return ModelInfo(
        name=folder.name,
        path=folder,
        backbone=backboneName,
        labels=labels,
        source=source,
        provenance=provenance,
    )


def isModelDir(path: str | os.PathLike) -> bool:
    try:
        readModelDir(path)
    except ModelError:
        return False
    return True


def loadRegistryFile(path: str | os.PathLike | None) -> dict[str, Any]:
    """``{"version", "models": [...], "baseModels": [...]}`` (empty lists when absent)."""
    empty = {"version": REGISTRY_FORMAT_VERSION, "models": [], "baseModels": []}
    if path is None or not Path(path).is_file():
        return empty
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"The model registry {path} is not valid JSON ({exc}).") from exc
    if not isinstance(data, dict) or not isinstance(data.get("models", []), list):
        raise ModelError(f"The model registry {path} must hold {{'models': [...]}}.")
    for entry in data.get("models", []):
        missing = [k for k in ("name", "url", "sha256", "backbone") if not entry.get(k)]
        if missing:
            raise ModelError(f"Registry entry {entry!r} lacks {', '.join(missing)}.")
    return {**empty, **data}


def defaultRegistryFile(moduleDir: str | os.PathLike | None = None) -> Path | None:
    """``models.json``: next to the installed module's resources, or the checkout's Resources/."""
    here = Path(moduleDir) if moduleDir else Path(__file__).resolve().parents[1]
    for candidate in (here / "Resources" / "models.json",
                      here.parent / "Resources" / "models.json"):
        if candidate.is_file():
            return candidate
    return None


def _safeExtract(archive: Path, target: Path) -> None:
    """Extract a zip refusing absolute paths and '..' (a model archive must not escape)."""
    with zipfile.ZipFile(archive) as zf:
        root = target.resolve()
        for member in zf.infolist():
            destination = (target / member.filename).resolve()
            if os.path.commonpath([root, destination]) != str(root):
                raise ModelError(f"{archive.name} holds an unsafe path {member.filename!r}.")
        zf.extractall(target)


class ModelRegistry:
    """The models offered in the Auto-segment tab and as bases in the Train tab."""

    def __init__(
        self,
        registryFile: str | os.PathLike | None = None,
        userModelsDir: str | os.PathLike | None = None,
    ) -> None:
        self.registryFile = Path(registryFile) if registryFile else defaultRegistryFile()
        self.userModelsDir = Path(userModelsDir) if userModelsDir else defaultModelsDir()
        self.problems: list[str] = []  # folders that were skipped, with the reason

    # ------------------------------------------------------------------ listing
    def registry(self) -> dict[str, Any]:
        return loadRegistryFile(self.registryFile)

    def baseModels(self) -> list[dict[str, Any]]:
        return list(self.registry().get("baseModels", []))

    def _addedPaths(self) -> list[Path]:
        path = self.userModelsDir / ADDED_MODELS_FILE
        if not path.is_file():
            return []
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return []
        return [Path(p) for p in data.get("folders", []) if isinstance(p, str)]

    def _writeAddedPaths(self, paths: list[Path]) -> None:
        self.userModelsDir.mkdir(parents=True, exist_ok=True)
        target = self.userModelsDir / ADDED_MODELS_FILE
        tmp = target.with_name(f".{ADDED_MODELS_FILE}.tmp")
        tmp.write_text(
            json.dumps({"folders": [str(p) for p in paths]}, indent=2) + "\n", encoding="utf-8"
        )
        os.replace(tmp, target)

    def bundledModels(self) -> list[ModelInfo]:
        """Models shipped with the extension (``bundledModels`` of models.json), each file
        checked against its SHA-256; a damaged one is skipped and named in ``problems``."""
        found = []
        if self.registryFile is None:
            return found
        for entry in self.registry().get("bundledModels", []) or []:
            if not isinstance(entry, dict) or not entry.get("name") or not entry.get("folder"):
                continue
            folder = (self.registryFile.parent / str(entry["folder"])).resolve()
            files = {str(k): str(v) for k, v in (entry.get("files") or {}).items()}
            try:
                ModelEntry(str(entry["name"]), "bundled", folder, files=files).verify()
                info = readModelDir(folder, source="bundled")
            except (MaskSAMError, ModelError) as exc:
                self.problems.append(str(exc))
                continue
            info.name = str(entry["name"])
            info.description = str(entry.get("description", ""))
            info.licence = str(entry.get("licence", ""))
            info.files = files
            found.append(info)
        return found

    def models(self) -> list[ModelInfo]:
        """Bundled models, user models, added models, then registry entries not yet fetched."""
        self.problems = []
        found: list[ModelInfo] = self.bundledModels()
        seen: set[Path] = {m.path.resolve() for m in found if m.path is not None}
        if self.userModelsDir.is_dir():
            for child in sorted(self.userModelsDir.iterdir()):
                if not child.is_dir() or child.name.startswith("."):
                    continue
                if ".tmp" in child.name:
                    continue  # a model folder still being written
                if (child / "training").is_dir() and not (child / WEIGHTS_FILE).is_file():
                    continue  # a training run that has not saved weights yet
                try:
                    info = readModelDir(child, source="user")
                except ModelError as exc:
                    if (child / CONFIG_FILE).exists():
                        self.problems.append(str(exc))
                    continue
                found.append(info)
                seen.add(child.resolve())
        for folder in self._addedPaths():
            if folder.resolve() in seen:
                continue
            try:
                info = readModelDir(folder, source="added")
            except ModelError as exc:
                self.problems.append(str(exc))
                continue
            found.append(info)
            seen.add(folder.resolve())
        for entry in self.registry().get("models", []):
            local = self.userModelsDir / entry["name"]
            if local.resolve() in seen:
                for info in found:
                    if info.path is not None and info.path.resolve() == local.resolve():
                        info.source = "registry"
                        info.url, info.sha256 = entry["url"], entry["sha256"]
                continue
            found.append(
                ModelInfo(
                    name=entry["name"],
                    path=None,
                    backbone=entry.get("backbone"),
                    labels=[
                        {"value": i, "name": n, "color": [128, 128, 128], "terminology": None}
                        for i, n in enumerate(["background", *entry.get("classes", [])])
                    ],
                    source="registry",
                    url=entry["url"],
                    sha256=entry["sha256"],
                    description=entry.get("description", ""),
                )
            )
        return found

    def availableModels(self) -> list[ModelInfo]:
        return [m for m in self.models() if m.available]

    def find(self, nameOrPath: str) -> ModelInfo | None:
        for model in self.models():
            if model.name == nameOrPath or (
                model.path is not None and str(model.path) == nameOrPath
            ):
                return model
        return None

    # ------------------------------------------------------------------ adding
    def addModelDir(self, path: str | os.PathLike) -> ModelInfo:
        """Validate a model folder and remember it (the user's "Add model...")."""
        info = readModelDir(path, source="added")
        folder = info.path.resolve()
        if self.userModelsDir.is_dir() and folder.parent == self.userModelsDir.resolve():
            info.source = "user"
            return info
        paths = [p for p in self._addedPaths() if p.resolve() != folder]
        paths.append(folder)
        self._writeAddedPaths(paths)
        return info

    def removeAddedModel(self, path: str | os.PathLike) -> None:
        folder = Path(path).resolve()
        self._writeAddedPaths([p for p in self._addedPaths() if p.resolve() != folder])

    def newModelDir(self, name: str) -> Path:
        """A non-existing folder in the user's models folder for a model called ``name``."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name.strip()) or "model"
        safe = safe.lstrip(".") or "model"
        candidate = self.userModelsDir / safe
        index = 2
        while candidate.exists():
            candidate = self.userModelsDir / f"{safe}_{index}"
            index += 1
        return candidate

    # ------------------------------------------------------------------ fetching (user asked)
    def fetchModel(
        self,
        name: str,
        *,
        localFile: str | os.PathLike | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> ModelInfo:
        """Download (or import from ``localFile``) a registry model; verify SHA-256; unpack.

        Only called after the user asked for it. The archive is a zip holding ``config.json``
        and ``model.safetensors`` (at its root or in one folder). Nothing is left behind on
        failure.
        """
        entry = next((e for e in self.registry().get("models", []) if e["name"] == name), None)
        if entry is None:
            raise ModelError(f"'{name}' is not in the model registry.")
        target = self.userModelsDir / entry["name"]
        if target.exists():
            return readModelDir(target, source="registry")
        self.userModelsDir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=self.userModelsDir))
        try:
            archive = work / "model.zip"
            if localFile is not None:
                shutil.copyfile(localFile, archive)
            else:
                self._download(entry["url"], archive, progress)
            digest = sha256_file(archive)
            if digest.lower() != str(entry["sha256"]).lower():
                raise ModelError(
                    f"The file for '{name}' has SHA-256 {digest}, expected {entry['sha256']}; it "
                    "is damaged or not the right file. Download it again."
                )
            unpacked = work / "unpacked"
            try:
                _safeExtract(archive, unpacked)
            except zipfile.BadZipFile as exc:
                raise ModelError(f"The file for '{name}' is not a zip archive.") from exc
            folder = unpacked
            if not (folder / CONFIG_FILE).is_file():
                subfolders = [p for p in unpacked.iterdir() if p.is_dir()]
                if len(subfolders) == 1:
                    folder = subfolders[0]
            readModelDir(folder)
            os.replace(folder, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return readModelDir(target, source="registry")

    @staticmethod
    def _download(url: str, destination: Path, progress) -> None:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, destination.open("wb") as out:
                total = int(response.headers.get("Content-Length") or 0)
                done = 0
                while True:
                    block = response.read(1 << 20)
                    if not block:
                        break
                    out.write(block)
                    done += len(block)
                    if progress is not None:
                        progress(done, total)
        except OSError as exc:
            raise ModelError(
                f"Could not download {url} ({exc}); check the connection or import the file "
                "from disk."
            ) from exc
