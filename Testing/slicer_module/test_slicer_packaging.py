"""Extension packaging: CMake metadata, .s4ext and the catalog JSON agree; install lists match disk.

CI cannot build a Slicer extension, so these tests read the build files and check them against
the repository: what slicerMacroBuildScriptedModule would install is exactly the module's and
MaskSAMLib's Python files, every listed file exists, and the catalog entry uses only the keys
the ExtensionsIndex schema (slicer-extension-catalog-entry-schema v1.0.x) allows.
"""

from __future__ import annotations

import ast
import json
import re
import struct
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "MaskSAMSlicer"
TOP_CMAKE = REPO / "CMakeLists.txt"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
S4EXT = REPO / "MaskSAMSlicer.s4ext"
CATALOG_JSON = REPO / "MaskSAMSlicer.json"

# Transcribed from Slicer/Schemas/slicer-extension-catalog-entry-schema-v1.0.{1,2}.json
# ("additionalProperties": false): the keys an entry may have, and the required ones.
CATALOG_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema",
    "type": "object",
    "required": ["$schema", "category", "scm_url"],
    "additionalProperties": False,
    "properties": {
        "$schema": {"type": "string"},
        "category": {"type": "string"},
        "scm_url": {"type": "string"},
        "scm_revision": {"type": "string"},
        "scm_type": {"type": "string", "enum": ["git", "local"]},
        "build_dependencies": {"type": "array", "items": {"type": "string"}},
        "build_subdirectory": {"type": "string"},
        "enabled": {"type": "boolean"},
        "tier": {"type": "integer", "enum": [1, 3, 5]},
    },
}
SCHEMA_1_0_2_EXTRA = {"dicom_support_rule"}


def cmakeSets(text: str) -> dict[str, str]:
    """``set(NAME "value")`` / ``set(NAME value)`` at top level (comments stripped)."""
    text = re.sub(r"#[^\n]*", "", text)
    values = {}
    for match in re.finditer(r"set\(\s*(\w+)\s+(\"(?:[^\"\\]|\\.)*\"|[^)\s]+)\s*\)", text):
        value = match.group(2)
        values[match.group(1)] = value[1:-1] if value.startswith('"') else value
    return values


def cmakeList(text: str, name: str) -> list[str]:
    text = re.sub(r"#[^\n]*", "", text)
    match = re.search(rf"set\(\s*{name}\s+([^)]*)\)", text)
    assert match, f"set({name} ...) not found"
    return match.group(1).split()


def s4ext() -> dict[str, str]:
    values = {}
    for line in S4EXT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        values[key] = value.strip()
    return values


def urlToRepoPath(url: str, homepage: str) -> Path:
    prefix = homepage.rstrip("/") + "/raw/main/"
    assert url.startswith(prefix), f"{url} is not a file of {homepage}"
    return REPO / url[len(prefix):]


