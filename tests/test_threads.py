"""Training threads: the machine's cores by default (bounded), one rule for the CLI and the dashboard,
the count in the run's JSON, and runs stored with one thread keeping their hash."""

import os
from dataclasses import replace
from types import SimpleNamespace

import pytest
from conftest import last_json_line

from engine import cli
from engine.config import MAX_DEFAULT_THREADS, TrainConfig, default_threads
from engine.runs import RunSettings, config_hash


@pytest.fixture
def cores(monkeypatch):
    def set_cores(count: int) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(count)), raising=False)
    return set_cores


def test_the_default_is_the_machines_cores_at_most_eight(cores):
    cores(16)
    assert default_threads() == MAX_DEFAULT_THREADS == 8
    cores(1)
    assert default_threads() == 1
    cores(3)
    assert default_threads() == 3


def test_the_cli_and_the_dashboard_take_the_same_default(cores):
    cores(3)
    assert TrainConfig().threads == RunSettings().threads == RunSettings().train_config().threads == 3
    args = cli._parser().parse_args(["score", "sample", "--method", "loss"])
    assert args.threads == 3
    assert cli._parser().parse_args(["score", "sample", "--method", "loss", "--threads", "1"]).threads == 1


def test_runs_stored_before_keep_their_hash(cores):
    """A stored run's settings without ``threads`` ran on one thread: they load as threads=1 and hash as
    before; a run on the machine's default count is another run."""
    cores(4)
    data = SimpleNamespace(fingerprint="f")
    stored = {k: v for k, v in RunSettings(threads=1).to_dict().items() if k != "threads"}
    loaded = RunSettings.from_dict(stored)
    assert loaded.threads == 1
    assert config_hash(loaded, data) == config_hash(RunSettings(threads=1), data)
    assert config_hash(RunSettings(), data) != config_hash(RunSettings(threads=1), data)
    assert RunSettings.from_dict(RunSettings(threads=3).to_dict()).threads == 3
    assert replace(RunSettings(), threads=4) == RunSettings()


@pytest.mark.slow
def test_the_cli_says_how_many_threads_trained(run_cli, tmp_path):
    result = run_cli("score", "sample", "--method", "loss", "--epochs", "1", "--threads", "1",
                     "--out", tmp_path / "s.csv")
    assert result.returncode == 0, result.stderr
    assert last_json_line(result.stdout)["threads"] == 1
