"""Benchmark-only helpers shared by the scripts: the shared real data (MNIST, CIFAR-10, human-validated
label errors) as engine :class:`~engine.data.Dataset` objects, and how a measurement is printed and tabled.

Where the data live: ``--data-root`` / ``data_root(path)``, else ``$INFLUENCE_LENS_DATA``, else
``../shared/data`` beside the repository, else ``device_data/`` inside it (the git-ignored folder a
GPU machine receives the data in: there only the compact JPEG blobs fit, so CIFAR-10 test falls back
to its compact form, whose decoded pixels equal the ``.npz``).
"""

from __future__ import annotations

import io
import json
import os
import platform
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

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



# -- what the scripts print and write ---------------------------------------------------------------

def emit(row: dict) -> dict:
    """Print one measurement as a JSON line (floats to 6 places) and return it unchanged."""
    print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}, default=str),
          flush=True)
    return row


def cell(value, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals for a table cell; empty when there is none (None or NaN)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return f"{value:.{digits}f}"


def markdown_table(frame: pd.DataFrame) -> str:
    """A Markdown table of ``frame`` (pandas' own needs the optional ``tabulate``)."""
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def comma_list(values: list[str] | str | None) -> list[str]:
    """The items of a repeatable, comma-separated option: ``["a,b", "c"]`` → ``["a", "b", "c"]``."""
    if values is None:
        return []
    items = values if isinstance(values, list) else [values]
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def machine_description(device: str) -> str:
    """Where a benchmark ran, for its tables: the GPU, or the CPU with its threads and load."""
    if torch.cuda.is_available() and device != "cpu":
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"CPU ({os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} thread(s), "
            f"{platform.machine()}), load average at start {load}")
