"""Session state seeded in one place, cached loaders, the active run, and writing decisions.

The workspace (SQLite) is the source of truth: the session only remembers which workspace and
run it shows (mirrored in the URL, so a browser refresh comes back to the same run), and reads
the decisions afresh on every rerun, so two tabs see each other's decisions.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st
import torch

from dashboard import charts, timing
from dashboard.text import md
from engine.errors import InfluenceLensError
from engine.explain import feature_map, map_rows
from engine.guidance import (
    Advice,
    ErrorPrior,
    ReviewEstimate,
    cleaning_test_set_warnings,
    error_prior,
    review_estimate,
    scoring_advice,
)
from engine.measured import recommended_methods
from engine.metrics import ranks
from engine.pipeline import result_table
from engine.runs import RunData, RunSettings, load_run_data
from engine.safe_files import check_folder, under_root
from engine.scorers import scorer_class
from engine.sources import bound_heap_growth, start_workers_from_a_fork_server
from engine.training import Predictions, TrainedModel
from engine.workspace import SUFFIX, StoredResult, Workspace, default_folder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AppArgs:
    """Command-line arguments after ``--`` (see ``influence-lens dashboard``)."""

    data: str = "sample"
    workspace: str | None = None  # the workspace folder (default ``workspaces/`` here)
    data_root: str | None = None  # when set, data paths are read relative to it and only under it


def app_args(argv: list[str] | None = None) -> AppArgs:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--data", default="sample")
    parser.add_argument("--workspace", default=None)
    parser.add_argument("--data-root", default=None)
    known, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return AppArgs(known.data, known.workspace, known.data_root)


def folder() -> Path:
    return default_folder(app_args().workspace)


# -- cached loaders -------------------------------------------------------------------------------

@st.cache_resource(show_spinner="Loading the data…", max_entries=8)
def run_data(settings_json: str) -> RunData:
    """Datasets of a run, shared by every session (never mutated); with a data root, only data under it."""
    settings = readable_settings(RunSettings.from_dict(json.loads(settings_json)))
    check_folder(folder(), [settings.data, settings.validation, settings.test])  # workspaces never go into data
    return load_run_data(settings, listings=folder())


READ_FIELDS = ("data", "validation", "test", "weights", "backbone", "embeddings")  # every path a run reads


def readable(spec: str | None) -> str | None:
    """A path a page is about to read: with ``--data-root``, relative to the root and refused outside it
    (:func:`engine.safe_files.under_root`, the same words whether or not it exists); as given otherwise."""
    return under_root(spec, app_args().data_root, own=folder())


def readable_settings(settings: RunSettings) -> RunSettings:
    """``settings`` with every path it reads (data, validation, test, weights, backbone, embeddings) through
    :func:`readable`."""
    return replace(settings, **{name: readable(getattr(settings, name)) for name in READ_FIELDS})


@st.cache_resource(max_entries=32)
def _stored(path: str, key: str, methods: tuple[str, ...]) -> tuple[dict[str, StoredResult], dict[str, np.ndarray]]:
    """Results and model outputs of a run; the method list in the cache key refreshes it after scoring."""
    workspace = Workspace(path)
    return workspace.results(key), workspace.arrays(key)


@st.cache_data(max_entries=64, show_spinner=False)
def _ranks(path: str, key: str, method: str, methods: tuple[str, ...]) -> np.ndarray:
    return ranks(_stored(path, key, methods)[0][method].scores)


@st.cache_resource(max_entries=8, show_spinner=False)
def _row_of_index(_run: Active, path: str, key: str) -> pd.Index:
    """The scored rows' sample indices, hashed once (a lookup per decision, not a pass over a million rows)."""
    return pd.Index(_run.data.train.index)


@st.cache_resource(max_entries=8, show_spinner=False)
def _ranked_rows(_run: Active, path: str, key: str, method: str, methods: tuple[str, ...]) -> charts.RankedRows:
    """The gallery's rows in ``method``'s order (shared, never mutated: a rerun adds the decisions to a copy)."""
    result = _run.results[method]
    return charts.ranked_rows(_run.data.train.index, result.scores, _run.data.train.labels,
                              _run.predictions.predicted, result.suggested_labels)


@st.cache_data(max_entries=16, show_spinner="Computing the feature map…")
def feature_xy(path: str, key: str, method: str) -> tuple[np.ndarray, np.ndarray]:
    """The rows the map draws (:func:`engine.explain.map_rows`: all, or a seeded sample of a large run) and
    their 2-D map (PCA or t-SNE) of the run's training features."""
    features = Workspace(path).arrays(key)["features"]
    rows = map_rows(len(features))
    return rows, feature_map(features[rows], method=method)


