"""Lazily read image files scored chunk by chunk equal the in-memory run, row for row."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_dataset, save_image, write_image_folder, write_manifest

from engine.config import TrainConfig
from engine.data import load_dataset
from engine.errors import DataError, InfluenceLensError
from engine.pipeline import score_methods
from engine.streaming import RECORD, ImageFiles, stream_scores
from engine.training import train

CONFIG = TrainConfig(epochs=2, batch_size=8, checkpoints=2, device="cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(make_dataset(classes=3, per_class=9, shape=(8, 8, 3), seed=2),
                              tmp_path_factory.mktemp("lazy") / "images")


@pytest.fixture(scope="module")
def trained(folder):
    return train(load_dataset(folder), CONFIG)


def test_files_are_listed_as_the_in_memory_loader_lists_them(folder, tmp_path):
    eager = load_dataset(folder)
    files = ImageFiles.open(folder)
    assert len(files) == len(eager) and files.class_names == eager.class_names
    np.testing.assert_array_equal(files.index, eager.index)
    np.testing.assert_array_equal(files.labels, eager.labels)
    rows = np.array([25, 0, 13])
    loaded = files.load(rows)
    np.testing.assert_array_equal(loaded.images, eager.images[rows])
    assert loaded.paths == tuple(eager.paths[r] for r in rows)
    manifest = write_manifest(make_dataset(classes=2, per_class=3, seed=5), tmp_path / "m.csv")
    np.testing.assert_array_equal(ImageFiles.open(manifest).load(np.arange(6)).images, load_dataset(manifest).images)


@pytest.mark.parametrize("method", ["loss", "tracin"])
def test_streamed_scores_equal_the_in_memory_scores(folder, trained, tmp_path, method):
    out = tmp_path / "scores.npy"
    stream_scores(ImageFiles.open(folder), trained, method, out, chunk_rows=7, workers=2)  # 27 rows: 4 chunks
    eager = load_dataset(folder)
    run = score_methods(eager, [method], trained=trained)
    table = np.load(out, mmap_mode="r")
    assert isinstance(table, np.memmap) and table.dtype == RECORD
    np.testing.assert_array_equal(table["index"], eager.index)
    np.testing.assert_array_equal(table["given_label"], eager.labels)
    np.testing.assert_allclose(table["score"], run.results[method].scores, rtol=1e-5)
    np.testing.assert_array_equal(table["predicted_label"], run.context.predictions.predicted)
    np.testing.assert_array_equal(table["suggested_label"], run.results[method].suggested_labels)


def test_methods_that_need_every_row_at_once_are_refused(folder, trained, tmp_path):
    with pytest.raises(InfluenceLensError, match="every training row at once"):
        stream_scores(ImageFiles.open(folder), trained, "if-last", tmp_path / "s.npy")
    assert not (tmp_path / "s.npy").exists()


def test_an_unreadable_file_is_named_even_from_a_worker(tmp_path, trained):
    root = write_image_folder(make_dataset(classes=3, per_class=3, shape=(8, 8, 3)), tmp_path / "odd")
    (root / "class_2" / "zz_odd.png").write_text("not an image")
    with pytest.raises(DataError, match=r"zz_odd\.png: unreadable image"):
        stream_scores(ImageFiles.open(root), trained, "loss", tmp_path / "s.npy", chunk_rows=4, workers=1)


def test_a_file_of_another_size_is_resized_to_the_first(tmp_path):
    root = write_image_folder(make_dataset(classes=2, per_class=2, shape=(8, 8, 3)), tmp_path / "sizes")
    save_image(np.full((16, 12, 3), 90, dtype=np.uint8), root / "class_1" / "zz_big.png")
    files = ImageFiles.open(root)
    image, _, _ = files[len(files) - 1]
    assert image.shape == (8, 8, 3) and (image == 90).all()


def test_grayscale_files_in_an_rgb_set_become_rgb(tmp_path):
    root = write_image_folder(make_dataset(classes=2, per_class=2, shape=(8, 8, 3)), tmp_path / "mixed")
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    save_image(gray, root / "class_1" / "zz_gray.png")
    files = ImageFiles.open(root)
    image, _, _ = files[len(files) - 1]
    np.testing.assert_array_equal(image, np.repeat(gray[..., None], 3, axis=2))