def pngSize(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


# ----------------------------------------------------------------------------- metadata
def test_cmake_metadata_is_complete():
    text = TOP_CMAKE.read_text()
    meta = cmakeSets(text)
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL",
                "SCREENSHOTURLS", "DEPENDS"):
        assert meta.get(f"EXTENSION_{key}"), f"EXTENSION_{key} is missing or empty"
    assert meta["EXTENSION_DEPENDS"].split() == ["PyTorch"]
    assert re.search(r"project\(\s*MaskSAMSlicer\s*\)", text)
    for required in ("find_package(Slicer 5.10 REQUIRED)", "include(${Slicer_USE_FILE})",
                     "add_subdirectory(MaskSAMSlicer)",
                     "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                     "include(${Slicer_EXTENSION_CPACK})"):
        assert required in text, required
    assert "research use" in meta["EXTENSION_DESCRIPTION"].lower()


def test_icon_and_screenshots_exist_where_the_urls_point():
    meta = cmakeSets(TOP_CMAKE.read_text())
    home = meta["EXTENSION_HOMEPAGE"]
    icon = urlToRepoPath(meta["EXTENSION_ICONURL"], home)
    assert pngSize(icon) == (128, 128)
    assert pngSize(MODULE_DIR / "Resources" / "Icons" / "MaskSAMSlicer.png") == (128, 128)
    shots = meta["EXTENSION_SCREENSHOTURLS"].split()
    assert len(shots) >= 1
    for url in shots:
        width, height = pngSize(urlToRepoPath(url, home))
        assert width >= 300 and height >= 300


def test_s4ext_agrees_with_cmake():
    meta = cmakeSets(TOP_CMAKE.read_text())
    legacy = s4ext()
    assert legacy["scm"] == "git"
    assert legacy["homepage"] == meta["EXTENSION_HOMEPAGE"]
    assert legacy["scmurl"].rstrip("/").removesuffix(".git") == meta["EXTENSION_HOMEPAGE"]
    assert legacy["depends"].split() == meta["EXTENSION_DEPENDS"].split()
    for key in ("category", "contributors", "description", "iconurl", "screenshoturls",
                "status"):
        assert legacy[key] == meta[f"EXTENSION_{key.upper()}"], key
    assert legacy["build_subdirectory"] == "."
    assert legacy["enabled"] in ("0", "1")


def test_catalog_json_has_only_schema_keys_and_agrees():
    entry = json.loads(CATALOG_JSON.read_text())
    version = re.search(r"schema-v(1\.0\.\d)\.json", entry["$schema"])
    assert version, "the $schema must name slicer-extension-catalog-entry-schema v1.0.x"
    allowed = set(CATALOG_SCHEMA["properties"])
    if version.group(1) == "1.0.2":
        allowed |= SCHEMA_1_0_2_EXTRA
    assert set(entry) <= allowed, f"keys the schema does not allow: {set(entry) - allowed}"
    assert set(CATALOG_SCHEMA["required"]) <= set(entry)
    try:
        import jsonschema
    except ImportError:
        pass
    else:
        jsonschema.validate(entry, CATALOG_SCHEMA)
    meta = cmakeSets(TOP_CMAKE.read_text())
    legacy = s4ext()
    assert entry["category"] == meta["EXTENSION_CATEGORY"] == legacy["category"]
    assert entry["scm_url"] == legacy["scmurl"]
    assert entry.get("scm_revision", "main") == legacy["scmrevision"]
    assert entry.get("build_dependencies", []) == meta["EXTENSION_DEPENDS"].split()
    assert entry.get("build_subdirectory", ".") == legacy["build_subdirectory"]


# ----------------------------------------------------------------------------- install lists
def moduleLists() -> tuple[list[str], list[str], list[str]]:
    text = MODULE_CMAKE.read_text()
    name = cmakeSets(text)["MODULE_NAME"]
    scripts = [s.replace("${MODULE_NAME}", name) for s in cmakeList(text, "MODULE_PYTHON_SCRIPTS")]
    library = cmakeList(text, "MASKSAMLIB_PYTHON_SCRIPTS")
    resources = [s.replace("${MODULE_NAME}", name)
                 for s in cmakeList(text, "MODULE_PYTHON_RESOURCES")]
    return scripts, library, resources


def test_module_scripts_list_every_module_file_and_nothing_else():
    scripts, _, _ = moduleLists()
    assert all((MODULE_DIR / s).is_file() for s in scripts), [
        s for s in scripts if not (MODULE_DIR / s).is_file()]
    onDisk = {p.relative_to(MODULE_DIR).as_posix() for p in MODULE_DIR.rglob("*.py")
              if "Testing" not in p.parts and "__pycache__" not in p.parts}
    assert set(scripts) == onDisk, {"unlisted": onDisk - set(scripts),
                                    "missing": set(scripts) - onDisk}


def test_masksamlib_is_installed_next_to_the_module():
    _, library, _ = moduleLists()
    text = MODULE_CMAKE.read_text()
    missing = [s for s in library if not (REPO / s).is_file()]
    assert not missing, f"listed but not on disk: {missing}"
    onDisk = {p.relative_to(REPO).as_posix() for p in (REPO / "MaskSAMLib").rglob("*.py")
              if "__pycache__" not in p.parts}
    assert set(library) == onDisk, {
        "add to MASKSAMLIB_PYTHON_SCRIPTS in MaskSAMSlicer/CMakeLists.txt":
            sorted(onDisk - set(library)),
        "remove from the list": sorted(set(library) - onDisk)}
    # Each library file is copied into the module's binary folder and listed by absolute path,
    # which ctkMacroCompilePythonScript installs as qt-scripted-modules/MaskSAMLib/...
    assert re.search(r"foreach\(\s*script\s+IN\s+LISTS\s+MASKSAMLIB_PYTHON_SCRIPTS\s*\)", text)
    assert "${CMAKE_CURRENT_BINARY_DIR}/${script}" in text and "COPYONLY" in text
    assert "list(APPEND MODULE_PYTHON_SCRIPTS ${CMAKE_CURRENT_BINARY_DIR}/${script})" in text


def test_module_resources_tests_and_registry_are_installed():
    _, _, resources = moduleLists()
    text = re.sub(r"#[^\n]*", "", MODULE_CMAKE.read_text())
    for resource in resources:
        assert (MODULE_DIR / resource).is_file(), resource
    onDisk = {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "Resources").rglob("*")
              if p.is_file() and p.suffix != ".py"}
    assert set(resources) == onDisk, onDisk ^ set(resources)
    macro = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", text, re.S).group(1)
    for keyword in ("NAME ${MODULE_NAME}", "SCRIPTS ${MODULE_PYTHON_SCRIPTS}",
                    "RESOURCES ${MODULE_PYTHON_RESOURCES}", "WITH_GENERIC_TESTS"):
        assert keyword in macro
    unittest = r"slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)"
    assert re.search(r"if\(BUILD_TESTING\).*" + unittest, text, re.S)
    registry = re.findall(r"\$\{MASKSAMSLICER_SOURCE_ROOT\}/(Resources/models\.json)", text)
    assert registry and all((REPO / r).is_file() for r in registry)


