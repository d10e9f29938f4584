"""Progress reporting: the library calls ``progress(done, total, message)``; front ends draw it."""

from __future__ import annotations

import time
from collections.abc import Callable

from engine.errors import InfluenceLensError

Progress = Callable[[int, int, str], None]
# A stage estimated to take longer than this (a week) is stopped unless the user insists: absurd
# epochs or a huge data set on a CPU would otherwise run for months before anyone notices.
MAX_ESTIMATED_HOURS = 168.0
_ESTIMATE_AFTER_STEPS = 3  # steps timed (after the first, which pays one-off costs) before estimating
_open_bars: set = set()  # tqdm bars drawn by tqdm_progress and not yet closed


def no_progress(done: int, total: int, message: str) -> None:
    """The default callback: report nothing."""


def tqdm_progress(**tqdm_kwargs) -> Progress:
    """A callback drawing one tqdm bar per message (stage) on stderr, for the CLI."""
    from tqdm import tqdm

    state: dict[str, tqdm] = {}

    def report(done: int, total: int, message: str) -> None:
        stage = message.split(":")[0]
        bar = state.get("bar")
        if bar is None or state.get("stage") != stage or done < bar.n:  # a new stage, or one started again
            if bar is not None:
                _close(bar)
            bar = state["bar"] = tqdm(total=total, desc=stage, leave=False, mininterval=0.5, **tqdm_kwargs)
            _open_bars.add(bar)
            state["stage"] = stage
        bar.total = total
        bar.update(done - bar.n)
        if done >= total:
            _close(state.pop("bar"))

    return report


def time_limited(progress: Progress, hours: float | None = None) -> Progress:
    """``progress``, stopping a stage early with an :class:`InfluenceLensError` when its first steps say it
    would take more than ``hours`` (:data:`MAX_ESTIMATED_HOURS` by default). Each stage is estimated once."""
    state: dict[str, float] = {}

    def report(done: int, total: int, message: str) -> None:
        progress(done, total, message)
        stage = message.split(":")[0]
        if state.get("stage") != stage or done < state["done"]:  # a new stage, or one started again
            state.update(stage=stage, first=done, start=time.perf_counter(), checked=0)
        state["done"] = done
        if not state["checked"] and done - state["first"] >= _ESTIMATE_AFTER_STEPS:
            state["checked"] = 1
            per_step = (time.perf_counter() - state["start"]) / (done - state["first"])
            estimate = per_step * (total - done) / 3600
            limit = MAX_ESTIMATED_HOURS if hours is None else hours
            if estimate > limit:
                raise InfluenceLensError(f"{stage} would take about {estimate:,.0f} hours on this device ({total:,} "
                                         f"steps at {per_step:.3g} s each), more than {limit:g}; lower the epochs "
                                         "or the data, or pass --force to run it anyway")

    return report


def _close(bar) -> None:
    bar.close()
    _open_bars.discard(bar)


def close_progress_bars() -> None:
    """Clear the bars a failed run left open, so that the error it prints stands on a line of its own."""
    for bar in list(_open_bars):
        _close(bar)