@st.cache_resource
def warm_up() -> threading.Thread:
    """Build a throw-away optimizer in the background once per server: the first one costs ~3 s of
    imports (torch._dynamo), which would otherwise land in the user's first run. Large freed blocks go
    back to the system from now on (:func:`engine.sources.bound_heap_growth`: a long-lived server), and
    image-decoding workers start from a fork server."""
    bound_heap_growth()
    start_workers_from_a_fork_server()  # this server runs many threads: its decoding workers are not forks of it
    thread = threading.Thread(target=lambda: torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1),
                              name="influence-lens warm-up", daemon=True)
    thread.start()
    return thread


class ModelCache:
    """Trained models by configuration hash, the ``capacity`` most recently used (a model and its
    checkpoints can take hundreds of MB; the workspace keeps the outputs the pages show, and a model
    dropped here only costs a retraining when a later step needs the weights). Shared by every tab;
    not a Streamlit resource, which would be shared read-only and unbounded."""

    def __init__(self, capacity: int = 3):
        self.capacity = capacity
        self._models: OrderedDict[str, TrainedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> TrainedModel | None:
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
            return self._models.get(key)

    def __setitem__(self, key: str, model: TrainedModel | None) -> None:
        if model is None:
            return
        with self._lock:
            self._models[key] = model
            self._models.move_to_end(key)
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)

    def __len__(self) -> int:
        return len(self._models)


MODELS = ModelCache()


def models() -> ModelCache:
    """The server's trained models (see :class:`ModelCache`)."""
    return MODELS


# -- the active run -------------------------------------------------------------------------------

@dataclass
class Active:
    """The run the pages show."""

    settings: RunSettings
    workspace: Workspace
    key: str
    data: RunData
    results: dict[str, StoredResult]
    arrays: dict[str, np.ndarray]

    @property
    def methods(self) -> list[str]:
        return list(self.results)

    @property
    def ready(self) -> bool:
        return bool(self.results) and "logits" in self.arrays

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.data.train.class_names

    @cached_property  # a float64 copy of N×C logits: once per rerun
    def predictions(self) -> Predictions:
        return Predictions(self.arrays["logits"].astype(np.float64), self.arrays["features"])

    def ranked_rows(self, method: str) -> charts.RankedRows:
        return _ranked_rows(self, str(self.workspace.path), self.key, method, tuple(self.methods))

    def ranks(self, method: str) -> np.ndarray:
        return _ranks(str(self.workspace.path), self.key, method, tuple(self.methods))

    def decisions(self) -> pd.DataFrame:
        """Decisions in force on the scored rows (read now: another tab may have written)."""
        current = self.workspace.decisions()
        return current[self.rows_of(current["index"]) >= 0].reset_index(drop=True)

    def rows_of(self, indices) -> np.ndarray:
        """Row positions of sample indices in the scored set (-1 for one not in it)."""
        return _row_of_index(self, str(self.workspace.path), self.key).get_indexer(indices)

    def position_of(self, index: int) -> int:
        row = int(self.rows_of([index])[0])
        if row < 0:
            raise KeyError(f"sample {index} is not in the scored set")
        return row

    def reviewed(self) -> tuple[np.ndarray, np.ndarray]:
        """Row positions decided so far, and whether each was a label error (relabel or drop; keep = correct)."""
        decisions = self.decisions()
        return self.rows_of(decisions["index"]), (decisions["action"] != "keep").to_numpy()

    def review_estimate(self, method: str, threshold: float) -> ReviewEstimate:
        """How deep to review ``method``'s ranking, recalibrated by the decisions made so far."""
        rows, is_error = self.reviewed()
        reviewed = tuple(zip(rows.tolist(), is_error.tolist(), strict=True))
        return _review_estimate(self, str(self.workspace.path), self.key, method, tuple(self.methods), reviewed,
                                threshold)

    def advice(self, method: str) -> list[Advice]:
        """The misuse guards for this run, judged on ``method``'s flagged samples."""
        return _advice(self, str(self.workspace.path), self.key, method, tuple(self.methods))


@st.cache_data(max_entries=8, show_spinner="Estimating the label noise…")
def _error_prior(_run: Active, path: str, key: str, methods: tuple[str, ...]) -> ErrorPrior:
    """Fitted once per run and set of methods (the noise fit takes seconds on large sets); decisions
    only recalibrate it."""
    return error_prior(_run.results, _run.data.train.labels, _run.predictions.probabilities,
                       trusted_validation=_run.data.validation is None or _run.data.validation_trusted)