def test_requirements_leave_slicer_packages_alone():
    lines = [ln.split("#")[0].strip() for ln in
             (MODULE_DIR / "Resources" / "requirements.txt").read_text().splitlines()]
    names = {re.match(r"[A-Za-z0-9._-]+", ln).group(0).lower() for ln in lines if ln}
    assert names and not names & {"numpy", "simpleitk", "vtk", "torch", "torchvision"}
    # What MaskSAMLib imports from outside the standard library is covered.
    assert {"segment-anything", "safetensors", "scipy", "tqdm", "psutil"} <= names


def test_model_registry_file_is_valid():
    import sys

    sys.path.insert(0, str(MODULE_DIR))
    from MaskSAMSlicerLib.modelRegistry import loadRegistryFile

    registry = loadRegistryFile(REPO / "Resources" / "models.json")
    for entry in registry["models"]:
        assert re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])
    bases = {b["backbone"] for b in registry["baseModels"]}
    assert {"litemedsam", "vit_b", "vit_l", "vit_h"} <= bases


# ----------------------------------------------------------------------------- module code
def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_module_never_imports_torch_and_logic_never_imports_qt():
    for path in MODULE_DIR.rglob("*.py"):
        assert not {n for n in imports(path) if n.split(".")[0] == "torch"}, path
    for name in ("errors", "process", "volumeIO", "segmentationLogic", "trainingCases",
                 "trainingLogic", "promptLogic", "panelLogic", "modelRegistry", "install"):
        path = MODULE_DIR / "MaskSAMSlicerLib" / f"{name}.py"
        bad = {n for n in imports(path)
               if n.split(".")[0] in ("qt", "ctk", "PythonQt") or "ScriptedLoadableModule" in n}
        assert not bad, (path, bad)
        usesApp = [node.lineno for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.Attribute) and node.attr == "app"
                   and isinstance(node.value, ast.Name) and node.value.id == "slicer"]
        assert not usesApp, (path, usesApp)


