"""Sphinx extension: a figure's image or diagram without alt text gets the figure's caption as alt.

myst-nb renders a cell's plot as an image whose alt text, unless the cell sets
``mystnb: image: alt:``, is the image's file name (``_images/3f2a....png``): a screen reader reads
out a hash. A ``{graphviz}`` diagram without ``:alt:`` falls back to its dot source. Every chapter
figure has a caption (``mystnb: figure: caption:``, the directive's ``:caption:``), which
describes it; this extension copies the caption into ``alt`` where the author gave none, so the
page check (tests/browser/check_pages.py, "image without alt") passes captioned figures and still
fails an image or diagram that has neither alt text nor a caption.

Loaded by ``_config.yml`` (``sphinx: local_extensions: {figure_alt: tools/}``).
"""
from __future__ import annotations

import html

from docutils import nodes


def caption_alt(image: nodes.Element) -> str | None:
    """The caption text of the figure that holds `image`, on one line; None outside a captioned figure."""
    parent = image.parent
    while parent is not None and not isinstance(parent, nodes.figure):
        parent = parent.parent
    if parent is None:
        return None
    captions = [c for c in parent.children if isinstance(c, nodes.caption)]
    text = " ".join(captions[0].astext().split()) if captions else ""
    return text or None


def add_alt_from_captions(app, doctree: nodes.document, docname: str) -> None:
    """Set ``alt`` on every image and graphviz diagram of `doctree` that has none, from its
    figure's caption."""
    from sphinx.ext.graphviz import graphviz

    for image in doctree.findall(lambda n: isinstance(n, (nodes.image, graphviz))):
        if image.get("alt", "").strip():
            continue
        alt = caption_alt(image)
        if alt:
            # sphinx.ext.graphviz writes a diagram's alt into the HTML as is; docutils escapes
            # an image's alt itself
            image["alt"] = html.escape(alt) if isinstance(image, graphviz) else alt


def setup(app):
    app.connect("doctree-resolved", add_alt_from_captions)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}
