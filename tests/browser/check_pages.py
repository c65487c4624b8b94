#!/usr/bin/env python3
"""Check every page of the built book in headless Chromium, offline.

Run by .ci/build_book.sh after `jupyter-book build` (not collected by pytest; its rules are tested
by tests/test_page_check.py on small fixture pages):

    python tests/browser/check_pages.py --html _build/html --toc _toc.yml \
        --screenshots _build/screenshots

For every page listed in the toc it serves the build directory from 127.0.0.1 (http.server,
recording every request), renders the page once in headless Chromium with every other host
unreachable (--host-resolver-rules), dumps the DOM after the scripts ran and saves a screenshot
(1280 x 2000) to --screenshots. The server appends a read-only layout probe
(tests/browser/page_probe.js) to the page it checks; the probe reports what a reader sees.

A page FAILS on any of these problems (each printed as "category: where: detail"):

reader-facing defects (from the probe, on the rendered page)
  raw TeX            TeX left in visible text outside code blocks: $$, \\( \\) \\[ \\], an inline
                     $...$, a $ glued to TeX (e.g. "$\\alpha"), \\begin{...} or a TeX macro such
                     as \\frac or \\mathbb
  Markdown table     Markdown table syntax in visible text: a |---| separator, or a line
                     "| a | b |" with at least three bars
  image without alt  an <img> whose alt is missing, empty or only its file name (myst-nb's
                     default), unless marked decorative (aria-hidden="true", role="presentation")
                     or drawn by the widget renderer (which has no alt to give); an SVG diagram
                     (<object>) whose fallback text is its dot source
  horizontal overflow  the document is wider than the window, or a box in the article column
                     reaches past the column's edges without a scrolling container
                     (overflow-x auto/scroll) around it, or a clipping box cuts its content off,
                     or a scrolling container that is not code, an output or a table (e.g. a
                     display equation) is narrower than its content
  visible setup cell a code cell whose source holds `from iconv.book import setup` is visible
                     (the setup line must be hidden: remove-input, remove-cell or hide-input)

build defects (static HTML and the browser's requests)
  math               math elements MathJax did not typeset, TeX errors, undefined macros; a
                     page with math that does not load _static/mathjax/tex-chtml.js
  widgets            ipywidgets state without the local renderer, or views not drawn
  image / request    an image or any other local request that does not answer 200
  remote             a <script>/<link> pointing at another host or a CDN
  link               a relative link or #fragment that does not resolve
  screenshot / probe no screenshot, or the layout probe did not report

Prints a PASS/FAIL table and exits non-zero if any page fails. Standard library only.
"""

from __future__ import annotations

import argparse
import functools
import html.parser
import http.server
import json
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
PROBE_JS = Path(__file__).with_name("page_probe.js")
PROBE_QUERY = "page-check"
PROBE_ID = "page-check-probe"
WINDOW = (1280, 2000)
CDN_PATTERN = re.compile(r"cdn|jsdelivr|unpkg|cdnjs|googleapis|cloudflare", re.I)
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
        "param", "source", "track", "wbr"}

# Categories of the reader-facing defects (the first word(s) of a problem, before ":").
RAW_TEX = "raw TeX"
MD_TABLE = "Markdown table"
NO_ALT = "image without alt"
OVERFLOW = "horizontal overflow"
SETUP_CELL = "visible setup cell"
OVERFLOW_HOW = {  # the probe's kinds of overflow (page_probe.js)
    "box": "reaches past the column's edge (no scrolling container around it)",
    "content": "lets its content spill past the column's edge",
    "clipped": "cuts its content off (overflow hidden; make it scroll)",
    "scrolls": "scrolls sideways to show its content (only code and tables may; break the line)",
    "column": "(the article column) reaches past the window's edge",
}

