"""Journey 2: the ranked gallery with filters, paging, per-image and bulk decisions, and the overview
charts (score histogram with the cut, given-vs-suggested matrix, feature map) that filter it."""

from __future__ import annotations

import numpy as np
import streamlit as st

from dashboard import charts, gallery, jobs, state, timing, widgets
from dashboard.text import md
from engine.explain import MAP_METHODS, class_confusion, feature_map
from engine.guidance import TRAINED_MODEL_SOURCE, spot_check_rows

PER_ROW = 8  # 3 rows of 8 fill a 1280×800 window once scrolled to the gallery
SPOT_CHECK_SIZE = 12
TSNE_MAX_ROWS = 10_000  # scikit-learn's t-SNE takes minutes beyond this on a CPU; PCA is offered alone then
QUIET = {"displayModeBar": False}  # the tool bar hides the titles of these small charts; lasso is the drag mode


def bump(name: str) -> None:
    """Give a chart a new key: a fresh widget drops its selection."""
    st.session_state[name] = st.session_state.get(name, 0) + 1


def set_page(page: int) -> None:
    st.session_state["gallery_page"] = max(1, int(page))


def bulk(run: state.Active, action: str, label_of=None, sent: tuple[str, int] | None = None) -> None:
    """Callback: one action on every selected sample: one batch, one undo. Cards decided already are
    skipped (and counted) unless "overwrite decisions" is on."""
    selected = sorted(st.session_state["selected"])
    if not selected:
        state.tell("select some images first")
        return
    told = state.decide(run, selected, action, None if label_of is None else label_of(selected),
                        overwrite=st.session_state.get("bulk_overwrite", False), sent=sent)
    st.session_state["bulk_note"] = f"last bulk action: {told}"  # stays beside the buttons, unlike the toast


def select(indices) -> None:
    st.session_state["selected"] = set(st.session_state["selected"]) | {int(i) for i in indices}


def clear_selection() -> None:
    st.session_state["selected"] = set()


def flag_down_to(run: state.Active, depth: int) -> None:
    """Callback: move the cut to the estimated review depth."""
    st.session_state["review_cut"] = max(1, depth)
    state.remember_review_setting(run, "cut")


def spot_check(indices: list[int]) -> None:
    """Callback: show these samples (random ones beyond the line) instead of the flagged ones."""
    st.session_state["spot_check_indices"] = set(indices)
    set_page(1)


def end_spot_check() -> None:
    st.session_state.pop("spot_check_indices", None)


st.title("Review the suspects")
run = widgets.require_run()
names = run.class_names
n = len(run.data.train)
state.seed_review_widgets(run)
st.html(f"<style>{widgets.CARD_CSS}</style>")


def remember(name: str) -> dict:
    """Widget arguments that store the widget's value with the run."""
    return {"key": f"review_{name}", "on_change": state.remember_review_setting, "args": (run, name)}


c1, c2, c3, c4 = st.columns(4)
method = c1.selectbox("Ranked by", run.methods, **remember("method"))
result = run.results[method]
cut = int(c2.number_input("Flag the top", 1, n, help="the cut: samples ranked above it are 'flagged'",
                          **remember("cut")))
only_flagged = c3.toggle("Only flagged", **remember("only_flagged"))
per_page = c4.selectbox("Images per page", state.PAGE_SIZES, **remember("per_page"))

for advice in run.advice(method):
    st.warning(md(advice.message), icon=":material/warning:")

# The depth estimate is one line until opened; the gallery comes next, so a 1280×800 window shows its cards
# on arrival. The filters and the overview charts are drawn below it (they set what it shows).
threshold = st.session_state.get("review_threshold", 0.5)
estimate = run.review_estimate(method, threshold)
carved = run.data.validation is not None and not run.data.validation_trusted
# With a carved validation set θ̃ learned the same noisy labels (it estimated 0.4 errors where 17 were): the
# engine then falls back to cleanlab's held-out folds, else to the trained model, whose number is no stop line.
reliable = not (carved and estimate.source == TRAINED_MODEL_SOURCE)
if reliable:
    rough = " (rough: from the trained model, which saw the labels)" if estimate.source == TRAINED_MODEL_SOURCE else ""
    summary = (f"How deep to review: down to **#{estimate.stop_depth:,}** ({estimate.stop_depth / n:.1%}) · "
               f"found {estimate.found:,} of about {estimate.expected_total:,.0f} estimated errors{rough}")
