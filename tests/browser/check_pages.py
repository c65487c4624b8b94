#!/usr/bin/env python3
"""Check every page of the built book in headless Chromium, offline.

Run by .ci/build_book.sh after `jupyter-book build` (not collected by pytest):

    python tests/browser/check_pages.py --html _build/html --toc _toc.yml \
        --screenshots _build/screenshots

For every page listed in the toc (plus the references page, if any) it

* serves the build directory from 127.0.0.1 on a free port (http.server) and records
  every request the browser makes;
* renders the page with headless Chromium while every other host is unreachable
  (--host-resolver-rules), so anything that needs a CDN fails to render;
* checks, on the DOM after scripts ran (--dump-dom):
    - math: pages whose HTML has math got one MathJax <mjx-container> per math element,
      no <mjx-merror> or undefined macro, and no raw TeX delimiters ($$, \\(, \\[, \\begin{) left in visible text;
    - widgets: pages carrying ipywidgets state drew every widget view (a non-empty
      .widget-subarea holding .jupyter-widgets elements);
    - every <img> loads (data: URIs are fine; others must be local and answer 200);
    - no <script src> / <link href> points at a non-local host, and no page mentions a
      CDN in its script sources;
    - every local request the browser made answered 200 (favicon excepted);
    - every relative link resolves to a built file, and its #fragment to an id there;
* saves a screenshot per page to --screenshots.

Prints a PASS/FAIL table and exits non-zero if any page fails. Standard library only.
"""

from __future__ import annotations

import argparse
import functools
import html.parser
import http.server
import os
import re
import shutil
import socketserver
import subprocess
import sys
import tempfile
import threading
import urllib.parse
from pathlib import Path

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CDN_PATTERN = re.compile(r"cdn|jsdelivr|unpkg|cdnjs|googleapis|cloudflare", re.I)
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
        "param", "source", "track", "wbr"}
TEXT_SKIP = {"script", "style", "pre", "code", "textarea", "mjx-container", "noscript",
             "template", "svg", "math"}
RAW_TEX = [("$$", "raw $$"), ("\\(", "raw \\("), ("\\[", "raw \\["), ("\\begin{", "raw \\begin{")]


# --------------------------------------------------------------------------- tiny DOM
class Node:
    __slots__ = ("tag", "attrs", "children", "parent", "text")

    def __init__(self, tag, attrs=None, parent=None, text=None):
        self.tag, self.attrs, self.parent, self.text = tag, dict(attrs or {}), parent, text
        self.children: list[Node] = []

    def classes(self):
        return (self.attrs.get("class") or "").split()

    def iter(self):
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children))


