"""Loaders give back exactly the arrays that were written; splits are stratified and seeded."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_dataset, save_image, write_image_folder, write_manifest
from PIL import Image

from engine.data import (
    Dataset,
    load_csv_manifest,
    load_dataset,
    load_image_folder,
    load_npz,
    load_sample,
    save_npz,
    stratified_split,
)


def assert_same_rows(loaded: Dataset, written: Dataset) -> None:
    """Same images, labels and class names, matched row by row through the stable index."""
    order = np.argsort(loaded.index)
    assert loaded.class_names == written.class_names
    np.testing.assert_array_equal(loaded.images[order], written.images)
    np.testing.assert_array_equal(loaded.labels[order], written.labels)


@pytest.mark.parametrize("shape", [(8, 8), (6, 7, 3)], ids=["gray", "rgb"])
def test_npz_round_trip(tmp_path, shape):
    written = make_dataset(shape=shape)
    written = written.subset(np.arange(len(written))[::-1])  # a non-trivial stable index
    save_npz(written, tmp_path / "d.npz")
    loaded = load_npz(tmp_path / "d.npz")
    np.testing.assert_array_equal(loaded.images, written.images)
    np.testing.assert_array_equal(loaded.labels, written.labels)
    np.testing.assert_array_equal(loaded.index, written.index)
    assert loaded.class_names == written.class_names


def test_npz_float_images_in_unit_range_are_rescaled(tmp_path):
    written = make_dataset()
    np.savez(tmp_path / "f.npz", images=written.images / 255.0, labels=written.labels)
    loaded = load_npz(tmp_path / "f.npz")
    assert loaded.images.dtype == np.uint8
    np.testing.assert_array_equal(loaded.images, written.images)
    assert loaded.class_names == ("0", "1", "2")


@pytest.mark.parametrize("shape", [(8, 8), (6, 7, 3)], ids=["gray", "rgb"])
def test_image_folder_round_trip_png(tmp_path, shape):
    written = make_dataset(shape=shape)
    loaded = load_dataset(write_image_folder(written, tmp_path / "folder"))
    assert_same_rows(loaded, written)
    assert loaded.paths[0] == "class_0/img_00000.png"


def test_image_folder_jpeg_decodes_close_to_the_original(tmp_path):
    """JPEG is lossy: pixels come back within a few levels, labels and classes exactly."""
    written = make_dataset(shape=(16, 16, 3), per_class=4)
    for image, label, idx in zip(written.images, written.labels, written.index, strict=True):
        save_image(image, tmp_path / "jpg" / written.class_names[label] / f"{idx:03d}.jpg", quality=100,
                   subsampling=0)
    loaded = load_image_folder(tmp_path / "jpg")
    assert loaded.images.shape == written.images.shape
    assert np.abs(loaded.images.astype(int) - written.images.astype(int)).mean() < 4
    np.testing.assert_array_equal(loaded.labels, written.labels)
    assert loaded.class_names == written.class_names


@pytest.mark.parametrize("integer_labels", [False, True], ids=["class-names", "integers"])
@pytest.mark.parametrize("shape", [(8, 8), (5, 9, 3)], ids=["gray", "rgb"])
def test_csv_manifest_round_trip(tmp_path, integer_labels, shape):
    written = make_dataset(shape=shape)
    csv_path = write_manifest(written, tmp_path / "m.csv", integer_labels=integer_labels)
    loaded = load_dataset(csv_path)
    np.testing.assert_array_equal(loaded.images, written.images)
    np.testing.assert_array_equal(loaded.labels, written.labels)
    np.testing.assert_array_equal(loaded.index, np.arange(len(written)))  # the manifest's row order
    expected_names = ("0", "1", "2") if integer_labels else written.class_names
    assert loaded.class_names == expected_names


def test_mixed_channel_modes_load_as_rgb(tmp_path):
    """Grayscale, RGBA and palette files in one folder are converted, not refused."""
    gray = np.full((4, 4), 200, dtype=np.uint8)
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 255
    save_image(gray, tmp_path / "a" / "gray.png")
    save_image(rgba, tmp_path / "a" / "rgba.png")
    palette = Image.fromarray(np.full((4, 4, 3), (0, 0, 255), dtype=np.uint8)).convert("P")
    (tmp_path / "b").mkdir()
    palette.save(tmp_path / "b" / "palette.png")
    loaded = load_image_folder(tmp_path)
    assert loaded.images.shape == (3, 4, 4, 3)
    by_path = dict(zip(loaded.paths, loaded.images, strict=True))
    np.testing.assert_array_equal(by_path["a/gray.png"][0, 0], [200, 200, 200])
    np.testing.assert_array_equal(by_path["a/rgba.png"][0, 0], [255, 0, 0])
    np.testing.assert_array_equal(by_path["b/palette.png"][0, 0], [0, 0, 255])


def test_sixteen_bit_png_is_rescaled_not_clipped(tmp_path):
    """Pillow's own conversion would clip every value above 255 to white."""
    save_image(np.array([[0, 1000, 30000, 65535]], dtype=np.uint16), tmp_path / "a" / "deep.png")
    save_image(np.zeros((1, 4), dtype=np.uint8), tmp_path / "b" / "flat.png")
    loaded = load_image_folder(tmp_path)
    np.testing.assert_array_equal(loaded.images[0], [[0, 4, 117, 255]])


