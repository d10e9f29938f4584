"""Journey 6: close the loop. The samples a person confirmed or relabeled become trusted: they join
the validation set and the methods that use one (VM / FVM) re-score, and the page shows how the
ranking of the samples not yet reviewed changed."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import streamlit as st

from dashboard import charts, estimates, jobs, state, widgets
from dashboard.text import md
from engine.data import save_npz
from engine.errors import InfluenceLensError
from engine.measured import recommended_methods
from engine.metrics import detection_metrics, ranks
from engine.runs import config_hash, reviewed_validation, score_into
from engine.safe_files import write_atomically
from engine.scorers import available_methods, scorer_class
from engine.stages import fingerprint


def start_loop(run: state.Active, methods: list[str]) -> None:
    """Write the grown validation set beside the workspace, then score the new configuration in the
    background. The active run stays: the page shows how the ranking changed, and opening the
    re-scored run (which holds only ``methods``) is the user's choice."""
    decisions = run.decisions()
    validation = reviewed_validation(run.data, decisions)
    workspace = run.workspace
    path = workspace.path.parent / f"{workspace.path.stem}-validation-{fingerprint(validation)}.npz"
    if not path.exists():  # written whole or not at all, like every file the tool writes
        write_atomically(path, lambda handle: save_npz(validation, handle), binary=True)
    settings = replace(run.settings, validation=str(path), val_from_train=None)
    data = state.run_data(json.dumps(settings.to_dict(), sort_keys=True))
    key = config_hash(settings, data)
    reviewed = decisions.loc[decisions["action"].isin(["keep", "relabel"]), "index"].astype(int).tolist()
    workspace.save_run(key, settings.to_dict())
    # "reviewed": these training rows are in the validation set on purpose (the overlap guard skips them)
    workspace.save_report(key, "loop", {"from": run.key, "validation": str(path), "size": len(validation),
                                        "reviewed": reviewed})
    workspace.save_report(run.key, "loop_next", {"key": key, "methods": methods})
    models, trained = state.models(), state.models().get(run.key)  # training ignores validation: reuse θ*

    def work(progress):
        _, model = score_into(workspace, state.readable_settings(settings), data, methods, trained=trained,
                              progress=progress)
        models[key] = model
        return model

    jobs.start(jobs.key_for("score", workspace.path, key), "Re-scoring", work)


def switch_to(run: state.Active, key: str, message: str) -> None:
    """Callback: show another run of this workspace from now on, and say so."""
    state.open_run(run.workspace.path.stem, key)
    st.session_state["flash"] = message


st.title("Close the loop")
run = widgets.require_run()
loop = run.workspace.report(run.key, "loop")  # this run was made by closing the loop on another
following = run.workspace.report(run.key, "loop_next")  # or another was made from this one
decisions = run.decisions()
counts = decisions["action"].value_counts()
trusted = len(run.data.validation) if run.data.validation is not None and run.data.validation_trusted else 0
needing = [m for m in available_methods() if scorer_class(m).requires_validation]
st.markdown(f"Reviewed so far: **{counts.get('keep', 0)}** confirmed correct and **{counts.get('relabel', 0)}** "
            f"relabeled. They join the trusted validation set ({trusted} samples now) and the methods below "
            "re-score every training sample against it, as a new run beside this one (this run stays open).")
if not needing:
    st.info("No registered method uses a validation set.")
    st.stop()
methods = st.multiselect("Re-score with", needing, key="loop_methods",
                         default=recommended_methods(needing, 1))
if methods:  # said before the button: θ* is reused when the server still holds it; scoring is under one training
    train = run.data.train
    cached = state.models().get(run.key) is not None
    st.markdown(estimates.trainings_line(1 if cached else 2, estimates.run_time(
        len(train), train.images.shape[1:], len(run.class_names), run.settings.train_config(), methods),
        what=("re-scoring, at most about one training; the trained model is reused" if cached else
              "the trained model again (the server no longer holds it), then re-scoring, at most about one")))
if st.button("Add the reviewed samples to the validation set and re-score", type="primary", key="loop_run",
             disabled=not methods or counts.get("keep", 0) + counts.get("relabel", 0) == 0):
    try:
        start_loop(run, methods)
        st.rerun()
    except InfluenceLensError as exc:
        st.error(md(exc))

if following is not None:
    before_key, after_key = run.key, following["key"]
elif loop is not None and loop["from"] != run.key:
    before_key, after_key = loop["from"], run.key
else:
    st.stop()
job_key = jobs.key_for("score", run.workspace.path, after_key)
job = jobs.get(job_key)
if job is not None and job.running:
    jobs.watch(job_key)
    st.stop()
if job is not None:
    jobs.forget(job_key)
    if job.error:
        st.error(f"Re-scoring failed: {md(job.error)}")
before_results, after_results = run.workspace.results(before_key), run.workspace.results(after_key)
if not after_results:
    st.info("The re-scored run has no results (re-scoring stopped before the end): run it again.")
    st.stop()
after_loop = run.workspace.report(after_key, "loop")
if after_key == run.key:
    st.button("Back to the run it came from", key="loop_back", icon=":material/undo:", on_click=switch_to,
              args=(run, before_key, f"Now showing the run before closing the loop ({', '.join(before_results)})."))
else:
    st.button(f"Review the re-scored ranking ({', '.join(after_results)})", key="loop_open", type="primary",
              icon=":material/open_in_new:", on_click=switch_to,
              args=(run, after_key, f"Now showing the re-scored run: {', '.join(after_results)} against a validation "
                                    f"set of {after_loop['size']} samples. The run before is in the set-up page's "
                                    "runs table, and this page takes you back."),
              help="The re-scored run holds only the methods re-scored; this run stays active until you open it.")

st.subheader("How the ranking changed")
c1, c2 = st.columns(2)
after_methods = list(after_results)
after_method = c2.selectbox("After: the re-scored run's", after_methods, key="loop_after", index=len(after_methods) - 1)
before_methods = list(before_results)
before_method = c1.selectbox("Before: the previous run's", before_methods, key="loop_before",
                             index=before_methods.index(after_method) if after_method in before_methods else 0)
before_scores, after_scores = before_results[before_method].scores, after_results[after_method].scores
before_ranks, after_ranks = ranks(before_scores), ranks(after_scores)
train = run.data.train
reviewed = np.isin(train.index, decisions.loc[decisions["action"].isin(["keep", "relabel"]), "index"])
flipped = run.data.flipped
st.caption(f"Validation set: {after_loop['size']} samples ({md(after_loop['validation'])}).")
if flipped is not None and flipped[~reviewed].any() and not flipped[~reviewed].all():
    a, b = st.columns(2)
    auroc_before = detection_metrics(before_scores[~reviewed], flipped[~reviewed])["auroc"]
    auroc_after = detection_metrics(after_scores[~reviewed], flipped[~reviewed])["auroc"]
    a.metric(f"AUROC on the unreviewed samples, {before_method}", f"{auroc_before:.3f}")
    b.metric(f"AUROC on the unreviewed samples, {after_method}", f"{auroc_after:.3f}",
             delta=charts.metric_delta(auroc_before, auroc_after, digits=3))
st.plotly_chart(charts.rank_change_figure(before_ranks, after_ranks, reviewed, flipped), key="rank_change")
st.markdown("**Climbed most** (not yet reviewed)")
st.dataframe(charts.rank_change_table(train.index, before_ranks, after_ranks, train.labels, run.class_names,
                                      among=~reviewed), hide_index=True)
