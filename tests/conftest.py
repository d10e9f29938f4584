"""Shared test helpers: tiny synthetic datasets, writers for every input format, the CLI as a
subprocess, and a snapshot of a folder to prove that a failed command changed nothing.

The helpers are plain functions (import them with ``from conftest import ...``) and the most used
ones are also fixtures, so a test can ask for ``run_cli`` or ``make_dataset`` by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data import Dataset

REPO_ROOT = Path(__file__).resolve().parent.parent
# Two shared cores: one thread per process keeps parallel helpers from thrashing, and it is also
# what the subprocesses get, so in-process and CLI results come from the same arithmetic.
torch.set_num_threads(1)
# Which files the tool wrote (engine.safe_files.remember_written) is recorded in a state folder: the
# tests (and the CLI subprocesses they start, which inherit it) keep theirs apart from the user's.
os.environ.setdefault("INFLUENCE_LENS_STATE_DIR", tempfile.mkdtemp(prefix="influence-lens-state-"))


def make_dataset(*, classes: int = 3, per_class: int = 6, shape: tuple[int, ...] = (8, 8),
                 seed: int = 0, source: str = "synthetic") -> Dataset:
    """A tiny, learnable dataset: class c is a bright horizontal band at row c (plus noise).

    ``shape`` is H×W (grayscale) or H×W×C; rows are grouped by class, labels 0..classes-1.
    """
    rng = np.random.default_rng(seed)
    n = classes * per_class
    labels = np.repeat(np.arange(classes), per_class)
    images = rng.integers(0, 60, size=(n, *shape), dtype=np.int64)
    for row, c in enumerate(labels):
        images[row, c % shape[0]] += 180
    return Dataset(images.astype(np.uint8), labels.astype(np.int64),
                   tuple(f"class_{c}" for c in range(classes)), source=source)


def save_image(array: np.ndarray, path: Path, **save_kwargs) -> Path:
    """Write one uint8 H×W or H×W×C array with Pillow (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **save_kwargs)
    return path


def write_image_folder(dataset: Dataset, root: Path, *, suffix: str = ".png") -> Path:
    """The folder layout: one sub-folder per class name, one file per row (named by its index)."""
    for image, label, idx in zip(dataset.images, dataset.labels, dataset.index, strict=True):
        save_image(image, root / dataset.class_names[label] / f"img_{idx:05d}{suffix}")
    return root


def write_manifest(dataset: Dataset, csv_path: Path, *, integer_labels: bool = False,
                   image_dir: str = "images") -> Path:
    """A ``path,label`` CSV beside PNGs in ``image_dir``; labels as class names or integers."""
    lines = ["path,label"]
    for image, label, idx in zip(dataset.images, dataset.labels, dataset.index, strict=True):
        rel = f"{image_dir}/img_{idx:05d}.png"
        save_image(image, csv_path.parent / rel)
        lines.append(f"{rel},{int(label) if integer_labels else dataset.class_names[label]}")
    csv_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return csv_path


def write_blank_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit PNG of zeros (a few kB on disk) that would need width·height bytes decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path → sha256), to show a command wrote nothing."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(*args: str | Path, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m engine.cli ARGS`` the way a user runs it; text output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "engine.cli", *map(str, args)], cwd=cwd or REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def last_json_line(stdout: str) -> dict:
    """The CLI's summary: the last line of stdout, parsed as one JSON object."""
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(name="make_dataset")
def make_dataset_fixture():
    return make_dataset


@pytest.fixture(name="run_cli")
def run_cli_fixture():
    return run_cli


@pytest.fixture(name="snapshot")
def snapshot_fixture():
    return snapshot


def head_gradients(features, probabilities, labels, *, bias: bool = True) -> torch.Tensor:
    """Per-sample head gradients vec((p − e_y) âᵀ), (N, C·D), row-major like ``head.weight`` with
    the bias as the last column (the same order as :meth:`LayerCapture.factors`): the brute-force
    side of the head-curvature tests."""
    p = torch.as_tensor(probabilities)
    a = torch.as_tensor(features, dtype=p.dtype)
    a = torch.cat([a, a.new_ones(len(a), 1)], 1) if bias else a
    residual = p.clone()
    residual[torch.arange(len(p)), torch.as_tensor(labels, device=p.device)] -= 1.0
    return (residual[:, :, None] * a[:, None, :]).reshape(len(p), -1)
