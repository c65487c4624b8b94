"""One statement of the tested torch releases: pyproject's floor, the CI pins, the book's warning range.

pyproject.toml declares the oldest torch a test has passed on; requirements.txt pins the main CI
job's torch and .ci/compat.sh the compatibility job's; iconv.book.TESTED_TORCH (the chapters warn
outside it) must list exactly those two releases, and the README must name them.
"""
import re
from pathlib import Path

import pytest

import iconv
from iconv.book import TESTED_TORCH

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def release(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def pinned(text: str, package: str) -> str:
    match = re.search(rf"\b{package}==([0-9][0-9.]*)", text)
    assert match, f"no {package}==... pin found"
    return match.group(1)


def test_torch_floor_and_tested_releases_agree():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_requirement = next(d for d in project["dependencies"] if re.match(r"torch\b", d))
    floor = re.fullmatch(r"torch>=([0-9.]+)", torch_requirement.replace(" ", ""))
    assert floor, f"pyproject.toml should declare torch>=<oldest tested>, has {torch_requirement!r}"
    main_job = pinned((ROOT / "requirements.txt").read_text(), "torch")
    compat_default = re.search(r"ICONV_COMPAT_TORCH:-([^}]*)}", (ROOT / ".ci" / "compat.sh").read_text())
    assert compat_default, ".ci/compat.sh has no default ICONV_COMPAT_TORCH"
    compat_job = pinned(compat_default.group(1), "torch")
    assert sorted({release(main_job), release(compat_job)}) == sorted(TESTED_TORCH)
    assert floor.group(1) == min(TESTED_TORCH, key=lambda v: tuple(map(int, v.split("."))))
    readme = (ROOT / "README.md").read_text()
    for version in (main_job, compat_job):
        assert version in readme, f"README.md does not name the tested torch {version}"


def test_version_has_one_definition():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" in project["project"]["dynamic"] and "version" not in project["project"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "iconv.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", iconv.__version__)
