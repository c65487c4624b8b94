"""Static checks of the book's configuration and notebooks (no execution, no browser).

The configuration (offline math, graphviz diagrams, MyST-rendered Markdown outputs), the chapter
layout (title first, hidden one-line setup cell, hidden plotting code, no committed outputs), the
repository URL (one value in _config.yml; iconv/book.py, the chapters' %pip lines and the
README's book address and badge follow it, tools/set_repo_url.py rewrites them), the toc, the
bibliography and the Pages workflow. The full check is `bash .ci/build_book.sh`; these catch the
cheap mistakes early.
"""

import hashlib
import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
SETUP_LINE = "from iconv.book import setup; BOOK = setup()"
HIDDEN_TAGS = {"remove-input", "remove-cell", "hide-input"}


def load_tool(name):
    """A module of tools/ (not a package) by file name."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


set_repo_url = load_tool("set_repo_url")
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
    assert "sphinx-mathjax-offline" in sphinx["extra_extensions"]  # math offline
    assert {"amsmath", "dollarmath"} <= set(cfg["parse"]["myst_enable_extensions"])
    # diagrams drawn at build time by the local `dot`, as SVG (no web service)
    assert "sphinx.ext.graphviz" in sphinx["extra_extensions"]
    assert sphinx["config"]["graphviz_output_format"] == "svg"
    # Markdown displayed by cells (generated result tables) is parsed as MyST: tables render
    assert sphinx["config"]["nb_render_markdown_format"] == "myst"
    for name, folder in sphinx["local_extensions"].items():
        assert (ROOT / folder / f"{name}.py").is_file(), f"local extension {name} not in {folder}"
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
    """The chapter layout: a markdown title first, then the hidden setup cell (one line outside Colab)."""
    nb = json.loads(path.read_text())
    meta = nb["metadata"]
    assert meta["kernelspec"]["name"] == "python3"
    assert meta.get("accelerator") == "GPU", "Colab should ask for a GPU"
    first = nb["cells"][0]
    assert first["cell_type"] == "markdown" and "".join(first["source"]).startswith("# "), (
        "a chapter opens with its title, goal and intuition (markdown) before any code")
    cell = first_code_cell(nb)
    source = "".join(cell["source"])
    assert SETUP_LINE in source, f"the first code cell must run {SETUP_LINE!r} (tools/chapter_template.ipynb)"
    tags = set(cell.get("metadata", {}).get("tags", []))
    assert tags & HIDDEN_TAGS, f"the setup cell must be hidden (one of {sorted(HIDDEN_TAGS)}), has {sorted(tags)}"
    assert '"google.colab" in sys.modules' in source, "the %pip line must run only on Colab"
    lines = [ln for ln in source.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert len(lines) <= 4, f"the setup cell is the template's four lines, not {len(lines)}"
    urls = set_repo_url.PIP_URL.findall(source)
    assert urls, 'the setup cell lacks %pip install "invertible-convnets @ git+<repository url>"'
    assert {u.rstrip("/") for u in urls} == {repo_url()}, "the %pip URL differs from _config.yml"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_figure_cells_hide_their_code(path):
    """Plotting code is hidden: the figure shows, the code is one click away."""
    nb = json.loads(path.read_text())
    shown = [c.get("id") for c in nb["cells"] if c["cell_type"] == "code"
             and "figure" in c.get("metadata", {}).get("mystnb", {})
             and not set(c["metadata"].get("tags", [])) & HIDDEN_TAGS]
    assert not shown, f"figure cells whose code is visible (tag them hide-input): {shown}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    dirty = [c.get("id") for c in nb["cells"] if c["cell_type"] == "code" and c.get("outputs")]
    assert not dirty, f"clear outputs before committing (the build executes): cells {dirty}"
    assert "widgets" not in nb["metadata"], "clear saved widget state before committing"


def test_toc_files_exist_and_notation_follows_the_intro():
    files = toc_files()
    missing = [f for f in files if not any((ROOT / f"{f}{ext}").is_file() for ext in (".md", ".ipynb"))]
    assert not missing, f"listed in _toc.yml but not written: {missing}"
    assert files[:2] == ["book/intro", "book/notation"], "the notation page comes right after the intro"


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


# --------------------------------------------------------------------------- the repository URL
def url_copies(root: Path) -> dict[str, set[str]]:
    """Every copy of the repository URL under `root`: {where: {urls}}."""
    copies = {}
    book_py = (root / "iconv" / "book.py").read_text()
    copies["iconv/book.py REPO_URL"] = {m.group(2).rstrip("/") for m in set_repo_url.BOOK_PY_URL.finditer(book_py)}
    for path in set_repo_url.notebooks(root):
        urls = set_repo_url.notebook_urls(json.loads(path.read_text()))
        copies[f"{path.relative_to(root)} setup cell"] = {u.rstrip("/") for u in urls}
    readme = (root / "README.md").read_text()
    copies["README.md install command"] = {u.rstrip("/") for u in set_repo_url.PIP_URL.findall(readme)}
    return copies


def readme_problems(root: Path, url: str) -> list[str]:
    """What README.md lacks: the book's address derived from `url`, and the workflow badge."""
    readme = (root / "README.md").read_text()
    badge, workflow = set_repo_url.badge_urls(url)
    wanted = {"online address": set_repo_url.pages_url(url), "badge image": badge,
              "badge link": f"({workflow})"}
    problems = [f"README.md lacks the {what} {text}" for what, text in wanted.items() if text not in readme]
    others = {m.group(0) for m in set_repo_url.PAGES.finditer(readme)} - {set_repo_url.pages_url(url)}
    problems += [f"README.md has another book address: {o}" for o in sorted(others)]
    return problems


