"""The page check (tests/browser/check_pages.py) fails on each reader-facing defect and passes a clean page.

Two layers:

* the text and image rules on strings and HTML snippets (no browser);
* tiny fixture sites rendered by headless Chromium: one clean page that holds every legitimate
  look-alike of a defect (TeX and table syntax inside code, a wide table inside a scrolling
  wrapper, a hidden setup cell, margin content, described images) and one page per defect, each
  the clean page plus that defect. Each defect page must fail with its own category and no other;
  the clean page must pass.

The browser tests skip when Chromium is absent, except under CI (``CI`` set, as on GitHub
Actions), where a missing browser is an error: .ci/setup.sh installs it.
"""
from __future__ import annotations

import importlib.util
import os
import struct
import zlib
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("check_pages", HERE / "browser" / "check_pages.py")
check_pages = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_pages)

RAW_TEX, MD_TABLE, NO_ALT = check_pages.RAW_TEX, check_pages.MD_TABLE, check_pages.NO_ALT
OVERFLOW, SETUP_CELL = check_pages.OVERFLOW, check_pages.SETUP_CELL


def category(problem: str) -> str:
    return problem.split(":", 1)[0]


# --------------------------------------------------------------------------- rules, no browser
@pytest.mark.parametrize("text", [
    "The slope $s$ of the negative half-line",            # inline, one letter
    "where $\\kappa_f = \\|A_f\\|\\,\\|A_f^{-1}\\|$ is",  # inline, TeX inside
    "$$\n\\sigma(x) = x\n$$",                              # display
    "so $$x$$ holds",
    "inline \\(x^2\\) left raw",
    "\\[ \\sum_i x_i \\]",
    "item 1: $\\alpha",                                     # a dangling $ glued to TeX
    "then $A^{-1} ",
    "\\begin{aligned} a &= b \\end{aligned}",
    "the bound \\frac{1}{2} holds",
    "over \\mathbb{R}",
])
def test_raw_tex_rule_finds_tex(text):
    assert check_pages.raw_tex(text), text


@pytest.mark.parametrize("text", [
    "It costs $5 and $10 to print.",
    "Set ICONV_SIZE with export, e.g. $ICONV_SIZE",
    "a | b, and abs |x|",
    "C:\\Users\\reader",
    "plain text with no markup",
])
def test_raw_tex_rule_passes_prose(text):
    assert not check_pages.raw_tex(text), text


@pytest.mark.parametrize("text", [
    "| model | data | bits/dim |\n|---|---|---|\n| flow | mnist | 1.2 |",
    "| model | data | bits/dim | |---|---|---| | flow | mnist | 1.2 |",  # joined into one line
    "|:---|---:|",
    "| a | b |",
])
def test_markdown_table_rule_finds_tables(text):
    assert check_pages.markdown_table(text), text


@pytest.mark.parametrize("text", ["abs |x| and |y|", "a | b", "x -- y --- z", "|x|"])
def test_markdown_table_rule_passes_prose(text):
    assert not check_pages.markdown_table(text), text


@pytest.mark.parametrize("snippet, bad", [
    ('<img src="_images/a.png" alt="SneakyReLU for three slopes">', False),
    ('<img src="icon.png" alt="" aria-hidden="true">', False),
    ('<img src="icon.png" alt="" role="presentation">', False),
    ('<div class="widget-subarea"><div class="jupyter-widgets widget-output"><img src="data:,"></div></div>', False),
    ('<img src="_images/a.png">', True),
    ('<img src="_images/a.png" alt="  ">', True),
    ('<img src="_images/a.png" alt="_images/a.png">', True),   # myst-nb's default alt
    ('<img src="_images/a.png" alt="figure-1.svg">', True),
    ('<object data="g.svg" type="image/svg+xml"><p class="warning">Fourier pipeline</p></object>', False),
    ('<object data="g.svg" type="image/svg+xml"><p class="warning">digraph { a -> b }</p></object>', True),
    ('<object data="g.svg" type="image/svg+xml"></object>', True),
])
def test_alt_rule(snippet, bad):
    problems = check_pages.alt_problems(check_pages.parse(snippet))
    assert bool(problems) == bad, problems
    assert all(category(p) == NO_ALT for p in problems)


