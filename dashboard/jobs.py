"""Long work (scoring, retraining, cleaning curves) in a background thread, so the app stays usable.

A job runs a plain engine function with a progress callback and writes its result to the workspace;
the page polls the job and draws one progress bar per stage. Jobs are shared by every browser tab of
the server (keyed by workspace and configuration), so a second tab sees the run in progress.
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


@st.cache_resource
def _registry() -> dict[str, Job]:
    return {}


def key_for(kind: str, workspace_path, config_hash: str) -> str:
    """Jobs are keyed by kind, workspace and configuration, so every tab finds the same one."""
    return f"{kind}:{workspace_path}:{config_hash}"


def get(key: str) -> Job | None:
    return _registry().get(key)


def start(key: str, label: str, work: Callable[[Callable[[int, int, str], None]], Any]) -> Job:
    """Run ``work(progress)`` in a thread unless a job with this key is already running."""
    registry = _registry()
    existing = registry.get(key)
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

    job.thread = threading.Thread(target=target, name=f"influence-lens {label}", daemon=True)
    registry[key] = job
    job.thread.start()
    return job


def forget(key: str) -> None:
    """Drop a finished job (its result has been shown and stored)."""
    job = _registry().get(key)
    if job is not None and not job.running:
        del _registry()[key]


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
