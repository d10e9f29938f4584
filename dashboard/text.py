"""Text that comes from the data (class names, file names) is shown as text, never run as Markdown.

Streamlit renders Markdown in ``st.markdown``, captions, toasts and widget labels: a class named
``![x](https://example.com/p.png)`` would make every viewer's browser fetch that image, ``[ok](url)``
would be a link, ``$..$`` LaTeX, ``:red[..]`` colour. :func:`md` backslash-escapes every character
with a meaning there (CommonMark renders an escaped ASCII punctuation mark as itself) and folds line
breaks, which would start a new block; ``:``, ``.`` and ``@`` go as character references, so a URL
or an e-mail address in a class name is not turned into a link (GFM autolinks). Every data-derived
string goes through it before it is put into Markdown. Plotly draws a subset of HTML in chart text
(``<a href>``, ``<b>``): :func:`plot_text` escapes that for axis labels, legends and hover text.
"""

from __future__ import annotations

import html
import re

_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:&=\"'])")


# GFM turns a bare URL or e-mail address into a live link (autolink literals), escaped or not: these
# three characters go as character references instead, which display as themselves but break the pattern.
_AUTOLINK_BREAKS = {"\\:": "&#58;", "\\.": "&#46;", "@": "&#64;"}


def md(value: object) -> str:
    """``value`` as Markdown that displays exactly its text (on one line), a URL in it as text, not a link."""
    escaped = _SPECIAL.sub(r"\\\1", " ".join(str(value).split()))
    for mark, reference in _AUTOLINK_BREAKS.items():
        escaped = escaped.replace(mark, reference)
    return escaped


def plot_text(value: object) -> str:
    """``value`` for Plotly chart text: its HTML tags shown, not drawn."""
    return html.escape(str(value), quote=False)
