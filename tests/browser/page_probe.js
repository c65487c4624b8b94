// Layout probe of tests/browser/check_pages.py.
//
// The page check's local server appends this script to the page under test (only for the URL it
// checks, marked by the query "?page-check"). After the page has loaded, MathJax has typeset and
// the widgets had time to draw, it measures the rendered page and writes its findings as JSON into
// <script type="application/json" id="page-check-probe">, which `chromium --dump-dom` returns.
// It only reads the page: nothing it does changes the layout or the screenshot.
//
// Findings (check_pages.py turns them into problems):
//   text     [[where, text], ...]  visible text per block element, outside code, math and
//                                   SVG, for blocks that hold "$", "\" or "|" (raw TeX and
//                                   Markdown-table candidates; the rules are in Python)
//   overflow [{where, what, right, left, by, clipped}, ...]  boxes in the article column that
//                                   reach past its edges and are not inside a scrolling box
//   page     {scrollWidth, clientWidth}  the whole document
//   setup    [{where, what}, ...]   visible code cells whose source holds the setup import
(function () {
  "use strict";
  var SETUP = "from iconv.book import setup";
  var SKIP = /^(SCRIPT|STYLE|PRE|CODE|KBD|SAMP|TT|TEXTAREA|NOSCRIPT|TEMPLATE|MJX-CONTAINER|MJX-ASSISTIVE-MML|SVG|MATH|OBJECT|IFRAME|CANVAS)$/;
  // Boxes that are meant to leave the text column (sphinx-book-theme's margin content).
  var WIDE_OK = ".margin, .sidebar, .full-width, aside, .bd-sidebar-secondary";
  // Scrolling containers that may be wider inside than the column: code, outputs and tables.
  var CODE_OR_TABLE = "pre, code, .highlight, [class*='highlight-'], .cell_output, .output, " +
    ".pst-scrollable-table-container, .table-wrapper, .table-container, table";
  // Boxes whose inside is not the page's layout (MathJax's own boxes, SVG, embedded documents).
  var SKIP_BOX = /^(SCRIPT|STYLE|TEMPLATE|MJX-ASSISTIVE-MML|SVG|MATH|IFRAME|OBJECT|CANVAS)$/;

  function visible(el) {
    if (el.checkVisibility) {
      return el.checkVisibility({ checkOpacity: true, checkVisibilityCSS: true });
    }
    var r = el.getBoundingClientRect();
    return r.width > 0 && r.height > 0;
  }

  function where(el) {
    var sec = el.closest ? el.closest("section[id]") : null;
    var name = sec ? "#" + sec.id : "(page)";
    return name;
  }

  function describe(el) {
    var cls = (el.getAttribute("class") || "").trim().split(/\s+/).filter(Boolean).slice(0, 3);
    var text = (el.textContent || "").replace(/\s+/g, " ").trim().slice(0, 60);
    return el.tagName.toLowerCase() + (cls.length ? "." + cls.join(".") : "") +
      (text ? ' "' + text + '"' : "");
  }

  // Text is grouped by the nearest block of the document's structure (by tag, not by computed
  // display: the theme shows inline math as a flex box, which must not split "$a" from "b$").
  var BLOCK = /^(P|LI|DIV|TD|TH|DT|DD|H[1-6]|FIGCAPTION|CAPTION|BLOCKQUOTE|SECTION|ARTICLE|TABLE|TR|UL|OL|DL|DETAILS|SUMMARY|NAV|HEADER|FOOTER|MAIN|ASIDE|FIGURE|FORM|BODY)$/;
  function isBlock(el) { return BLOCK.test(el.tagName.toUpperCase()); }

  // ---- visible text, grouped by block element
  function visibleText() {
    var blocks = new Map();  // block element -> [pieces]
    var order = [];
    var walker = document.createTreeWalker(document.body, NodeFilter.SHOW_ELEMENT | NodeFilter.SHOW_TEXT, {
      acceptNode: function (node) {
        if (node.nodeType === 1) {
          if (SKIP.test(node.tagName.toUpperCase())) return NodeFilter.FILTER_REJECT;
          if (node.classList.contains("highlight") || node.classList.contains("MathJax")) return NodeFilter.FILTER_REJECT;
          if (!visible(node) && getComputedStyle(node).display !== "contents") return NodeFilter.FILTER_REJECT;
          return NodeFilter.FILTER_SKIP;
        }
        return NodeFilter.FILTER_ACCEPT;
      }
    });
    var node;
    while ((node = walker.nextNode())) {
      var block = node.parentElement;
      while (block && block !== document.body && !isBlock(block)) block = block.parentElement;
      if (!blocks.has(block)) { blocks.set(block, []); order.push(block); }
      blocks.get(block).push(node.data);
    }
    var out = [];
    order.forEach(function (block) {
      var text = blocks.get(block).join("");
      if (/[$\\|]/.test(text)) out.push([where(block), text]);
    });
    return out;
  }

  // ---- horizontal overflow of the article column
  // A scrolling box (overflow-x auto/scroll) keeps its content's overflow inside itself; any
  // other box lets it spill over the column's edge (visible) or cuts it off (hidden/clip).
  // Walk down from the column into the children that reach past its edges and report the
  // innermost box responsible.
  function overflowX(el) { return getComputedStyle(el).overflowX; }

  function overflow() {
    var col = document.querySelector("article.bd-article") || document.querySelector("main") || document.body;
    var cr = col.getBoundingClientRect();
    var found = [];

    function report(el, by, clipped, how) {
      if (found.length < 20) {
        found.push({ where: where(el), what: describe(el), by: Math.round(by), clipped: clipped, how: how });
      }
    }

    function textPast(node) {
      if (!node.data.trim()) return 0;
      var range = document.createRange();
      range.selectNodeContents(node);
      var r = range.getBoundingClientRect();
      return r.width > 0 ? Math.max(r.right - cr.right, cr.left - r.left) : 0;
    }

    // How far the drawn content of a clipping box reaches past its edges: the boxes and text of
    // its descendants (scrollWidth also counts invisible helpers such as MathJax's assistive
    // MathML, which is absolutely positioned and has no height).
    function clippedBy(box, r) {
      var most = 0;
      var walker = document.createTreeWalker(box, NodeFilter.SHOW_ELEMENT | NodeFilter.SHOW_TEXT, {
        acceptNode: function (n) {
          if (n.nodeType === 1 && SKIP_BOX.test(n.tagName.toUpperCase())) return NodeFilter.FILTER_REJECT;
          return NodeFilter.FILTER_ACCEPT;
        }
      });
      var n;
      while ((n = walker.nextNode())) {
        var b;
        if (n.nodeType === 3) {
          if (!n.data.trim()) continue;
          var range = document.createRange();
          range.selectNodeContents(n);
          b = range.getBoundingClientRect();
        } else {
          b = n.getBoundingClientRect();
        }
        if (b.width > 0 && b.height > 0) most = Math.max(most, b.right - r.right, r.left - b.left);
      }
      return most;
    }

    function visit(parent) {
      var hit = false;
      var textReported = false;
      for (var i = 0; i < parent.childNodes.length; i++) {
        var node = parent.childNodes[i];
        if (node.nodeType === 3) {
          var by = textPast(node);
          if (by > 1 && !textReported) {
            report(parent, by, false, "content"); hit = textReported = true;
          }
          continue;
        }
        if (node.nodeType !== 1) continue;
        var el = node;
        if (SKIP_BOX.test(el.tagName.toUpperCase()) || el.matches(WIDE_OK)) continue;
        var style = getComputedStyle(el);
        if (style.position === "fixed" || style.display === "none") continue;
        var r = el.getBoundingClientRect();
        var ox = style.overflowX;
        var past = Math.max(r.right - cr.right, cr.left - r.left);
        if (r.width > 0 && r.height > 0 && past > 1 && visible(el)) {
          report(el, past, false, "box"); hit = true; continue;
        }
        if (ox === "auto" || ox === "scroll") {
          // code and tables may scroll sideways; anything else (display math, text, figures)
          // must fit the column
          if (!el.matches(CODE_OR_TABLE) && !el.querySelector("table, pre")) {
            var hidden = el.scrollWidth > el.clientWidth + 1 ? clippedBy(el, r) : 0;
            if (hidden > 2 && visible(el)) { report(el, hidden, false, "scrolls"); hit = true; }
          }
          continue;
        }
        if (ox === "hidden" || ox === "clip") {
          var cut = el.scrollWidth > el.clientWidth + 1 ? clippedBy(el, r) : 0;
          if (cut > 2 && visible(el)) { report(el, cut, true, "clipped"); hit = true; continue; }
          if (visit(el)) hit = true;  // e.g. a scrolling box inside it
          continue;
        }
        if (visit(el)) hit = true;
      }
      return hit;
    }

    visit(col);
    if (cr.right > window.innerWidth + 1) report(col, cr.right - window.innerWidth, false, "column");
    return found;
  }

  // ---- code cells holding the setup import that a reader can see
  function setupCells() {
    var out = [], seen = [];
    document.querySelectorAll("div.cell_input, div.cell pre, div.highlight pre").forEach(function (el) {
      if ((el.textContent || "").indexOf(SETUP) < 0 || !visible(el)) return;
      if (seen.some(function (s) { return s.contains(el); })) return;  // its cell is reported
      var r = el.getBoundingClientRect();
      if (r.width > 0 && r.height > 0) {
        seen.push(el);
        out.push({ where: where(el), what: describe(el) });
      }
    });
    return out;
  }

  function run() {
    var result;
    try {
      result = {
        text: visibleText(), overflow: overflow(), setup: setupCells(),
        page: { scrollWidth: document.documentElement.scrollWidth,
                clientWidth: document.documentElement.clientWidth }
      };
    } catch (e) {
      result = { error: String(e && e.stack || e) };
    }
    var out = document.createElement("script");
    out.type = "application/json";
    out.id = "page-check-probe";
    out.textContent = JSON.stringify(result).replace(/</g, "\\u003c");
    document.body.appendChild(out);
  }

  function later() { setTimeout(run, 4000); }  // virtual time: widgets and fonts settle
  window.addEventListener("load", function () {
    var mj = window.MathJax && window.MathJax.startup && window.MathJax.startup.promise;
    if (mj) { mj.then(later, later); } else { later(); }
  });
})();
