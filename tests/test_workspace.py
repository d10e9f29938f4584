"""The SQLite review workspace: decisions persist, undo appends, exports, refusals."""

from __future__ import annotations

import io
import sqlite3
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import make_dataset

from engine import workspace as workspace_module
from engine.errors import DataError, InfluenceLensError
from engine.pipeline import apply_decisions
from engine.scorers import ScoreResult
from engine.workspace import CLEANED_COLUMNS, SCHEMA_VERSION, Workspace


@pytest.fixture
def workspace(tmp_path):
    return Workspace(tmp_path / "ws.sqlite")


def test_decisions_survive_reopening(tmp_path):
    path = tmp_path / "ws.sqlite"
    first = Workspace(path)
    first.decide([3], "relabel", 2)
    first.decide([5, 7], "drop")
    first.decide([3], "keep")  # a later decision on the same sample wins
    again = Workspace(path)
    current = again.decisions()
    assert current[["index", "action", "new_label"]].values.tolist() == [[3, "keep", -1], [5, "drop", -1],
                                                                          [7, "drop", -1]]
    assert len(again.decision_log()) == 4
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_undo_restores_the_previous_decision_and_keeps_history(workspace):
    workspace.decide([1], "relabel", 4)
    workspace.decide([1, 2], "drop")
    undone = workspace.undo()
    assert sorted(undone["index"]) == [1, 2]
    assert workspace.decisions()[["index", "action", "new_label"]].values.tolist() == [[1, "relabel", 4]]
    log = workspace.decision_log()
    assert len(log) == 5  # nothing deleted: 3 decisions + 2 undo rows
    assert log.loc[log["action"] == "drop", "undone"].tolist() == [1, 1]
    assert log.loc[log["action"] == "undo", "undoes"].tolist() == log.loc[log["action"] == "drop", "id"].tolist()
    workspace.undo()
    assert workspace.decisions().empty
    assert workspace.undo().empty  # nothing left to undo


def test_one_batch_can_carry_a_label_per_sample_and_is_undone_at_once(workspace):
    workspace.decide([1, 2, 3], "relabel", [4, 0, 4])  # a bulk "accept the suggestions"
    assert workspace.decisions()[["index", "new_label"]].values.tolist() == [[1, 4], [2, 0], [3, 4]]
    assert workspace.decision_log()["batch"].nunique() == 1
    assert sorted(workspace.undo()["index"]) == [1, 2, 3]
    assert workspace.decisions().empty
    with pytest.raises(InfluenceLensError, match="2 new labels for 3 samples"):
        workspace.decide([1, 2, 3], "relabel", [4, 0])


def test_a_numbered_decision_resent_by_a_tab_is_applied_once(workspace, tmp_path):
    """The gallery resends what the server has not acknowledged: the tab's number is stored with the decision,
    in the same transaction, so a resend (also after a restart: a new Workspace object) changes nothing."""
    assert workspace.last_sent("tab") == 0
    assert workspace.decide([1], "keep", sent=("tab", 5)) is not None
    assert workspace.decide([1], "keep", sent=("tab", 5)) is None  # resent
    assert Workspace(workspace.path).decide([2], "drop", sent=("tab", 4)) is None  # older than the last applied
    assert workspace.decide([2], "drop", sent=("other tab", 1)) is not None  # numbers are per tab
    assert workspace.undo(sent=("tab", 6))["index"].tolist() == [2]
    assert workspace.undo(sent=("tab", 6)).empty  # a resent undo undoes nothing more
    assert workspace.last_sent("tab") == 6
    assert workspace.decision_log()["action"].tolist() == ["keep", "drop", "undo"]


def test_decide_validates_actions(workspace):
    with pytest.raises(InfluenceLensError, match="unknown action"):
        workspace.decide([1], "delete")
    with pytest.raises(InfluenceLensError, match="new label"):
        workspace.decide([1], "relabel")
    assert workspace.decision_log().empty


