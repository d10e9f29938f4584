"""Progress reporting: the library calls ``progress(done, total, message)``; front ends draw it."""

from __future__ import annotations

from typing import Callable

Progress = Callable[[int, int, str], None]


def no_progress(done: int, total: int, message: str) -> None:
    """The default callback: report nothing."""


def tqdm_progress(**tqdm_kwargs) -> Progress:
    """A callback drawing one tqdm bar per message (stage) on stderr, for the CLI."""
    from tqdm import tqdm

    state: dict[str, tqdm] = {}

    def report(done: int, total: int, message: str) -> None:
        stage = message.split(":")[0]
        bar = state.get("bar")
        if bar is None or state.get("stage") != stage:
            if bar is not None:
                bar.close()
            bar = state["bar"] = tqdm(total=total, desc=stage, leave=False, mininterval=0.5, **tqdm_kwargs)
            state["stage"] = stage
        bar.total = total
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            state.pop("bar")

    return report
