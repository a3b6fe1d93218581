"""Every text file and pipe the project opens names its encoding.

Python's default is the locale's: ASCII under `LC_ALL=C` (containers, CI runners, cron, Slicer
started from a service), where README's em dashes, tqdm's bars in a child's stderr or a YAML
comment in another language raise UnicodeDecodeError. Files the project writes are UTF-8 and read
back as UTF-8 whatever the locale.
"""

import ast
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("CycleINR", "CycleINRLib", "Training", "Testing", "benchmarks")
PATH_METHODS = {"read_text", "write_text"}
PIPES = {"run", "Popen", "check_output", "check_call"}


def python_files() -> list[Path]:
    return sorted(path for folder in SOURCE_FOLDERS for path in (REPOSITORY / folder).rglob("*.py"))


def keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def is_text_open(call: ast.Call) -> bool:
    """`open(path)` or `open(path, "w")`: text mode unless the mode has a "b"."""
    mode = call.args[1] if len(call.args) > 1 else keyword(call, "mode")
    return not (isinstance(mode, ast.Constant) and "b" in str(mode.value))


def is_text_pipe(call: ast.Call) -> bool:
    return any(isinstance(keyword(call, flag), ast.Constant) and keyword(call, flag).value is True
               for flag in ("text", "universal_newlines"))


def unnamed_encodings(source: str) -> list[int]:
    """Lines of every text open, Path.read_text/write_text and text-mode subprocess call without
    an `encoding=` argument."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or keyword(node, "encoding") is not None:
            continue
        function = node.func
        name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
        if (name == "open" and isinstance(function, ast.Name) and is_text_open(node)) \
                or name in PATH_METHODS or (name in PIPES and is_text_pipe(node)):
            found.append(node.lineno)
    return found


def test_every_text_file_and_pipe_names_its_encoding():
    found = [f"{path.relative_to(REPOSITORY)}:{line}" for path in python_files()
             for line in unnamed_encodings(path.read_text(encoding="utf-8"))]
    assert found == [], "text I/O in the locale's encoding (ASCII under LC_ALL=C): " + ", ".join(found)


@pytest.mark.parametrize("source, expected", [
    ('open("a.json")', 1), ('open("a.json", "w", encoding="utf-8")', 0), ('open("a.gz", "rb")', 0),
    ('Path("a").read_text()', 1), ('Path("a").write_text("x", encoding="utf-8")', 0),
    ('subprocess.run(["ls"], capture_output=True, text=True)', 1), ('subprocess.run(["ls"])', 0),
    ('subprocess.run(["ls"], text=True, encoding="utf-8")', 0), ('os.open("a", os.O_RDONLY)', 0),
])
def test_the_check_finds_what_it_should(source, expected):
    assert len(unnamed_encodings(source)) == expected
