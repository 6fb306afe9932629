"""Sphinx HTML math renderer that draws formulas with matplotlib's mathtext.

The default renderer (MathJax) loads a script from a CDN when the page is
opened, so the formulas show as raw TeX offline. This one renders each formula
at build time to an SVG embedded in the page: no network when building or
reading. mathtext covers the TeX subset the docstrings use (fractions, sums,
roots, Greek letters, spacing); a formula it cannot parse fails the build.
"""

from __future__ import annotations

import base64
import html
import io
from functools import cache
from typing import Any

from docutils import nodes


@cache
def _svg(latex: str, fontsize: int) -> str:
    from matplotlib.font_manager import FontProperties
    from matplotlib.mathtext import math_to_image

    buf = io.BytesIO()
    math_to_image(f"${latex}$", buf, prop=FontProperties(size=fontsize), format="svg")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(latex: str, fontsize: int, cls: str) -> str:
    latex = " ".join(latex.split())
    data = _svg(latex, fontsize)
    alt = html.escape(latex, quote=True)
    return f'<img class="{cls}" src="data:image/svg+xml;base64,{data}" alt="{alt}"/>'


def visit_inline(self: Any, node: nodes.Element) -> None:
    """Writes an inline formula as an SVG image."""
    self.body.append(_img(node.astext(), 12, "math-inline"))
    raise nodes.SkipNode


def visit_block(self: Any, node: nodes.Element) -> None:
    """Writes a display formula as a centred SVG image."""
    self.body.append('<div class="math-block">' + _img(node.astext(), 14, "math"))
    self.body.append("</div>")
    raise nodes.SkipNode


def setup(app: Any) -> dict[str, Any]:
    """Registers the renderer as ``html_math_renderer = "mathtext_svg"``."""
    inline, block = (visit_inline, None), (visit_block, None)
    app.add_html_math_renderer("mathtext_svg", inline, block)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