#: The library modules the Slicer module may import (torch-free, numpy at most, at import).
TORCH_FREE_LIBRARY = {"MaskSAMLib", "MaskSAMLib.errors", "MaskSAMLib.labels", "MaskSAMLib.files",
                      "MaskSAMLib.models", "MaskSAMLib.terminology", "MaskSAMLib.config",
                      "MaskSAMLib.backbones", "MaskSAMLib.faults", "MaskSAMLib.data",
                      "MaskSAMLib.data.nifti_checks"}


def test_importing_the_module_logic_loads_no_torch():
    """In a fresh interpreter: every logic module of MaskSAMSlicerLib imports, torch is not in
    ``sys.modules`` afterwards, and the only MaskSAMLib modules loaded are the torch-free ones."""
    import json
    import subprocess
    import sys

    pytest.importorskip("slicer", reason="slicer-core is not installed")
    pytest.importorskip("SimpleITK")
    names = ["errors", "process", "volumeIO", "segmentationLogic", "trainingCases",
             "trainingLogic", "promptLogic", "panelLogic", "modelRegistry", "install",
             "compatibility"]
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(MODULE_DIR)!r})\n"
        f"for name in {names!r}:\n"
        "    __import__('MaskSAMSlicerLib.' + name)\n"
        "print(json.dumps(sorted(m for m in sys.modules\n"
        "                        if m.split('.')[0] in ('torch', 'MaskSAMLib', 'qt', 'ctk'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert not any(m.split(".")[0] == "torch" for m in loaded), loaded
    assert not loaded & {"qt", "ctk"}
    assert {"MaskSAMLib.labels", "MaskSAMLib.models", "MaskSAMLib.files"} <= loaded
    assert loaded <= TORCH_FREE_LIBRARY, loaded - TORCH_FREE_LIBRARY


def test_module_file_declares_the_slicer_classes_and_research_notice():
    tree = ast.parse((MODULE_DIR / "MaskSAMSlicer.py").read_text())
    classes = {n.name: [b.id if isinstance(b, ast.Name) else "" for b in n.bases]
               for n in tree.body if isinstance(n, ast.ClassDef)}
    assert classes["MaskSAMSlicer"] == ["ScriptedLoadableModule"]
    assert "ScriptedLoadableModuleWidget" in classes["MaskSAMSlicerWidget"]
    assert classes["MaskSAMSlicerLogic"] == ["ScriptedLoadableModuleLogic"]
    assert classes["MaskSAMSlicerTest"] == ["ScriptedLoadableModuleTest"]
    text = (MODULE_DIR / "MaskSAMSlicer.py").read_text()
    assert "Research use only" in text and "not for diagnosis" in text
    # No dependency installation at import time: only names are imported at module level.
    top = {n for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
           for n in imports_of(node)}
    assert not top & {"torch", "MaskSAMLib", "MaskSAMSlicerLib.install"}


def imports_of(node) -> set[str]:
    if isinstance(node, ast.Import):
        return {a.name for a in node.names}
    return {node.module or ""}


@pytest.mark.parametrize("path", sorted((MODULE_DIR).rglob("*.py")), ids=lambda p: p.name)
def test_module_files_compile(path):
    compile(path.read_text(), str(path), "exec")


# ----------------------------------------------------------------------------- index review
def test_licence_file_is_the_projects_apache_2_licence():
    text = (REPO / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'license\s*=\s*\{\s*text\s*=\s*"Apache-2.0"\s*\}', pyproject)


