"""Server time of the steps a reviewer waits for, as debug log lines (``benchmarks/click_latency.py`` reads them).

Shown when the server starts with ``STREAMLIT_LOGGER_LEVEL=debug`` in its environment (``influence-lens
dashboard`` passes it on; a plain ``streamlit run`` also takes ``--logger.level debug``): Streamlit's own logger
factory gives the line its format and level, so nothing is printed at the default level.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from streamlit.logger import get_logger

log = get_logger("dashboard.timing")


@contextmanager
def timed(step: str) -> Iterator[None]:
    """Log ``<step> took <ms> ms`` once the block (or the decorated function) returns; a run cut short logs nothing."""
    started = time.perf_counter()
    yield
    log.debug("%s took %.1f ms", step, 1000 * (time.perf_counter() - started))