def test_probe_report_becomes_problems():
    probe = {"text": [["#s1", "the slope $s$"], ["#s2", "|---|---|"], ["#s3", "fine | text"]],
             "overflow": [{"where": "#s4", "what": "table", "by": 300, "clipped": False, "how": "box"}],
             "setup": [{"where": "#s0", "what": "pre"}],
             "page": {"scrollWidth": 1500, "clientWidth": 1280}}
    cats = sorted(category(p) for p in check_pages.probe_problems(probe))
    assert cats == sorted([RAW_TEX, MD_TABLE, OVERFLOW, OVERFLOW, SETUP_CELL])
    clean = {"text": [["#s3", "fine | text, $5 and $10"]], "overflow": [], "setup": [],
             "page": {"scrollWidth": 1280, "clientWidth": 1280}}
    assert check_pages.probe_problems(clean) == []
    assert category(check_pages.probe_problems({"error": "TypeError"})[0]) == "probe"


def test_probe_is_injected_before_body_end():
    out = check_pages.inject_probe("<html><body><p>x</p></body></html>", "var a = 1;")
    assert out.index("var a = 1;") > out.index("<p>x</p>")
    assert out.rstrip().endswith("</body></html>")
    assert "var a = 1;" in check_pages.inject_probe("<p>no body tag</p>", "var a = 1;")


# --------------------------------------------------------------------------- fixture site
STYLE = """
body { margin: 0; font: 16px/1.5 sans-serif; }
.bd-main { display: flex; width: 1280px; }
nav.bd-sidebar-primary { flex: none; width: 260px; }
.bd-article-container { flex: none; width: 760px; }
article.bd-article { width: 720px; padding: 0 20px; }
.bd-sidebar-secondary { flex: none; width: 260px; }
div.highlight pre { overflow: auto; }
.table-wrapper { overflow-x: auto; }
aside.margin { float: right; width: 240px; margin-right: -260px; }
td, th { padding: 2px 8px; white-space: nowrap; }
"""

SETUP_SOURCE = "from iconv.book import setup; BOOK = setup()"
WIDE_ROW = "".join(f"<td>{i}.{i}e-3 ms</td>" for i in range(24))
LONG_LINE = "speed = " + " + ".join(f"bench(c={i}, h=32, w=32)" for i in range(30))

CLEAN_BODY = f"""
<h1>Fixture chapter</h1>
<p>This chapter has prose with a price of $5 and $10, and a bar | in text, and the inline code
<code>$HOME</code> and <code>| a | b |</code>.</p>
<div class="cell docutils container">
  <details class="hide above-input"><summary>Show code cell source</summary>
    <div class="cell_input docutils container"><div class="highlight-ipython3 notranslate">
      <div class="highlight"><pre>{SETUP_SOURCE}</pre></div></div></div>
  </details>
  <div class="cell_output docutils container"><div class="output stream highlight-myst-ansi">
    <div class="highlight"><pre>python 3.11 | torch 2.13.0 | size ci</pre></div></div></div>
</div>
<aside class="margin"><p>A margin note sits in the right margin, outside the column.</p></aside>
<div class="highlight"><pre>label = "$x$ and $$y$$ and \\(z\\) and \\[w\\]"
table = "| model | bits/dim |\\n|---|---|"
{LONG_LINE}</pre></div>
<div class="table-wrapper"><table><thead><tr>{WIDE_ROW}</tr></thead><tbody><tr>{WIDE_ROW}</tr></tbody></table></div>
<figure><img src="fig.png" alt="SneakyReLU for three slopes"><figcaption>Figure 1</figcaption></figure>
<img src="fig.png" alt="" aria-hidden="true">
<div class="graphviz"><object data="diagram.svg" type="image/svg+xml" class="graphviz">
  <p class="warning">The Fourier pipeline: rfft2, a solve per frequency, irfft2</p></object></div>
"""

