"""Journey 5 (when the truth is known): every method's ROC and precision-recall curves on one plot,
AUROC / AP / precision@k, and label errors found vs. samples inspected."""

from __future__ import annotations

import streamlit as st

from dashboard import charts, widgets
from engine.explain import detection_curves
from engine.metrics import detection_metrics

st.title("Compare methods")
run = widgets.require_run()
if not run.data.truth_known:
    st.info("Comparing methods needs the truth: set up a run with the demo noise switched on.")
    st.stop()
flipped = run.data.flipped
if flipped.all() or not flipped.any():
    st.info("The noise flipped no label (or every label): nothing to compare.")
    st.stop()
metrics = {m: detection_metrics(r.scores, flipped) for m, r in run.results.items()}
curves = {m: detection_curves(r.scores, flipped) for m, r in run.results.items()}
st.markdown(f"{len(flipped)} samples, **{int(flipped.sum())}** labels flipped "
            f"({run.settings.noise_rate:.0%} {run.settings.noise_kind} noise, seed {run.settings.seed}).")
st.dataframe(charts.metrics_table(metrics), hide_index=True, key="metrics_table",
             column_config={c: st.column_config.NumberColumn(format="%.3f")
                            for c in charts.metrics_table(metrics).columns if c != "method"})
left, right = st.columns(2)
left.plotly_chart(charts.roc_figure(curves, {m: v["auroc"] for m, v in metrics.items()}), key="roc")
right.plotly_chart(charts.pr_figure(curves, {m: v["ap"] for m, v in metrics.items()}, float(flipped.mean())), key="pr")
st.plotly_chart(charts.found_figure(curves, int(flipped.sum()), len(flipped)), key="found")