def test_pages_url_derivation():
    assert (set_repo_url.pages_url("https://github.com/iconv-book/invertible-convnets")
            == "https://iconv-book.github.io/invertible-convnets/")
    assert set_repo_url.pages_url("https://github.com/Some-User/repo.x") == "https://some-user.github.io/repo.x/"
    assert set_repo_url.pages_url("https://github.com/Me/me.github.io") == "https://me.github.io/"


def test_repository_url_agrees_everywhere():
    from iconv.book import REPO_URL

    assert REPO_URL.rstrip("/") == repo_url(), "iconv/book.py REPO_URL differs from _config.yml"
    differ = {where: urls for where, urls in url_copies(ROOT).items() if urls and urls != {repo_url()}}
    assert not differ, f"differ from _config.yml's {repo_url()} (run tools/set_repo_url.py): {differ}"
    assert not readme_problems(ROOT, repo_url())


def test_set_repo_url_rewrites_every_copy(tmp_path):
    """In a fork: change _config.yml, run the tool, and every copy follows (and only the copies)."""
    for rel in ["_config.yml", "README.md", "iconv/book.py", "tools/chapter_template.ipynb"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    shutil.copytree(ROOT / "book", tmp_path / "book", ignore=shutil.ignore_patterns("data", "results", "runs"))
    old, fork = repo_url(), "https://github.com/A-Fork/my-book"
    config = tmp_path / "_config.yml"
    config.write_text(config.read_text().replace(f"url: {old}", f"url: {fork}"))
    assert set_repo_url.config_url(tmp_path) == fork
    assert set_repo_url.main(["--check"], root=tmp_path) == 1  # stale copies are reported

    assert set_repo_url.main([], root=tmp_path) == 0
    copies = url_copies(tmp_path)
    assert all(urls == {fork} for urls in copies.values() if urls), copies
    assert sum(1 for urls in copies.values() if urls) >= 2 + len(NOTEBOOKS) - 1
    assert readme_problems(tmp_path, fork) == []
    assert "https://a-fork.github.io/my-book/" in (tmp_path / "README.md").read_text()
    assert set_repo_url.main(["--check"], root=tmp_path) == 0
    # nothing but the URL changed
    before = (ROOT / "iconv" / "book.py").read_text().replace(old, fork)
    assert (tmp_path / "iconv" / "book.py").read_text() == before


# --------------------------------------------------------------------------- publishing
def test_pages_workflow_runs_ci_scripts_and_deploys():
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "pages.yml").read_text())
    trigger = wf.get("on", wf.get(True))  # YAML 1.1 reads the key `on` as True
    assert "main" in trigger["push"]["branches"]
    build, deploy = wf["jobs"]["build"], wf["jobs"]["deploy"]
    runs = "\n".join(step.get("run", "") for step in build["steps"])
    for script in (".ci/setup.sh", ".ci/test.sh", ".ci/build_book.sh"):
        assert f"bash {script}" in runs, f"the workflow does not run {script}"
        assert (ROOT / script).is_file()
    upload = [s for s in build["steps"] if s.get("uses", "").startswith("actions/upload-pages-artifact@")]
    assert upload and upload[0]["with"]["path"] == "_build/html"
    assert deploy["needs"] == "build"
    assert any(s.get("uses", "").startswith("actions/deploy-pages@") for s in deploy["steps"])
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert deploy["environment"]["name"] == "github-pages"


def test_ci_setup_installs_the_book_tools():
    """The book build needs Debian's graphviz (dot, for the diagrams) and chromium (the page check)."""
    setup = (ROOT / ".ci" / "setup.sh").read_text()
    for package in ("graphviz", "chromium"):
        assert re.search(rf"\b{package}\b", setup), f".ci/setup.sh does not install {package}"


# --------------------------------------------------------------------------- tools/figure_alt.py
def test_figure_alt_uses_the_caption_only_when_alt_is_missing():
    """Plots and diagrams in a captioned figure get the caption as alt; others stay as they are."""
    from docutils import nodes

    figure_alt = load_tool("figure_alt")
    doc = nodes.document(None, None)
    captioned, explicit, bare = nodes.image(uri="a.png"), nodes.image(uri="b.png", alt="Own text"), nodes.image(uri="c.png")
    doc += nodes.figure("", captioned, nodes.caption("", "Loss  against\nsteps."))
    doc += nodes.figure("", explicit, nodes.caption("", "A caption"))
    doc += nodes.paragraph("", "", bare)
    from sphinx.ext.graphviz import graphviz

    diagram, bare_diagram = graphviz(code="digraph { a -> b }"), graphviz(code="digraph { c -> d }")
    doc += nodes.figure("", diagram, nodes.caption("", "The Fourier pipeline, for |A_f| < 1."))
    doc += bare_diagram
    figure_alt.add_alt_from_captions(None, doc, "page")
    assert captioned["alt"] == "Loss against steps."  # the caption, on one line
    assert explicit["alt"] == "Own text"
    assert diagram["alt"] == "The Fourier pipeline, for |A_f| &lt; 1."  # Sphinx writes it unescaped
    assert "alt" not in bare and "alt" not in bare_diagram  # no caption: the page check fails them


def test_environments_and_build_outputs_are_excluded_from_the_book():
    """Sphinx must not read the Markdown of installed packages (.venv, .venv-compat, ...): with
    -W their docs' warnings fail the build (as .venv-compat's did)."""
    import fnmatch

    patterns = load_config()["exclude_patterns"]
    for path in [".venv/lib/x/README.md", ".venv-compat/lib/python3.11/site-packages/x/README.md",
                 "_build/html/index.md", "venv/lib/python3.12/site-packages/y/LICENSE.md"]:
        assert any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p + "/*")
                   or fnmatch.fnmatch(path.split("/")[0], p) for p in patterns), path
