"""Static checks of the book's configuration and notebooks (no execution, no browser).

The full check is `bash .ci/build_book.sh`; these catch the cheap mistakes early.
"""

import hashlib
import json
import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
TEMPLATE = ROOT / "tools" / "chapter_template.ipynb"  # the pattern new chapters copy; not in the toc
NOTEBOOKS = sorted(BOOK.glob("*.ipynb")) + [TEMPLATE]


def load_config():
    return yaml.safe_load((ROOT / "_config.yml").read_text())


def toc_files():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [ch["file"] for ch in part.get("chapters", [])]
    return files


def repo_url():
    return load_config()["repository"]["url"].rstrip("/")


def first_code_cell(nb):
    return next(c for c in nb["cells"] if c["cell_type"] == "code")


def test_config_essentials():
    cfg = load_config()
    assert cfg["title"] == "Invertible Convolutional Networks"
    assert cfg["execute"]["execute_notebooks"] == "force"
    assert cfg["execute"]["timeout"] >= 600
    sphinx = cfg["sphinx"]
    assert sphinx["config"]["nb_execution_raise_on_error"] is True
    assert "sphinx-mathjax-offline" in sphinx["extra_extensions"]
    assert {"amsmath", "dollarmath"} <= set(cfg["parse"]["myst_enable_extensions"])
    assert cfg["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", repo_url())


def test_widget_js_is_local_and_vendored():
    sphinx_cfg = load_config()["sphinx"]["config"]
    static_dirs = [ROOT / d for d in sphinx_cfg["html_static_path"]]
    for path in sphinx_cfg["nb_ipywidgets_js"]:
        assert "://" not in path and not path.startswith("//"), f"remote widget JS: {path}"
        assert any((d / path).is_file() for d in static_dirs), f"{path} not in html_static_path"


def test_vendored_files_match_checksums():
    sums = (ROOT / "_vendor" / "SHA256SUMS").read_text().split("\n")
    folder = ROOT / "_vendor" / "static" / "jupyter-widgets"
    for line in filter(None, sums):
        digest, name = line.split()
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_setup_cell_and_metadata(path):
    nb = json.loads(path.read_text())
    meta = nb["metadata"]
    assert meta["kernelspec"]["name"] == "python3"
    assert meta.get("accelerator") == "GPU", "Colab should ask for a GPU"
    source = "".join(first_code_cell(nb)["source"])
    urls = re.findall(r"""^REPO_URL\s*=\s*["']([^"']+)["']""", source, flags=re.M)
    assert urls, "the first code cell must define REPO_URL (copy it from tools/chapter_template.ipynb)"
    assert urls[0].rstrip("/") == repo_url(), "REPO_URL differs from _config.yml repository.url"
    for needle in ('"google.colab" in sys.modules', "ICONV_SIZE", "invertible-convnets @ git+"):
        assert needle in source, f"setup cell lacks {needle!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    dirty = [c.get("id") for c in nb["cells"] if c["cell_type"] == "code" and c.get("outputs")]
    assert not dirty, f"clear outputs before committing (the build executes): cells {dirty}"
    assert "widgets" not in nb["metadata"], "clear saved widget state before committing"


def test_every_chapter_notebook_is_in_the_toc():
    listed = set(toc_files())
    stray = [p.name for p in NOTEBOOKS + sorted(BOOK.glob("*.md"))
             if p != TEMPLATE and f"book/{p.stem}" not in listed]
    assert not stray, f"not in _toc.yml (so never built): {stray}"


def test_citations_exist_in_bibliography():
    keys = set(re.findall(r"^@\w+\{([^,\s]+),", (ROOT / "references.bib").read_text(), re.M))
    texts = [p.read_text() for p in BOOK.glob("*.md")]
    for nb_path in NOTEBOOKS:
        nb = json.loads(nb_path.read_text())
        texts += ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown"]
    cited = set()
    for text in texts:
        text = re.sub(r"``.+?``", "", text)  # inline code that shows the syntax
        for group in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", text):
            cited.update(k.strip() for k in group.split(","))
    assert cited, "no citations found at all"
    assert not cited - keys, f"cited but not in references.bib: {sorted(cited - keys)}"


def test_single_bibliography_directive():
    texts = {p.name: p.read_text() for p in BOOK.glob("*.md")}
    for nb_path in NOTEBOOKS:
        nb = json.loads(nb_path.read_text())
        texts[nb_path.name] = "\n".join("".join(c["source"]) for c in nb["cells"])
    directive = re.compile(r"^\s*(`{3,}|:{3,})\s*\{bibliography\}", re.M)
    with_bib = sorted(name for name, text in texts.items() if directive.search(text))
    assert with_bib == ["references.md"], f"only references.md may hold one: {with_bib}"
