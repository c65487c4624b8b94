#!/usr/bin/env python3
"""Make every copy of the repository URL agree with `repository: url:` in _config.yml.

In a fork: edit the URL in _config.yml, then run

    python tools/set_repo_url.py            # rewrite the copies
    python tools/set_repo_url.py --check    # only list the copies that differ (exit 1 if any)

The copies (tests/test_book_config.py checks that they agree):

* ``REPO_URL = "..."`` in iconv/book.py (the book helpers fetch results files from it), and
  the setup cell shown in its docstring;
* the Colab ``%pip install "invertible-convnets @ git+<url>"`` line of every chapter's hidden
  setup cell, in book/*.ipynb and tools/chapter_template.ipynb;
* README.md: the install command, the workflow badge and the book's online address, which is
  derived from the URL: https://github.com/<owner>/<repo> is published by GitHub Pages at
  https://<owner, lower case>.github.io/<repo>/.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GITHUB = re.compile(r"https://github\.com/([\w.-]+)/([\w.-]+?)(?:\.git)?(?=[^\w.-]|\.?$)")
BOOK_PY_URL = re.compile(r'^(REPO_URL\s*=\s*)"([^"]*)"', re.M)
PIP_URL = re.compile(r"git\+(https://github\.com/[\w.-]+/[\w.-]+?)(?:\.git)?(?=[\"'\s@#]|$)")
LEGACY_NB_URL = re.compile(r'^(REPO_URL\s*=\s*)"([^"]*)"', re.M)
PAGES = re.compile(r"https://[\w-]+\.github\.io/(?:[\w.-]+/)?")


def config_url(root: Path = ROOT) -> str:
    """`repository: url:` of root/_config.yml, without a trailing slash."""
    text = (root / "_config.yml").read_text()
    m = re.search(r"^repository:\s*\n(?:[ \t]+.*\n)*?[ \t]+url:\s*(\S+)", text, re.M)
    if not m:
        raise SystemExit(f"{root / '_config.yml'}: no `repository: url:` found")
    url = m.group(1).strip("'\"").rstrip("/")
    if not GITHUB.fullmatch(url):
        raise SystemExit(f"repository url must look like https://github.com/<owner>/<repo>, got {url!r}")
    return url


def pages_url(repo_url: str) -> str:
    """GitHub Pages address of a repository: https://<owner>.github.io/<repo>/ (a repository
    named <owner>.github.io is served at the root)."""
    owner, repo = GITHUB.fullmatch(repo_url.rstrip("/")).groups()
    owner = owner.lower()
    if repo.lower() == f"{owner}.github.io":
        return f"https://{owner}.github.io/"
    return f"https://{owner}.github.io/{repo}/"


def badge_urls(repo_url: str) -> tuple[str, str]:
    """(badge image, link target) of the Pages workflow's status badge."""
    workflow = f"{repo_url.rstrip('/')}/actions/workflows/pages.yml"
    return f"{workflow}/badge.svg", workflow


def notebooks(root: Path = ROOT) -> list[Path]:
    return sorted((root / "book").glob("*.ipynb")) + [root / "tools" / "chapter_template.ipynb"]


def notebook_urls(nb: dict) -> list[str]:
    """The repository URLs in a notebook's code cells (pip lines, and the legacy REPO_URL)."""
    urls = []
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            src = "".join(cell["source"])
            urls += PIP_URL.findall(src) + [m.group(2) for m in LEGACY_NB_URL.finditer(src)]
    return urls


def rewrite_notebook(nb: dict, url: str) -> bool:
    changed = False
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        new = PIP_URL.sub(f"git+{url}", src)
        new = LEGACY_NB_URL.sub(lambda m: f'{m.group(1)}"{url}"', new)
        if new != src:
            cell["source"] = new.splitlines(keepends=True)
            changed = True
    return changed


def replace_urls(text: str, old_urls: set[str], url: str) -> str:
    """`text` with each old repository URL (and its Pages address) replaced by `url`'s."""
    for old in sorted(old_urls, key=len, reverse=True):
        if old == url:
            continue
        text = re.sub(re.escape(old) + r"(?![\w-]|\.[\w])", url, text)
        text = text.replace(pages_url(old), pages_url(url))
    return text


def main(argv=None, root: Path = ROOT) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only report copies that differ")
    ap.add_argument("--root", type=Path, default=root, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    root = args.root
    url = config_url(root)
    stale: list[str] = []
    old_urls: set[str] = set()

    book_py = root / "iconv" / "book.py"
    text = book_py.read_text()
    m = BOOK_PY_URL.search(text)
    if not m:
        raise SystemExit(f"{book_py}: no REPO_URL = \"...\" line")
    if m.group(2).rstrip("/") != url:
        old_urls.add(m.group(2).rstrip("/"))
        stale.append(str(book_py.relative_to(root)))
        if not args.check:  # the REPO_URL line and the docstring's example
            text = BOOK_PY_URL.sub(lambda m: f'{m.group(1)}"{url}"', text, count=1)
            book_py.write_text(replace_urls(text, old_urls, url))

    for path in notebooks(root):
        nb = json.loads(path.read_text())
        found = notebook_urls(nb)
        if any(u.rstrip("/") != url for u in found):
            old_urls.update(u.rstrip("/") for u in found if u.rstrip("/") != url)
            stale.append(str(path.relative_to(root)))
            if not args.check and rewrite_notebook(nb, url):
                path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")

    readme = root / "README.md"
    text = readme.read_text()
    old_urls.update(u.rstrip("/") for u in PIP_URL.findall(text))
    old_urls.update(m.group(0) for m in GITHUB.finditer(text)
                    if "/actions/workflows/pages.yml" in text[m.end():m.end() + 40])
    new = replace_urls(text, old_urls - {url}, url)
    if new != text:
        stale.append("README.md")
        if not args.check:
            readme.write_text(new)

    verb = "differ" if args.check else "updated"
    for s in stale:
        print(f"{verb}: {s}")
    print(f"repository {url}\nbook       {pages_url(url)}")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
