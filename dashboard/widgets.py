"""Widgets shared by the review pages: one gallery card, a row of image tiles, the run guard."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import charts, jobs, state
from engine.data import original_image

TILE_PX = 112


def status_bar() -> None:
    """Above every page: the active run, the decisions so far, and undo (the log keeps the history)."""
    if "startup_error" in st.session_state:
        st.error(st.session_state.pop("startup_error"))
    run = state.active()
    if run is None:
        return
    s = run.settings
    noise = f", {s.noise_rate:.0%} {s.noise_kind} noise" if s.noise_rate else ""
    counts = run.workspace.decisions()["action"].value_counts()
    with st.container(horizontal=True, vertical_alignment="center", key="status_bar"):
        st.caption(f"**{s.data}**{noise} · {len(run.data.train)} samples · {', '.join(run.methods) or 'scoring…'} · "
                   f"decisions: **{int(counts.sum())}** (relabel {counts.get('relabel', 0)}, drop "
                   f"{counts.get('drop', 0)}, keep {counts.get('keep', 0)}) · workspace `{run.workspace.path.name}`")
        st.button("Undo", key="undo", icon=":material/undo:", shortcut="U", on_click=state.undo, args=(run,),
                  disabled=counts.empty, help=f"undo the last decision (U); the log keeps it. {run.workspace.path}")


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
            st.error(f"Scoring failed: {job.error}")
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


def card(run: state.Active, row: pd.Series) -> None:
    """One gallery image with its numbers and one-click decisions."""
    names = run.class_names
    index, suggested, given = int(row["index"]), int(row["suggested"]), int(row["given"])
    with st.container(border=True, key=f"card_{index}"):
        st.image(charts.tile(original_image(run.data.train, int(row["position"]), TILE_PX), TILE_PX), width=TILE_PX)
        st.markdown(charts.card_caption(row, names))
        with st.container(horizontal=True, gap="small"):
            st.button(f"✓ {names[suggested]}", key=f"accept_{index}", help="accept the suggested label",
                      disabled=suggested == given, on_click=state.decide, args=(run, [index], "relabel", suggested))
            st.button("", key=f"keep_{index}", icon=":material/verified:", help="confirm the given label is correct",
                      on_click=state.decide, args=(run, [index], "keep"))
            st.button("", key=f"drop_{index}", icon=":material/delete:", help="drop this sample",
                      on_click=state.decide, args=(run, [index], "drop"))
            with st.popover("", icon=":material/edit:", help="pick another label"):
                label = st.selectbox("New label", range(len(names)), format_func=names.__getitem__,
                                     index=suggested, key=f"pick_{index}")
                st.button("Relabel", key=f"relabel_{index}", on_click=state.decide,
                          args=(run, [index], "relabel", label))
            st.button("", key=f"detail_{index}", icon=":material/zoom_in:", help="look closer",
                      on_click=open_detail, args=(index,))
        st.session_state[f"select_{index}"] = index in st.session_state["selected"]  # the set is the truth
        st.checkbox("select", key=f"select_{index}", on_change=_toggle_selected, args=(index,))


def _toggle_selected(index: int) -> None:
    selected = set(st.session_state["selected"])
    selected ^= {index}
    st.session_state["selected"] = selected


def tiles(images: np.ndarray, captions: list[str], *, per_row: int = 6, size: int = 96) -> None:
    """A row of small images with captions (neighbours on the detail page)."""
    if not len(images):
        st.caption("none")
        return
    columns = st.columns(per_row)
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        columns[i % per_row].image(charts.tile(image, size), caption=caption, width=size)