def test_cleaned_labels_export(workspace):
    data = make_dataset(classes=3, per_class=2)  # labels 0 0 1 1 2 2, index 0..5
    workspace.decide([0], "relabel", 2)
    workspace.decide([3], "drop")
    workspace.decide([4], "keep")
    frame = workspace.cleaned_labels(data)
    assert list(frame.columns) == CLEANED_COLUMNS == ["index", "original_label", "final_label", "action"]
    text = frame.to_csv(index=False)
    assert text.splitlines() == [
        "index,original_label,final_label,action",
        "0,class_0,class_2,relabel",
        "1,class_0,class_0,unreviewed",
        "2,class_1,class_1,unreviewed",
        "3,class_1,,drop",
        "4,class_2,class_2,keep",
        "5,class_2,class_2,unreviewed",
    ]
    cleaned = apply_decisions(data, workspace.decisions())  # the current decisions feed the engine
    assert cleaned.index.tolist() == [0, 1, 2, 4, 5] and cleaned.labels.tolist() == [2, 0, 1, 2, 2]


def test_decision_log_export_names_labels(workspace):
    workspace.decide([2], "relabel", 1)
    workspace.undo()
    log = workspace.decision_log_export(("cat", "dog"))
    assert log[["index", "action", "new_label", "undone"]].values.tolist() == [[2, "relabel", "dog", 1],
                                                                               [2, "undo", "", 0]]
    assert pd.read_csv(io.StringIO(log.to_csv(index=False))).shape == (2, 8)


def test_results_and_arrays_round_trip(workspace):
    scores = np.array([0.5, 2.0, -1.0])
    workspace.save_run("abc", {"data": "sample", "epochs": 3})
    workspace.save_result("abc", ScoreResult("loss", scores, np.array([1, 0, 2]), {"x": 1}, {"score_seconds": 0.1}))
    workspace.save_arrays("abc", {"features": np.eye(3, dtype=np.float32)})
    workspace.save_report("abc", "retrain", {"after": 0.9})
    again = Workspace(workspace.path)
    stored = again.results("abc")["loss"]
    np.testing.assert_array_equal(stored.scores, scores)
    assert stored.suggested_labels.tolist() == [1, 0, 2] and stored.settings == {"x": 1}
    np.testing.assert_array_equal(again.arrays("abc")["features"], np.eye(3, dtype=np.float32))
    assert again.report("abc", "retrain") == {"after": 0.9} and again.report("abc", "other") is None
    runs = again.runs()
    assert runs["config_hash"].tolist() == ["abc"] and runs["methods"].tolist() == [["loss"]]
    assert runs["settings"][0] == {"data": "sample", "epochs": 3}


def test_per_row_arrays_of_a_result_are_stored_with_it(workspace):
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]], dtype=np.float32)
    workspace.save_run("abc", {})
    workspace.save_result("abc", ScoreResult("fvm-loss", np.zeros(3), np.zeros(3), {}, {},
                                             arrays={"probabilities": probabilities}))
    workspace.save_result("abc", ScoreResult("loss", np.ones(3), np.zeros(3), {}, {}))
    stored = Workspace(workspace.path).results("abc")
    np.testing.assert_array_equal(stored["fvm-loss"].arrays["probabilities"], probabilities)
    assert stored["loss"].arrays == {}
    with pytest.raises(ValueError, match="one row per score"):
        ScoreResult("fvm-loss", np.zeros(3), np.zeros(3), {}, {}, arrays={"probabilities": probabilities[:2]})


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "ws.sqlite"
    Workspace(path)
    with sqlite3.connect(path) as con:
        con.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION + 1,))
    with pytest.raises(InfluenceLensError, match=f"newer influence-lens.*schema version {SCHEMA_VERSION + 1}"):
        Workspace(path)


