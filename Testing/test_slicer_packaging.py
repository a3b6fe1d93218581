"""The Slicer extension's packaging: CMake lists, icon, license, Python version of the scripts.

The CMake lists name every file explicitly (Slicer's convention); these tests make sure a new
file in CycleINRLib/ or CycleINR/ cannot silently miss the extension package.
"""

import ast
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPOSITORY = Path(__file__).resolve().parents[1]
SLICER_PYTHON = (3, 9)  # Slicer 5.4, the oldest version the extension supports, ships Python 3.9


def cmake_list(path: Path, variable: str) -> list:
    """The items of `set(<variable> ...)` in a CMake file, with ${MODULE_NAME} expanded."""
    text = path.read_text(encoding="utf-8")
    match = re.search(rf"set\(\s*{variable}\s+(.*?)\)", text, re.S)
    assert match, f"{path.name} has no set({variable} ...)"
    module_name = re.search(r"set\(\s*MODULE_NAME\s+(\w+)\s*\)", text)
    items = match.group(1).split()
    return [item.replace("${MODULE_NAME}", module_name.group(1)) if module_name else item for item in items]


def files_under(folder: Path) -> set:
    return {str(path.relative_to(folder.parent)) for path in folder.rglob("*")
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"}


def test_the_extension_lists_every_file_of_the_library():
    top = REPOSITORY / "CMakeLists.txt"
    listed = cmake_list(top, "CycleINRLib_PYTHON_SCRIPTS") + cmake_list(top, "CycleINRLib_PYTHON_RESOURCES")
    assert len(listed) == len(set(listed)), "a file is listed twice"
    on_disk = files_under(REPOSITORY / "CycleINRLib")
    assert on_disk - set(listed) == set(), "files of CycleINRLib/ missing from CMakeLists.txt"
    assert set(listed) - on_disk == set(), "CMakeLists.txt lists files that do not exist"
    assert any(name.endswith(".safetensors") for name in listed), "the bundled weights must ship"


def test_the_module_lists_every_file_of_its_folder():
    module = REPOSITORY / "CycleINR" / "CMakeLists.txt"
    listed = cmake_list(module, "MODULE_PYTHON_SCRIPTS") + cmake_list(module, "MODULE_PYTHON_RESOURCES")
    on_disk = {name.split("/", 1)[1] for name in files_under(REPOSITORY / "CycleINR")} - {"CMakeLists.txt"}
    assert set(listed) == on_disk
    assert "slicerMacroBuildScriptedModule(" in module.read_text(encoding="utf-8")


def test_every_python_file_at_the_top_of_the_module_folder_is_a_module():
    """Slicer loads each .py file at the top of a module folder as a scripted module whose class
    has the file's name (helpers go in a package); a helper there would fail to load at every
    start and run its code again over the imported one."""
    for script in sorted((REPOSITORY / "CycleINR").glob("*.py")):
        tree = ast.parse(script.read_text(encoding="utf-8"))
        classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
        assert script.stem in classes, f"{script.name} defines no class {script.stem}: move it into CycleINRSlicerLib/"
        assert [base.id for base in classes[script.stem].bases if isinstance(base, ast.Name)] == ["ScriptedLoadableModule"]


def test_the_top_level_cmake_is_a_slicer_extension():
    text = (REPOSITORY / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"^project\(CycleINR\)", text, re.M)
    for variable in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert re.search(rf'set\(EXTENSION_{variable} "[^"]+"\)', text), f"EXTENSION_{variable} is not set"
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text
    ordered = ["find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(CycleINR)",
               "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"]
    positions = [text.index(statement) for statement in ordered]
    assert positions == sorted(positions)
    assert re.search(r'MINIMUM_SLICER_VERSION "5\.4"', text)


def test_links_into_the_readme_name_one_of_its_headings():
    """The module's help and the extension's homepage point users at README sections."""
    headings = re.findall(r"^#+ (.+)$", (REPOSITORY / "README.md").read_text(encoding="utf-8"), re.M)
    anchors = {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}  # GitHub's slugs
    links = [anchor for path in ("CMakeLists.txt", "CycleINR/CycleINR.py")
             for anchor in re.findall(r"github\.com/cycleinr/CycleINR#([\w-]+)", (REPOSITORY / path).read_text(encoding="utf-8"))]
    assert links and set(links) <= anchors, set(links) - anchors


@pytest.mark.parametrize("path", ["CycleINR.png", "CycleINR/Resources/Icons/CycleINR.png"])
def test_the_icon_is_a_real_128_pixel_picture(path):
    image = Image.open(REPOSITORY / path).convert("RGBA")
    assert image.size == (128, 128)
    pixels = np.asarray(image).reshape(-1, 4)
    opaque = pixels[pixels[:, 3] > 200, :3]
    assert len(opaque) > 128 * 128 // 5, "the icon is mostly empty"
    assert len(np.unique(opaque // 32, axis=0)) >= 4, "the icon has too few colours to show anything"


def test_the_license_is_apache_2():
    text = (REPOSITORY / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text


@pytest.mark.parametrize("script", sorted((REPOSITORY / "CycleINR").rglob("*.py")), ids=lambda path: path.name)
def test_module_scripts_use_only_the_grammar_of_the_oldest_supported_slicer_python(script):
    ast.parse(script.read_text(encoding="utf-8"), filename=str(script), feature_version=SLICER_PYTHON)
