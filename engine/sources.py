"""Images read on access: the out-of-core side of a :class:`engine.data.Dataset`.

A dataset whose decoded images would not fit the memory budget (:func:`memory_budget`) keeps a
:class:`LazyImages` in ``Dataset.images`` instead of an array: the files of an image folder or a
manifest (or the rows of a memory-mapped array), decoded, EXIF-rotated and resized only when rows
are asked for. It answers the array calls the engine makes on images (``len``, ``shape``, ``ndim``,
``dtype``, ``images[lo:hi]``, ``images[rows]``) with decoded uint8 batches, and :func:`batches`
reads a long run of rows in DataLoader worker processes, a few batches ahead. So every consumer
(training, feature extraction, every scorer) holds one batch at a time, whatever N is.

Memory of the listing itself: file names as one byte buffer (:class:`Names`), not N Python strings,
since forked workers would copy every page whose reference counts they touch.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from engine.errors import DataError

# Decoded image bytes the engine may hold at once, unless INFLUENCE_LENS_MEMORY_BUDGET says otherwise
# (bytes, or a number with K / M / G): a dataset under it is decoded into memory once (fast
# epochs), a larger one is read per batch; batch sizes of inference follow it too.
DEFAULT_BUDGET_SHARE = 8  # of the machine's memory
MAX_DEFAULT_BUDGET = 2 * 2**30
MEMORY_BUDGET_VARIABLE = "INFLUENCE_LENS_MEMORY_BUDGET"
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def machine_memory() -> int:
    """Physical memory of this machine (16 GiB where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def memory_budget() -> int:
    """Bytes of decoded images (and of one inference batch's activations) the engine may hold."""
    text = os.environ.get(MEMORY_BUDGET_VARIABLE, "").strip().upper().removesuffix("B").removesuffix("I")
    if not text:
        return min(MAX_DEFAULT_BUDGET, machine_memory() // DEFAULT_BUDGET_SHARE)
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*([KMG]?)", text)
    if match is None:
        raise DataError(f"{MEMORY_BUDGET_VARIABLE}={os.environ[MEMORY_BUDGET_VARIABLE]!r}: expected bytes, or a "
                        "number with K, M or G (e.g. 512M)")
    return int(float(match[1]) * _UNITS[match[2]])


def inference_batch(sample_shape: tuple[int, ...], *, cap: int = 512) -> int:
    """Rows per inference batch: a power of two (so batch boundaries fall on the resumable shards'
    boundaries) whose activations fit the budget, at most ``cap``. A row's activations are taken as
    64 float32 channels at the input's resolution (an image) or 64 times its width (a feature row),
    the order of what a convolutional network's first stages hold."""
    per_row = 4 * 64 * int(np.prod(sample_shape[:2]))
    rows = max(1, min(cap, memory_budget() // max(per_row, 1)))
    return 1 << (rows.bit_length() - 1)


class Names:
    """N strings as one UTF-8 buffer and offsets: two arrays, no per-row Python objects."""

    def __init__(self, names: list[str]):
        encoded = [name.encode() for name in names]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self.offsets[1:])
        self.buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    @classmethod
    def from_buffer(cls, buffer: np.ndarray, offsets: np.ndarray) -> Names:
        names = cls([])
        names.buffer, names.offsets = buffer, offsets
        return names

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row: int) -> str:
        return self.buffer[self.offsets[row]:self.offsets[row + 1]].tobytes().decode()


@dataclass(frozen=True, eq=False)
class FileSource:
    """Image files under ``root`` (relative names), with the size and mtime each had when listed:
    what identifies the data without reading its pixels."""

    root: Path
    names: Names
    sizes: np.ndarray
    mtimes: np.ndarray

    def read(self, position: int, draft: int | None) -> np.ndarray:
        from engine.data import read_image

        return read_image(self.root / self.names[position], draft)

    def identity(self) -> bytes:
        return b"".join([str(self.root).encode(), self.names.buffer.tobytes(), self.names.offsets.tobytes(),
                         self.sizes.tobytes(), self.mtimes.tobytes()])


@dataclass(frozen=True, eq=False)
class ArraySource:
    """Rows of an array that need not be in memory (a memory-mapped ``.npy`` or ``.npz`` member)."""

    array: np.ndarray

    def read(self, position: int, draft: int | None) -> np.ndarray:
        return np.asarray(self.array[position])



@dataclass(frozen=True, eq=False)
class LazyImages:
    """Rows of a source as uint8 images of one ``shape`` (H×W or H×W×3; a feature row's D), decoded on
    access: with ``fit``, each is first resized on its shorter side to ``fit`` and centre-cropped
    (a JPEG decoded at a reduced scale when that is enough); then brought to ``shape`` (channels and
    size) as the in-memory loaders would."""

    source: FileSource | ArraySource
    rows: np.ndarray  # positions in the source
    sample_shape: tuple[int, ...]
    fit: int | None = None
    dtype: np.dtype = field(default=np.dtype(np.uint8))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.sample_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.sample_shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def image(self, position: int) -> np.ndarray:
        """Row ``position`` (of this view) decoded and brought to ``sample_shape``."""
        return self._decoded(int(self.rows[position]))

    def _decoded(self, row: int) -> np.ndarray:
        """Row ``row`` of the source decoded and brought to ``sample_shape``."""
        from engine.data import center_fit, conform_image

        raw = self.source.read(row, self.fit)
        if self.dtype != np.uint8:  # feature rows: nothing to resize
            return raw.astype(self.dtype, copy=False)
        return conform_image(raw if self.fit is None else center_fit(raw, self.fit), self.sample_shape)

    def take(self, selection) -> LazyImages:
        """A view of some rows (a boolean mask, positions or a slice); nothing is read."""
        return replace(self, rows=self.rows[selection])

    def with_shape(self, sample_shape: tuple[int, ...]) -> LazyImages:
        return replace(self, sample_shape=tuple(sample_shape))

    def __getitem__(self, key) -> np.ndarray:
        """Decoded rows, as an array would give them: one row for an integer, a stacked batch otherwise."""
        if isinstance(key, (int, np.integer)):
            return self.image(int(key) % len(self))
        rows = self.rows[key]  # the batch's rows alone: not an arange of every row (0.1 ms a step at 100k rows)
        if len(rows) == 0:
            return np.zeros((0, *self.sample_shape), dtype=self.dtype)
        if isinstance(self.source, ArraySource) and self.fit is None and \
                self.source.array.shape[1:] == self.sample_shape:  # rows as stored: one indexed read
            return np.asarray(self.source.array[rows], dtype=self.dtype)
        return np.stack([self._decoded(int(row)) for row in rows])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self[:]
        return array if dtype is None else array.astype(dtype)

    def file_identity(self) -> bytes | None:
        """What determines rows decoded from files without reading their pixels (the files' names,
        sizes and mtimes, the rows, the shape and the fit); None for an array source, whose rows'
        bytes are what identifies it (hashed like an array's)."""
        if not isinstance(self.source, FileSource):
            return None
        return b"".join([self.source.identity(), self.rows.tobytes(), str((self.sample_shape, self.fit)).encode()])


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def bound_heap_growth() -> None:
    """Have glibc return every large block to the system when it is freed: a process-wide setting for a
    long-lived server (the dashboard), whose million-row frames, freed, would otherwise stay in its heap.
    It costs every allocation above 128 kB a system call and fresh pages (a run over large photos took a
    third longer: ``benchmarks/results/heap_growth_cpu.md``), so a batch loop relies on :class:`HeapGuard`."""
    libc = _libc()
    if libc is not None:  # not glibc: its allocator has no such setting
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)


def _anonymous_resident() -> int | None:
    """This process's resident anonymous memory (its heaps, not files or shared memory), or None off Linux."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class HeapGuard:
    """Hands freed heap memory back to the system once the process's anonymous memory has grown by a
    sixteenth of the memory budget since its lowest point: batches of large images, decoded, normalised
    and freed again and again, fragment glibc's heap. Over 600 photos of 1280×960 with a 256 MB budget
    (``benchmarks/results/heap_growth_cpu.md``) a run peaked at 0.9-2.4 GB as glibc comes, at 0.48-0.49
    GB with this (a fifth slower), and at 0.41 GB but a third slower with every block above 128 kB mapped on
    its own (:func:`bound_heap_growth`). Checked at most every :attr:`INTERVAL` seconds (one
    ``/proc`` read, ~20 µs), so a loop over small batches pays next to nothing; a steady loop never trims."""

    INTERVAL = 0.01  # every batch of images; at 0.5 s, 1024-px photos one per batch grew 150-180 MB between checks
    BUDGET_SHARE = 16  # a quarter let 224-px batches hold more for no speed (benchmarks/scale.py)

    def __init__(self):
        self.libc = _libc()
        self.floor: int | None = None
        self.next_check = 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        if self.libc is None or now < self.next_check:
            return
        self.next_check = now + self.INTERVAL
        resident = _anonymous_resident()
        if resident is None:
            return
        if self.floor is not None and resident > self.floor + memory_budget() // self.BUDGET_SHARE:
            self.libc.malloc_trim(0)
            resident = _anonymous_resident() or resident
        self.floor = resident if self.floor is None else min(self.floor, resident)


_heap_guard = HeapGuard()  # one per process: its heap is shared by every loop and thread


def is_lazy(images) -> bool:
    return isinstance(images, LazyImages)


def array_rows(array: np.ndarray, rows: np.ndarray, dtype=None) -> LazyImages:
    """Some rows of an array (typically a memory map) as a view read on access, as ``dtype``."""
    return LazyImages(ArraySource(array), np.asarray(rows, dtype=np.int64), tuple(array.shape[1:]),
                      dtype=np.dtype(dtype or array.dtype))


def readable_workers() -> int:
    """Decoding processes for a lazy file source: one per core beyond the first (the main process
    runs the network), at least one."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


_worker_start: str | None = None  # how DataLoader workers start: None is the platform's default (fork on Linux)


def start_workers_from_a_fork_server() -> None:
    """Start this process's decoding workers from a fork server (a fresh single-threaded process that
    imported the engine once) instead of forking this process: for a multi-threaded server (the
    dashboard), where a fork copies every lock that another thread may hold at that moment."""
    global _worker_start
    import multiprocessing

    multiprocessing.set_forkserver_preload(["engine.sources"])
    _worker_start = "forkserver"


class _Batches(torch.utils.data.Dataset):
    """Item ``k`` is batch ``k`` of decoded rows, or the error that decoding it raised (a DataError
    from a worker would reach the main process as a traceback wrapped in another exception)."""

    def __init__(self, images: LazyImages, chunks: list[np.ndarray]):
        self.images, self.chunks = images, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int):
        try:
            return self.images[self.chunks[k]]
        except DataError as exc:
            return exc


def _as_is(item):
    return item


def batches(images, positions: np.ndarray | None = None, *, batch_size: int,
            workers: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(positions, images[positions])`` in order, ``batch_size`` rows at a time: sliced from an
    array, decoded ahead in worker processes for files (``workers`` 0 decodes in this process)."""
    positions = np.arange(len(images)) if positions is None else np.asarray(positions)
    chunks = [positions[lo:lo + batch_size] for lo in range(0, len(positions), batch_size)]
    if not is_lazy(images) or not isinstance(images.source, FileSource) or len(chunks) < 2:
        for chunk in chunks:
            yield chunk, images[chunk]
            _heap_guard()
        return
    workers = readable_workers() if workers is None else workers
    loader = torch.utils.data.DataLoader(_Batches(images, chunks), batch_size=None, shuffle=False,
                                         num_workers=workers, prefetch_factor=2 if workers else None,
                                         collate_fn=_as_is, multiprocessing_context=_worker_start if workers else None)
    for chunk, batch in zip(chunks, loader, strict=True):
        if isinstance(batch, DataError):
            raise batch
        yield chunk, batch
        _heap_guard()
