"""The measured ranking the dashboard's defaults come from: written by the detection benchmark from
its tables, shipped in the package, read by engine.measured."""

from __future__ import annotations

import json
import shutil
import sys

import pandas as pd
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
from benchmarks.detection import write_summary  # noqa: E402
from engine.measured import MEASURED_FILE, measured_methods, recommended_methods  # noqa: E402


def _table(folder, setting, aurocs):
    rows = [{"setting": setting, "size": "cpu", "kind": "training", "method": "(training)"}]
    rows += [{"setting": setting, "size": "cpu", "kind": "detection", "method": m, "auroc": a, "relabel_top1": 0.5}
             for m, a in aurocs.items()]
    pd.DataFrame(rows).to_csv(folder / f"{setting}.csv", index=False)


def test_the_summary_ranks_by_mean_auroc_and_the_engine_reads_it(tmp_path):
    _table(tmp_path, "a", {"loss": 0.80, "fvm": 0.70, "margin": 0.90})
    _table(tmp_path, "b", {"loss": 0.80, "fvm": 0.95, "margin": 0.60, "tracin": 1.0})  # tracin: one setting only
    write_summary(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [m["method"] for m in summary["methods"]] == ["fvm", "loss", "margin", "tracin"]
    assert summary["methods"][0]["mean_auroc"] == 0.825 and summary["settings"] == ["a", "b"]
    ranked = measured_methods(tmp_path / "summary.json")
    assert [m.method for m in ranked] == ["fvm", "loss", "margin", "tracin"]
    assert ranked[0].auroc == {"a": 0.70, "b": 0.95} and ranked[0].mean_relabel_top1 == 0.5
    path = tmp_path / "summary.json"
    assert recommended_methods(["margin", "cleanlab", "loss"], path=path) == ["loss", "margin", "cleanlab"]
    assert recommended_methods(["margin", "fvm", "loss"], 2, path=path) == ["fvm", "loss"]
    assert recommended_methods(["margin", "loss"], path=tmp_path / "missing.json") == ["margin", "loss"]


def test_the_shipped_ranking_is_the_one_the_committed_tables_give(tmp_path):
    for table in (REPO_ROOT / "benchmarks" / "results").glob("*.csv"):
        shutil.copy(table, tmp_path)
    write_summary(tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(MEASURED_FILE.read_text())
    assert (REPO_ROOT / "benchmarks" / "results" / "summary.json").read_text() == MEASURED_FILE.read_text()