# defect page -> (HTML added to the clean page, the category it must fail with)
DEFECTS = {
    "tex_inline": ("<p>The slope $s$ of the negative half-line.</p>", RAW_TEX),
    "tex_display": ("<p>$$\n\\sigma_s(x) = x\n$$</p>", RAW_TEX),
    "tex_paren": ('<p>Inline <span class="math">\\(x^2\\)</span> that MathJax never typeset.</p>',
                  RAW_TEX),
    "tex_bracket": ("<div>\\[ \\sum_i x_i \\]</div>", RAW_TEX),
    # chapter 9's symptom: display math inside a list item mis-parsed into emphasis
    "tex_in_list": ("<ol><li><p>Item: $\\kappa<em>f = \\sigma</em>{max}$ per block.</p></li></ol>",
                    RAW_TEX),
    # chapter 7's symptom: a Markdown display output rendered as one paragraph
    "markdown_table": ('<div class="output text_markdown"><p>| model | data | bits/dim |\n'
                       "|---|---|---|\n| flow | mnist | 1.24 |</p></div>", MD_TABLE),
    "img_no_alt": ('<img src="fig.png">', NO_ALT),
    "img_filename_alt": ('<img src="fig.png" alt="fig.png">', NO_ALT),
    "diagram_no_alt": ('<div class="graphviz"><object data="diagram.svg" type="image/svg+xml">'
                       '<p class="warning">digraph { x -> y }</p></object></div>', NO_ALT),
    "wide_table": (f"<table><tr>{WIDE_ROW}</tr></table>", OVERFLOW),
    "wide_box": ('<div style="width: 1100px; background: #eee">a box wider than the column</div>',
                 OVERFLOW),
    # spills into the right-hand sidebar, but the document stays as wide as the window
    "box_into_sidebar": ('<div style="width: 900px; background: #eee">a box 180px wider than the column</div>',
                         OVERFLOW),
    "long_word": ("<p>" + "unbreakable" * 12 + "</p>", OVERFLOW),
    # a display equation wider than the column: it scrolls, but only code and tables may
    "wide_display_math": ('<div class="math" style="overflow-x: auto"><span style="display: inline-block; '
                          'width: 1000px">det M = det(T*) det(P) det(D) det(P) det(T)</span></div>', OVERFLOW),
    "clipped_code": (f'<div style="overflow: hidden"><pre style="overflow: visible">{LONG_LINE}</pre></div>',
                     OVERFLOW),
    "setup_visible": ('<div class="cell docutils container"><div class="cell_input docutils container">'
                      f'<div class="highlight-ipython3 notranslate"><div class="highlight"><pre>{SETUP_SOURCE}'
                      "</pre></div></div></div></div>", SETUP_CELL),
}


def page(body: str) -> str:
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fixture</title><style>{STYLE}</style></head>
<body><div class="bd-main">
<nav class="bd-sidebar-primary"><a href="index.html">Home</a></nav>
<div class="bd-article-container"><article class="bd-article" role="main">
<section id="fixture-chapter">{body}</section></article></div>
<div class="bd-sidebar-secondary"><p>On this page</p></div>
</div></body></html>
"""


def png_bytes(width=4, height=3) -> bytes:
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    raw = b"".join(b"\x00" + b"\x80\x40\x20" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def site_results(tmp_path_factory):
    if not Path(check_pages.CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"CI must have Chromium at {check_pages.CHROMIUM} (.ci/setup.sh installs it)")
        pytest.skip(f"no Chromium at {check_pages.CHROMIUM}")
    site = tmp_path_factory.mktemp("site")
    (site / "fig.png").write_bytes(png_bytes())
    (site / "diagram.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="40" height="20">'
                                      '<rect width="40" height="20" fill="#88c"/></svg>')
    (site / "index.html").write_text(page(CLEAN_BODY))
    for name, (defect, _) in DEFECTS.items():
        (site / f"{name}.html").write_text(page(CLEAN_BODY + defect))
    shots = site / "screenshots"
    results = check_pages.check_pages(site, ["index", *DEFECTS], shots, timeout=120)
    return results, shots


def test_clean_page_passes(site_results):
    results, shots = site_results
    problems, _ = results["index"]
    assert problems == []
    assert (shots / "index.png").stat().st_size > 1000


@pytest.mark.parametrize("name", sorted(DEFECTS))
def test_page_with_defect_fails(site_results, name):
    results, shots = site_results
    problems, _ = results[name]
    expected = DEFECTS[name][1]
    assert problems, f"{name}: the check passed a page with a {expected} defect"
    assert {category(p) for p in problems} == {expected}, problems
    assert (shots / f"{name}.png").exists(), "a screenshot is saved for failing pages too"


def test_report_counts_failures(site_results, capsys):
    results, _ = site_results
    assert check_pages.report(results) == len(DEFECTS)
    out = capsys.readouterr().out
    assert f"browser check: 1 passed, {len(DEFECTS)} failed" in out
