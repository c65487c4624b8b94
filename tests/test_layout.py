"""The package's layout rule: no module uses a private name (leading underscore) of another module.

What one module needs from another is public and documented. The test walks every module of
``iconv`` (and the chapters' code cells, ``book/*.ipynb``) with :mod:`ast` and fails on

* ``from X import _name`` (a private name of another module), and
* ``X._name`` where ``X`` is a name bound by an import (a module or a name imported from one),

naming the file, the line and the name. Dunder names (``__version__``) are public; ``self._x``
and ``cls._x`` are a class's own business and not imports, so they are not flagged.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "iconv"
BOOK = ROOT / "book"


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(source: str, where: str) -> list[str]:
    """Every ``from X import _y`` and ``<imported name>._y`` in ``source``: ``["where:line: ..."]``."""
    tree = ast.parse(source)
    imported: set[str] = set()
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                imported.add((alias.asname or alias.name).split(".")[0])
                private = [part for part in alias.name.split(".") if is_private(part)]
                if private:
                    problems.append(f"{where}:{node.lineno}: import {alias.name} (private module {private[0]})")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            private = [part for part in module.split(".") if is_private(part)]
            if private:
                problems.append(f"{where}:{node.lineno}: from {'.' * node.level}{module} import ... "
                                f"(private module {private[0]})")
            for alias in node.names:
                imported.add(alias.asname or alias.name)
                if is_private(alias.name):
                    problems.append(f"{where}:{node.lineno}: from {'.' * node.level}{module} import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in imported:
                problems.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return problems


def package_sources() -> list[tuple[str, str]]:
    return [(str(path.relative_to(ROOT)), path.read_text()) for path in sorted(PACKAGE.rglob("*.py"))]


def cell_code(lines: list[str]) -> str:
    """A code cell as Python: IPython magics and shell lines (``%...``, ``!...``) become ``pass``."""
    out = []
    for line in lines:
        stripped = line.lstrip()
        indent = line[: len(line) - len(stripped)]
        out.append(indent + "pass  # " + stripped if stripped.startswith(("%", "!")) else line)
    return "\n".join(out)


def chapter_sources() -> list[tuple[str, str]]:
    """The code cells of every chapter: ``("book/<chapter>.ipynb cell <i>", code)``."""
    out = []
    for path in sorted(BOOK.glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        for i, cell in enumerate(cells):
            if cell["cell_type"] == "code":
                out.append((f"{path.relative_to(ROOT)} cell {i}", cell_code("".join(cell["source"]).splitlines())))
    return out


def test_the_checker_catches_private_uses():
    source = ("from iconv.flow import _check_shape\nimport iconv\nfrom iconv import fourier as f\n"
              "x = iconv._threads.guard\ny = f._lu(1)\nfrom . import _threads\n"
              "self._cache = 1\nz = obj._private\nv = iconv.__version__\n")
    problems = {p.split(": ", 1)[1] for p in private_uses(source, "probe.py")}
    assert problems == {"from iconv.flow import _check_shape", "from . import _threads", "iconv._threads",
                        "f._lu"}, problems


def test_no_module_uses_a_private_name_of_another():
    problems = [p for where, source in package_sources() for p in private_uses(source, where)]
    assert not problems, "private names used across modules:\n" + "\n".join(problems)


@pytest.mark.parametrize("chapter", [p.name for p in sorted(BOOK.glob("*.ipynb"))])
def test_no_chapter_uses_a_private_name(chapter):
    problems = []
    for where, source in chapter_sources():
        if where.split(" cell ")[0].endswith(chapter):
            try:
                problems += private_uses(source, where)
            except SyntaxError as err:
                problems.append(f"{where}: does not parse ({err.msg}, line {err.lineno})")
    assert not problems, "private names used by the chapter:\n" + "\n".join(problems)


# --------------------------------------------------------------------------- the layers of the package

#: core -> layers -> models -> tasks; ``checks``, ``errors`` and ``data`` import nothing of iconv.
LEAVES = {"iconv.checks", "iconv.errors", "iconv.data"}


def rank(module: str) -> int:
    if module in LEAVES or module.startswith("iconv.core"):
        return 0
    if module.startswith("iconv.layers"):
        return 1
    if module.startswith("iconv.models"):
        return 2
    return 3


def iconv_imports(path: Path) -> set[str]:
    """The iconv modules ``path`` imports (relative imports resolved)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    package = parts if parts[-1] == "__init__" else parts[:-1]
    package = [p for p in package if p != "__init__"]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("iconv"):
                found.add(target)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("iconv")}
    return found


def test_each_layer_imports_only_from_the_layers_before_it():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        if module == "iconv":
            continue
        for target in sorted(iconv_imports(path)):
            if module in LEAVES and target not in LEAVES:
                problems.append(f"{module} (a leaf) imports {target}")
            elif rank(target) > rank(module):
                problems.append(f"{module} imports {target}, a later layer")
    assert not problems, "\n".join(problems)