def test_a_version_1_workspace_opens_and_is_marked_version_2(tmp_path):
    """v2 only adds file-backed arrays: a v1 file reads as it is, and is marked v2 so that an older
    influence-lens refuses it in words once it may hold them."""
    path = tmp_path / "ws.sqlite"
    workspace = Workspace(path)
    workspace.save_arrays("abc", {"logits": np.arange(6.0).reshape(3, 2)})
    with sqlite3.connect(path) as con:
        con.execute("DELETE FROM schema_version")
        con.execute("INSERT INTO schema_version VALUES (1)")
    reopened = Workspace(path)
    assert reopened.schema_version() == 2
    np.testing.assert_array_equal(reopened.arrays("abc")["logits"], np.arange(6.0).reshape(3, 2))


def test_thumbnails_stored_as_png_only_read_back_after_the_column_is_renamed(tmp_path):
    """The thumbnail column was ``png`` before photos were stored as JPEGs: an older file's column is
    renamed on opening and its thumbnails read back."""
    path = tmp_path / "ws.sqlite"
    Workspace(path)
    with sqlite3.connect(path) as con:
        con.execute("ALTER TABLE thumbnails RENAME COLUMN image TO png")
        con.execute("INSERT INTO thumbnails VALUES ('abc', 7, 112, ?)", (b"\x89PNG old",))
    assert Workspace(path).thumbnails("abc", [7, 8], 112) == {7: b"\x89PNG old"}


def test_a_large_array_is_a_memory_mapped_file_beside_the_database(tmp_path, monkeypatch):
    """Above FILE_ARRAY_BYTES an array goes to ``<workspace>.arrays/`` and comes back memory-mapped (a
    million 256-d feature rows are 1 GB: SQLite refuses such a blob, and a blob is read whole)."""
    monkeypatch.setattr(workspace_module, "FILE_ARRAY_BYTES", 1024)
    workspace = Workspace(tmp_path / "ws.sqlite")
    features = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    small = np.arange(10, dtype=np.float32)
    workspace.save_arrays("abc", {"features": features, "index": small})
    workspace.save_result("abc", ScoreResult("fvm-loss", np.zeros(300), np.zeros(300, dtype=np.int64), {}, {},
                                             arrays={"probabilities": features}))
    stored = Workspace(workspace.path).arrays("abc")
    assert isinstance(stored["features"], np.memmap) and not isinstance(stored["index"], np.memmap)
    np.testing.assert_array_equal(stored["features"], features)
    np.testing.assert_array_equal(stored["index"], small)
    np.testing.assert_array_equal(workspace.results("abc")["fvm-loss"].arrays["probabilities"], features)
    assert sorted(p.suffix for p in workspace.array_folder.iterdir()) == [".npy", ".npy"]  # no partial file left
    file = next(workspace.array_folder.glob("abc-features*.npy"))
    file.unlink()
    with pytest.raises(DataError, match="stored array of this workspace is missing"):
        workspace.arrays("abc")
    np.save(file, features[:5])  # replaced by another array: a clear error, not wrong rows
    with pytest.raises(DataError, match="damaged"):
        workspace.arrays("abc")


def test_a_file_that_is_not_sqlite_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "ws.sqlite"
    path.write_text("index,label\n1,2\n")
    with pytest.raises(InfluenceLensError, match="not an SQLite database"):
        Workspace(path)
    assert path.read_text() == "index,label\n1,2\n"


def test_for_data_puts_one_file_per_dataset_under_the_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = Workspace.for_data("sample"), Workspace.for_data("/data/my set/train.csv")
    assert a.path.parent == tmp_path / "workspaces" and a.path != b.path
    assert Workspace.for_data("sample").path == a.path
    assert Workspace.for_data("sample", tmp_path / "elsewhere").path.parent == tmp_path / "elsewhere"


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    path = tmp_path / "ws.sqlite"
    Workspace(path)
    writer = ("import sys\nfrom engine.workspace import Workspace\nws = Workspace(sys.argv[1])\n"
              "for i in range(int(sys.argv[2]), int(sys.argv[2]) + 60):\n    ws.decide([i], 'drop')\n")
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(path), str(start)], stderr=subprocess.PIPE, text=True)
             for start in (0, 1000)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert sorted(Workspace(path).decisions()["index"]) == list(range(60)) + list(range(1000, 1060))
