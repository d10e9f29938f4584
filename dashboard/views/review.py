"""Journey 2: the ranked gallery with filters, paging, per-image and bulk decisions, and the overview
charts (score histogram with the cut, given-vs-suggested matrix, feature map) that filter it."""

from __future__ import annotations

import numpy as np
import streamlit as st

from dashboard import charts, state, widgets
from dashboard.text import md
from engine.explain import MAP_METHODS, class_confusion
from engine.guidance import TRAINED_MODEL_SOURCE, spot_check_rows
from engine.measured import recommended_methods

PER_ROW = 6
SPOT_CHECK_SIZE = 12
PAGE_SIZES = (12, 24, 48, 96)
TSNE_MAX_ROWS = 10_000  # scikit-learn's t-SNE takes minutes beyond this on a CPU; PCA is offered alone then
QUIET = {"displayModeBar": False}  # the tool bar hides the titles of these small charts; lasso is the drag mode


def bump(name: str) -> None:
    """Give a chart a new key: a fresh widget drops its selection."""
    st.session_state[name] = st.session_state.get(name, 0) + 1


def set_page(page: int) -> None:
    st.session_state["gallery_page"] = max(1, page)


def bulk(run: state.Active, action: str, label_of=None) -> None:
    """Callback: one action on every selected sample (one batch, undone together)."""
    selected = sorted(st.session_state["selected"])
    if not selected:
        st.toast("select some images first")
        return
    if label_of is None:
        state.decide(run, selected, action)
        return
    labels = label_of(selected)
    for label in sorted(set(labels)):  # one batch per target label
        state.decide(run, [i for i, lab in zip(selected, labels, strict=True) if lab == label], action, label)


def select(indices) -> None:
    st.session_state["selected"] = set(st.session_state["selected"]) | {int(i) for i in indices}


def clear_selection() -> None:
    st.session_state["selected"] = set()


def flag_down_to(depth: int) -> None:
    """Callback: move the cut to the estimated review depth."""
    st.session_state["review_cut"] = max(1, depth)


def spot_check(indices: list[int]) -> None:
    """Callback: show these samples (random ones beyond the line) instead of the flagged ones."""
    st.session_state["spot_check_indices"] = set(indices)
    set_page(1)


def end_spot_check() -> None:
    st.session_state.pop("spot_check_indices", None)


if st.session_state.pop("goto_detail", False):
    st.switch_page("views/detail.py")

st.title("Review the suspects")
run = widgets.require_run()
names = run.class_names
n = len(run.data.train)

c1, c2, c3, c4 = st.columns([2, 2, 2, 2])
method = c1.selectbox("Ranked by", run.methods, key="review_method",  # opens on the best measured method
                      index=run.methods.index(recommended_methods(run.methods, 1)[0]))
result = run.results[method]
cut = int(c2.number_input("Flag the top", 1, n, min(n, max(10, round(0.1 * n))), key="review_cut",
                          help="the cut: samples ranked above it are 'flagged'"))
only_flagged = c3.toggle("Only flagged", value=True, key="review_only_flagged")
per_page = c4.selectbox("Images per page", PAGE_SIZES, index=1, key="review_per_page")

for advice in run.advice(method):
    st.warning(md(advice.message), icon=":material/warning:")

with st.expander("How deep to review", expanded=True, key="review_depth"):
    chart, numbers = st.columns([3, 1])
    threshold = numbers.slider("Stop when precision falls below", 0.05, 0.95, 0.5, 0.05, key="review_threshold",
                               format="%.2f", help="the estimated chance that the next sample is a label error")
    estimate = run.review_estimate(method, threshold)
    numbers.metric("Review down to", f"{estimate.stop_depth:,}", f"{estimate.stop_depth / n:.1%} of the set",
                   delta_color="off", delta_arrow="off")
    numbers.metric("Found so far / estimated total", f"{estimate.found:,} / {estimate.expected_total:,.0f}",
                   f"estimated noise rate {estimate.expected_noise_rate:.1%}", delta_color="off", delta_arrow="off")
    numbers.button("Flag down to here", key="flag_down_to", on_click=flag_down_to, args=(estimate.stop_depth,),
                   disabled=estimate.stop_depth in (0, cut))
    reviewed_rows, _ = run.reviewed()
    sample = run.data.train.index[spot_check_rows(estimate, reviewed_rows, SPOT_CHECK_SIZE, seed=len(reviewed_rows))]
    numbers.button("Spot-check beyond the line", key="spot_check", on_click=spot_check, args=(sample.tolist(),),
                   disabled=len(sample) == 0,
                   help=f"show {SPOT_CHECK_SIZE} random unreviewed samples ranked below the line: your decisions on "
                        "them correct the estimate of how many errors remain there")
    chart.plotly_chart(charts.review_depth_figure(estimate, threshold, cut), key="review_depth_chart", config=QUIET)
    second = f" cleanlab counts {estimate.cleanlab_total:,} issues." if estimate.cleanlab_total is not None else ""
    if estimate.source == TRAINED_MODEL_SOURCE:
        second += " Score with fvm-loss, fvm or cleanlab for an estimate from a model that did not learn the labels."
    chart.caption(f"Estimated from the probabilities of **{estimate.source}**, recalibrated with your "
                  f"{estimate.reviewed:,} decisions so far (relabel and drop count as errors, keep as correct); "
                  f"the estimate of the top {cut:,} is {estimate.precision_at(cut):.0%} precision.{second}")

predicted = run.predictions.predicted
table = charts.gallery_table(run.data.train.index, result.scores, run.data.train.labels, predicted,
                             result.suggested_labels, run.decisions())
flagged_mask = run.ranks(method) <= cut

