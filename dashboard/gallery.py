"""The page of gallery cards as one ``st.components.v2`` component: the review runs in the browser.

A key or a click changes the card at once (optimistic); the browser numbers each command (a decision,
a selection, a page turn, an undo) and queues it, and sends the queue to Python as one trigger value,
the whole unacknowledged queue each time: while a rerun is in flight new commands wait and go in the
next batch, and a trigger that Streamlit replaces by a newer one (it keeps only the last of a widget)
loses nothing, because the newer one carries the older commands too. Python applies the commands in
order, skips those it has applied already (per tab: the number of the last one applied is written
with the decision in SQLite, ``Workspace.decide(sent=...)``), and acknowledges the last number with
the next data; a card says "saved" only then. A write that fails is named on its card and resent
until it succeeds. The queue is kept in the tab's ``sessionStorage``: a reload or a server restart
resends what was not acknowledged.

The card cursor, the key listener (``keys.SHORTCUTS``) and the type-ahead picker live here too.
Thumbnails are the run's stored ones (``engine.thumbnails``): a page reads its own.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import pandas as pd
import streamlit as st

from dashboard import keys
from dashboard.state import Active
from engine.thumbnails import media_type, thumbnails

KEY = "gallery_cards"
RETRY_MS = 1500  # a failed write is resent after this; an unacknowledged batch after RESEND_MS
RESEND_MS = 4000


def card_data(rows: pd.DataFrame, run: Active, selected: set[int]) -> list[dict]:
    """What the browser needs per card: index, rank, given, suggested, decision, selection, image (the
    run's stored thumbnails of this page only, :mod:`engine.thumbnails`)."""
    images = thumbnails(run.workspace, run.key, run.data.train, rows["position"].to_numpy())
    return [{"i": int(r.index), "r": int(r.rank), "g": int(r.given), "s": int(r.suggested), "st": str(r.status),
             "nl": int(r.new_label), "sel": int(r.index) in selected,
             "src": f"data:{media_type(image)};base64," + base64.b64encode(image).decode("ascii")}
            for r, image in zip(rows.itertuples(index=False), images, strict=True)]


def receive(payload: dict, run: str, last_applied: Callable[[str], int],
            apply: Callable[[dict, tuple[str, int]], None]) -> None:
    """Callback: apply a batch of numbered commands in order, each once; remember the acknowledgement
    (or the failure) for the next data. ``last_applied(client)`` is the number stored with the last
    decision (after a restart the session knows nothing); ``apply(command, (client, seq))`` does one."""
    if not payload or payload.get("run") != run:  # a queue left from another run waits for that run
        return
    client = str(payload["client"])
    acks = st.session_state.setdefault("gallery_acks", {})
    errors = st.session_state.setdefault("gallery_errors", {})
    last = acks.get(client)
    if last is None:
        last = last_applied(client)
    errors.pop(client, None)
    for command in sorted(payload.get("items", []), key=lambda c: int(c["seq"])):
        seq = int(command["seq"])
        if seq <= last:
            continue
        try:
            apply(command, (client, seq))
        except Exception as exc:  # noqa: BLE001 (shown on the card and resent, never dropped)
            errors[client] = {"seq": seq, "message": str(exc) or type(exc).__name__}
            break
        last = seq
    acks[client] = last


def show(run: str, cards: list[dict], class_names: tuple[str, ...], *, per_row: int, page: int, pages: int,
         on_batch: Callable[[dict], None]) -> None:
    """Mount the gallery for one page of ``cards`` (``card_data``); ``on_batch`` gets each batch."""
    st.session_state["gallery_nonce"] = st.session_state.get("gallery_nonce", 0) + 1
    data = {"run": run, "cards": cards, "classes": list(class_names), "per_row": per_row, "page": page,
            "pages": pages, "type_ahead_above": keys.TYPE_AHEAD_ABOVE, "help": keys.help_html(),
            "acks": st.session_state.get("gallery_acks", {}), "errors": st.session_state.get("gallery_errors", {}),
            "retry_ms": RETRY_MS, "resend_ms": RESEND_MS,
            "nonce": st.session_state["gallery_nonce"]}  # new data every run: the browser hears every answer
    _component(key=KEY, data=data, on_batch_change=lambda: on_batch(dict(st.session_state[KEY]["batch"] or {})),
               height="content")


def command_log(payload: dict) -> str:
    """One batch as a line for the debug log."""
    return json.dumps(payload.get("items", []))


_HTML = '<div class="il-gallery"></div>'

_CSS = keys.OVERLAY_CSS + """
.il-gallery { display: grid; grid-template-columns: repeat(var(--il-per-row, 8), minmax(0, 1fr)); gap: .4rem; }
.il-card { position: relative; border: 1px solid rgba(128,128,128,.35); border-radius: .45rem; padding: .3rem .35rem;
  font: 12px/1.35 "Source Sans Pro", sans-serif; color: var(--st-text-color, #262730); min-width: 0; }
.il-card.il-cursor { outline: 3px solid var(--st-primary-color, #ff4b4b); outline-offset: 1px; }
.il-card.il-selected { box-shadow: inset 0 0 0 3px #1f77b4; }
.il-card.il-decided { background: rgba(128,128,128,.08); }
.il-card.il-decided img { opacity: .35; }
.il-thumb { height: 112px; display: flex; align-items: center; justify-content: center; cursor: pointer; }
.il-thumb img { width: 112px; height: 112px; object-fit: contain; image-rendering: pixelated; }
.il-line, .il-acts { display: flex; align-items: center; gap: .2rem; white-space: nowrap; overflow: hidden;
  height: 1.35rem; }
.il-cap { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; flex: 1; min-width: 0; }
.il-badge { border-radius: .3rem; padding: 0 .3rem; font-weight: 600; white-space: nowrap; }
.il-b-relabel { background: rgba(33,195,84,.18); color: #158237; }
.il-b-drop { background: rgba(255,43,43,.15); color: #bd4043; }
.il-b-keep { background: rgba(28,131,225,.15); color: #0054a3; }
.il-card button, .il-card select { font: inherit; border: 1px solid rgba(128,128,128,.35); border-radius: .3rem;
  background: transparent; color: inherit; padding: 0 .25rem; height: 1.25rem; cursor: pointer; min-width: 0; }
.il-card button:hover { border-color: var(--st-primary-color, #ff4b4b); }
.il-card button:disabled { opacity: .35; cursor: default; }
.il-card select { max-width: 3.2rem; }
.il-sel { width: 1.25rem; padding: 0 !important; }
.il-card { --il-thumb: 112px; }
.il-state { position: absolute; top: .35rem; right: .4rem; font-size: 11px; border-radius: .3rem; padding: 0 .25rem;
  pointer-events: none; }
.il-state.il-saving { background: rgba(128,128,128,.85); color: #fff; }
.il-state.il-saving::before { content: "saving…"; }
.il-state.il-saved { background: rgba(21,130,55,.9); color: #fff; }
.il-state.il-saved::before { content: "✓ saved"; }
.il-state.il-failed { left: .4rem; top: 2.5rem; background: #bd4043; color: #fff; font-weight: 600;
  white-space: normal; max-height: 4.2rem; overflow: hidden; }
.il-note { position: absolute; left: .35rem; right: .35rem; top: 2.5rem; background: rgba(0,0,0,.75); color: #fff;
  border-radius: .3rem; padding: .2rem .3rem; font-size: 11px; white-space: normal; }
.il-empty { grid-column: 1 / -1; padding: 1rem; }
"""

_JS = r"""
export default function (component) {
  const w = window, data = component.data, root = component.parentElement;
  const g = w.__ilGallery || (w.__ilGallery = { installed: false, local: {}, sel: {}, queue: [], inFlight: false,
                                                  sentAt: 0, sentMax: 0, timer: null, run: null, picker: null });
  g.data = data; g.send = component.setTriggerValue; g.root = root;
  if (!g.client) {
    g.client = sessionStorage.getItem("il-client");
    if (!g.client) { g.client = Math.random().toString(36).slice(2) + Date.now().toString(36);
                     sessionStorage.setItem("il-client", g.client); }
  }
  if (g.run !== data.run) {  // another run: its own queue (kept in the tab across reloads)
    g.run = data.run; g.local = {}; g.sel = {};
    g.queue = JSON.parse(sessionStorage.getItem("il-queue:" + g.run) || "[]");
    g.inFlight = false;
    for (const c of g.queue) remember(c);
  }
  absorb();
  render();
  flush(false);
  if (!g.installed) { g.installed = true; w.addEventListener("keydown", onKey, true); }  // capture: before widgets
  return () => { if (g.root === root) { g.data = null; closeOverlays(); } };

  // -- the queue ------------------------------------------------------------------------------
  function nextSeq() {
    const n = Math.max(Number(sessionStorage.getItem("il-seq") || 0), Date.now()) + 1;  // grows across reloads
    sessionStorage.setItem("il-seq", String(n));
    return n;
  }
  function save() { sessionStorage.setItem("il-queue:" + g.run, JSON.stringify(g.queue)); }
  function remember(c) {
    if (c.index === undefined || c.index === null) return;
    if (c.action === "select") g.sel[c.index] = { on: c.on, seq: c.seq };
    else if (["relabel", "keep", "drop"].includes(c.action))
      g.local[c.index] = { action: c.action, label: c.label, seq: c.seq, state: "saving" };
  }
  function enqueue(command) {
    command.seq = nextSeq();
    g.queue.push(command); save(); remember(command);
    render();
    flush(false);
  }
  function flush(force) {
    if (!g.queue.length || !g.data) return;
    if (g.inFlight && !force) return;
    g.inFlight = true; g.sentAt = Date.now(); g.sentMax = g.queue[g.queue.length - 1].seq;
    g.send("batch", { client: g.client, run: g.run, items: g.queue.slice(0, 500) });
    clearTimeout(g.timer);
    g.timer = setTimeout(() => flush(true), g.data.resend_ms);  // no answer: send again (resends are skipped)
  }
  function absorb() {
    const ack = g.data.acks[g.client], err = g.data.errors[g.client];
    if (ack !== undefined) {
      const before = g.queue.length;
      g.queue = g.queue.filter(c => c.seq > ack);
      if (g.queue.length !== before) save();
      for (const i in g.local) if (g.local[i].seq <= ack && g.local[i].state !== "saved") g.local[i].state = "saved";
      for (const i in g.sel) if (g.sel[i].seq <= ack) delete g.sel[i];
    }
    if (err && g.queue.length && g.queue[0].seq === err.seq) {
      const c = g.queue[0];
      if (g.local[c.index] && g.local[c.index].seq === c.seq) { g.local[c.index].state = "failed";
                                                               g.local[c.index].error = err.message; }
      g.inFlight = false; clearTimeout(g.timer);
      g.timer = setTimeout(() => flush(true), g.data.retry_ms);  // retried, never dropped
      return;
    }
    if (ack !== undefined && ack >= g.sentMax) { g.inFlight = false; clearTimeout(g.timer); }
  }

  // -- the cards ------------------------------------------------------------------------------
  function esc(s) {
    return String(s).replace(/[&<>"]/g, ch => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[ch]);
  }
  function cards() { return (g.data && g.data.cards) || []; }
  function ids() { return cards().map(c => c.i); }
  function cardOf(index) { return cards().find(c => c.i === index); }
  function cursor() {
    const all = ids(), stored = Number(sessionStorage.getItem("il-cursor"));
    return all.includes(stored) ? stored : (all.length ? all[0] : null);
  }
  function status(c) {  // what the card shows: the local decision until the server has it, then the server's
    const l = g.local[c.i];
    if (l && l.state !== "saved") return { st: l.action, nl: l.label, state: l.state, error: l.error };
    const saved = l && l.action === c.st && (c.st !== "relabel" || l.label === c.nl);
    return { st: c.st, nl: c.nl, state: saved ? "saved" : "" };
  }
  function selected(c) { const s = g.sel[c.i]; return s ? s.on : c.sel; }
  function render() {
    const box = g.root.querySelector(".il-gallery");
    if (!box) return;
    box.style.setProperty("--il-per-row", g.data.per_row);
    const names = g.data.classes, want = ids();
    if (!want.length) { box.innerHTML = "<div class='il-empty'>No image passes the filters.</div>"; return; }
    const empty = box.querySelector(".il-empty"); if (empty) empty.remove();
    const have = {};
    for (const el of Array.from(box.children)) {
      const i = Number(el.dataset.i);
      if (want.includes(i)) have[i] = el; else el.remove();
    }
    want.forEach((i, at) => {
      let el = have[i];
      if (!el) { el = build(cardOf(i)); }
      if (box.children[at] !== el) box.insertBefore(el, box.children[at] || null);
      paint(el, cardOf(i));
    });
    const c = cursor();
    for (const el of box.children) el.classList.toggle("il-cursor", Number(el.dataset.i) === c);
  }
  function build(c) {
    const el = document.createElement("div");
    el.className = "il-card"; el.dataset.i = c.i;
    const options = g.data.classes.map((n, k) => "<option value='" + k + "'>" + k + " · " + esc(n) + "</option>")
      .join("");
    el.innerHTML = "<div class='il-thumb'><img alt='sample " + c.i + "'></div>" +
      "<div class='il-line'><button class='il-sel' data-a='select' title='select (Space)'></button>" +
      "<span class='il-cap'></span></div>" +
      "<div class='il-acts'><button data-a='accept'>A ✓</button>" +
      "<button data-a='keep' title='keep: the given label is correct (K)'>K</button>" +
      "<button data-a='drop' title='drop this sample (D)'>D ✗</button>" +
      "<select data-a='relabel' title='another label (digit keys)'><option value=''>→ …</option>" + options +
      "</select>" +
      "<button data-a='detail' title='look closer'>⌕</button></div>" +
      "<div class='il-state'></div>";
    el.addEventListener("click", e => {
      const a = e.target.closest("[data-a]"), i = Number(el.dataset.i);
      if (e.target.closest(".il-thumb")) { moveTo(i); return; }
      if (!a || a.tagName === "SELECT") return;
      moveTo(i);
      act(a.dataset.a, i);
    });
    el.querySelector("select").addEventListener("change", e => {
      const v = e.target.value; e.target.value = ""; e.target.blur();
      if (v !== "") { moveTo(Number(el.dataset.i)); decideOn(Number(el.dataset.i), "relabel", Number(v)); }
    });
    return el;
  }
  function paint(el, c) {
    const names = g.data.classes, s = status(c), img = el.querySelector("img");
    if (img.getAttribute("src") !== c.src) img.setAttribute("src", c.src);
    const badge = { relabel: "<span class='il-badge il-b-relabel'>relabeled → " + esc(names[s.nl] ?? s.nl) + "</span>",
                    drop: "<span class='il-badge il-b-drop'>dropped</span>",
                    keep: "<span class='il-badge il-b-keep'>kept</span>" }[s.st];
    const cap = badge ? "<b>#" + c.r + "</b> " + badge :
      "<b>#" + c.r + "</b> " + esc(names[c.g]) + " → <b>" + esc(names[c.s]) + "</b>";
    const capEl = el.querySelector(".il-cap");
    if (capEl.innerHTML !== cap) capEl.innerHTML = cap;
    capEl.title = "#" + c.r + " given " + names[c.g] + " → suggested " + names[c.s];
    el.classList.toggle("il-decided", !!badge);
    const sel = selected(c);
    el.classList.toggle("il-selected", sel);
    el.querySelector(".il-sel").textContent = sel ? "☑" : "☐";
    const accept = el.querySelector("[data-a='accept']");
    accept.disabled = c.s === c.g;
    accept.title = "accept the suggestion " + names[c.s] + " (A or Enter)";
    const state = el.querySelector(".il-state");
    state.className = "il-state" + (s.state ? " il-" + s.state : "");
    const why = s.state === "failed" ? String(s.error).replace(/^\/\S+: /, "") : "";  // without the file's path
    state.textContent = s.state === "failed" ? "not saved, retrying: " + why : "";
    state.title = s.state === "failed" ? String(s.error) : "";
  }
  function note(index, text) {
    const el = g.root.querySelector(".il-card[data-i='" + index + "']");
    if (!el) return;
    let n = el.querySelector(".il-note");
    if (!n) { n = document.createElement("div"); n.className = "il-note"; el.appendChild(n); }
    n.textContent = text;
    setTimeout(() => n.remove(), 2500);
  }

  // -- commands -------------------------------------------------------------------------------
  function moveTo(index) {
    sessionStorage.setItem("il-cursor", String(index));
    const box = g.root.querySelector(".il-gallery");
    if (!box) return;
    for (const el of box.children) el.classList.toggle("il-cursor", Number(el.dataset.i) === index);
    const el = box.querySelector(".il-card[data-i='" + index + "']");
    if (el) el.scrollIntoView({ block: "nearest" });
  }
  function move(step) {
    const all = ids(), at = all.indexOf(cursor());
    if (all.length) moveTo(all[Math.max(0, Math.min(all.length - 1, at + step))]);
  }
  function decideOn(index, action, label) {
    enqueue({ action: action, index: index, label: label === undefined ? null : label });
  }
  function act(action, index) {
    const c = cardOf(index);
    if (!c) return;
    if (action === "accept") {
      if (c.s === c.g) { note(index, "the suggestion is its given label (K keeps it)"); return false; }
      decideOn(index, "relabel", c.s);
    } else if (action === "keep" || action === "drop") decideOn(index, action);
    else if (action === "select") enqueue({ action: "select", index: index, on: !selected(c) });
    else if (action === "detail") enqueue({ action: "detail", index: index });
    return true;
  }
  function decideKey(action, label, shift) {
    if (shift) { enqueue({ action: "bulk_" + action }); return; }
    const c = cursor();
    if (c === null) return;
    const done = action === "relabel" ? (decideOn(c, "relabel", label), true) : act(action, c);
    if (done) move(1);  // on to the next card
  }
  function page(step) {
    const to = Math.max(1, Math.min(g.data.pages, g.data.page + step));
    if (to !== g.data.page) enqueue({ action: "page", page: to });
  }

  // -- keys -----------------------------------------------------------------------------------
  function overlay(id, html) {
    let el = document.getElementById(id);
    if (!el) {
      el = document.createElement("div"); el.id = id; el.className = "il-overlay"; document.body.appendChild(el);
    }
    el.innerHTML = html;
    return el;
  }
  function closeOverlays() {
    for (const id of ["il-help", "il-picker"]) { const el = document.getElementById(id); if (el) el.remove(); }
    g.picker = null;
  }
  function matches(text) {
    const names = g.data.classes, t = text.toLowerCase(), found = [];
    if (/^\d+$/.test(text) && Number(text) < names.length) found.push(Number(text));
    names.forEach((n, i) => { if (n.toLowerCase().startsWith(t) && !found.includes(i)) found.push(i); });
    names.forEach((n, i) => { if (n.toLowerCase().includes(t) && !found.includes(i)) found.push(i); });
    return found;
  }
  function drawPicker() {
    const names = g.data.classes, found = matches(g.picker);
    const rows = found.slice(0, 8).map((i, r) => "<div" + (r ? "" : " class='il-first'") + ">" + i + " · " +
      esc(names[i]) + "</div>").join("");
    overlay("il-picker", "<b>Relabel to:</b> " + esc(g.picker || "…") + rows +
      "<small>Enter picks the first · Esc cancels</small>");
  }
  function onPicker(e) {
    if (e.key === "Escape") closeOverlays();
    else if (e.key === "Enter") {
      const found = matches(g.picker);
      closeOverlays();
      if (found.length) decideKey("relabel", found[0]);
    }
    else if (e.key === "Backspace") { g.picker = g.picker.slice(0, -1); drawPicker(); }
    else if (e.key.length === 1) { g.picker += e.key; drawPicker(); }
    else return false;
    return true;
  }
  function typing(t) {
    if (!t || !t.closest) return false;
    // a closed dropdown keeps the focus after a choice: its search box is not being typed in
    if (t.getAttribute && t.getAttribute("role") === "combobox" && t.getAttribute("aria-expanded") !== "true")
      return false;
    return !!t.closest("textarea, [contenteditable='true'], select, input:not([type='checkbox']):not([type='radio'])");
  }
  function onKey(e) {
    if (!g.data || e.ctrlKey || e.metaKey || e.altKey) return;
    if (!g.root || !g.root.isConnected) return;  // not on the gallery
    if (typing(e.target)) return;  // typing in a text field stays typing
    let handled = true;
    if (g.picker !== null && g.picker !== undefined) handled = onPicker(e);
    else {
      const k = e.key, many = g.data.classes.length > g.data.type_ahead_above;
      if (k === "ArrowRight" || k === "l" || k === "L") move(1);
      else if (k === "ArrowLeft" || k === "h" || k === "H") move(-1);
      else if (k === "ArrowDown" || k === "j" || k === "J") move(g.data.per_row);
      else if (k === "ArrowUp") move(-g.data.per_row);
      else if (k === "Enter") decideKey("accept");
      else if (k === "a" || k === "A") decideKey("accept", undefined, e.shiftKey);
      else if (k === "k" || k === "K") decideKey("keep", undefined, e.shiftKey);
      else if (k === "d" || k === "D") decideKey("drop", undefined, e.shiftKey);
      else if (k === "u" || k === "U") enqueue({ action: "undo" });
      else if (k === " ") { const c = cursor(); if (c !== null) act("select", c); }
      else if (k === "n" || k === "N") page(1);
      else if (k === "p" || k === "P") page(-1);
      else if (k === "?") {
        if (document.getElementById("il-help")) closeOverlays(); else overlay("il-help", g.data.help);
      }
      else if (k === "Escape") { handled = !!document.querySelector(".il-overlay"); closeOverlays(); }
      else if (/^[0-9]$/.test(k) && !many) { if (Number(k) < g.data.classes.length) decideKey("relabel", Number(k)); }
      else if (/^[0-9]$/.test(k) || ((k === "r" || k === "R") && many)) {
        g.picker = /^[0-9]$/.test(k) ? k : "";
        drawPicker();
      }
      else handled = false;
    }
    if (handled) {
      e.preventDefault(); e.stopImmediatePropagation();
      if (e.target && e.target.blur && e.target !== document.body) e.target.blur();
    }
  }
}
"""

_component = st.components.v2.component("influence_lens.gallery", html=_HTML, css=_CSS, js=_JS, isolate_styles=False)
