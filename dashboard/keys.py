"""Keyboard-first review: one key listener on the page, whatever element has focus (text fields aside).

Streamlit's own button shortcuts ignore keys while a checkbox or any other input has focus, so the
gallery listens itself, in the capture phase, and sends each decision to Python as one trigger value
of a small ``st.components.v2`` component (no iframe). The card cursor lives in the browser (it is
painted with one CSS rule, so it survives reruns); Python only receives ``{action, index, label}``.
"""

from __future__ import annotations

from collections.abc import Callable

import streamlit as st

KEY = "review_keys"
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

_JS = r"""
export default function (component) {
  const w = window;
  w.__ilKeys = { data: component.data, send: component.setTriggerValue };
  if (!w.__ilKeysInstalled) {
    w.__ilKeysInstalled = true;
    w.addEventListener("keydown", onKey, true);  // capture: before Streamlit's shortcuts and the focused widget
  }
  paint();
  return () => { w.__ilKeys = null; paint(); close(); };

  function ids() { return (w.__ilKeys && w.__ilKeys.data.cards) || []; }
  function cursor() {
    const all = ids(), stored = Number(sessionStorage.getItem("il-cursor"));
    return all.includes(stored) ? stored : (all.length ? all[0] : null);
  }
  function card(index) { return document.querySelector(".st-key-card_" + index); }
  function paint() {
    let style = document.getElementById("il-cursor-style");
    if (!style) {
      style = document.createElement("style");
      style.id = "il-cursor-style";
      document.head.appendChild(style);
    }
    const c = w.__ilKeys ? cursor() : null;
    style.textContent = c === null ? "" :
      ".st-key-card_" + c + " { outline: 3px solid var(--st-primary-color, #ff4b4b); outline-offset: 1px; }";
  }
  function moveTo(index) {
    sessionStorage.setItem("il-cursor", String(index));
    paint();
    const el = card(index);
    if (el) el.scrollIntoView({ block: "nearest" });
  }
  function move(step) {
    const all = ids(), at = all.indexOf(cursor());
    if (all.length) moveTo(all[Math.max(0, Math.min(all.length - 1, at + step))]);
  }
  function send(command) { w.__ilKeys.send("command", Object.assign({ seq: Date.now() }, command)); }
  function decide(action, label, shift) {
    const c = cursor();
    if (shift) { send({ action: "bulk_" + action }); return; }
    if (c === null) return;
    send({ action: action, index: c, label: label === undefined ? null : label });
    move(1);  // on to the next card
  }
  function overlay(id, html) {
    let el = document.getElementById(id);
    if (!el) {
      el = document.createElement("div");
      el.id = id;
      el.className = "il-overlay";
      document.body.appendChild(el);
    }
    el.innerHTML = html;
    return el;
  }
  function close() {
    for (const id of ["il-help", "il-picker"]) { const el = document.getElementById(id); if (el) el.remove(); }
    w.__ilPicker = null;
  }
  function matches(text) {
    const names = w.__ilKeys.data.classes, t = text.toLowerCase(), found = [];
    if (/^\d+$/.test(text) && Number(text) < names.length) found.push(Number(text));
    names.forEach((n, i) => { if (n.toLowerCase().startsWith(t) && !found.includes(i)) found.push(i); });
    names.forEach((n, i) => { if (n.toLowerCase().includes(t) && !found.includes(i)) found.push(i); });
    return found;
  }
  function drawPicker() {
    const names = w.__ilKeys.data.classes, found = matches(w.__ilPicker);
    const rows = found.slice(0, 8).map((i, r) => "<div" + (r ? "" : " class='il-first'") + ">" + i + " · " +
      names[i].replace(/[&<>]/g, "") + "</div>").join("");
    overlay("il-picker", "<b>Relabel to:</b> " + (w.__ilPicker || "…") + rows +
      "<small>Enter picks the first · Esc cancels</small>");
  }
  function onPicker(e) {
    if (e.key === "Escape") close();
    else if (e.key === "Enter") {
      const found = matches(w.__ilPicker);
      close();
      if (found.length) decide("relabel", found[0]);
    }
    else if (e.key === "Backspace") { w.__ilPicker = w.__ilPicker.slice(0, -1); drawPicker(); }
    else if (e.key.length === 1) { w.__ilPicker += e.key; drawPicker(); }
    else return false;
    return true;
  }
  function onKey(e) {
    const state = w.__ilKeys;
    if (!state || e.ctrlKey || e.metaKey || e.altKey) return;
    if (!document.querySelector("[class*='st-key-card_']")) return;  // not on the gallery (left unmounted)
    const t = e.target;
    const typing = "textarea, [contenteditable='true'], input:not([type='checkbox']):not([type='radio'])";
    if (t && t.closest && t.closest(typing)) return;  // typing in a text field stays typing
    let handled = true;
    if (w.__ilPicker !== null && w.__ilPicker !== undefined) handled = onPicker(e);
    else {
      const k = e.key, many = state.data.classes.length > state.data.type_ahead_above;
      if (k === "ArrowRight" || k === "l" || k === "L") move(1);
      else if (k === "ArrowLeft" || k === "h" || k === "H") move(-1);
      else if (k === "ArrowDown" || k === "j" || k === "J") move(state.data.per_row);
      else if (k === "ArrowUp") move(-state.data.per_row);
      else if (k === "Enter") decide("accept");
      else if (k === "a" || k === "A") decide("accept", undefined, e.shiftKey);
      else if (k === "k" || k === "K") decide("keep", undefined, e.shiftKey);
      else if (k === "d" || k === "D") decide("drop", undefined, e.shiftKey);
      else if (k === "u" || k === "U") send({ action: "undo" });
      else if (k === " ") { const c = cursor(); if (c !== null) send({ action: "select", index: c }); }
      else if (k === "n" || k === "N") send({ action: "page", step: 1 });
      else if (k === "p" || k === "P") send({ action: "page", step: -1 });
      else if (k === "?") { if (document.getElementById("il-help")) close(); else overlay("il-help", state.data.help); }
      else if (k === "Escape") { handled = !!document.querySelector(".il-overlay"); close(); }
      else if (/^[0-9]$/.test(k) && !many) { if (Number(k) < state.data.classes.length) decide("relabel", Number(k)); }
      else if (/^[0-9]$/.test(k) || ((k === "r" || k === "R") && many)) {
        w.__ilPicker = /^[0-9]$/.test(k) ? k : "";
        drawPicker();
      }
      else handled = false;
    }
    if (handled) { e.preventDefault(); e.stopImmediatePropagation(); }
  }
}
"""

