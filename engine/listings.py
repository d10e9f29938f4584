"""Image headers remembered between loads of one listing (an image folder or a manifest).

Listing a million photos read every file's header (its size and colour, to fix the shape of the rows):
about 70 µs a file, over a minute each time the dashboard opened the run or a retrain loaded it again. A
listing loaded with a workspace folder keeps those headers in ``<folder>/listings/``, never beside the
user's data, with each file's size and modification time; a later load reads a file's header again
only when either has changed, and otherwise only stats it. A cache file that cannot be read is ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import InfluenceLensError
from engine.sources import Names

LISTING_FOLDER = "listings"


@dataclass(frozen=True)
class Headers:
    """Per file of a listing: its name (relative to the listing's root), size, mtime (ns), and the
    height, width and colour its header gave."""

    names: Names
    sizes: np.ndarray
    mtimes: np.ndarray
    heights: np.ndarray
    widths: np.ndarray
    colour: np.ndarray

    def save(self, path: Path) -> None:
        """Written whole or not at all; a folder that cannot take it costs only the next load's time."""
        from engine.safe_files import write_atomically  # (which reads manifests through engine.data)

        arrays = {"buffer": self.names.buffer, "offsets": self.names.offsets, "sizes": self.sizes,
                  "mtimes": self.mtimes, "heights": self.heights, "widths": self.widths, "colour": self.colour}
        with contextlib.suppress(OSError, InfluenceLensError):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, lambda handle: np.savez(handle, **arrays), binary=True)

    @classmethod
    def load(cls, path: Path) -> Headers | None:
        try:
            with np.load(path, allow_pickle=False) as stored:
                names = Names.from_buffer(stored["buffer"], stored["offsets"])
                headers = cls(names, *(stored[k] for k in ("sizes", "mtimes", "heights", "widths", "colour")))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        n = len(names)
        if names.buffer.dtype != np.uint8 or names.offsets.shape != (n + 1,) or \
                any(len(a) != n for a in (headers.sizes, headers.mtimes, headers.heights, headers.widths,
                                          headers.colour)) or \
                (n and (names.offsets[0] != 0 or names.offsets[-1] != len(names.buffer))):
            return None
        return headers


def cache_file(folder: str | Path, root: Path, where: str) -> Path:
    """The cache of the listing ``where`` (a folder or a manifest) whose names are relative to ``root``."""
    key = hashlib.sha1(f"{root}\n{where}".encode()).hexdigest()[:20]
    return Path(folder) / LISTING_FOLDER / f"{key}.npz"


def known(cached: Headers | None, names: Names, sizes: np.ndarray, mtimes: np.ndarray) -> np.ndarray:
    """For each file, its row in ``cached`` when its name, size and mtime are the same there, else -1."""
    rows = np.full(len(names), -1, dtype=np.int64)
    if cached is None:
        return rows
    if np.array_equal(cached.names.offsets, names.offsets) and np.array_equal(cached.names.buffer, names.buffer):
        rows[:] = np.arange(len(names))  # the same files in the same order: the usual case, no lookup
    else:
        position = {cached.names[i]: i for i in range(len(cached.names))}
        rows[:] = [position.get(names[i], -1) for i in range(len(names))]
    found = rows >= 0
    same = np.zeros(len(names), dtype=bool)
    same[found] = (cached.sizes[rows[found]] == sizes[found]) & (cached.mtimes[rows[found]] == mtimes[found])
    rows[~same] = -1
    return rows
