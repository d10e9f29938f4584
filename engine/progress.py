"""Progress reporting: the library calls ``progress(done, total, message)``; front ends draw it."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[int, int, str], None]
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


def _close(bar) -> None:
    bar.close()
    _open_bars.discard(bar)


def close_progress_bars() -> None:
    """Clear the bars a failed run left open, so that the error it prints stands on a line of its own."""
    for bar in list(_open_bars):
        _close(bar)
