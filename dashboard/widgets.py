"""Widgets shared by the review pages: one gallery card, a row of image tiles, the run guard."""

from __future__ import annotations

import numpy as np
import streamlit as st

from dashboard import charts, jobs, state
from dashboard.text import md

TILE_PX = 112
# The review page: the title just below the page bar, compact warnings (the cards are dashboard/gallery.py's).
CARD_CSS = """
[data-testid="stMainBlockContainer"] { padding: 3.75rem 1.5rem 4rem; }
h1 { font-size: 1.9rem !important; padding: 0 0 .2rem !important; }
[data-testid="stAlertContainer"] { padding: .45rem .8rem; }
"""


def status_bar() -> None:
    """Above every page: the active run, the decisions so far, and undo (the log keeps the history)."""
    if "startup_error" in st.session_state:
        st.error(md(st.session_state.pop("startup_error")))
    state.show_told()
    run = state.active()
    if run is None:
        return
    s = run.settings
    noise = f", {s.noise_rate:.0%} {s.noise_kind} noise" if s.noise_rate else ""
    counts = run.workspace.decisions()["action"].value_counts()
    with st.container(horizontal=True, vertical_alignment="center", key="status_bar"):
        st.caption(f"**{md(s.data)}**{noise} · {len(run.data.train)} samples · "
                   f"{', '.join(run.methods) or 'scoring…'} · "
                   f"decisions: **{int(counts.sum())}** (relabel {counts.get('relabel', 0)}, drop "
                   f"{counts.get('drop', 0)}, keep {counts.get('keep', 0)}) · workspace `{run.workspace.path.name}`")
        st.button("Undo", key="undo", icon=":material/undo:", shortcut="U", on_click=state.undo, args=(run,),
                  help=f"undo the last decision (U); the log keeps it. {run.workspace.path}")  # never disabled:
        # decisions made in the gallery's fragment do not rerun this bar, so its counts may lag until the next run


def require_run() -> state.Active:
    """The active run with results, or a note and stop (while scoring runs, its progress)."""
    status_bar()
    run = state.active()
    if run is None:
        st.info("No run yet.")
        st.page_link("views/setup.py", label="Set up a run", icon=":material/tune:")
        st.stop()
    job_key = jobs.key_for("score", run.workspace.path, run.key)
    job = jobs.get(job_key)
    if job is not None and job.running:  # the page shows what is stored; it reruns as methods finish
        stored = len(run.methods)
        with st.expander("Scoring the other methods…" if run.ready else "Scoring…", expanded=not run.ready):
            jobs.watch(job_key, rerun_when=lambda: len(run.workspace.methods(run.key)) > stored)
    if not run.ready:
        if job is not None and job.error:
            st.error(f"Scoring failed: {md(job.error)}")
        elif job is None or not job.running:
            st.info("This run has no results yet.")
            st.page_link("views/setup.py", label="Set up a run", icon=":material/tune:")
        st.stop()
    flash = st.session_state.pop("flash", None)
    if flash:
        st.success(flash)
    return run


def open_detail(index: int) -> None:
    """Callback: show this sample on the detail page (the switch happens on the next run)."""
    st.session_state["detail_index"] = int(index)
    st.session_state["goto_detail"] = True


def tiles(images: np.ndarray, captions: list[str], *, per_row: int = 6, size: int = 96) -> None:
    """A row of small images with captions (neighbours on the detail page)."""
    if not len(images):
        st.caption("none")
        return
    columns = st.columns(per_row)
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        columns[i % per_row].image(charts.tile(image, size), caption=caption, width=size)
