"""The Qt-free parts of the Upsample slices module, testable with slicer-core alone.

A package, not files beside CycleINR.py: Slicer loads every .py file at the top of a module
folder as a scripted module, and would run these again as modules that fail to load.
"""

from pathlib import Path


def findLibraryParent(moduleDir) -> Path:
    """The folder that holds the CycleINRLib package (which the module then puts on sys.path).

    Installed extension: next to the module script; source checkout (module path added in
    Application Settings): the repository root, one level up.
    """
    moduleDir = Path(moduleDir).resolve()
    for candidate in (moduleDir, moduleDir.parent):
        if (candidate / "CycleINRLib" / "__init__.py").is_file():
            return candidate
    raise ImportError(f"the CycleINRLib package was found neither in {moduleDir} nor in {moduleDir.parent}; "
                      "reinstall the CycleINR extension")