else:
    summary = ("How deep to review: no reliable estimate (the validation set was carved from the training data, "
               "so its model learned the same noisy labels)")
# the summary is in the label, so a new count makes a new expander: it opens as the last one was
depth_panel = st.expander(summary, expanded=bool(st.session_state.get("review_panel_depth")), **remember("panel_depth"))
if depth_panel.open:  # a closed panel costs nothing
    with depth_panel:
        chart, numbers = st.columns([3, 1])
        numbers.slider("Stop when precision falls below", 0.05, 0.95, 0.5, 0.05, key="review_threshold",
                       format="%.2f", help="the estimated chance that the next sample is a label error")
        if reliable:
            numbers.metric("Review down to", f"{estimate.stop_depth:,}", f"{estimate.stop_depth / n:.1%} of the set",
                           delta_color="off", delta_arrow="off")
            numbers.metric("Found so far / estimated total", f"{estimate.found:,} / {estimate.expected_total:,.0f}",
                           f"estimated noise rate {estimate.expected_noise_rate:.1%}", delta_color="off",
                           delta_arrow="off")
            numbers.button("Flag down to here", key="flag_down_to", on_click=flag_down_to,
                           args=(run, estimate.stop_depth), disabled=estimate.stop_depth in (0, cut))
        else:
            numbers.metric("Found so far", f"{estimate.found:,}")
            numbers.caption("No depth to stop at: score with cleanlab (held-out folds) or give a trusted "
                            "validation set for an estimate.")
        reviewed_rows, _ = run.reviewed()
        sample = run.data.train.index[spot_check_rows(estimate, reviewed_rows, SPOT_CHECK_SIZE,
                                                      seed=len(reviewed_rows))]
        numbers.button("Spot-check beyond the line", key="spot_check", on_click=spot_check, args=(sample.tolist(),),
                       disabled=len(sample) == 0 or not reliable,
                       help=f"show {SPOT_CHECK_SIZE} random unreviewed samples ranked below the line: your decisions "
                            "on them correct the estimate of how many errors remain there")
        chart.plotly_chart(charts.review_depth_figure(estimate, threshold, cut), key="review_depth_chart",
                           config=QUIET)
        second = "" if estimate.cleanlab_total is None else f" cleanlab counts {estimate.cleanlab_total:,} issues."
        if estimate.source == TRAINED_MODEL_SOURCE:
            second += (" Score with cleanlab, or fvm-loss / fvm with a trusted validation set, for an estimate from "
                       "a model that did not learn the labels.")
        chart.caption(f"Estimated from the probabilities of **{estimate.source}**, recalibrated with your "
                      f"{estimate.reviewed:,} decisions so far (relabel and drop count as errors, keep as correct; "
                      f"decisions in the gallery below update this on the next change of page settings); "
                      f"the estimate of the top {cut:,} is {estimate.precision_at(cut):.0%} precision.{second}")

gallery_slot = st.container()
flagged_mask = run.ranks(method) <= cut


