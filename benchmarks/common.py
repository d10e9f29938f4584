"""Benchmark-only helpers: the shared real data (MNIST, CIFAR-10, human-validated label errors) as
engine :class:`~engine.data.Dataset` objects.

Where the data live: ``--data-root`` / ``data_root(path)``, else ``$INFLUENCE_LENS_DATA``, else
``../shared/data`` beside the repository, else ``device_data/`` inside it (the git-ignored folder a
GPU machine receives the data in: there only the compact JPEG blobs fit, so CIFAR-10 test falls back
to its compact form, whose decoded pixels equal the ``.npz``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from engine.data import Dataset, load_npz
from engine.errors import DataError, OptionError

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_ENV = "INFLUENCE_LENS_DATA"
DEFAULT_ROOTS = (REPO_ROOT.parent / "shared" / "data", REPO_ROOT / "device_data")
LABEL_ERROR_SETS = ("mnist", "cifar10")


def data_root(path: str | Path | None = None) -> Path:
    """The folder holding the shared data (see the module docstring for the search order)."""
    chosen = path or os.environ.get(DATA_ENV)
    if chosen:
        root = Path(chosen)
        if not root.is_dir():
            raise DataError(f"{root}: data folder not found (from {'--data-root' if path else '$' + DATA_ENV})")
        return root
    for root in DEFAULT_ROOTS:
        if root.is_dir():
            return root
    raise DataError(f"shared data not found in {' or '.join(map(str, DEFAULT_ROOTS))}; "
                    f"pass --data-root or set ${DATA_ENV}")


def load_mnist_test(root: Path) -> Dataset:
    """The 10,000 MNIST test images in original order (row i = test index i)."""
    return replace(load_npz(root / "mnist_test.npz"), source="MNIST test")


def load_cifar10(root: Path, split: str, *, rows: np.ndarray | None = None, workers: int = 8) -> Dataset:
    """CIFAR-10 ``train`` or ``test`` (JPEG q75), optionally only ``rows``; the index is the original row.

    The compact form is decoded with Pillow in a thread pool (Pillow releases the GIL while decoding).
    """
    if split not in ("train", "test"):
        raise OptionError("CIFAR-10 split", split, ("train", "test"))
    npz = root / "cifar10_test_jpegq75.npz"
    if split == "test" and rows is None and npz.is_file():
        return replace(load_npz(npz), source="CIFAR-10 test")
    blob_path, index_path = root / f"cifar10_{split}_jpegq75.bin", root / f"cifar10_{split}_jpegq75_index.npz"
    for path in (blob_path, index_path):
        if not path.is_file():
            raise DataError(f"{path}: file not found")
    with np.load(index_path) as index:
        offsets, labels, class_names = index["offsets"], index["labels"], tuple(index["class_names"])
    rows = np.arange(len(labels)) if rows is None else np.asarray(rows, dtype=np.int64)
    blob = blob_path.read_bytes()
    with ThreadPoolExecutor(workers) as pool:
        images = np.stack(list(pool.map(lambda i: _decode_jpeg(blob[offsets[i]:offsets[i + 1]]), rows,
                                        chunksize=256)))
    return Dataset(images, labels[rows].astype(np.int64), class_names, rows, source=f"CIFAR-10 {split}")


def cifar10_train_labels(root: Path) -> np.ndarray:
    """The 50,000 clean CIFAR-10 training labels, without decoding any image."""
    with np.load(root / "cifar10_train_jpegq75_index.npz") as index:
        return index["labels"].astype(np.int64)


def _decode_jpeg(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def load_label_errors(root: Path, name: str) -> pd.DataFrame:
    """The reviewed candidates of ``mnist`` or ``cifar10`` test (one row each, see the data README)."""
    if name not in LABEL_ERROR_SETS:
        raise OptionError("label-error set", name, LABEL_ERROR_SETS)
    path = root / "label_errors" / f"{name}_test_label_errors.csv"
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return pd.read_csv(path)


@dataclass(frozen=True)
class KnownErrors:
    """The human-validated errors among a dataset's rows, and the right label where reviewers agreed."""

    is_error: np.ndarray  # bool per row
    true_labels: np.ndarray  # per row: the given label, the agreed label of a correctable error, or -1


