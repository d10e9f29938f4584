"""Keyboard-first review: the keys of the gallery and their help overlay.

The listener itself is part of the gallery component (``dashboard/gallery.py``): one listener on the
page, in the capture phase, whatever element has focus (text fields and open dropdowns aside), because
Streamlit's own button shortcuts ignore keys while a checkbox or any other input has focus.
"""

from __future__ import annotations

TYPE_AHEAD_ABOVE = 10  # with more classes a digit opens a picker that matches class numbers and names
SHORTCUTS = (
    ("← → ↑ ↓ · H L J", "move the card cursor (left, right, down)"),
    ("Enter · A", "accept the suggested label"),
    ("0–9", "relabel to that class (more than 10 classes: type its number or name, then Enter)"),
    ("K", "keep: the given label is correct"),
    ("D", "drop the sample"),
    ("Space", "select / unselect the card"),
    ("Shift + A · K · D", "accept · keep · drop every selected card"),
    ("U", "undo the last decision (a bulk action is one)"),
    ("N · P", "next / previous page"),
    ("?", "show / hide this list"),
)

OVERLAY_CSS = """
.il-overlay { position: fixed; z-index: 1000100; background: var(--st-background-color, #fff);
  color: var(--st-text-color, #262730); border: 1px solid rgba(128,128,128,.4); border-radius: .5rem;
  box-shadow: 0 8px 24px rgba(0,0,0,.25); padding: 1rem 1.25rem; font: 14px/1.5 sans-serif; }
#il-help { top: 15%; left: 50%; transform: translateX(-50%); min-width: 28rem; }
#il-help td:first-child { font-weight: 600; padding-right: 1.5rem; white-space: nowrap; }
#il-picker { bottom: 2rem; left: 50%; transform: translateX(-50%); min-width: 16rem; }
#il-picker .il-first { font-weight: 600; color: var(--st-primary-color, #ff4b4b); }
"""


def help_html() -> str:
    rows = "".join(f"<tr><td>{keys}</td><td>{what}</td></tr>" for keys, what in SHORTCUTS)
    return (f"<style>{OVERLAY_CSS}</style><b>Keyboard</b> (any focus but a text field)<table>{rows}</table>"
            "<small>? or Esc closes</small>")