# --------------------------------------------------------------------------- text rules
TEX_MACROS = (
    "frac dfrac tfrac sqrt sum prod int oint lim mathbb mathrm mathcal mathbf mathit mathsf "
    "operatorname boldsymbol left right big Big cdot cdots ldots dots times otimes oplus circ "
    "le leq ge geq ne neq approx sim simeq equiv propto infty partial nabla "
    "alpha beta gamma Gamma delta Delta epsilon varepsilon eta zeta lambda Lambda mu nu xi rho "
    "sigma Sigma tau kappa theta Theta phi Phi varphi psi Psi omega Omega pi "
    "log exp det tr min max arg argmin argmax top quad qquad text textbf hat tilde bar "
    "overline underline vec mid lvert rvert lVert rVert langle rangle mapsto to in notin "
    "subset subseteq cup cap forall exists"
).split()
TEX_RULES = [
    ("$$", re.compile(r"\$\$")),
    ("\\( or \\)", re.compile(r"\\[()]")),
    ("\\[ or \\]", re.compile(r"\\[\[\]]")),
    ("\\begin/\\end", re.compile(r"\\(?:begin|end)\{")),
    # $x$, $a_i + b$: non-blank right inside both dollars, no dollar or newline between them
    ("inline $...$", re.compile(r"(?<![\w$\\])\$(?=[^\s$])[^$\n]{0,300}?[^\s$\\]\$(?![\w$])")),
    # a lone $ glued to TeX: "$\alpha", "$x_i", "$A^{-1}"
    ("$ before TeX", re.compile(r"(?<![\w$\\])\$(?=\\[A-Za-z]|[A-Za-z0-9]{0,3}[_^{])")),
    ("TeX macro", re.compile(r"\\(?:%s)(?![A-Za-z])" % "|".join(TEX_MACROS))),
]
TABLE_RULES = [
    ("|---| separator", re.compile(r"\|[ \t]*:?-{3,}:?[ \t]*(?:\||$)", re.M)),
    ("| a | b | row", re.compile(r"^[ \t]*\|[^\n|]*\|[^\n]*\|[ \t]*$", re.M)),
]


def _excerpt(text: str, start: int, end: int, pad: int = 30) -> str:
    return " ".join(text[max(0, start - pad):end + pad].split())


def raw_tex(text: str) -> list[str]:
    """What of `text` (visible, outside code and math) is raw TeX: '<rule>: ...excerpt...'."""
    found = []
    for name, rule in TEX_RULES:
        m = rule.search(text)
        if m:
            found.append(f"{name} in {_excerpt(text, m.start(), m.end())!r}")
    return found


def markdown_table(text: str) -> list[str]:
    """What of `text` (visible, outside code) is Markdown table syntax: '<rule>: ...excerpt...'."""
    found = []
    for name, rule in TABLE_RULES:
        m = rule.search(text)
        if m:
            found.append(f"{name} in {_excerpt(text, m.start(), m.end(), 10)!r}")
    return found


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

    def text_content(self) -> str:
        return "".join(n.text for n in self.iter() if n.tag == "#text")


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


IMAGE_FILE = re.compile(r"\S+\.(?:png|jpe?g|gif|svg|webp|bmp)", re.I)
DOT_SOURCE = re.compile(r"\b(?:di)?graph\b[^{]*\{|->|\w+\s*\[\s*\w+\s*=")


def in_widget(node: Node) -> bool:
    """Whether `node` was drawn by the ipywidgets renderer (inside a widget's view)."""
    parent = node.parent
    while parent is not None:
        if any(c.startswith(("jupyter-widgets", "widget-")) for c in parent.classes()):
            return True
        parent = parent.parent
    return False


def alt_problems(dom: Node) -> list[str]:
    """Images a screen reader cannot describe: no alt, an empty alt or only the file name.

    Images inside a widget's view are not checked: @jupyter-widgets/html-manager draws a plot
    that an interactive widget saved in its state as an <img> without alt, and no notebook
    metadata reaches it; the text around the widget has to say what it shows.
    """
    found = []
    for n in dom.iter():
        decorative = (n.attrs.get("aria-hidden") == "true"
                      or n.attrs.get("role") in ("presentation", "none"))
        if n.tag == "img" and in_widget(n):
            continue
        if n.tag == "img" and not decorative:
            src = n.attrs.get("src", "")
            alt = n.attrs.get("alt")
            name = src.rsplit("/", 1)[-1][:80] or "(no src)"
            if alt is None:
                found.append(f"{NO_ALT}: <img src=...{name}> has no alt attribute")
            elif not alt.strip():
                found.append(f"{NO_ALT}: <img src=...{name}> has an empty alt")
            elif alt.strip() == src or IMAGE_FILE.fullmatch(alt.strip()):
                found.append(f"{NO_ALT}: <img src=...{name}> has only its file name as alt "
                             f"({alt.strip()[:60]!r}); set the cell's mystnb.image.alt")
        elif n.tag == "object" and n.attrs.get("type") == "image/svg+xml" and not decorative:
            fallback = " ".join(n.text_content().split())
            if not fallback or DOT_SOURCE.search(fallback):
                found.append(f"{NO_ALT}: diagram {n.attrs.get('data', '')[-60:]} has no alt text "
                             f"(its fallback is {fallback[:50]!r}); give the graphviz "
                             "directive an :alt:")
    return found


