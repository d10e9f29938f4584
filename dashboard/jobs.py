"""Long work (scoring, retraining, cleaning curves) in a background thread, so the app stays usable.

A job runs a plain engine function with a progress callback and writes its result to the workspace;
the page polls the job and draws one progress bar per stage. Jobs are shared by every browser tab of
the server (keyed by workspace and configuration), so a second tab sees the run in progress; the
registry is bounded (see :class:`JobRegistry`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import streamlit as st
import torch

from engine.errors import InfluenceLensError

log = logging.getLogger(__name__)
POLL_SECONDS = 1.5  # each poll reruns a fragment; at 0.5 s it slowed a CPU training ~3x on 2 cores
# CPU threads of a job's scoring: one core stays free for the web server; OMP_NUM_THREADS wins if set.
# Training itself uses the recipe's thread count (``TrainConfig.threads``), as the CLI does.
JOB_THREADS = max(1, (os.cpu_count() or 1) - 1)


@dataclass
class Job:
    """One piece of background work and what it reported so far."""

    key: str
    label: str
    stages: dict[str, tuple[int, int, str]] = field(default_factory=dict)  # stage → (done, total, message)
    result: Any = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self.finished is None

    @property
    def seconds(self) -> float:
        return (self.finished or time.time()) - self.started

    def progress(self, done: int, total: int, message: str) -> None:
        """The engine's progress callback: the stage is the text before the first ':'."""
        self.stages[message.split(":")[0]] = (done, total, message)

    def wait(self, timeout: float | None = None) -> Job:
        if self.thread is not None:
            self.thread.join(timeout)
        return self


class JobRegistry:
    """The server's jobs by key, shared by every tab. Bounded: running jobs are always kept; a finished
    one stays until a page has shown it (:func:`forget`) or ``max_finished`` newer ones have finished,
    so a server that runs for weeks does not keep every result it ever computed. (Not a Streamlit
    resource: those are shared read-only things; this one changes on every job.)"""

    def __init__(self, max_finished: int = 16):
        self.max_finished = max_finished
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> Job | None:
        with self._lock:
            return self._jobs.get(key)

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def add(self, job: Job) -> None:
        with self._lock:
            self._jobs[job.key] = job
        self.prune()

    def prune(self) -> None:
        """Drop the oldest finished jobs beyond ``max_finished`` (called as jobs start and end)."""
        with self._lock:
            finished = sorted((j for j in self._jobs.values() if not j.running), key=lambda j: j.finished)
            for old in finished[:max(0, len(finished) - self.max_finished)]:
                del self._jobs[old.key]

    def forget(self, key: str) -> None:
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and not job.running:
                del self._jobs[key]


REGISTRY = JobRegistry()


def key_for(kind: str, workspace_path, config_hash: str) -> str:
    """Jobs are keyed by kind, workspace and configuration, so every tab finds the same one."""
    return f"{kind}:{workspace_path}:{config_hash}"


def get(key: str) -> Job | None:
    return REGISTRY.get(key)


def start(key: str, label: str, work: Callable[[Callable[[int, int, str], None]], Any]) -> Job:
    """Run ``work(progress)`` in a thread unless a job with this key is already running."""
    existing = REGISTRY.get(key)
    if existing is not None and existing.running:
        return existing
    job = Job(key, label)

    def target() -> None:
        if "OMP_NUM_THREADS" not in os.environ:  # OpenMP's thread count is per calling thread: set it here
            torch.set_num_threads(JOB_THREADS)
        try:
            job.result = work(job.progress)
        except InfluenceLensError as exc:
            job.error = str(exc)
        except Exception as exc:  # shown in the page instead of killing the thread silently
            log.error("job %s failed:\n%s", key, traceback.format_exc())
            job.error = f"{exc.__class__.__name__}: {exc}"
        finally:
            job.finished = time.time()
            REGISTRY.prune()

    job.thread = threading.Thread(target=target, name=f"influence-lens {label}", daemon=True)
    REGISTRY.add(job)
    job.thread.start()
    return job


def forget(key: str) -> None:
    """Drop a finished job (its result has been shown and stored)."""
    REGISTRY.forget(key)


def draw(job: Job) -> None:
    """One progress bar per stage reported so far."""
    st.caption(f"{job.label}: {job.seconds:.0f} s")
    for done, total, message in job.stages.values():
        st.progress(min(1.0, done / total) if total else 0.0, text=message)


def watch(key: str, *, rerun_when: Callable[[], bool] | None = None) -> None:
    """Poll a running job in a fragment (the rest of the page stays live); rerun the page when it ends
    or when ``rerun_when()`` turns true (e.g. a first result is stored)."""

    @st.fragment(run_every=POLL_SECONDS)
    def poll() -> None:
        job = get(key)
        if job is None or not job.running or (rerun_when is not None and rerun_when()):
            st.rerun()
        draw(job)

    poll()
