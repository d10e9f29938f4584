"""Journey 7: the cleaned labels (``index,original_label,final_label,action``), the full decision log,
and the decisions in the ``influence-lens retrain --decisions`` format. Your data files are untouched; text
cells that a spreadsheet would run as a formula are quoted (:func:`engine.safe_files.spreadsheet_safe`)."""

from __future__ import annotations

import streamlit as st

from dashboard import widgets
from dashboard.text import md
from engine.pipeline import decision_label
from engine.safe_files import spreadsheet_safe

st.title("Export")
run = widgets.require_run()
names = run.class_names
workspace = run.workspace
stem = workspace.path.stem
cleaned = workspace.cleaned_labels(run.data.full_train)
log = workspace.decision_log_export(names)
decisions = workspace.decisions()[["index", "action", "new_label"]]
decisions["new_label"] = [decision_label(names, v) if a == "relabel" else ""
                          for v, a in zip(decisions["new_label"], decisions["action"], strict=True)]

st.markdown(f"Workspace {md(workspace.path)}: **{len(decisions)}** decisions in force, **{len(log)}** rows in the log.")
a, b, c = st.columns(3)
a.download_button("Cleaned labels (CSV)", spreadsheet_safe(cleaned).to_csv(index=False),
                  f"{stem}-cleaned-labels.csv", "text/csv", key="export_cleaned", icon=":material/download:",
                  help="index,original_label,final_label,action")
b.download_button("Decision log (CSV)", spreadsheet_safe(log).to_csv(index=False), f"{stem}-decision-log.csv",
                  "text/csv", key="export_log", icon=":material/download:", help="every decision and undo, with times")
c.download_button("Decisions for `influence-lens retrain`", spreadsheet_safe(decisions).to_csv(index=False),
                  f"{stem}-decisions.csv", "text/csv", key="export_decisions", icon=":material/download:",
                  help="index,action,new_label")
st.subheader("Cleaned labels (changed rows)")
st.dataframe(cleaned[cleaned["action"] != "unreviewed"], hide_index=True)
st.subheader("Decision log")
st.dataframe(log, hide_index=True)