def probe_problems(probe: dict) -> list[str]:
    """The reader-facing defects in the layout probe's report (see page_probe.js)."""
    if "error" in probe:
        return [f"probe: the layout probe failed: {probe['error'][:300]}"]
    found = []
    seen = set()
    for where, text in probe.get("text", []):
        for category, rule in ((RAW_TEX, raw_tex), (MD_TABLE, markdown_table)):
            hits = rule(text)
            msg = f"{category}: {where}: {'; '.join(hits)}"
            if hits and msg not in seen:
                seen.add(msg)
                found.append(msg)
    page = probe.get("page", {})
    extra = page.get("scrollWidth", 0) - page.get("clientWidth", 0)
    if extra > 1:
        found.append(f"{OVERFLOW}: (page): the document is {extra}px wider than the window")
    for box in probe.get("overflow", []):
        how = OVERFLOW_HOW.get(box.get("how"), "reaches past the column")
        found.append(f"{OVERFLOW}: {box['where']}: {box['what']} {how} by {box['by']}px")
    for cell in probe.get("setup", []):
        found.append(f"{SETUP_CELL}: {cell['where']}: {cell['what']} (hide it: tag remove-input)")
    return found


# --------------------------------------------------------------------------- server
def inject_probe(page_html: str, script: str) -> str:
    """`page_html` with `script` appended as the last element of <body>."""
    tag = f"<script>\n{script}\n</script>\n"
    i = page_html.lower().rfind("</body>")
    return page_html[:i] + tag + page_html[i:] if i >= 0 else page_html + tag


class RecordingHandler(http.server.SimpleHTTPRequestHandler):
    log: list[tuple[str, int]] = []
    probe_js = ""

    def do_GET(self):
        parts = urllib.parse.urlsplit(self.path)
        if parts.query == PROBE_QUERY and parts.path.endswith(".html"):
            self.send_probed(parts.path)
        else:
            super().do_GET()

    def send_probed(self, path: str):
        file = Path(self.translate_path(path))
        if not file.is_file():
            self.send_error(404)
            return
        body = inject_probe(file.read_text(errors="replace"), self.probe_js).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

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
    RecordingHandler.probe_js = PROBE_JS.read_text()
    handler = functools.partial(RecordingHandler, directory=str(directory))
    server = Server(("127.0.0.1", 0), handler)  # port 0: the OS picks a free port
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def http_status(base: str, path: str) -> int:
    import urllib.error
    import urllib.request

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


def static_problems(static: Node, file: Path, id_cache: dict, info: dict) -> list[str]:
    """Remote resources, missing local renderers and broken links, from the built HTML."""
    problems = []
    for n in static.iter():
        src = n.attrs.get("src") if n.tag == "script" else (
            n.attrs.get("href") if n.tag == "link" and "stylesheet" in n.attrs.get("rel", "") else None)
        if src and not is_local(src):
            problems.append(f"remote: {n.tag} {src}")
        elif src and n.tag == "script" and CDN_PATTERN.search(src):
            problems.append(f"remote: CDN-looking script {src}")
    scripts = [urllib.parse.urlsplit(n.attrs.get("src", "")).path
               for n in static.iter() if n.tag == "script"]
    if info["math"] and not any(s.endswith("_static/mathjax/tex-chtml.js") for s in scripts):
        problems.append("math: page has math but does not load _static/mathjax/tex-chtml.js")
    has_state = any(n.tag == "script" and n.attrs.get("type")
                    == "application/vnd.jupyter.widget-state+json" for n in static.iter())
    if has_state and not any(s.endswith("_static/jupyter-widgets/embed.js") for s in scripts):
        problems.append("widgets: page has widget state but does not load "
                        "_static/jupyter-widgets/embed.js")
    if info["widgets"] and not has_state:
        problems.append("widgets: widget views without widget state (was the notebook executed?)")

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
            problems.append(f"link: broken link {href}")
        elif frag and target_path.suffix == ".html":
            if urllib.parse.unquote(frag) not in ids_in(target_path, id_cache):
                problems.append(f"link: broken anchor {href}")
    return problems


def rendered_problems(dom: Node, info: dict, url: str, base: str) -> list[str]:
    """MathJax, widgets and images on the DOM after the scripts ran."""
    problems = []
    if info["math"]:
        rendered = sum(1 for n in dom.iter() if n.tag == "mjx-container")
        if rendered < info["math"]:
            problems.append(f"math: MathJax typeset {rendered} of {info['math']} math elements")
    if any(n.tag == "mjx-merror" for n in dom.iter()):
        problems.append("math: MathJax reported a TeX error (mjx-merror)")
    for n in dom.iter():  # MathJax shows an undefined macro as red text in its MathML copy
        if n.tag == "mtext" and n.attrs.get("mathcolor") == "red":
            txt = n.text_content().strip()
            if txt.startswith("\\"):
                problems.append(f"math: undefined TeX macro {txt}")

    if info["widgets"]:
        subareas = [n for n in dom.iter() if n.tag == "div" and "widget-subarea" in n.classes()]
        drawn = [s for s in subareas if any("jupyter-widgets" in d.classes() for d in s.iter())]
        if len(drawn) < info["widgets"]:
            problems.append(f"widgets: drawn {len(drawn)} of {info['widgets']} views")

    for n in dom.iter():
        if n.tag != "img":
            continue
        src = n.attrs.get("src", "")
        info["imgs"] += 1
        if src.startswith("data:"):
            continue
        if not src:
            problems.append("image: <img> without src")
        elif not is_local(src) and not src.startswith(base):
            problems.append(f"remote: image {src[:120]}")
        else:
            full = urllib.parse.urljoin(url, src)
            status = http_status(base, urllib.parse.urlsplit(full).path)
            if status != 200:
                problems.append(f"image: {src} -> HTTP {status}")
    return problems + alt_problems(dom)


