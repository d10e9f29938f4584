"""Text that comes from the data (class names, file names) is shown as text, never run as Markdown.

Streamlit renders Markdown in ``st.markdown``, captions, toasts and widget labels: a class named
``![x](https://example.com/p.png)`` would make every viewer's browser fetch that image, ``[ok](url)``
would be a link, ``$..$`` LaTeX, ``:red[..]`` colour. :func:`md` backslash-escapes every character
with a meaning there (CommonMark renders an escaped ASCII punctuation mark as itself) and folds line
breaks, which would start a new block. Every data-derived string goes through it before it is put
into Markdown. Plotly draws a subset of HTML in chart text (``<a href>``, ``<b>``): :func:`plot_text`
escapes that for axis labels, legends and hover text.
"""

from __future__ import annotations

import html
import re

_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:&=\"'])")


def md(value: object) -> str:
    """``value`` as Markdown that displays exactly its text (on one line)."""
    return _SPECIAL.sub(r"\\\1", " ".join(str(value).split()))


def plot_text(value: object) -> str:
    """``value`` for Plotly chart text: its HTML tags shown, not drawn."""
    return html.escape(str(value), quote=False)