@st.cache_data(max_entries=32, show_spinner=False)
def _review_estimate(_run: Active, path: str, key: str, method: str, methods: tuple[str, ...],
                     reviewed: tuple[tuple[int, bool], ...], threshold: float) -> ReviewEstimate:
    rows = np.array([r for r, _ in reviewed], dtype=np.int64)
    is_error = np.array([e for _, e in reviewed], dtype=bool)
    return review_estimate(_run.results, method, _run.data.train.labels, _run.predictions.probabilities,
                           reviewed_rows=rows, reviewed_is_error=is_error, threshold=threshold,
                           prior=_error_prior(_run, path, key, methods))


@st.cache_data(max_entries=32, show_spinner=False)
def _advice(_run: Active, path: str, key: str, method: str, methods: tuple[str, ...]) -> list[Advice]:
    data, result = _run.data, _run.results[method]
    table = result_table(data.train, result, _run.predictions.predicted)
    training = _run.workspace.report(key, "training") or {}
    loop = _run.workspace.report(key, "loop") or {}  # closing the loop put these reviewed rows in validation
    return scoring_advice(data.train, table, validation=data.validation, trusted=data.validation_trusted,
                          info=result.info, history=training.get("history"), training_notes=training.get("notes"),
                          reviewed_in_validation=loop.get("reviewed", []),
                          uses_validation=any(scorer_class(m).requires_validation for m in _run.results)) + \
        cleaning_test_set_warnings(data.train, data.test)


def activate(workspace: Workspace, key: str, settings: RunSettings) -> None:
    """Show this run from now on (and after a browser refresh: the URL names it)."""
    st.session_state["active"] = (str(workspace.path), key, json.dumps(settings.to_dict(), sort_keys=True))
    st.query_params["run"] = key
    st.query_params["workspace"] = workspace.path.stem
    review_widgets = [name for name in st.session_state if str(name).startswith("review_")]  # the old run's
    for name in ("gallery_page", "gallery_view", "detail_index", "spot_check_indices", "bulk_note",
                 *review_widgets):
        st.session_state.pop(name, None)
    st.session_state["selected"] = set()  # the old run's cards


def keep_run_in_url() -> None:
    """Name the active run in the URL on every page (``st.switch_page`` clears the query parameters, and a
    reload then opened the latest run on the data instead of the one opened from the runs table)."""
    if "active" not in st.session_state:
        return
    path, key, _ = st.session_state["active"]
    if st.query_params.get("run") != key or st.query_params.get("workspace") != Path(path).stem:
        st.query_params["run"] = key
        st.query_params["workspace"] = Path(path).stem


def active() -> Active | None:
    """The active run, or None before the first run."""
    if "active" not in st.session_state:
        return None
    path, key, settings_json = st.session_state["active"]
    workspace = Workspace(path)
    methods = tuple(workspace.methods(key))
    results, arrays = _stored(path, key, methods)
    return Active(RunSettings.from_dict(json.loads(settings_json)), workspace, key, run_data(settings_json),
                  results, arrays)


def _known_runs() -> list[tuple[str, Workspace, str, dict, str, list[str]]]:
    """(last_used, workspace, config hash, settings, created, methods) of every run in the workspace folder."""
    found = []
    for path in sorted(folder().glob(f"*{SUFFIX}")):
        try:
            workspace = Workspace(path)
            runs = workspace.runs()
        except InfluenceLensError as exc:  # a foreign or newer file in the folder: skip it, say why
            log.warning("skipping %s", exc)
            continue
        found += [(r.last_used, workspace, r.config_hash, r.settings, r.created, r.methods)
                  for r in runs.itertuples()]
    return sorted(found, key=lambda r: r[0], reverse=True)


def known_runs() -> pd.DataFrame:
    """The runs in the workspace folder, most recent first, for the set-up page."""
    return charts.runs_table([{"last_used": used, "created": created, "settings": settings, "methods": methods,
                               "workspace": ws.path.name, "run": key}
                              for used, ws, key, settings, created, methods in _known_runs()])


def open_run(workspace_name: str, key: str) -> bool:
    """Activate a stored run by workspace file stem and hash; False if it is not there."""
    for _, workspace, run_key, settings, *_ in _known_runs():
        if run_key == key and workspace.path.stem == workspace_name:
            activate(workspace, key, RunSettings.from_dict(settings))
            return True
    return False


def init() -> None:
    """Seed the session once: restore the run named in the URL, else the latest run on this data."""
    if st.session_state.get("_initialised"):
        return
    st.session_state["_initialised"] = True
    st.session_state.setdefault("selected", set())
    params = st.query_params
    try:
        if "run" in params and "workspace" in params and open_run(params["workspace"], params["run"]):
            return
        data = app_args().data
        for _, workspace, key, settings, *_ in _known_runs():
            if settings.get("data") == data:
                activate(workspace, key, RunSettings.from_dict(settings))
                return
    except InfluenceLensError as exc:
        st.session_state["startup_error"] = str(exc)


