"""The server-wide registries of the dashboard (jobs, trained models) stay bounded and drop only what
is safe to drop: finished jobs (oldest first), least recently used models."""

from __future__ import annotations

import threading

from dashboard import jobs
from dashboard.jobs import Job, JobRegistry
from dashboard.state import ModelCache


def test_finished_jobs_beyond_the_bound_are_dropped_oldest_first_and_running_ones_never(monkeypatch):
    registry = JobRegistry(max_finished=3)
    monkeypatch.setattr(jobs, "REGISTRY", registry)
    release = threading.Event()
    running = jobs.start("long", "long", lambda progress: release.wait(30))
    for i in range(10):
        jobs.start(f"quick-{i}", "quick", lambda progress, i=i: i).wait(30)
    kept = {job.key for job in registry.jobs()}
    assert kept == {"long", "quick-7", "quick-8", "quick-9"} and running.running
    release.set()
    running.wait(30)
    jobs.forget("long")
    assert {job.key for job in registry.jobs()} == {"quick-8", "quick-9"}  # quick-7 made room for it
    assert jobs.get("quick-9").result == 9


def test_forget_keeps_a_running_job():
    registry = JobRegistry()
    job = Job("k", "label")
    registry.add(job)
    registry.forget("k")
    assert registry.get("k") is job  # still running: a second tab is watching it


def test_model_cache_keeps_the_most_recently_used():
    cache = ModelCache(capacity=2)
    cache["a"], cache["b"] = "model a", "model b"
    assert cache.get("a") == "model a"  # a is now the most recent
    cache["c"] = "model c"
    assert cache.get("b") is None and cache.get("a") == "model a" and cache.get("c") == "model c"
    cache["d"] = None  # nothing trained (every method was stored): nothing to keep
    assert len(cache) == 2