def read_probe(dom: Node) -> dict | None:
    for n in dom.iter():
        if n.tag == "script" and n.attrs.get("id") == PROBE_ID:
            return json.loads(n.text_content())
    return None


def check_page(page: str, html_dir: Path, base: str, shots: Path, profile: str,
               timeout: int, id_cache: dict) -> tuple[list[str], dict]:
    """The problems of one page ('category: detail' strings) and its counts."""
    info = {"math": 0, "widgets": 0, "imgs": 0, "links": 0}
    file = html_dir / f"{page}.html"
    if not file.exists():
        return [f"page: {file} was not built"], info
    static = parse(file.read_text(errors="replace"))
    info["math"] = sum(1 for n in static.iter() if n.tag in ("span", "div")
                       and "math" in n.classes() and "notranslate" in n.classes())
    info["widgets"] = sum(1 for n in static.iter() if n.tag == "script" and n.attrs.get("type")
                          == "application/vnd.jupyter.widget-view+json")
    problems = static_problems(static, file, id_cache, info)

    # ---- render once: the DOM after scripts ran (with the probe's report) and a screenshot
    url = f"{base}/{page}.html"
    shot = shots / f"{page}.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    shot.unlink(missing_ok=True)
    RecordingHandler.log.clear()
    try:
        res = chromium(["--dump-dom", f"--screenshot={shot}",
                        f"--window-size={WINDOW[0]},{WINDOW[1]}", f"{url}?{PROBE_QUERY}"],
                       profile, timeout)
    except subprocess.TimeoutExpired:
        return problems + [f"page: chromium timed out after {timeout}s"], info
    if res.returncode != 0 or "<html" not in res.stdout:
        return problems + [f"page: chromium failed (rc={res.returncode}): {res.stderr[-300:]}"], info
    if not shot.exists():
        problems.append(f"screenshot: none saved (rc={res.returncode})")
    dom = parse(res.stdout)
    problems += rendered_problems(dom, info, url, base)

    probe = read_probe(dom)
    if probe is None:
        problems.append("probe: the layout probe did not report (page never finished loading?)")
    else:
        problems += probe_problems(probe)

    for path, code in list(RecordingHandler.log):
        if code not in (200, 304) and not path.endswith("favicon.ico"):
            problems.append(f"request: {path} -> HTTP {code}")
    return problems, info


def check_pages(html_dir: Path, pages: list[str], shots: Path,
                timeout: int = 120) -> dict[str, tuple[list[str], dict]]:
    """Check `pages` (paths under `html_dir` without .html); {page: (problems, counts)}."""
    server = serve(html_dir)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    id_cache: dict = {}
    results = {}
    try:
        for page in pages:
            results[page] = check_page(page, html_dir, base, shots, profile, timeout, id_cache)
            print(f"{'FAIL' if results[page][0] else 'PASS'}  {page}", flush=True)
    finally:
        server.shutdown()
        server.server_close()
        shutil.rmtree(profile, ignore_errors=True)
    return results


def report(results: dict[str, tuple[list[str], dict]]) -> int:
    """Print the table; the number of failed pages."""
    width = max(len(p) for p in results)
    print()
    print(f"{'page':<{width}}  result  math  widgets  imgs  links")
    failed = 0
    for page, (problems, info) in results.items():
        failed += bool(problems)
        print(f"{page:<{width}}  {'FAIL' if problems else 'PASS':<6}  {info['math']:>4}  "
              f"{info['widgets']:>7}  {info['imgs']:>4}  {info['links']:>5}")
        for p in problems:
            print(f"{'':<{width}}    - {p}")
    print(f"\nbrowser check: {len(results) - failed} passed, {failed} failed")
    return failed


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
    results = check_pages(html_dir, args.pages or toc_pages(args.toc), args.screenshots,
                          args.timeout)
    return 1 if report(results) else 0


if __name__ == "__main__":
    sys.exit(main())