with st.expander("Overview: score histogram, given vs. suggested, feature map", expanded=True):
    h, m, f = st.columns(3)
    cut_score = float(np.sort(result.scores)[::-1][cut - 1])
    h.plotly_chart(charts.score_histogram(result.scores, cut_score, method=method, flagged=cut), key="histogram",
                   config=QUIET)
    counts = class_confusion(run.data.train.labels[flagged_mask], result.suggested_labels[flagged_mask], len(names))
    cell_event = m.plotly_chart(charts.confusion_figure(counts, names), on_select="rerun", selection_mode="points",
                                key=f"confusion_{st.session_state.get('confusion_key', 0)}", config=QUIET)
    map_method = f.radio("Map", MAP_METHODS if n <= TSNE_MAX_ROWS else ("pca",), horizontal=True, key="map_method",
                         label_visibility="collapsed", format_func=lambda x: {"pca": "PCA", "tsne": "t-SNE"}[x])
    xy = state.feature_xy(str(run.workspace.path), run.key, map_method)
    map_event = f.plotly_chart(charts.feature_map_figure(xy, run.data.train.labels, run.data.train.index, flagged_mask,
                                                         names),
                               on_select="rerun", selection_mode=("lasso", "box"), config=QUIET,
                               key=f"map_{st.session_state.get('map_key', 0)}")

cell = None
if cell_event and cell_event.selection.points:
    given_id, suggested_id = charts.point_customdata(cell_event.selection.points[0])
    cell = (int(given_id), int(suggested_id))
lasso = None
if map_event and map_event.selection.points:
    lasso = {int(charts.point_customdata(p)[0]) for p in map_event.selection.points}

f1, f2, f3, f4 = st.columns(4)
label_ids = list(range(len(names)))
given_filter = f1.multiselect("Given class", label_ids, format_func=names.__getitem__, key="filter_given")
suggested_filter = f2.multiselect("Suggested class", label_ids, format_func=names.__getitem__, key="filter_suggested")
status_filter = f3.multiselect("Decision", charts.STATUSES, key="filter_status")
low, high = float(result.scores.min()), float(result.scores.max())
score_range = f4.slider("Score range", low, high, (low, high), key=f"filter_score_{method}") if high > low else None
if score_range == (low, high):
    score_range = None

chips = st.container(horizontal=True)
if cell is not None:
    chips.button(f"given {md(names[cell[0]])} → suggested {md(names[cell[1]])}  ✕", key="clear_cell",
                 on_click=bump, args=("confusion_key",))
if lasso is not None:
    chips.button(f"map selection: {len(lasso)} samples  ✕", key="clear_lasso", on_click=bump, args=("map_key",))
checking = st.session_state.get("spot_check_indices")
if checking is not None:
    chips.button(f"spot-check: {len(checking)} random samples beyond the line  ✕", key="end_spot_check",
                 on_click=end_spot_check)
    lasso = checking if lasso is None else lasso & checking

shown = charts.filter_gallery(table, top_k=cut if only_flagged and checking is None else None, given=given_filter,
                              suggested=suggested_filter, status=status_filter, score_range=score_range,
                              indices=lasso, cell=cell)
page_rows, pages = charts.page_of(shown, st.session_state.get("gallery_page", 1), per_page)
page = min(st.session_state.get("gallery_page", 1), pages)

selected = st.session_state["selected"]
with st.container(horizontal=True, vertical_alignment="center"):
    st.markdown(f"**{len(shown)}** shown · **{len(selected)}** selected")
    st.button("Select page", key="select_page", on_click=select, args=(page_rows["index"].tolist(),))
    st.button("Clear selection", key="clear_selection", on_click=clear_selection, disabled=not selected)
    suggested_of = dict(zip(table["index"], table["suggested"], strict=True))
    st.button("Accept suggestions", key="bulk_accept", shortcut="A", disabled=not selected, type="primary",
              on_click=bulk, args=(run, "relabel", lambda ids: [int(suggested_of[i]) for i in ids]))
    st.button("Confirm correct", key="bulk_keep", shortcut="K", disabled=not selected,
              on_click=bulk, args=(run, "keep"))
    st.button("Drop", key="bulk_drop", shortcut="D", disabled=not selected, on_click=bulk, args=(run, "drop"))
    with st.popover("Relabel to…", disabled=not selected):
        target = st.selectbox("Label", label_ids, format_func=names.__getitem__, key="bulk_label")
        st.button("Relabel selected", key="bulk_relabel", on_click=bulk,
                  args=(run, "relabel", lambda ids: [target] * len(ids)))

with st.container(horizontal=True, vertical_alignment="center"):
    st.button("Previous", key="prev_page", icon=":material/chevron_left:", shortcut="P", disabled=page <= 1,
              on_click=set_page, args=(page - 1,))
    st.markdown(f"page **{page}** of {pages}")
    st.button("Next", key="next_page", icon=":material/chevron_right:", shortcut="N", disabled=page >= pages,
              on_click=set_page, args=(page + 1,))
    st.number_input("Go to page", 1, pages, page, key=f"goto_page_{pages}", label_visibility="collapsed",
                    on_change=lambda: set_page(st.session_state[f"goto_page_{pages}"]), width=110)

if page_rows.empty:
    st.info("No image passes the filters.")
for start in range(0, len(page_rows), PER_ROW):
    columns = st.columns(PER_ROW)
    for column, (_, row) in zip(columns, page_rows.iloc[start:start + PER_ROW].iterrows(), strict=False):
        with column:
            widgets.card(run, row)
st.caption("Shortcuts: A accept suggestions · K confirm correct · D drop (selected images) · N / P next / previous "
           "page · U undo.")
