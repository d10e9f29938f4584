"""Data sets larger than memory: image files read on access, scored chunk by chunk into a memory-mapped file.

:class:`ImageFiles` lists an image folder or a CSV manifest (the same rules and the same stable index
as :func:`engine.data.load_dataset`) without decoding anything; ``torch.utils.data.DataLoader``
worker processes decode chunks of it. :func:`stream_scores` runs a ``row_local`` scorer (a row's
score depends only on that row, the model and the validation set) one chunk at a time and writes
each chunk's rows into a ``.npy`` opened as a memory map. At no point is there an array of all N
images, nor anything N × P (P parameters): host memory is one chunk of images in flight per worker
plus what one scoring batch needs, and the file names, stored as one byte buffer (a list of N
Python strings would be copied into every forked worker as reference counts touch its pages).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap

from engine.data import Dataset, conform_image, image_folder_files, manifest_files, read_image
from engine.errors import DataError, InfluenceLensError
from engine.progress import Progress, no_progress
from engine.safe_files import check_output
from engine.scorers import ScoringContext, make_scorer, scorer_class
from engine.sources import Names
from engine.training import TrainedModel

# One record per training row in the scores file (``np.load(path, mmap_mode="r")`` reads it back).
RECORD = np.dtype([("index", np.int64), ("score", np.float64), ("given_label", np.int64),
                   ("predicted_label", np.int64), ("suggested_label", np.int64)])
DEFAULT_CHUNK_ROWS = 2048  # decoded images per chunk: 2048 CIFAR-sized images are 6 MB


class ImageFiles(torch.utils.data.Dataset):
    """An image folder or CSV manifest, listed but not decoded; item ``i`` is ``(image, label, i)``.

    The first image fixes the shape: a file of another size or colour is converted to it
    (:func:`engine.data.conform_image`; the in-memory loaders, which see every image first, take the
    most common size instead).
    """

    def __init__(self, root: Path, names: list[str], labels: np.ndarray, class_names: tuple[str, ...], source: str):
        self.root, self.names, self.labels = root, Names(names), labels
        self.class_names, self.source = class_names, source
        self.index = np.arange(len(labels), dtype=np.int64)  # the in-memory loaders' index: the listing position
        first = read_image(root / self.names[0])
        self.image_shape = first.shape

    @classmethod
    def open(cls, spec: str | Path) -> ImageFiles:
        """A folder (one sub-folder per class) or a ``.csv`` manifest with columns ``path,label``."""
        path = Path(spec)
        if path.is_dir():
            files, labels, class_names = image_folder_files(path)
            root = path
        elif path.suffix.lower() == ".csv":
            files, labels, class_names = manifest_files(path)
            root = path.parent.resolve()
        else:
            raise DataError(f"{spec}: read lazily only from an image folder or a .csv manifest")
        return cls(root, [str(f.relative_to(root)) for f in files], labels, class_names, str(path))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __getitem__(self, row: int) -> tuple[np.ndarray, int, int]:
        path = self.root / self.names[row]
        return conform_image(read_image(path), self.image_shape), int(self.labels[row]), row

    def load(self, rows: np.ndarray) -> Dataset:
        """Decode some rows into an in-memory :class:`Dataset` (e.g. a sample to train on)."""
        rows = np.asarray(rows, dtype=np.int64)
        images = np.stack([self[int(r)][0] for r in rows])
        return Dataset(images, self.labels[rows], self.class_names, self.index[rows], source=self.source,
                       paths=tuple(self.names[int(r)] for r in rows))


def _is_scores_file(path: Path) -> bool:
    """A ``.npy`` of :data:`RECORD` rows, as :func:`stream_scores` writes."""
    try:
        return np.load(path, mmap_mode="r").dtype == RECORD
    except (OSError, ValueError):
        return False


def _stack(items: list[tuple[np.ndarray, int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images, labels, rows = zip(*items, strict=True)
    return np.stack(images), np.asarray(labels, dtype=np.int64), np.asarray(rows, dtype=np.int64)


def stream_scores(files: ImageFiles, trained: TrainedModel, method: str, out: str | Path, *, settings=None,
                  validation: Dataset | None = None, validation_trusted: bool = True,
                  chunk_rows: int = DEFAULT_CHUNK_ROWS, workers: int = 2, force: bool = False,
                  progress: Progress = no_progress) -> np.memmap:
    """Score every file with ``method`` into ``out`` (a ``.npy`` of :data:`RECORD`, rows in file order).

    ``method`` must be ``row_local``; its ``prepare`` (e.g. a validation fine-tune) runs once, then
    ``score`` runs on each chunk of ``chunk_rows`` images that ``workers`` processes decode ahead.
    ``out`` passes :func:`engine.safe_files.check_output` first: not the data, not inside its folder, and
    an existing file only when it is a scores file of this kind (or ``force``).
    """
    scorer_type = scorer_class(method)
    if not scorer_type.row_local:
        raise InfluenceLensError(f"method {method!r} needs every training row at once; stream with a method "
                                 "whose scores are per row (e.g. loss, margin, tracin-last, tracin)")
    if scorer_type.requires_validation and validation is None:
        raise InfluenceLensError(f"method {method!r} needs a validation set")
    if files.num_classes != trained.num_classes:
        raise DataError(f"{files.source}: {files.num_classes} classes, the model was trained for {trained.num_classes}")
    out = check_output(out, [files.source], force=force, option="out", ours=_is_scores_file)
    scorer = make_scorer(method, settings)
    temporary = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # renamed onto ``out`` once complete
    try:
        _score_chunks(files, trained, method, scorer, temporary, validation, validation_trusted, chunk_rows,
                      workers, progress)
        os.replace(temporary, out)
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
    return np.load(out, mmap_mode="r+")


def _score_chunks(files: ImageFiles, trained: TrainedModel, method: str, scorer, path: Path,
                  validation: Dataset | None, validation_trusted: bool, chunk_rows: int, workers: int,
                  progress: Progress) -> None:
    """Score chunk by chunk into a new ``.npy`` at ``path`` (see :func:`stream_scores`)."""
    table = open_memmap(path, mode="w+", dtype=RECORD, shape=(len(files),))
    loader = torch.utils.data.DataLoader(files, batch_size=chunk_rows, num_workers=workers, collate_fn=_stack)
    prepared = False
    for images, labels, rows in loader:
        chunk = Dataset(images, labels, files.class_names, files.index[rows], source=files.source)
        context = ScoringContext(chunk, trained, validation, validation_trusted)
        if not prepared:
            scorer.prepare(context)
            prepared = True
        result = scorer.score(context)
        part = table[rows[0]:rows[-1] + 1]  # chunks come in file order
        part["index"], part["score"], part["given_label"] = chunk.index, result.scores, labels
        part["predicted_label"], part["suggested_label"] = context.predictions.predicted, result.suggested_labels
        progress(int(rows[-1]) + 1, len(files), f"scoring {method}")
    table.flush()
