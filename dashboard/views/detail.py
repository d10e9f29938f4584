"""Journey 3: one sample up close: the image, class probabilities, its score and rank under every
method, and why it was flagged (the validation and training images most like it)."""

from __future__ import annotations

import streamlit as st

from dashboard import charts, state, widgets
from dashboard.text import md
from engine.data import original_image
from engine.explain import explain
from engine.scorers import scorer_class

NEIGHBOURS = 6


def goto(index: int) -> None:
    st.session_state["detail_index"] = int(index)


def decide_and_advance(run: state.Active, index: int, action: str, label: int | None, following: int | None) -> None:
    state.decide(run, [index], action, label)
    if following is not None and st.session_state.get("detail_advance", True):
        goto(following)


st.title("Sample detail")
run = widgets.require_run()
names = run.class_names
shown = [md(name) for name in names]  # for Markdown: the data's names as text
train = run.data.train
method = state.review_settings(run)["method"]  # the gallery's ranking: its rank, score and suggestion
ranks = run.ranks(method)
order = run.ranked_rows(method).table["index"].to_numpy()  # stable indices, most suspicious first

if "sample" in st.query_params and "detail_index" not in st.session_state:
    st.session_state["detail_index"] = int(st.query_params["sample"])
index = int(st.session_state.get("detail_index", order[0]))
if run.rows_of([index])[0] < 0:  # not a scored row: say why, then show the top of the ranking
    validation = run.data.validation
    carved = validation is not None and not run.data.validation_trusted and index in set(validation.index.tolist())
    st.warning(f"Sample {index} is not scored: it was carved into the validation set. Showing the top of the "
               "ranking instead." if carved else f"There is no sample {index} in the scored set. Showing the top "
               "of the ranking instead.", icon=":material/info:")
    index = int(order[0])
st.query_params["sample"] = str(index)
position = run.position_of(index)
rank = int(ranks[position])
previous_index = int(order[rank - 2]) if rank > 1 else None
next_index = int(order[rank]) if rank < len(order) else None

with st.container(horizontal=True, vertical_alignment="center"):
    st.button("Previous", key="detail_prev", icon=":material/chevron_left:", shortcut="P",
              disabled=previous_index is None, on_click=goto, args=(previous_index,))
    st.markdown(f"sample **{index}** · rank **{rank}** of {len(order)} by **{method}**")
    st.button("Next", key="detail_next", icon=":material/chevron_right:", shortcut="N",
              disabled=next_index is None, on_click=goto, args=(next_index,))
    st.number_input("Sample index", value=index, step=1, key=f"detail_pick_{index}", width=160,
                    on_change=lambda: goto(st.session_state[f"detail_pick_{index}"]))
    st.toggle("advance after a decision", value=True, key="detail_advance")

given = int(train.labels[position])
suggested = int(run.results[method].suggested_labels[position])
probabilities = run.predictions.probabilities[position]
decisions = run.decisions().set_index("index")
image_col, chart_col = st.columns([1, 2])
with image_col:
    st.image(charts.tile(original_image(train, position, 640), 320), width=320)  # the real photo
    source = f" · {md(train.paths[position])}" if train.paths is not None else ""
    st.markdown(f"given **{shown[given]}** · predicted **{shown[int(probabilities.argmax())]}** · "
                f"suggested **{shown[suggested]}**{source}")
    st.caption(f"Predicted: the trained model θ*'s most likely class (the probabilities beside). Suggested by "
               f"**{method}**: {scorer_class(method).suggestion}.")
    if index in decisions.index:
        decision = decisions.loc[index]
        label = f" → {shown[int(decision['new_label'])]}" if decision["action"] == "relabel" else ""
        st.markdown(f"Decision: **{decision['action']}{label}** ({decision['decided_at'][:19].replace('T', ' ')} UTC)")
    if run.data.truth_known:
        truth = int(run.data.clean_labels[position])
        st.caption(f"demo truth: {shown[truth]} ({'label flipped' if truth != given else 'label correct'})")
    with st.container(horizontal=True):
        st.button(f"Accept {shown[suggested]}", key="detail_accept", shortcut="A", type="primary",
                  disabled=suggested == given, on_click=decide_and_advance,
                  args=(run, index, "relabel", suggested, next_index))
        st.button("Confirm correct", key="detail_keep", shortcut="K", on_click=decide_and_advance,
                  args=(run, index, "keep", None, next_index))
        st.button("Drop", key="detail_drop", shortcut="D", on_click=decide_and_advance,
                  args=(run, index, "drop", None, next_index))
    with st.container(horizontal=True, vertical_alignment="bottom"):
        label = st.selectbox("Another label", range(len(names)), format_func=names.__getitem__, index=suggested,
                             key=f"detail_label_{index}")
        st.button("Relabel", key="detail_relabel", on_click=decide_and_advance,
                  args=(run, index, "relabel", label, next_index))
with chart_col:
    st.plotly_chart(charts.probability_figure(probabilities, names, given=given, suggested=suggested),
                    key="probabilities")
    st.dataframe(charts.method_table({m: r.scores for m, r in run.results.items()},
                                     {m: r.suggested_labels for m, r in run.results.items()}, position, names),
                 hide_index=True)

st.subheader("Why it was flagged")
why = explain(position, features=run.arrays["features"], labels=train.labels, suggested=suggested,
              val_features=run.arrays.get("val_features"), k=NEIGHBOURS)
validation = run.data.validation
if validation is not None and len(why.validation[0]):
    st.markdown("**Validation images most like it** (by the model's features) and their labels")
    widgets.tiles(validation.images[why.validation[0]],
                  [f"{shown[int(validation.labels[p])]} · sim {s:.2f}" for p, s in zip(*why.validation, strict=True)])
else:
    st.caption("No validation set in this run: the nearest validation images need one.")
for title, (positions, similarity) in ((f"Training images like it labelled **{shown[given]}** (pulling towards the "
                                        "given label)", why.same_given),
                                       (f"Training images like it labelled **{shown[suggested]}** (pulling towards "
                                        "the suggested label)", why.same_suggested)):
    st.markdown(title)
    widgets.tiles(train.images[positions],
                  [f"#{int(train.index[p])} · sim {s:.2f}" for p, s in zip(positions, similarity, strict=True)])