def map_xy(map_method: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The rows drawn and their map: PCA at once (of a sample beyond engine.explain.MAP_ROWS rows); t-SNE
    (offered up to TSNE_MAX_ROWS) in a background job with its progress (None until it is done)."""
    if map_method == "pca":
        return state.feature_xy(str(run.workspace.path), run.key, map_method)
    job_key = jobs.key_for(f"map-{map_method}", run.workspace.path, run.key)
    job = jobs.get(job_key) or jobs.start(job_key, "t-SNE map", lambda progress: feature_map(
        run.arrays["features"], method=map_method))
    if job.running:
        jobs.watch(job_key)
        return None
    if job.error:
        st.error(f"The t-SNE map failed: {job.error}")
        return None
    return np.arange(len(job.result)), job.result


filters_slot = st.container()
overview = st.expander("Overview: score histogram, given vs. suggested, feature map", **remember("panel_overview"))
cell_event = map_event = None
if overview.open:
    with overview:
        h, m, f = st.columns(3)
        cut_score = float(run.ranked_rows(method).table["score"].iloc[cut - 1])
        h.plotly_chart(charts.score_histogram(result.scores, cut_score, method=method, flagged=cut), key="histogram",
                       config=QUIET)
        counts = class_confusion(run.data.train.labels[flagged_mask], result.suggested_labels[flagged_mask],
                                 len(names))
        cell_event = m.plotly_chart(charts.confusion_figure(counts, names), on_select="rerun", selection_mode="points",
                                    key=f"confusion_{st.session_state.get('confusion_key', 0)}", config=QUIET)
        with f:
            map_method = st.radio("Map", MAP_METHODS if n <= TSNE_MAX_ROWS else ("pca",), horizontal=True,
                                  key="map_method", label_visibility="collapsed",
                                  format_func=lambda x: {"pca": "PCA", "tsne": "t-SNE"}[x])
            drawn = map_xy(map_method)
            if drawn is not None:
                rows, xy = drawn
                map_event = st.plotly_chart(charts.feature_map_figure(xy, run.data.train.labels[rows],
                                                                      run.data.train.index[rows], flagged_mask[rows],
                                                                      names),
                                            on_select="rerun", selection_mode=("lasso", "box"), config=QUIET,
                                            key=f"map_{st.session_state.get('map_key', 0)}")
                if len(rows) < n:
                    st.caption(f"The map draws {len(rows):,} of the {n:,} samples, chosen at random; a lasso "
                               "selects among those.")

cell = None
if cell_event and cell_event.selection.points:
    given_id, suggested_id = charts.point_customdata(cell_event.selection.points[0])
    cell = (int(given_id), int(suggested_id))
lasso = None
if map_event and map_event.selection.points:
    lasso = {int(charts.point_customdata(p)[0]) for p in map_event.selection.points}

f1, f2, f3, f4 = filters_slot.columns(4)
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


# A change of what the gallery shows starts it at page 1 (the page number belongs to the old list).
view = (method, cut, only_flagged, per_page, tuple(given_filter), tuple(suggested_filter), tuple(status_filter),
        score_range, cell, None if lasso is None else tuple(sorted(lasso)))
if st.session_state.get("gallery_view") not in (None, view):
    set_page(1)
st.session_state["gallery_view"] = view


def suggestions(indices) -> list[int]:
    return [int(result.suggested_labels[run.position_of(i)]) for i in indices]


BULK = {"accept": ("relabel", suggestions), "keep": ("keep", None), "drop": ("drop", None)}


def apply(command: dict, sent: tuple[str, int]) -> None:
    """One numbered command from the gallery (a key or a click; see ``gallery.py``), in order."""
    action, index = str(command.get("action", "")), command.get("index")
    if action in ("relabel", "keep", "drop") and index is not None:
        label = command.get("label") if action == "relabel" else None
        state.decide(run, [int(index)], action, None if label is None else int(label), sent=sent, quiet=True)
    elif action.startswith("bulk_") and action.removeprefix("bulk_") in BULK:
        bulk(run, *BULK[action.removeprefix("bulk_")], sent=sent)
    elif action == "undo":
        state.undo(run, sent=sent)
    elif action == "select" and index is not None:
        chosen = set(st.session_state["selected"])
        st.session_state["selected"] = chosen | {int(index)} if command.get("on") else chosen - {int(index)}
    elif action == "page":
        set_page(min(int(command.get("page", 1)), st.session_state.get("gallery_pages", 1)))
    elif action == "detail" and index is not None:
        widgets.open_detail(int(index))


def receive(payload: dict) -> None:
    gallery.receive(payload, gallery_run, run.workspace.last_sent, apply)


gallery_run = f"{run.workspace.path.stem}/{run.key}"


def go_to_page() -> None:
    set_page(st.session_state["gallery_goto"])


@st.fragment
@timing.timed("gallery fragment")
def show_gallery() -> None:
    """The cards (one client-side component), their bulk actions and the pager: a decision reruns only this."""
    if st.session_state.pop("goto_detail", False):
        st.switch_page("views/detail.py")
    state.show_told()
    table = charts.gallery_table(run.ranked_rows(method), run.decisions())
    shown = charts.filter_gallery(table, top_k=cut if only_flagged and checking is None else None,
                                  given=given_filter, suggested=suggested_filter, status=status_filter,
                                  score_range=score_range, indices=lasso, cell=cell)
    page_rows, pages = charts.page_of(shown, st.session_state.get("gallery_page", 1), per_page)
    page = min(st.session_state.get("gallery_page", 1), pages)
    st.session_state["gallery_pages"] = pages
    st.session_state["gallery_goto"] = page  # the box follows N / P and the buttons

    selected = st.session_state["selected"]
    decided = int((page_rows["status"] != charts.UNREVIEWED).sum())
    flagged = int((page_rows["rank"] <= cut).sum())
    with st.container(horizontal=True, vertical_alignment="center", key="gallery_bar", gap="small"):
        st.markdown(f"**{len(shown):,}** shown · this page: **{decided}** of {len(page_rows)} decided, "
                    f"**{flagged}** flagged · **{len(selected)}** selected")
        st.button("Select page", key="select_page", on_click=select, args=(page_rows["index"].tolist(),))
        if selected:  # the bulk actions once there is a selection (Shift + A / K / D act on it too)
            st.button("Clear selection", key="clear_selection", on_click=clear_selection)
            st.button("Accept suggestions", key="bulk_accept", type="primary", on_click=bulk,
                      args=(run, *BULK["accept"]), help="accept each selected card's suggestion (Shift+A)")
            st.button("Keep", key="bulk_keep", on_click=bulk, args=(run, *BULK["keep"]),
                      help="the given labels of the selected cards are correct (Shift+K)")
            st.button("Drop", key="bulk_drop", on_click=bulk, args=(run, *BULK["drop"]),
                      help="drop the selected cards (Shift+D)")
            with st.popover("Relabel to…"):
                target = st.selectbox("Label", label_ids, format_func=names.__getitem__, key="bulk_label")
                st.button("Relabel selected", key="bulk_relabel", on_click=bulk,
                          args=(run, "relabel", lambda ids: [target] * len(ids)))
        st.toggle("overwrite decisions", key="bulk_overwrite",
                  help="off: bulk actions skip the cards decided already (and say how many)")
        if "bulk_note" in st.session_state:
            st.caption(st.session_state["bulk_note"])
        st.space("stretch")
        st.button("", key="prev_page", icon=":material/chevron_left:", disabled=page <= 1,
                  on_click=set_page, args=(page - 1,), help="previous page (P)")
        st.markdown(f"page **{page}** of {pages}")
        st.button("", key="next_page", icon=":material/chevron_right:", disabled=page >= pages,
                  on_click=set_page, args=(page + 1,), help="next page (N)")
        st.number_input("Go to page", 1, pages, key="gallery_goto", label_visibility="collapsed",
                        on_change=go_to_page, width=90, help="go to page")
    gallery.show(gallery_run, gallery.card_data(page_rows, run, selected), names,
                 per_row=PER_ROW, page=page, pages=pages, on_batch=receive)
    st.caption("Keyboard: arrows move · Enter/A accept · digits relabel · K keep · D drop · Space select · "
               "U undo · N/P page · **?** lists every key. A card says “✓ saved” once its decision is in the "
               "workspace.")


with gallery_slot:
    show_gallery()