class TreeBuilder(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#root")
        self.cur = self.root

    def handle_starttag(self, tag, attrs):
        node = Node(tag, [(k, v if v is not None else "") for k, v in attrs], self.cur)
        self.cur.children.append(node)
        if tag not in VOID:
            self.cur = node

    def handle_startendtag(self, tag, attrs):
        self.cur.children.append(Node(tag, [(k, v or "") for k, v in attrs], self.cur))

    def handle_endtag(self, tag):
        node = self.cur
        while node is not self.root and node.tag != tag:
            node = node.parent
        if node is not self.root:  # close it (and anything left open inside it)
            self.cur = node.parent

    def handle_data(self, data):
        self.cur.children.append(Node("#text", parent=self.cur, text=data))


def parse(text: str) -> Node:
    builder = TreeBuilder()
    builder.feed(text)
    builder.close()
    return builder.root


def visible_text(root: Node) -> str:
    out, stack = [], [root]
    while stack:
        node = stack.pop()
        if node.tag == "#text":
            out.append(node.text)
            continue
        if node.tag in TEXT_SKIP or "MathJax" in node.classes() or "highlight" in node.classes():
            continue
        if node.attrs.get("type", "").startswith("application/vnd.jupyter"):
            continue
        stack.extend(reversed(node.children))
    return "".join(out)


# --------------------------------------------------------------------------- server
class RecordingHandler(http.server.SimpleHTTPRequestHandler):
    log: list[tuple[str, int]] = []

    def log_request(self, code="-", size="-"):
        try:
            RecordingHandler.log.append((urllib.parse.unquote(self.path), int(code)))
        except (TypeError, ValueError):
            RecordingHandler.log.append((self.path, 0))

    def log_message(self, *args):  # keep the output clean
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        # Chromium drops connections it no longer needs when it exits; not our problem.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


def serve(directory: Path):
    handler = functools.partial(RecordingHandler, directory=str(directory))
    server = Server(("127.0.0.1", 0), handler)  # port 0: the OS picks a free port
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def http_status(base: str, path: str) -> int:
    import urllib.request
    import urllib.error

    try:
        with urllib.request.urlopen(base + path, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


# --------------------------------------------------------------------------- chromium
def chromium(args: list[str], profile: str, timeout: int) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--disable-default-apps", "--disable-extensions",
        "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
        f"--user-data-dir={profile}",
        # Everything but the local server is unreachable: a page that needs a CDN fails.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--virtual-time-budget=10000",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- pages
def toc_pages(toc: Path) -> list[str]:
    """root + every `file:` entry of a jb-book toc, without needing PyYAML."""
    text = toc.read_text()
    pages = re.findall(r"^\s*root:\s*(\S+)", text, flags=re.M)
    pages += re.findall(r"^\s*-?\s*file:\s*(\S+)", text, flags=re.M)
    seen, out = set(), []
    for p in pages:
        p = re.sub(r"\.(md|ipynb|rst)$", "", p.strip("'\""))
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def ids_in(path: Path, cache: dict) -> set[str]:
    if path not in cache:
        root = parse(path.read_text(errors="replace"))
        cache[path] = {n.attrs[k] for n in root.iter() for k in ("id", "name") if k in n.attrs}
    return cache[path]


def is_local(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    return not parts.scheme and not parts.netloc


def check_page(page: str, html_dir: Path, base: str, shots: Path, profile: str,
               timeout: int, id_cache: dict) -> tuple[list[str], dict]:
    problems: list[str] = []
    info = {"math": 0, "widgets": 0, "imgs": 0, "links": 0}
    file = html_dir / f"{page}.html"
    if not file.exists():
        return [f"{file} was not built"], info
    static_html = file.read_text(errors="replace")
    static = parse(static_html)
    url = f"{base}/{page}.html"

    # ---- what the page should show, from the static HTML
    math_expected = sum(1 for n in static.iter()
                        if n.tag in ("span", "div") and "math" in n.classes()
                        and "notranslate" in n.classes())
    views_expected = sum(1 for n in static.iter() if n.tag == "script"
                         and n.attrs.get("type") == "application/vnd.jupyter.widget-view+json")
    has_state = any(n.tag == "script" and n.attrs.get("type")
                    == "application/vnd.jupyter.widget-state+json" for n in static.iter())
    info["math"], info["widgets"] = math_expected, views_expected

    # ---- no remote scripts / styles; MathJax and the widget renderer come from _static
    for n in static.iter():
        src = n.attrs.get("src") if n.tag == "script" else (
            n.attrs.get("href") if n.tag == "link" and "stylesheet" in n.attrs.get("rel", "") else None)
        if src and not is_local(src):
            problems.append(f"remote {n.tag}: {src}")
        elif src and n.tag == "script" and CDN_PATTERN.search(src):
            problems.append(f"CDN-looking script: {src}")
    scripts = [urllib.parse.urlsplit(n.attrs.get("src", "")).path
               for n in static.iter() if n.tag == "script"]
    if math_expected and not any(s.endswith("_static/mathjax/tex-chtml.js") for s in scripts):
        problems.append("page has math but does not load _static/mathjax/tex-chtml.js")
    if has_state and not any(s.endswith("_static/jupyter-widgets/embed.js") for s in scripts):
        problems.append("page has widget state but does not load _static/jupyter-widgets/embed.js")
    if views_expected and not has_state:
        problems.append("widget views without widget state (was the notebook executed?)")

    # ---- relative links resolve (file and #fragment)
    for n in static.iter():
        if n.tag != "a" or "href" not in n.attrs:
            continue
        href = n.attrs["href"]
        if not href or not is_local(href) or href.startswith(("mailto:", "javascript:")):
            continue
        info["links"] += 1
        target, _, frag = href.partition("#")
        target_path = (file.parent / urllib.parse.unquote(target)).resolve() if target else file
        if target_path.is_dir():
            target_path = target_path / "index.html"
        if not target_path.exists():
            problems.append(f"broken link: {href}")
        elif frag and target_path.suffix == ".html":
            if urllib.parse.unquote(frag) not in ids_in(target_path, id_cache):
                problems.append(f"broken anchor: {href}")

    # ---- render: DOM after scripts ran
    RecordingHandler.log.clear()
    try:
        res = chromium(["--dump-dom", url], profile, timeout)
    except subprocess.TimeoutExpired:
        return problems + [f"chromium --dump-dom timed out after {timeout}s"], info
    if res.returncode != 0 or "<html" not in res.stdout:
        return problems + [f"chromium --dump-dom failed (rc={res.returncode}): {res.stderr[-300:]}"], info
    dom = parse(res.stdout)
    requests = list(RecordingHandler.log)

    if math_expected:
        rendered = sum(1 for n in dom.iter() if n.tag == "mjx-container")
        if rendered < math_expected:
            problems.append(f"MathJax typeset {rendered} of {math_expected} math elements")
    if any(n.tag == "mjx-merror" for n in dom.iter()):
        problems.append("MathJax reported a TeX error (mjx-merror)")
    for n in dom.iter():  # MathJax shows an undefined macro as red text in its MathML copy
        if n.tag == "mtext" and n.attrs.get("mathcolor") == "red":
            txt = "".join(c.text for c in n.iter() if c.tag == "#text").strip()
            if txt.startswith("\\"):
                problems.append(f"undefined TeX macro: {txt}")
    text = visible_text(dom)
    for needle, what in RAW_TEX:
        i = text.find(needle)
        if i >= 0:
            problems.append(f"{what} left in visible text: ...{text[max(0, i - 40):i + 40]!r}...")

    if views_expected:
        subareas = [n for n in dom.iter() if n.tag == "div" and "widget-subarea" in n.classes()]
        drawn = [s for s in subareas if any("jupyter-widgets" in d.classes() for d in s.iter())]
        if len(drawn) < views_expected:
            problems.append(f"widgets drawn: {len(drawn)} of {views_expected} views")

    for n in dom.iter():
        if n.tag != "img":
            continue
        src = n.attrs.get("src", "")
        info["imgs"] += 1
        if src.startswith("data:"):
            continue
        if not src:
            problems.append("<img> without src")
        elif not is_local(src) and not src.startswith(base):
            problems.append(f"remote image: {src[:120]}")
        else:
            full = urllib.parse.urljoin(url, src)
            status = http_status(base, urllib.parse.urlsplit(full).path)
            if status != 200:
                problems.append(f"image {src} -> HTTP {status}")

    for path, code in requests:
        if code != 200 and code != 304 and not path.endswith("favicon.ico"):
            problems.append(f"browser request {path} -> HTTP {code}")

    # ---- screenshot (a separate run: dump-dom and screenshot are separate modes)
    shot = shots / f"{page}.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    try:
        res = chromium([f"--screenshot={shot}", "--window-size=1280,2000", url], profile, timeout)
        if not shot.exists():
            problems.append(f"no screenshot (rc={res.returncode})")
    except subprocess.TimeoutExpired:
        problems.append("chromium --screenshot timed out")
    return problems, info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--html", default="_build/html", type=Path)
    ap.add_argument("--toc", default="_toc.yml", type=Path)
    ap.add_argument("--screenshots", default="_build/screenshots", type=Path)
    ap.add_argument("--timeout", default=120, type=int, help="seconds per Chromium run")
    ap.add_argument("pages", nargs="*", help="pages to check (default: all in the toc)")
    args = ap.parse_args(argv)

    if not Path(CHROMIUM).exists():
        print(f"Chromium not found at {CHROMIUM} (set CHROMIUM=...)", file=sys.stderr)
        return 2
    html_dir = args.html.resolve()
    if not (html_dir / "index.html").exists():
        print(f"{html_dir} has no index.html: build the book first", file=sys.stderr)
        return 2
    pages = args.pages or toc_pages(args.toc)

    server = serve(html_dir)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    id_cache: dict = {}
    rows, failed = [], 0
    try:
        for page in pages:
            problems, info = check_page(page, html_dir, base, args.screenshots, profile,
                                        args.timeout, id_cache)
            failed += bool(problems)
            rows.append((page, "FAIL" if problems else "PASS", info, problems))
            print(f"{'FAIL' if problems else 'PASS'}  {page}", flush=True)
    finally:
        server.shutdown()
        shutil.rmtree(profile, ignore_errors=True)

    width = max(len(r[0]) for r in rows)
    print()
    print(f"{'page':<{width}}  result  math  widgets  imgs  links")
    for page, result, info, problems in rows:
        print(f"{page:<{width}}  {result:<6}  {info['math']:>4}  {info['widgets']:>7}  "
              f"{info['imgs']:>4}  {info['links']:>5}")
        for p in problems:
            print(f"{'':<{width}}    - {p}")
    print(f"\nbrowser check: {len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
