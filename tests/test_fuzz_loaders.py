"""Hypothesis fuzzing of the parsers users feed files to: whatever the bytes, the loaders either
return a valid dataset or raise the tool's own error, never anything else."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_dataset, save_image, write_blank_png
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as npst

from engine.data import Dataset, load_csv_manifest, load_npz, save_npz
from engine.errors import InfluenceLensError
from engine.pipeline import read_decisions

pytestmark = pytest.mark.slow
MANIFEST_EXAMPLES, NPZ_EXAMPLES, CORRUPT_NPZ_EXAMPLES, DECISION_EXAMPLES = 1500, 1500, 500, 500


def fuzz(examples: int) -> settings:
    """No per-example deadline (file I/O on a shared machine); fixtures are reused on purpose."""
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """Images of every kind a manifest might point at, beside the manifest."""
    root = tmp_path_factory.mktemp("fuzz")
    for i in range(3):
        save_image(np.full((6, 6), 70 * i, dtype=np.uint8), root / f"g{i}.png")
    save_image(np.full((6, 6, 3), 99, dtype=np.uint8), root / "sub" / "rgb.jpg")
    save_image(np.full((6, 6, 4), 200, dtype=np.uint8), root / "rgba.png")
    save_image(np.zeros((5, 7), dtype=np.uint8), root / "odd_size.png")
    (root / "text.png").write_text("not an image")
    (root / "empty.png").write_bytes(b"")
    write_blank_png(root / "big.png", 5000, 5000)
    return root


def mostly(common: st.SearchStrategy, rare: st.SearchStrategy, odds: int = 4) -> st.SearchStrategy:
    """``common`` about ``odds`` times as often as ``rare``: most examples get deep into the loader."""
    return st.sampled_from([True] * odds + [False]).flatmap(lambda usual: common if usual else rare)


TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8)  # NUL gets its own cases
PATHS = mostly(st.sampled_from(["g0.png", "g1.png", "g2.png", "./g0.png", "sub/rgb.jpg", "sub/../g1.png", "rgba.png"]),
               st.sampled_from(["odd_size.png", "text.png", "empty.png", "big.png", "missing.png", "sub", "",
                                "../outside.png", "/etc/passwd", "x" * 300, "g0.png\x00", "g0.png "]) | TEXT)
LABELS = mostly(st.sampled_from(["0", "1", "2", "cat", "dog", " 1 "]),
                st.sampled_from(["-1", "", "1e3", "99999999999999999999", "\u0661"]) | TEXT | st.integers().map(str))
HEADERS = mostly(st.just(["path", "label"]),
                 st.sampled_from([["label", "path"], ["path"], ["file", "label"], ["path", "label", "extra"],
                                  [" path ", "label"], []]) | st.lists(TEXT, max_size=3))


@st.composite
def manifest_bytes(draw) -> bytes:
    """Mostly well-formed CSV with hostile values, sometimes arbitrary bytes or a broken encoding."""
    kind = draw(mostly(st.just("csv"), st.sampled_from(["raw", "mangled"])))
    if kind == "raw":
        return draw(st.binary(max_size=120))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(draw(HEADERS))
    rows = st.lists(st.tuples(PATHS, LABELS), max_size=6)
    for path, label in draw(mostly(st.lists(st.tuples(PATHS, LABELS), min_size=1, max_size=6, unique_by=lambda r: r[0]),
                                   rows)):
        writer.writerow([path, label] + draw(mostly(st.just([]), st.lists(TEXT, max_size=2))))
    data = buffer.getvalue().encode("utf-8")
    if kind == "mangled" and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at + 1:]
    return data


def outcome(error: InfluenceLensError | None) -> None:
    """Label the example for ``--hypothesis-show-statistics``: loaded, or which check refused it."""
    event("loaded" if error is None else re.sub(r"[^a-z ]", "", str(error).split(": ", 1)[-1])[:30])


def assert_valid(dataset: Dataset) -> None:
    assert dataset.images.dtype == np.uint8 and dataset.images.ndim in (3, 4)
    assert len(dataset.images) == len(dataset.labels) == len(dataset.index) > 0
    assert 0 <= dataset.labels.min() and dataset.labels.max() < dataset.num_classes
    assert len(set(dataset.index.tolist())) == len(dataset)


@fuzz(MANIFEST_EXAMPLES)
@given(data=manifest_bytes(), skip_unreadable=st.booleans())
def test_manifest_parser_raises_only_its_own_errors(image_dir, data, skip_unreadable):
    path = image_dir / "manifest.csv"
    path.write_bytes(data)
    try:
        dataset = load_csv_manifest(path, skip_unreadable=skip_unreadable)
    except InfluenceLensError as exc:
        return outcome(exc)
    outcome(None)
    assert_valid(dataset)
    assert all((image_dir / p).resolve().is_relative_to(image_dir.resolve()) for p in dataset.paths)


DTYPES = st.sampled_from(["uint8", "int8", "int64", "uint16", "uint64", "float16", "float32", "float64", "bool",
                          "complex64", "<U3", "S2"])
ANY_ARRAY = npst.arrays(DTYPES, npst.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4))


@st.composite
def npz_arrays(draw) -> dict[str, np.ndarray]:
    """Plausible images and labels of a common length, or anything at all, under each key."""
    n = draw(mostly(st.integers(2, 6), st.integers(0, 1)))
    side = draw(st.integers(1, 4))
    plausible = {
        "images": npst.arrays(st.sampled_from(["uint8", "float32", "int64"]),
                              st.sampled_from([(n, side, side), (n, side, side, 1), (n, side, side, 3)]),
                              elements=st.integers(0, 255)),
        "labels": npst.arrays("int64", (n,), elements=st.integers(-1, 4)),
        "class_names": mostly(st.lists(TEXT, min_size=2, max_size=5, unique=True), st.lists(TEXT, max_size=2)).map(
            lambda names: np.asarray(names, dtype=str)),
        "index": st.permutations(range(n)).map(lambda p: np.asarray(p, dtype=np.int64)),
    }
    arrays = {}
    for key, strategy in plausible.items():
        choice = draw(mostly(st.just("plausible"), st.sampled_from(["anything", "absent"]), odds=6))
        if choice != "absent":
            arrays[key] = draw(strategy if choice == "plausible" else ANY_ARRAY)
    if draw(mostly(st.just(False), st.just(True), odds=8)):
        arrays["objects"] = np.array([None, {"a": 1}], dtype=object)  # pickled: must not be loaded
    return arrays


@fuzz(NPZ_EXAMPLES)
@given(arrays=npz_arrays())
def test_npz_loader_raises_only_its_own_errors(tmp_path, arrays):
    path = tmp_path / "fuzz.npz"
    np.savez(path, **arrays)
    try:
        dataset = load_npz(path)
    except InfluenceLensError as exc:
        return outcome(exc)
    outcome(None)
    assert_valid(dataset)


@pytest.fixture(scope="module")
def valid_npz_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("npz") / "valid.npz"
    save_npz(make_dataset(), path)
    return path.read_bytes()


@fuzz(CORRUPT_NPZ_EXAMPLES)
@given(cut=mostly(st.just(0), st.integers(1, 10_000)), at=st.integers(0, 10_000),
       junk=st.binary(min_size=1, max_size=8))
def test_corrupted_npz_raises_only_its_own_errors(tmp_path, valid_npz_bytes, cut, at, junk):
    """A real archive, truncated and overwritten at random places."""
    data = valid_npz_bytes[: max(1, len(valid_npz_bytes) - cut % len(valid_npz_bytes))]
    at %= len(data)
    path = tmp_path / "corrupt.npz"
    path.write_bytes(data[:at] + junk + data[at + len(junk):])
    try:
        dataset = load_npz(path)
    except InfluenceLensError as exc:
        return outcome(exc)
    outcome(None)
    assert_valid(dataset)


DECISION_ROWS = st.tuples(
    mostly(st.integers(0, 17).map(str), st.sampled_from(["", "-1", "999", "1.5", "nan", "NA", "x"]) | TEXT),
    mostly(st.sampled_from(["drop", "relabel", "keep"]), st.sampled_from(["", "Drop", "nan"]) | TEXT),
    mostly(st.sampled_from(["", "0", "2", "class_1"]), st.sampled_from(["3", "-1", "nan", "class_9"]) | TEXT),
).map(list) | st.lists(TEXT, max_size=4)


@fuzz(DECISION_EXAMPLES)
@given(header=mostly(st.just("index,action,new_label"),
                     st.sampled_from(["index,action", "action,new_label,index", ""])),
       rows=st.lists(DECISION_ROWS, max_size=6), raw=mostly(st.just(b""), st.binary(max_size=40)))
def test_decisions_reader_raises_only_its_own_errors(tmp_path, header, rows, raw):
    dataset = make_dataset()
    buffer = io.StringIO()
    buffer.write(header + "\n")
    csv.writer(buffer).writerows(rows)
    path = tmp_path / "decisions.csv"
    path.write_bytes(buffer.getvalue().encode("utf-8") + raw)
    try:
        frame = read_decisions(str(path), dataset)
    except InfluenceLensError as exc:
        return outcome(exc)
    outcome(None)
    assert isinstance(frame, pd.DataFrame)
    assert set(frame["index"]) <= set(dataset.index.tolist())
    assert set(frame["action"]) <= {"drop", "relabel", "keep"}
    relabels = frame["new_label"][frame["action"] == "relabel"]
    assert ((relabels >= 0) & (relabels < dataset.num_classes)).all()