def known_errors(dataset: Dataset, table: pd.DataFrame) -> KnownErrors:
    """Align a label-error table (keyed by test-set position) with ``dataset``'s stable index."""
    errors = table[table["is_label_error"] == 1]
    is_error = np.isin(dataset.index, errors["index"].to_numpy())
    true_labels = dataset.labels.copy()
    true_labels[is_error] = -1
    correctable = errors[errors["category"] == "correctable"]
    position = {int(i): p for p, i in enumerate(dataset.index)}
    for idx, guessed in zip(correctable["index"], correctable["guessed_label"], strict=True):
        if int(idx) in position:
            true_labels[position[int(idx)]] = int(guessed)
    return KnownErrors(is_error, true_labels)


# -- results files a benchmark writes itself --------------------------------------------------------

def add_results_arguments(parser: argparse.ArgumentParser, *, append: bool = False) -> None:
    """``--out FILE.md`` (write the results file: the command, the machine, what was printed), ``--note``
    (a reading to put under it) and, for scripts whose file holds several runs, ``--append``."""
    parser.add_argument("--out", default=None, help="write this results file (Markdown) besides printing")
    parser.add_argument("--note", default="", help="what the figures show, written under them in --out")
    if append:
        parser.add_argument("--append", action="store_true", help="add this run as a section of --out")


def run_context() -> str:
    """When and where a benchmark ran: what its seconds depend on."""
    import torch

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()} with "
            f"{os.cpu_count()} cores ({device}), torch {torch.__version__} with {torch.get_num_threads()} "
            f"thread(s), load average {load} at the end.")


def command_line(argv: list[str] | None = None) -> str:
    """The command that ran, as one would type it from the repository root."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    with contextlib.suppress(ValueError):
        argv[0] = str(script.relative_to(REPO_ROOT))
    return "python " + " ".join(shlex.quote(a) for a in argv)


def render_results(title: str, command: str, context: str, printed: list[str], note: str = "",
                   existing: str | None = None) -> str:
    """A results file: the title (unless appended to ``existing``), the command, the run's context, what
    the script printed (runs of JSON lines fenced as code, tables and text as they are) and the note."""
    body, block = ["```", command, "```", "", context, ""], []
    for line in [*printed, ""]:
        if line.startswith("{"):
            block.append(line)
            continue
        if block:
            body += ["```", *block, "```"]
            block = []
        body.append(line)
    if note:
        body += [note, ""]
    text = "\n".join(body).strip("\n") + "\n"
    return f"{existing.rstrip()}\n\n{text}" if existing else f"# {title}\n\n{text}"


class _Tee(io.TextIOBase):
    def __init__(self, stream, copy: io.StringIO):
        self.stream, self.copy = stream, copy

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def results_file(args: argparse.Namespace, title: str) -> Iterator[None]:
    """Everything printed inside goes to stdout as before and, with ``--out``, into that results file
    (:func:`render_results`), written once the run ends without an error (temporary file, then renamed)."""
    if not getattr(args, "out", None):
        yield
        return
    out = Path(args.out)
    if not out.parent.is_dir():
        raise DataError(f"{out.parent}: folder not found (--out)")
    copy, stdout = io.StringIO(), sys.stdout
    sys.stdout = _Tee(stdout, copy)
    try:
        yield
    finally:
        sys.stdout = stdout
    existing = out.read_text() if getattr(args, "append", False) and out.is_file() else None
    text = render_results(title, command_line(), run_context(), copy.getvalue().splitlines(), args.note, existing)
    temporary = out.with_name(f".{out.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, out)
