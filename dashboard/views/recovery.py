"""Journey 4: retrain with the decisions applied (same recipe and seed) and show the recovery:
test accuracy before / after, per class, and the cleaning curve (with the oracle when the truth is known).
Both run in the background and are stored in the workspace."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import charts, estimates, jobs, state, widgets
from dashboard.text import md
from engine.explain import cleaning_curves
from engine.pipeline import retrain_comparison


def job_status(job_key: str) -> None:
    """Progress while running; the error once, if it failed."""
    job = jobs.get(job_key)
    if job is None:
        return
    if job.running:
        jobs.watch(job_key)
    elif job.error:
        st.error(md(job.error))
        jobs.forget(job_key)
    else:
        jobs.forget(job_key)


st.title("Retrain and recovery")
run = widgets.require_run()
names = run.class_names
test = run.data.test
if test is None:
    st.info("This run has no test set: give one on the set-up page to measure the recovery.")
    st.stop()
config = state.readable_settings(run.settings).train_config()  # its files under the data root
decisions = run.decisions()
counts = decisions["action"].value_counts()

st.subheader("Before and after your decisions")
st.markdown(f"Applying **{counts.get('relabel', 0)}** relabels and **{counts.get('drop', 0)}** drops "
            f"({counts.get('keep', 0)} confirmed correct), then retraining with the same recipe and seed "
            f"({config.epochs} epochs, seed {config.seed}); test set: {len(test)} images.")
retrain_key = jobs.key_for("retrain", run.workspace.path, run.key)
if st.button("Retrain with decisions applied", type="primary", key="retrain",
             disabled=jobs.get(retrain_key) is not None and jobs.get(retrain_key).running):
    workspace, key, train_set, before = run.workspace, run.key, run.data.train, state.models().get(run.key)

    def retrain(progress):
        start = time.perf_counter()
        report = retrain_comparison(train_set, decisions, test, config=config, before=before, progress=progress)
        report.update(decisions=len(decisions), at=time.strftime("%Y-%m-%d %H:%M:%S"),
                      seconds=round(time.perf_counter() - start, 1))
        workspace.save_report(key, "retrain", report)
        return report

    jobs.start(retrain_key, "Retraining", retrain)
job_status(retrain_key)

report = run.workspace.report(run.key, "retrain")
if report is not None:
    before, after = report["test_accuracy_before"], report["test_accuracy_after"]
    a, b, c = st.columns(3)
    a.metric("Test accuracy before", f"{before:.1%}")
    b.metric("Test accuracy after", f"{after:.1%}",
             delta=charts.metric_delta(before, after, digits=1, scale=100, unit=" pts"))
    c.metric("Decisions applied", report["decisions"],
             help=f"retrained {report['at']} in {report.get('seconds', '?')} s")
    if report["decisions"] != len(decisions):
        st.caption(f"Computed with {report['decisions']} decisions; you have {len(decisions)} now: retrain to update.")
    st.plotly_chart(charts.class_accuracy_figure(report["class_accuracy_before"], report["class_accuracy_after"],
                                                 names), key="class_accuracy")

st.subheader("Cleaning curve")
truth = run.data.truth_known
st.markdown("Test accuracy after fixing the top 0, k, 2k, … flagged samples: "
            + ("fixed to their true labels (demo noise), with the **oracle** that fixes only true errors."
               if truth else "fixed by accepting each method's suggestion."))
n = len(run.data.train)
c1, c2, c3 = st.columns(3)
curve_methods = c1.multiselect("Methods", run.methods, default=run.methods[:4], key="curve_methods")
default_step = max(1, int(run.data.flipped.sum()) // 4 if truth else round(0.025 * n))
step = int(c2.number_input("k (step)", 1, n, default_step, key="curve_step"))
points = int(c3.number_input("Points", 2, 12, 5, key="curve_points"))
depths = [min(n, i * step) for i in range(points)]
curve_key = jobs.key_for("curve", run.workspace.path, run.key)
st.caption(f"Fixes {depths}: one training per point and ranking (identical decision sets are trained once).")
if curve_methods:  # said before the button: the curve takes minutes (833 s on the sample data with 4 methods)
    trainings = 1 + (len(curve_methods) + int(truth)) * (len(set(depths)) - (0 in depths))
    train = run.data.train
    st.markdown(estimates.trainings_line(trainings, estimates.run_time(
        len(train), train.images.shape[1:], len(names), config), what="the unchanged set once, then one per point "
        "and ranking"))
if st.button("Compute the cleaning curve", key="curve", disabled=not curve_methods):
    rankings = {}
    for m in curve_methods:
        result = run.results[m]
        rankings[m] = (result.scores, run.data.clean_labels if truth else result.suggested_labels)
    if truth:
        rankings[charts.ORACLE] = (run.data.flipped.astype(np.float64), run.data.clean_labels)
    workspace, key, train_set = run.workspace, run.key, run.data.train

    def curve_work(progress):
        start = time.perf_counter()
        frame = cleaning_curves(train_set, test, rankings, depths=depths, config=config, progress=progress)
        workspace.save_report(key, "cleaning_curve", {"rows": frame.to_dict("records"),
                                                      "seconds": round(time.perf_counter() - start, 1)})
        return frame

    jobs.start(curve_key, "Cleaning curve", curve_work)
job_status(curve_key)
stored = run.workspace.report(run.key, "cleaning_curve")
if stored is not None:
    curve = pd.DataFrame(stored["rows"])
    st.plotly_chart(charts.cleaning_curve_figure(curve), key="cleaning_curve")
    with st.expander(f"Numbers (computed in {stored.get('seconds', '?')} s)"):
        st.dataframe(curve, hide_index=True)
