"""Crashes and concurrency: killed writers lose no acknowledged decision, two writers lose nothing
and never see "database is locked", and killed scoring runs resume from their last finished stage.

The writers are real processes (forked from the test, so that twenty kills cost seconds, not the
twenty interpreter start-ups of fresh ones) killed with SIGKILL; the scoring run is the real
``influence-lens`` command. Recovery is checked with raw ``sqlite3`` as well as through the tool.
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO_ROOT, last_json_line, make_dataset, run_cli

import engine.workspace as workspace_module
from engine.config import TrainConfig
from engine.data import save_npz
from engine.errors import InfluenceLensError
from engine.pipeline import ACTIONS, score_methods
from engine.scorers import scorer_class
from engine.stages import PLAIN, StageStore
from engine.workspace import SCHEMA_VERSION, Workspace

FORK = multiprocessing.get_context("fork")
KILLS = 24
KILL_WINDOW_S = (0.0, 0.35)  # from the writer's start, so some kills land while it creates the schema


# -- decisions: SIGKILL at random moments --------------------------------------------------------

def decision(number: int) -> tuple[list[int], str, int | None]:
    """Decision ``number``: 1-3 samples of its own (3n, 3n+1, ...), a cycling action and label."""
    action = ACTIONS[number % len(ACTIONS)]
    return list(range(3 * number, 3 * number + 1 + number % 3)), action, number % 5 if action == "relabel" else None


def record_decisions(path: str, first: int, ack: int) -> None:
    """Write decisions ``first, first+1, ...`` as fast as possible until killed; after each ``decide``
    returns (its commit done), write its number to the ``ack`` pipe (unbuffered: seen at once)."""
    workspace = Workspace(path)
    for number in itertools.count(first):
        workspace.decide(*decision(number))
        os.write(ack, f"{number}\n".encode())


def read_acks(fd: int) -> list[int]:
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    os.close(fd)
    return [int(line) for line in data.split()]


def committed_decisions(path: Path) -> dict[int, pd.DataFrame]:
    """Decision number → its rows in the log, after checking each decision is whole and as written."""
    log = Workspace(path).decision_log()
    found = {}
    for batch, rows in log.groupby("batch"):
        number = int(rows["index"].min()) // 3
        indices, action, label = decision(number)
        assert rows["index"].tolist() == indices, f"batch {batch} is not one whole decision"
        assert set(rows["action"]) == {action}
        assert rows["new_label"].fillna(-1).tolist() == [-1 if label is None else label] * len(indices)
        assert rows["batch"].nunique() == 1 and number not in found
        found[number] = rows
    return found


def check_database(path: Path) -> None:
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("SELECT max(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    con.close()


@pytest.mark.slow
def test_killed_writers_lose_no_acknowledged_decision(tmp_path):
    """24 writers SIGKILLed at random moments: after each kill the file opens through the tool,
    passes ``PRAGMA integrity_check``, holds every acknowledged decision, and every decision in it
    is whole (all its samples or none: one transaction per decision)."""
    path = tmp_path / "ws.sqlite"
    rng = random.Random(6)
    acknowledged: list[int] = []
    committed: dict[int, pd.DataFrame] = {}
    unacknowledged = 0
    deadline = time.monotonic() + 90
    for _ in range(KILLS):
        assert time.monotonic() < deadline, "the kill loop ran out of time"
        first = max(committed, default=-1) + 1
        read_fd, write_fd = os.pipe()
        writer = FORK.Process(target=record_decisions, args=(str(path), first, write_fd))
        writer.start()
        os.close(write_fd)
        time.sleep(rng.uniform(*KILL_WINDOW_S))
        assert writer.is_alive(), f"the writer stopped by itself (exit code {writer.exitcode})"
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        acks = read_acks(read_fd)
        assert acks == list(range(first, first + len(acks)))
        acknowledged += acks
        committed = committed_decisions(path)  # opens the file through the tool (it must open)
        check_database(path)
        assert set(acknowledged) <= set(committed), "an acknowledged decision was lost"
        extra = set(committed) - set(acknowledged)  # committed, killed before it could say so
        assert extra <= {first + len(acks)}
        unacknowledged += len(extra)
        acknowledged += sorted(extra)
    assert len(acknowledged) >= KILLS  # the writers did write between the kills
    print(f"{KILLS} kills survived, {len(acknowledged)} decisions checked "
          f"({unacknowledged} committed but killed before the acknowledgement)")


# -- two writers at once ---------------------------------------------------------------------------

def relabel_shared_samples(path: str, writer: int, count: int) -> None:
    """Relabel samples 0..9 (the other writer's too) ``count`` times; any error ends the process
    with status 1 (and its traceback on stderr)."""
    workspace = Workspace(path)
    for i in range(count):
        workspace.decide([i % 10], "relabel", writer)
        if i % 10 == 9:
            workspace.decisions()  # reads interleaved with the other writer's commits


def test_two_writers_on_the_same_samples_lose_nothing(tmp_path):
    """Two processes relabel the same samples at once: every decision of both is in the log once,
    batches are numbered without a clash, and neither sees an error (no "database is locked")."""
    path = tmp_path / "ws.sqlite"
    Workspace(path)
    count = 80
    writers = [FORK.Process(target=relabel_shared_samples, args=(str(path), w, count)) for w in (1, 2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
    assert [w.exitcode for w in writers] == [0, 0]  # no exception of any kind reached either writer
    log = Workspace(path).decision_log()
    assert len(log) == 2 * count and log["batch"].is_unique and sorted(log["batch"]) == list(range(1, 2 * count + 1))
    for w in (1, 2):
        assert log.loc[log["new_label"] == w, "index"].tolist() == [i % 10 for i in range(count)]  # in order
    latest = log.sort_values("id").groupby("index").last()["new_label"]
    current = Workspace(path).decisions().set_index("index")["new_label"]
    assert current.to_dict() == latest.astype(int).to_dict()
    check_database(path)


def hold_write_lock(path: Path, seconds: float, held: threading.Event) -> None:
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("BEGIN IMMEDIATE")
    held.set()
    time.sleep(seconds)
    con.execute("COMMIT")
    con.close()


def test_a_lock_held_briefly_is_waited_out(tmp_path, monkeypatch):
    """Another connection holds the write lock longer than one busy timeout: the retries wait it out."""
    monkeypatch.setattr(workspace_module, "BUSY_TIMEOUT_S", 0.1)
    path = tmp_path / "ws.sqlite"
    workspace = Workspace(path)
    held = threading.Event()
    holder = threading.Thread(target=hold_write_lock, args=(path, 0.6, held))
    holder.start()
    held.wait()
    workspace.decide([4], "drop")
    holder.join()
    assert workspace.decisions()["index"].tolist() == [4]


def test_a_lock_held_past_the_retries_gives_a_clear_error_before_it_is_released(tmp_path, monkeypatch):
    monkeypatch.setattr(workspace_module, "BUSY_TIMEOUT_S", 0.1)
    monkeypatch.setattr(workspace_module, "LOCK_RETRIES", 3)
    path = tmp_path / "ws.sqlite"
    workspace = Workspace(path)
    held = threading.Event()
    holder = threading.Thread(target=hold_write_lock, args=(path, 3.0, held))
    holder.start()
    held.wait()
    with pytest.raises(InfluenceLensError, match=r"ws\.sqlite: the workspace stayed locked by another process; try "
                                                 r"again") as caught:
        workspace.decide([4], "drop")
    gave_up_while_locked = holder.is_alive()  # 3 × 0.1 s busy timeouts and the backoff, not the holder's 3 s
    holder.join()
    assert gave_up_while_locked
    assert "database is locked" not in str(caught.value)
    assert workspace.decisions().empty


# -- stage files ---------------------------------------------------------------------------------

def test_stage_files_are_written_whole_or_not_at_all(tmp_path, monkeypatch, caplog):
    """A crash between writing and renaming leaves no stage file; a dead writer's temporary file is
    removed by the next store; a damaged stage file is recomputed; an unwritable folder is survived."""
    store = StageStore(tmp_path / "stages")

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        store.fetch("probe", "k1", lambda: {"x": 1}, codec=PLAIN)
    monkeypatch.undo()
    assert list((tmp_path / "stages").iterdir()) == []

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / "stages" / f".probe-k2.pt.{int(dead.stdout)}.tmp"
    live = tmp_path / "stages" / f".probe-k3.pt.{os.getpid()}.tmp"
    orphan.write_bytes(b"half a file")
    live.write_bytes(b"being written")
    StageStore(tmp_path / "stages")
    assert not orphan.exists() and live.exists()

    store.path("probe", "k4").write_bytes(b"\x00 damaged")
    with caplog.at_level(logging.WARNING, logger="engine.stages"):
        assert store.fetch("probe", "k4", lambda: {"x": 4}, codec=PLAIN) == {"x": 4}
    assert "unreadable stage file, computing it again" in caplog.text  # logged, never printed
    assert store.log[-1] == ("probe", "computed")
    assert StageStore(tmp_path / "stages").fetch("probe", "k4", lambda: {"x": 0}, codec=PLAIN) == {"x": 4}

    (tmp_path / "blocked").write_text("a file where the folder should be")
    assert StageStore(tmp_path / "blocked" / "stages").fetch("probe", "k5", lambda: {"x": 5}, codec=PLAIN) == {"x": 5}


class Interrupted(Exception):
    """Stands in for a kill at a chosen point of an in-process run."""


def interrupt_at(message_prefix: str, after: int = 0):
    calls = 0

    def progress(done: int, total: int, message: str) -> None:
        nonlocal calls
        if message.startswith(message_prefix):
            calls += 1
            if calls > after:
                raise Interrupted(message)

    return progress


@pytest.fixture(scope="module")
def tiny_run():
    train_set = make_dataset(classes=3, per_class=10, seed=0)
    validation = make_dataset(classes=3, per_class=4, seed=1)
    return train_set, validation, TrainConfig(epochs=2, device="cpu")


def test_an_interrupted_run_resumes_from_its_last_stage(tmp_path, tiny_run):
    """Interrupted while fine-tuning, while fitting the curvature, then in the 3rd row shard: each
    rerun reuses every stage saved so far and computes only the rest; the end result equals the
    uninterrupted run's, and rerunning the finished run computes nothing."""
    train_set, validation, config = tiny_run
    methods = ["fvm", "tracin-last"]
    settings = {"fvm": scorer_class("fvm").Settings(curvature="ekfac")}

    def run(store: StageStore, progress=None):
        kwargs = {"progress": progress} if progress else {}
        return score_methods(train_set, methods, validation=validation, config=config, settings=settings,
                             stages=store, **kwargs)

    shards = [f"scores:tracin-last[{lo}:{min(lo + 8, 30)}]" for lo in range(0, 30, 8)]
    whole = StageStore(tmp_path / "whole", shard_rows=8)
    uninterrupted = run(whole)
    assert whole.summary() == {"reused": [], "computed": ["train", "finetune:sam", "curvature:fvm", "scores:fvm",
                                                          *shards]}
    folder = tmp_path / "killed"
    expected = [({"reused": [], "computed": ["train"]}, interrupt_at("fine-tuning")),
                ({"reused": ["train"], "computed": ["finetune:sam"]}, interrupt_at("EK-FAC")),
                ({"reused": ["train", "finetune:sam"], "computed": ["curvature:fvm", "scores:fvm", *shards[:2]]},
                 interrupt_at("tracin-last", after=2 * 2))]  # 2 checkpoints per shard: 2 shards done
    for log, progress in expected:
        store = StageStore(folder, shard_rows=8)
        with pytest.raises(Interrupted):
            run(store, progress)
        assert store.summary() == log
    store = StageStore(folder, shard_rows=8)
    resumed = run(store)
    assert store.summary() == {"reused": ["train", "scores:fvm", *shards[:2]], "computed": shards[2:]}
    plain = score_methods(train_set, methods, validation=validation, config=config, settings=settings)
    for method in methods:
        np.testing.assert_array_equal(resumed.results[method].scores, uninterrupted.results[method].scores)
        np.testing.assert_array_equal(resumed.results[method].suggested_labels,
                                      uninterrupted.results[method].suggested_labels)
        # shards of 8 rows go through the network as batches of 8, the plain run as one batch of 30:
        # the same sums in another order (seen here: 4e-9 relative), nothing more
        np.testing.assert_allclose(resumed.results[method].scores, plain.results[method].scores, rtol=1e-7)
    assert resumed.results["fvm"].info == plain.results["fvm"].info
    store = StageStore(folder, shard_rows=8)
    run(store)
    assert store.summary() == {"reused": ["train", "scores:fvm", *shards], "computed": []}


# -- the real command, killed after training -------------------------------------------------------

def start_cli(*args: str | Path, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, "-m", "engine.cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_cli_killed_after_training_resumes_without_retraining(tmp_path):
    """``score --workspace`` killed (SIGKILL) once its trained-model stage is on disk: the rerun loads
    it instead of training, gives the same scores as a run never interrupted, and a third run of the
    finished configuration computes nothing."""
    save_npz(make_dataset(classes=4, per_class=40, seed=0), tmp_path / "train.npz")
    score = ["score", "train.npz", "--method", "cleanlab", "--epochs", "3", "--device", "cpu", "--noise-rate", "0.1"]
    killed = start_cli(*score, "--workspace", "ws", "--out", "killed.csv", cwd=tmp_path)
    deadline = time.monotonic() + 240
    while not list((tmp_path / "ws" / "stages").glob("train-*.pt")):
        assert killed.poll() is None and time.monotonic() < deadline, killed.communicate()[1]
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL and not (tmp_path / "killed.csv").exists()

    resumed = run_cli(*score, "--workspace", "ws", "--out", "resumed.csv", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    stages = last_json_line(resumed.stdout)["workspace"]["stages"]
    assert stages["reused"][0] == "train" and "train" not in stages["computed"]
    assert "scores:cleanlab" in stages["computed"]  # it was killed before the end
    assert "influence-lens: reused train" in resumed.stderr

    uninterrupted = run_cli(*score, "--out", "uninterrupted.csv", cwd=tmp_path)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    assert (tmp_path / "resumed.csv").read_text() == (tmp_path / "uninterrupted.csv").read_text()
    summary, plain = last_json_line(resumed.stdout), last_json_line(uninterrupted.stdout)
    assert {k: summary[k] for k in ("auroc", "ap", "info")} == {k: plain[k] for k in ("auroc", "ap", "info")}

    again = run_cli(*score, "--workspace", "ws", "--out", "again.csv", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert last_json_line(again.stdout)["workspace"]["stages"] == {"reused": ["result"], "computed": []}
    assert (tmp_path / "again.csv").read_text() == (tmp_path / "uninterrupted.csv").read_text()
    print("stages after the kill:", json.dumps(stages))

