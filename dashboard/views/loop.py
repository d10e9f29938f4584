"""Journey 6: close the loop. The samples a person confirmed or relabeled become trusted: they join
the validation set and the methods that use one (VM / FVM) re-score, and the page shows how the
ranking of the samples not yet reviewed changed."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import streamlit as st

from dashboard import charts, jobs, state, widgets
from dashboard.text import md
from engine.data import save_npz
from engine.errors import InfluenceLensError
from engine.metrics import detection_metrics, ranks
from engine.runs import config_hash, reviewed_validation, score_into
from engine.safe_files import write_atomically
from engine.scorers import available_methods, scorer_class
from engine.stages import fingerprint


def start_loop(run: state.Active, methods: list[str]) -> None:
    """Write the grown validation set beside the workspace, then score the new configuration."""
    validation = reviewed_validation(run.data, run.decisions())
    workspace = run.workspace
    path = workspace.path.parent / f"{workspace.path.stem}-validation-{fingerprint(validation)}.npz"
    if not path.exists():  # written whole or not at all, like every file the tool writes
        write_atomically(path, lambda handle: save_npz(validation, handle), binary=True)
    settings = replace(run.settings, validation=str(path), val_from_train=None)
    data = state.run_data(json.dumps(settings.to_dict(), sort_keys=True))
    key = config_hash(settings, data)
    workspace.save_run(key, settings.to_dict())
    workspace.save_report(key, "loop", {"from": run.key, "validation": str(path), "size": len(validation)})
    models, trained = state.models(), state.models().get(run.key)  # training ignores validation: reuse θ*

    def work(progress):
        _, model = score_into(workspace, settings, data, methods, trained=trained, progress=progress)
        models[key] = model
        return model

    jobs.start(jobs.key_for("score", workspace.path, key), "Re-scoring", work)
    state.activate(workspace, key, settings)


st.title("Close the loop")
run = widgets.require_run()
loop = run.workspace.report(run.key, "loop")
decisions = run.decisions()
counts = decisions["action"].value_counts()
trusted = len(run.data.validation) if run.data.validation is not None and run.data.validation_trusted else 0
needing = [m for m in available_methods() if scorer_class(m).requires_validation]
st.markdown(f"Reviewed so far: **{counts.get('keep', 0)}** confirmed correct and **{counts.get('relabel', 0)}** "
            f"relabeled. They join the trusted validation set ({trusted} samples now) and the methods below "
            "re-score every training sample against it.")
if not needing:
    st.info("No registered method uses a validation set.")
    st.stop()
methods = st.multiselect("Re-score with", needing, key="loop_methods",
                         default=[m for m in ("fvm",) if m in needing] or needing[:1])
if st.button("Add the reviewed samples to the validation set and re-score", type="primary", key="loop_run",
             disabled=not methods or counts.get("keep", 0) + counts.get("relabel", 0) == 0):
    try:
        start_loop(run, methods)
        st.rerun()
    except InfluenceLensError as exc:
        st.error(md(exc))

if loop is not None and loop["from"] != run.key:
    st.subheader("How the ranking changed")
    before_results = run.workspace.results(loop["from"])
    c1, c2 = st.columns(2)
    after_method = c2.selectbox("After: this run's", run.methods, key="loop_after", index=len(run.methods) - 1)
    before_methods = list(before_results)
    before_method = c1.selectbox("Before: the previous run's", before_methods, key="loop_before",
                                 index=before_methods.index(after_method) if after_method in before_methods else 0)
    before_scores, after_scores = before_results[before_method].scores, run.results[after_method].scores
    before_ranks, after_ranks = ranks(before_scores), ranks(after_scores)
    train = run.data.train
    reviewed = np.isin(train.index, decisions.loc[decisions["action"].isin(["keep", "relabel"]), "index"])
    flipped = run.data.flipped
    st.caption(f"Validation set: {loop['size']} samples ({md(loop['validation'])}).")
    if flipped is not None and flipped[~reviewed].any() and not flipped[~reviewed].all():
        a, b = st.columns(2)
        auroc_before = detection_metrics(before_scores[~reviewed], flipped[~reviewed])["auroc"]
        auroc_after = detection_metrics(after_scores[~reviewed], flipped[~reviewed])["auroc"]
        a.metric(f"AUROC on the unreviewed samples, {before_method}", f"{auroc_before:.3f}")
        b.metric(f"AUROC on the unreviewed samples, {after_method}", f"{auroc_after:.3f}",
                 delta=f"{auroc_after - auroc_before:+.3f}")
    st.plotly_chart(charts.rank_change_figure(before_ranks, after_ranks, reviewed, flipped), key="rank_change")
    st.markdown("**Climbed most** (not yet reviewed)")
    st.dataframe(charts.rank_change_table(train.index, before_ranks, after_ranks, train.labels, run.class_names,
                                          among=~reviewed), hide_index=True)