# -- review settings ------------------------------------------------------------------------------

REVIEW_SETTINGS = "review_settings"  # the workspace report that keeps them, one per run
PAGE_SIZES = (24, 48, 96, 192)


def review_defaults(run: Active) -> dict:
    n = len(run.data.train)
    return {"method": recommended_methods(run.methods, 1)[0],  # the best measured method (engine.measured)
            "cut": min(n, max(10, round(0.1 * n))), "only_flagged": True,
            "per_page": PAGE_SIZES[0], "panel_depth": False, "panel_overview": True}


def review_settings(run: Active) -> dict:
    """How this run is reviewed (ranking, cut, paging, open panels): kept in the workspace with the run,
    so a page switch, a reload or a second tab finds them; stale values fall back to the defaults."""
    settings = review_defaults(run)
    stored = run.workspace.report(run.key, REVIEW_SETTINGS) or {}
    valid = {"method": lambda v: v in run.results, "per_page": lambda v: v in PAGE_SIZES,
             "cut": lambda v: isinstance(v, int) and 1 <= v <= len(run.data.train)}
    settings.update({k: v for k, v in stored.items() if k in settings and valid.get(k, lambda _: True)(v)})
    return settings


def seed_review_widgets(run: Active) -> None:
    """Give the review widgets their stored values unless the session holds them already (the widgets
    then take no default of their own: a default beside session state is refused with a warning)."""
    for name, value in review_settings(run).items():
        st.session_state.setdefault(f"review_{name}", value)


def remember_review_setting(run: Active, name: str) -> None:
    """Callback of a review widget: store its new value with the run."""
    settings = review_settings(run)
    value = st.session_state[f"review_{name}"]
    settings[name] = int(value) if name in ("cut", "per_page") else value
    run.workspace.save_report(run.key, REVIEW_SETTINGS, settings)


# -- decisions ------------------------------------------------------------------------------------

@timing.timed("decide")
def decide(run: Active, indices, action: str, new_label=None, *, overwrite: bool = True,
           sent: tuple[str, int] | None = None, quiet: bool = False) -> str:
    """Write one decision (or one batch: one undo) to the workspace at once; say so.

    ``new_label`` is one label or one per sample. A sample already decided this way is left alone (no
    duplicate log rows); with ``overwrite=False`` a sample decided otherwise is skipped too, and counted.
    ``sent``: the gallery's (tab, number) of this decision, stored with it so a resend is skipped
    (``Workspace.decide``). ``quiet``: no toast (the gallery's card says it). Returns what it told the user.
    """
    indices = [int(i) for i in np.atleast_1d(indices)]
    labels = np.broadcast_to(np.asarray(-1 if new_label is None else new_label, dtype=np.int64),
                             (len(indices),)).tolist()
    current = run.decisions().set_index("index")
    chosen, chosen_labels, skipped = [], [], 0
    for index, label in zip(indices, labels, strict=True):
        if index in current.index:
            same = current.at[index, "action"] == action
            if same and (action != "relabel" or current.at[index, "new_label"] == label):
                continue
            if not overwrite:
                skipped += 1
                continue
        chosen.append(index)
        chosen_labels.append(label)
    st.session_state["selected"] = set(st.session_state.get("selected", set())) - set(indices)
    if chosen:
        run.workspace.decide(chosen, action, chosen_labels if action == "relabel" else None, sent=sent)
    what = {"relabel": f"relabeled → {md(run.class_names[chosen_labels[0]])}" if len(set(chosen_labels)) == 1
            else "relabeled", "drop": "dropped", "keep": "confirmed correct"}[action]
    told = (f"{len(chosen)} samples {what}" if len(chosen) > 1 else f"sample {chosen[0]} {what}") if chosen \
        else "nothing changed"
    if skipped:
        told += f"; skipped {skipped} already decided (tick “overwrite decisions” to replace them)"
    if not quiet:
        tell(told)
    return told


def undo(run: Active, *, sent: tuple[str, int] | None = None) -> None:
    undone = run.workspace.undo(sent=sent)
    tell(f"undid the decision on {len(undone)} sample(s)" if len(undone) else "nothing to undo")


def tell(text: str) -> None:
    """Queue a toast: callbacks of a fragment may not draw, so the next run shows it (``show_told``)."""
    st.session_state.setdefault("told", []).append(text)


def show_told() -> None:
    for text in st.session_state.pop("told", []):
        st.toast(text)