_CSS = """
.il-overlay { position: fixed; z-index: 1000100; background: var(--st-background-color, #fff);
  color: var(--st-text-color, #262730); border: 1px solid rgba(128,128,128,.4); border-radius: .5rem;
  box-shadow: 0 8px 24px rgba(0,0,0,.25); padding: 1rem 1.25rem; font: 14px/1.5 sans-serif; }
#il-help { top: 15%; left: 50%; transform: translateX(-50%); min-width: 28rem; }
#il-help td:first-child { font-weight: 600; padding-right: 1.5rem; white-space: nowrap; }
#il-picker { bottom: 2rem; left: 50%; transform: translateX(-50%); min-width: 16rem; }
#il-picker .il-first { font-weight: 600; color: var(--st-primary-color, #ff4b4b); }
"""

_listener = st.components.v2.component("influence_lens.review_keys", js=_JS, isolate_styles=False)


def help_html() -> str:
    rows = "".join(f"<tr><td>{keys}</td><td>{what}</td></tr>" for keys, what in SHORTCUTS)
    return (f"<style>{_CSS}</style><b>Keyboard</b> (any focus but a text field)<table>{rows}</table>"
            "<small>? or Esc closes</small>")


def listen(cards: list[int], class_names: tuple[str, ...], per_row: int, on_command: Callable[[dict], None]) -> None:
    """Mount the listener for the cards shown (in page order); ``on_command`` gets each key's command."""
    _listener(key=KEY, data={"cards": [int(i) for i in cards], "classes": list(class_names), "per_row": per_row,
                             "type_ahead_above": TYPE_AHEAD_ABOVE, "help": help_html()},
              on_command_change=lambda: on_command(dict(st.session_state[KEY]["command"] or {})), height=0)
    st.html(f"<style>{_CSS}</style>")