def test_index_is_stable_under_subsetting():
    data = make_dataset(per_class=5)
    part = data.subset(np.array([7, 2, 11]))
    np.testing.assert_array_equal(part.index, [7, 2, 11])
    np.testing.assert_array_equal(part.labels, data.labels[[7, 2, 11]])
    np.testing.assert_array_equal(part.subset(np.array([False, True, True])).index, [2, 11])


def test_stratified_split_keeps_class_proportions_and_is_seeded():
    data = make_dataset(classes=4, per_class=50)
    parts = stratified_split(data, (0.6, 0.2, 0.2), seed=3)
    assert [len(p) for p in parts] == [120, 40, 40]
    for part, fraction in zip(parts, (0.6, 0.2, 0.2), strict=True):
        np.testing.assert_array_equal(np.bincount(part.labels, minlength=4), [round(50 * fraction)] * 4)
    all_index = np.concatenate([p.index for p in parts])
    np.testing.assert_array_equal(np.sort(all_index), data.index)  # a partition: disjoint and complete
    again = stratified_split(data, (0.6, 0.2, 0.2), seed=3)
    other = stratified_split(data, (0.6, 0.2, 0.2), seed=4)
    assert all(np.array_equal(a.index, b.index) for a, b in zip(parts, again, strict=True))
    assert not np.array_equal(parts[1].index, other[1].index)


def test_sample_data_has_three_disjoint_splits():
    splits = {name: load_sample(name) for name in ("train", "val", "test")}
    assert {name: len(ds) for name, ds in splits.items()} == {"train": 1078, "val": 359, "test": 360}
    indices = [set(ds.index.tolist()) for ds in splits.values()]
    assert not (indices[0] & indices[1] or indices[0] & indices[2] or indices[1] & indices[2])
    for ds in splits.values():
        assert ds.image_shape == (8, 8) and ds.num_classes == 10
        assert np.bincount(ds.labels, minlength=10).min() >= 30
    np.testing.assert_array_equal(load_dataset("sample:val").index, splits["val"].index)


def test_example_folder_and_manifest_ship_the_same_images():
    """The format examples in sample_data/ load, and the two layouts agree."""
    from sample_data import EXAMPLES

    folder = load_dataset(EXAMPLES / "images")
    manifest = load_csv_manifest(EXAMPLES / "manifest.csv")
    by_path = {f"images/{p}": (img, folder.class_names[y]) for p, img, y in zip(folder.paths, folder.images,
                                                                               folder.labels, strict=True)}
    assert len(manifest) == len(folder) == 9
    for path, image, label in zip(manifest.paths, manifest.images, manifest.labels, strict=True):
        np.testing.assert_array_equal(image, by_path[path][0])
        assert manifest.class_names[label] == by_path[path][1]