def test_repository_name_and_every_url_agree():
    meta = cmakeSets(TOP_CMAKE.read_text())
    home = meta["EXTENSION_HOMEPAGE"]
    match = re.fullmatch(r"https://github\.com/[\w.-]+/([\w.-]+)", home)
    assert match, home
    assert match.group(1).startswith("Slicer"), "the index wants repository names Slicer..."
    assert re.search(r"project\(\s*MaskSAMSlicer\s*\)", TOP_CMAKE.read_text())  # the extension
    urls = [meta["EXTENSION_ICONURL"], *meta["EXTENSION_SCREENSHOTURLS"].split(),
            s4ext()["homepage"], s4ext()["iconurl"], *s4ext()["screenshoturls"].split(),
            s4ext()["scmurl"], json.loads(CATALOG_JSON.read_text())["scm_url"]]
    for url in urls:
        assert url == home or url.startswith(home + "/") or url == home + ".git", url
    # No other GitHub address of this project anywhere in the files the index reads.
    for path in (TOP_CMAKE, S4EXT, CATALOG_JSON, REPO / "README.md",
                 MODULE_DIR / "MaskSAMSlicer.py"):
        for other in re.findall(r"https://github\.com/MaskSAMSlicer/[\w.-]+", path.read_text()):
            assert other.removesuffix(".git") == home, (path, other)


def test_contributors_have_the_form_the_template_expects_everywhere():
    meta = cmakeSets(TOP_CMAKE.read_text())
    contributors = meta["EXTENSION_CONTRIBUTORS"]
    entry = r"[^,()]+ \([^()]+\)"
    assert re.fullmatch(rf"{entry}(, {entry})*", contributors), contributors
    assert s4ext()["contributors"] == contributors
    tree = ast.parse((MODULE_DIR / "MaskSAMSlicer.py").read_text())
    values = [node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
              and any(isinstance(t, ast.Attribute) and t.attr == "contributors"
                      for t in node.targets)]
    assert len(values) == 1
    assert ast.literal_eval(values[0]) == [contributors]


def test_minimum_slicer_version_is_stated_everywhere():
    text = TOP_CMAKE.read_text()
    assert "find_package(Slicer 5.10 REQUIRED)" in text
    meta = cmakeSets(text)
    assert "Slicer 5.10 or later" in meta["EXTENSION_DESCRIPTION"]
    assert "Slicer 5.10 or later" in (MODULE_DIR / "MaskSAMSlicer.py").read_text()
    readme = (REPO / "README.md").read_text()
    slicerSection = readme.split("## 3D Slicer extension", 1)[1].split("\n## ", 1)[0]
    assert "Slicer 5.10" in slicerSection and "Python 3.12" in slicerSection
    assert re.search(r'requires-python\s*=\s*">=3\.10"', (REPO / "pyproject.toml").read_text())
    import sys

    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))
    from MaskSAMSlicerLib.compatibility import MINIMUM_PYTHON, MINIMUM_SLICER

    assert MINIMUM_SLICER == (5, 10) and MINIMUM_PYTHON == (3, 10)


def usesUnionAnnotations(tree: ast.AST) -> bool:
    annotations = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            annotations += [a.annotation for a in (*args.args, *args.kwonlyargs,
                                                   *args.posonlyargs) if a.annotation]
            annotations += [node.returns] if node.returns else []
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
    return any(isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.BitOr)
               for annotation in annotations for sub in ast.walk(annotation))


@pytest.mark.parametrize("path", sorted((MODULE_DIR).rglob("*.py")), ids=lambda p: p.name)
def test_module_loads_on_an_old_slicer_to_say_it_is_too_old(path):
    """Slicer 5.6/5.8 (Python 3.9) must be able to import the module and show the panel's
    message: Python 3.9 grammar, and ``X | None`` annotations only behind the future import."""
    source = path.read_text()
    tree = ast.parse(source, feature_version=(3, 9))
    if usesUnionAnnotations(tree):
        assert "from __future__ import annotations" in source, path


def test_module_is_linted_like_the_library():
    """ruff with the repository's configuration (as Python 3.9 code, see pyproject.toml)."""
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff") or shutil.which("ruff", path=str(Path(sys.executable).parent))
    if ruff is None:
        pytest.skip("ruff is not installed (it is in the [test] extra)")
    paths = ["MaskSAMSlicer", "MaskSAMLib/terminology.py",
             *sorted(str(p.relative_to(REPO))
                     for p in (REPO / "Testing" / "slicer_module").glob("*.py"))]
    result = subprocess.run([ruff, "check", "--no-cache", *paths], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
