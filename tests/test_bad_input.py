"""The bad-input catalogue: every row is a mistake users make, with the one clear line it must give.

Each row builds its bad input in a fresh folder and is tried two ways: through the CLI (exit
status 2, the message as the last stderr line, no traceback) and, where the engine has an entry
point for it, through the engine API (an ``InfluenceLensError`` with the same message). Both must
leave the folder exactly as it was: no output file, no input changed. A handful of rows also run
as a real subprocess, and the cases where the tool should recover rather than refuse follow the
table.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import unicodedata
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    last_json_line,
    make_dataset,
    run_cli,
    save_image,
    snapshot,
    write_blank_png,
    write_image_folder,
    write_manifest,
)
from PIL import Image

from engine.cli import main
from engine.config import MAX_EPOCHS, MAX_SEED, TrainConfig
from engine.data import conform, load_dataset, save_npz
from engine.device import resolve_device
from engine.errors import DataError, InfluenceLensError
from engine.launch import streamlit_command
from engine.pipeline import carve_validation, read_decisions, retrain_comparison, score_methods, with_injected_noise
from engine.runs import RunSettings, load_run_data
from engine.safe_files import check_folder, check_output
from engine.scorers import make_scorer
from engine.start import backbone_size
from engine.training import train
from engine.workspace import SCHEMA_VERSION, SUFFIX, Workspace, workspace_name

FAST = TrainConfig(epochs=2, device="cpu")


# --- builders: each writes files under ``root`` -------------------------------------------------

def good_npz(root: Path, name: str = "train.npz", **kwargs) -> Path:
    save_npz(make_dataset(**kwargs), root / name)
    return root / name


def raw_npz(root: Path, name: str = "bad.npz", **arrays) -> Path:
    np.savez(root / name, **arrays)
    return root / name


def good_folder(root: Path, name: str = "folder") -> Path:
    return write_image_folder(make_dataset(per_class=3), root / name)


def folder_with(root: Path, odd_name: str, odd_bytes: bytes | None = None) -> Path:
    """A good two-class folder plus one extra file in class_0 (raw bytes)."""
    folder = good_folder(root)
    (folder / "class_0" / odd_name).write_bytes(odd_bytes or b"")
    return folder


def folder_with_empty_class(root: Path, name: str) -> Path:
    folder = good_folder(root)
    (folder / name).mkdir()
    (folder / name / "notes.txt").write_text("no images here")
    return folder


def text_only_folder(folder: Path) -> Path:
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
        (folder / name / "x.png").write_text("not an image")
    return folder


def truncated_jpeg(root: Path) -> Path:
    folder = good_folder(root)
    save_image(np.full((8, 8), 99, dtype=np.uint8), folder / "class_1" / "cut.jpg")
    data = (folder / "class_1" / "cut.jpg").read_bytes()
    (folder / "class_1" / "cut.jpg").write_bytes(data[: len(data) // 2])
    return folder


def manifest(root: Path, lines: list[str] | bytes, images: int = 4) -> Path:
    """``images`` small PNGs img0.png.. beside a CSV with the given lines (or raw bytes)."""
    for i in range(images):
        save_image(np.full((6, 6), 40 * i, dtype=np.uint8), root / f"img{i}.png")
    path = root / "m.csv"
    if isinstance(lines, bytes):
        path.write_bytes(lines)
    else:
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def workspace_file(root: Path) -> Path:
    """Where ``score train.npz --workspace ws`` keeps the workspace of ``train.npz``."""
    return root / "ws" / f"{workspace_name(RunSettings(data=str(root / 'train.npz')).data_key())}{SUFFIX}"


def workspace_with(root: Path, content: bytes | None = None, *, schema_version: int | None = None) -> Path:
    """``train.npz`` and, in ``ws/``, its workspace: raw ``content``, or a real one at ``schema_version``."""
    good_npz(root)
    path = workspace_file(root)
    if content is not None:
        path.parent.mkdir()
        path.write_bytes(content)
    else:
        Workspace(path).decide([1], "drop")
        with sqlite3.connect(path) as con:
            con.execute("INSERT INTO schema_version VALUES (?)", (schema_version,))
        con.close()
    return path


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def linked(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


def npz_declaring(root: Path, shape: tuple[int, ...]) -> Path:
    """A few-hundred-byte .npz whose images header declares ``shape`` (uint8): a decompression bomb's
    effect without the bomb (nothing but the header is stored)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    labels = io.BytesIO()
    np.save(labels, TWO_CLASSES)
    with zipfile.ZipFile(root / "bomb.npz", "w") as archive:
        archive.writestr("images.npy", header.getvalue())
        archive.writestr("labels.npy", labels.getvalue())
    return root / "bomb.npz"


def unicode_twin_folders(root: Path) -> Path:
    """Class folders 'café' written precomposed (NFC) and decomposed (NFD)."""
    folder = good_folder(root)
    for name in (unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")):
        write_image_folder(make_dataset(classes=2, per_class=2), root / "tmp")
        (root / "tmp" / "class_0").rename(folder / name)
        shutil.rmtree(root / "tmp")
    return folder


def folder_linking_out(root: Path) -> Path:
    """A good folder whose class_0 holds a link to an image outside it."""
    folder = good_folder(root)
    save_image(np.full((8, 8), 5, dtype=np.uint8), root / "secret.png")
    linked(folder / "class_0" / "elsewhere.png", root / "secret.png")
    return folder


class _Flat(torch.nn.Module):
    """A TorchScript backbone: flattened pixels as features, with the attributes the tool reads."""

    def __init__(self, mean: list[float] | None = None, image_size: float | None = None, fail: bool = False):
        super().__init__()
        if mean is not None:
            self.mean = mean
        if image_size is not None:
            self.image_size = image_size
        self.fail = fail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("this backbone always fails")
        return x.flatten(1)


def backbone_file(root: Path, module: torch.nn.Module, name: str = "bb.pt") -> Path:
    """``train.npz`` (grayscale 8×8) and a TorchScript ``module`` saved beside it."""
    good_npz(root)
    torch.jit.save(torch.jit.script(module), root / name)
    return root / name


def with_backbone(name: str = "bb.pt") -> Callable[[Path], object]:
    return lambda root: score_methods(load_dataset(root / "train.npz"), ["loss"],
                                      config=TrainConfig(epochs=2, device="cpu", backbone=str(root / name)))


def size_of_backbone(name: str = "bb.pt") -> Callable[[Path], object]:
    return lambda root: backbone_size(TrainConfig(backbone=str(root / name)))


def embeddings_file(root: Path, rows: np.ndarray | None = None, name: str = "emb.npy", **npz_kwargs) -> Path:
    """``train.npz`` (18 rows) and embeddings beside it: ``rows`` as an .npy, or an .npz archive."""
    good_npz(root, **npz_kwargs)
    if name.endswith(".npz"):
        np.savez(root / name, features=np.zeros((18, 4), np.float32))
    else:
        np.save(root / name, np.random.default_rng(0).normal(size=(18, 4)).astype(np.float32) if rows is None
                else rows)
    return root / name


def with_embeddings(name: str, train_name: str = "train.npz") -> Callable[[Path], object]:
    return lambda root: load_run_data(RunSettings(data=str(root / train_name), embeddings=str(root / name),
                                                  device="cpu"))


def numbered_classes_npz(root: Path) -> Path:
    """``train.npz`` whose classes are named 0, 1, 10, 2 (the sorted folder names of classes 0, 1, 2, 10)."""
    save_npz(replace(make_dataset(classes=4, per_class=4), class_names=("0", "1", "10", "2")), root / "train.npz")
    return root / "train.npz"


def folder_with_unreadable_classes(root: Path) -> Path:
    """A three-class folder where every file of class_1 and class_2 is unreadable: one class is left."""
    folder = good_folder(root)
    for name in ("class_1", "class_2"):
        for image in (folder / name).iterdir():
            image.write_text("not an image")
    return folder


def decisions(root: Path, lines: list[str]) -> Path:
    path = root / "decisions.csv"
    path.write_text("\n".join(["index,action,new_label", *lines]) + "\n", encoding="utf-8")
    return path


# --- the table --------------------------------------------------------------------------------

def score(target: str, *extra: str, method: str = "loss") -> list[str]:
    return ["score", target, "--method", method, "--epochs", "2", "--device", "cpu", "--out", "out.csv", *extra]


def score_to(target: str, out: str, *extra: str) -> list[str]:
    return [*score(target)[:-1], out, *extra]


def writing(target: str, out: str, *inputs: str, force: bool = False) -> Callable[[Path], object]:
    """The output guard every written file passes, as the engine API."""
    return lambda root: check_output(root / out, [root / i for i in (target, *inputs)], force=force)


def retrain(decisions_csv: str, *extra: str, test: str = "train.npz") -> list[str]:
    return ["retrain", "train.npz", "--decisions", decisions_csv, "--test", test, "--epochs", "2",
            "--device", "cpu", *extra]


def loading(name: str) -> Callable[[Path], object]:
    return lambda root: load_dataset(root / name)


def loading_skipping(name: str) -> Callable[[Path], object]:
    return lambda root: load_dataset(root / name, skip_unreadable=True)


def scoring(train_name: str, method: str = "loss", validation: str | None = None,
            config: TrainConfig = FAST) -> Callable[[Path], object]:
    return lambda root: score_methods(load_dataset(root / train_name), [method], config=config,
                                      validation=None if validation is None else load_dataset(root / validation))


def reading_decisions(name: str) -> Callable[[Path], object]:
    return lambda root: read_decisions(str(root / name), load_dataset(root / "train.npz"))


def retraining(name: str, test: str) -> Callable[[Path], object]:
    def run(root: Path) -> object:
        train_set = load_dataset(root / "train.npz")
        return retrain_comparison(train_set, read_decisions(str(root / name), train_set),
                                  load_dataset(root / test), config=FAST)
    return run


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], object]  # writes the bad input under the folder it is given
    args: list[str]  # the CLI arguments, relative to that folder
    message: str  # a regular expression the error line must contain
    api: Callable[[Path], object] | None  # the same mistake through the engine API, or None (CLI only)
    marks: tuple = ()


def npz_case(name: str, message: str, **arrays) -> Case:
    return Case(name, lambda root: raw_npz(root, **arrays), score("bad.npz"), message, loading("bad.npz"))


def csv_case(name: str, lines: list[str] | bytes, message: str) -> Case:
    return Case(name, lambda root: manifest(root, lines), score("m.csv"), message, loading("m.csv"))


IMAGES = np.zeros((4, 5, 5), dtype=np.uint8)
TWO_CLASSES = np.array([0, 1, 0, 1])

CASES = [
    # paths and folders
    Case("missing-path", lambda root: None, score("nope.npz"), r"nope\.npz: no such file or folder",
         loading("nope.npz")),
    Case("unsupported-file", lambda root: (root / "data.txt").write_text("1,2\n"), score("data.txt"),
         r"data\.txt: unsupported data file", loading("data.txt")),
    Case("empty-folder", lambda root: (root / "empty").mkdir(), score("empty"), r"empty: no class sub-folders",
         loading("empty")),
    Case("one-class-folder", lambda root: write_image_folder(make_dataset().subset(np.arange(6)), root / "one"),
         score("one"),
         r"only one class folder \(class_0\)", loading("one")),
    Case("class-folder-without-images", lambda root: folder_with_empty_class(root, "class_9"),
         score("folder"), r"class_9: class folder has no images", loading("folder")),
    Case("truncated-jpeg", truncated_jpeg, score("folder"), r"cut\.jpg: unreadable image", loading("folder")),
    Case("png-that-is-text", lambda root: folder_with(root, "text.png", b"this is not a PNG\n"), score("folder"),
         r"text\.png: unreadable image", loading("folder")),
    Case("zero-byte-file", lambda root: folder_with(root, "empty.png"), score("folder"),
         r"empty\.png: unreadable image", loading("folder")),
    Case("image-20000x20000", lambda root: [good_folder(root),
                                            write_blank_png(root / "folder/class_0/huge.png", 20000, 20000)],
         score("folder"), r"huge\.png: image is larger than the 16777216 pixels", loading("folder")),
    Case("image-10000x10000", lambda root: [good_folder(root),
                                            write_blank_png(root / "folder/class_0/big.png", 10000, 10000)],
         score("folder"), r"big\.png: image is 10000×10000, larger than", loading("folder")),
    Case("nothing-readable-even-skipping", lambda root: text_only_folder(root / "f"),
         score("f", "--skip-unreadable"), r"f: no readable images", loading_skipping("f")),
    Case("tiny-1x1-images", lambda root: raw_npz(root, images=np.zeros((4, 1, 1), np.uint8), labels=TWO_CLASSES),
         score("bad.npz"), r"1×1.*too small", scoring("bad.npz")),
    # CSV manifests
    csv_case("csv-missing-column", ["file,label", "img0.png,a"], r"m\.csv: missing column\(s\) path"),
    csv_case("csv-empty-file", b"", r"m\.csv: missing column\(s\) path, label"),
    csv_case("csv-zero-rows", ["path,label"], r"m\.csv: the manifest has zero rows"),
    csv_case("csv-blank-label", ["path,label", "img0.png,a", "img1.png, "], r"m\.csv, line 3: blank label"),
    csv_case("csv-duplicate-path", ["path,label", "img0.png,a", "img1.png,b", "./img0.png,b"],
             r"line 4: duplicate path './img0.png' \(first on line 2\)"),
    csv_case("csv-path-escaping-folder", ["path,label", "img0.png,a", "../../etc/passwd,b"],
             r"line 3: path '\.\./\.\./etc/passwd' points outside the manifest's folder"),
    csv_case("csv-absolute-path", ["path,label", "img0.png,a", "/etc/passwd,b"], r"line 3: .* points outside"),
    csv_case("csv-image-not-found", ["path,label", "img0.png,a", "missing.png,b"],
             r"line 3: image not found: missing\.png"),
    csv_case("csv-path-under-a-file", ["path,label", "img0.png,a", "img1.png/x.png,b"],
             r"line 3: image not found: img1\.png/x\.png"),
    Case("csv-symlink-loop", lambda root: [manifest(root, ["path,label", "img0.png,a", "loop.png,b"]),
                                           linked(root / "loop.png", root / "loop2.png"),
                                           linked(root / "loop2.png", root / "loop.png")],
         score("m.csv"), r"line 3: unusable path 'loop\.png' \(Symlink loop", loading("m.csv")),
    csv_case("csv-not-utf8", b"path,label\nimg0.png,caf\xe9\nimg1.png,b\n", r"m\.csv: not UTF-8 text \(byte 23\)"),
    csv_case("csv-nul-byte", b"path,label\nimg0.png,a\x00\nimg1.png,b\n", r"m\.csv: contains NUL bytes"),
    csv_case("csv-negative-label", ["path,label", "img0.png,0", "img1.png,-1"], r"m\.csv: negative label -1"),
    csv_case("csv-huge-integer-label", ["path,label", "img0.png,0", "img1.png,99999999999"],
             r"m\.csv: label 99999999999 .*at most \d+ classes"),
    csv_case("csv-single-class", ["path,label", "img0.png,cat", "img1.png,cat"], r"at least 2 classes, found 1"),
    # .npz archives
    npz_case("npz-without-labels", r"bad\.npz: missing array 'labels' \(found: images\)", images=IMAGES),
    npz_case("npz-labels-out-of-range", r"label 5 is out of range for 2 classes", images=IMAGES,
             labels=np.array([0, 1, 5, 1]), class_names=np.array(["a", "b"])),
    npz_case("npz-length-mismatch", r"bad\.npz: 4 images but 3 labels", images=IMAGES, labels=np.array([0, 1, 0])),
    npz_case("npz-float-images-out-of-range", r"float images must lie in \[0, 1\] or \[0, 255\]",
             images=np.full((4, 5, 5), 300.0), labels=TWO_CLASSES),
    npz_case("npz-nan-images", r"images contain NaN", images=np.full((4, 5, 5), np.nan), labels=TWO_CLASSES),
    npz_case("npz-float-labels", r"labels must be a 1-D integer array", images=IMAGES, labels=TWO_CLASSES + 0.5),
    npz_case("npz-flat-images", r"images must be N×H×W", images=np.zeros((4, 25), np.uint8), labels=TWO_CLASSES),
    npz_case("npz-scalar-images", r"images must be N×H×W", images=np.uint8(3), labels=TWO_CLASSES),
    npz_case("npz-zero-samples", r"bad\.npz: the dataset has zero samples", images=np.zeros((0, 5, 5), np.uint8),
             labels=np.zeros(0, np.int64)),
    npz_case("npz-single-class", r"at least 2 classes, found 1", images=IMAGES, labels=np.zeros(4, np.int64)),
    npz_case("npz-huge-label", r"label 1000000000000 .*at most \d+ classes", images=IMAGES,
             labels=np.array([0, 1, 0, 10**12])),
    npz_case("npz-text-index", r"bad\.npz: index must be 1-D integers", images=IMAGES, labels=TWO_CLASSES,
             index=np.array(["a", "b", "c", "d"])),
    npz_case("npz-duplicate-class-names", r"class names .*'a'.* more than once", images=IMAGES, labels=TWO_CLASSES,
             class_names=np.array(["a", "a"])),
    Case("npz-not-a-zip", lambda root: (root / "bad.npz").write_text("hello"), score("bad.npz"),
         r"bad\.npz: not a \.npz archive", loading("bad.npz")),
    Case("npz-one-sample", lambda root: raw_npz(root, images=IMAGES[:1], labels=np.array([1]),
                                                class_names=np.array(["a", "b"])),
         score("bad.npz"), r"at least 2 training samples", scoring("bad.npz")),
    # training and scoring
    Case("validation-classes-differ", lambda root: [good_npz(root), good_npz(root, "val.npz", classes=4)],
         score("train.npz", "--val", "val.npz"), r"val\.npz: the validation classes .* differ from the training",
         scoring("train.npz", validation="val.npz")),
    Case("one-sample-per-class-for-cleanlab", lambda root: good_npz(root, per_class=1),
         score("train.npz", method="cleanlab"), r"every class has a single sample; cleanlab's cross-validation needs",
         scoring("train.npz", method="cleanlab")),
    Case("carved-validation-too-small", lambda root: good_npz(root, per_class=2),
         score("train.npz", "--val-from-train", "0.2"), r"train\.npz: cannot split 6 samples into stratified parts",
         lambda root: carve_validation(load_dataset(root / "train.npz"), 0.2)),
    Case("diverging-learning-rate", good_npz, score("train.npz", "--lr", "1e12", "--epochs", "3"),
         r"training loss became \S+ in epoch \d even at learning rate 1e\+10 \(tried 1e\+12, 1e\+11, 1e\+10\); "
         r"lower the learning rate",
         scoring("train.npz", config=TrainConfig(epochs=3, learning_rate=1e12, device="cpu"))),
    Case("diverging-in-the-last-step", good_npz, score("train.npz", "--lr", "1e12", "--epochs", "1"),
         r"the model's outputs are NaN or infinite \(training diverged\); lower the learning rate",
         scoring("train.npz", config=TrainConfig(epochs=1, learning_rate=1e12, device="cpu"))),
    Case("unknown-method", good_npz, score("train.npz", method="magic"),
         r"unknown method 'magic'; valid choices: .*loss", lambda root: make_scorer("magic")),
    Case("unknown-device", good_npz, score("train.npz", "--device", "tpu"),
         r"unknown device 'tpu'; valid choices: auto, cpu, cuda", lambda root: resolve_device("tpu")),
    Case("cuda-without-gpu", good_npz, score("train.npz", "--device", "cuda"),
         r"--device cuda was asked for, but no CUDA GPU", lambda root: resolve_device("cuda"),
         marks=(pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present"),)),
    Case("unknown-model", good_npz, score("train.npz", "--model", "vgg"), r"unknown model 'vgg'; valid choices",
         lambda root: train(load_dataset(root / "train.npz"), TrainConfig(model="vgg"))),
    Case("zero-epochs", good_npz, score("train.npz", "--epochs", "0"), r"epochs must be a positive integer, got 0",
         lambda root: train(load_dataset(root / "train.npz"), TrainConfig(epochs=0))),
    Case("negative-learning-rate", good_npz, score("train.npz", "--lr", "-1"),
         r"learning_rate must be a positive number, got -1",
         lambda root: TrainConfig(learning_rate=-1.0).validate()),
    Case("unknown-noise-kind", good_npz, score("train.npz", "--noise-rate", "0.2", "--noise-kind", "asym"),
         r"unknown noise kind 'asym'; valid choices: symmetric, pair",
         lambda root: with_injected_noise(load_dataset(root / "train.npz"), rate=0.2, kind="asym")),
    Case("noise-rate-out-of-range", good_npz, score("train.npz", "--noise-rate", "1.5"),
         r"noise rate must be in \[0, 1\), got 1\.5",
         lambda root: with_injected_noise(load_dataset(root / "train.npz"), rate=1.5)),
    Case("noise-rate-flips-nothing", good_npz, score("train.npz", "--noise-rate", "0.001"),
         r"--noise-rate 0\.001 flips 0 of 18 labels", None),
    Case("out-folder-missing", good_npz, [*score("train.npz")[:-1], "no/such/dir/out.csv"],
         r"the folder no/such/dir does not exist", None),
    Case("csv-label-not-in-training-classes",
         lambda root: [good_npz(root), write_manifest(make_dataset(classes=4, per_class=2), root / "val.csv")],
         score("train.npz", "--val", "val.csv"), r"val\.csv: the validation classes .*class_3.* differ from the",
         scoring("train.npz", validation="val.csv")),
    Case("unknown-sample-split", lambda root: None, score("sample:holdout"),
         r"unknown sample split 'holdout'; valid choices: train, val, test",
         lambda root: load_dataset("sample:holdout")),
    # review decisions for retraining
    Case("decisions-file-missing", good_npz, retrain("nope.csv"), r"nope\.csv: file not found",
         reading_decisions("nope.csv")),
    Case("decisions-unknown-index", lambda root: [good_npz(root), decisions(root, ["3,drop,", "999,drop,"])],
         retrain("decisions.csv"), r"index 999 is not in the training set", reading_decisions("decisions.csv")),
    Case("decisions-unknown-action", lambda root: [good_npz(root), decisions(root, ["3,delete,"])],
         retrain("decisions.csv"), r"unknown action\(s\) \['delete'\]; valid: drop, relabel, keep",
         reading_decisions("decisions.csv")),
    Case("decisions-bad-new-label", lambda root: [good_npz(root), decisions(root, ["3,relabel,zebra"])],
         retrain("decisions.csv"), r"new_label 'zebra' is not a class name or a label in 0\.\.2",
         reading_decisions("decisions.csv")),
    Case("decisions-missing-column",
         lambda root: [good_npz(root), (root / "d.csv").write_text("index,action\n1,drop\n")],
         retrain("d.csv"), r"d\.csv: missing column\(s\) new_label", reading_decisions("d.csv")),
    Case("decisions-duplicate-index", lambda root: [good_npz(root), decisions(root, ["3,drop,", "3,keep,"])],
         retrain("decisions.csv"), r"index 3 has two decisions", reading_decisions("decisions.csv")),
    Case("decisions-blank-index", lambda root: [good_npz(root), decisions(root, ["3,drop,", ",drop,"])],
         retrain("decisions.csv"), r"decisions\.csv: decision 2 has a blank index",
         reading_decisions("decisions.csv")),
    Case("decisions-text-index", lambda root: [good_npz(root), decisions(root, ["three,drop,"])],
         retrain("decisions.csv"), r"decisions\.csv: decision 1 has index 'three', not an integer",
         reading_decisions("decisions.csv")),
    Case("decisions-drop-everything",
         lambda root: [good_npz(root), decisions(root, [f"{i},drop," for i in range(18)])],
         retrain("decisions.csv"), r"the decisions drop all 18 training samples",
         retraining("decisions.csv", "train.npz")),
    Case("test-classes-differ", lambda root: [good_npz(root), good_npz(root, "test.npz", classes=2),
                                              decisions(root, ["3,drop,"])],
         retrain("decisions.csv", test="test.npz"), r"test\.npz: the test classes .* differ from the training",
         retraining("decisions.csv", "test.npz")),
    # the review workspace (score --workspace, the dashboard): refused, the file left as it is
    Case("workspace-newer-schema", lambda root: workspace_with(root, schema_version=SCHEMA_VERSION + 1),
         score("train.npz", "--workspace", "ws"),
         rf"workspace written by a newer influence-lens \(schema version {SCHEMA_VERSION + 1}, .*upgrade",
         lambda root: Workspace(workspace_file(root))),
    Case("workspace-not-sqlite", lambda root: workspace_with(root, b"index,action\n3,drop\n"),
         score("train.npz", "--workspace", "ws"), r"not a workspace \(not an SQLite database\); move the file away",
         lambda root: Workspace(workspace_file(root))),
    Case("workspace-damaged-sqlite", lambda root: workspace_with(root, b"SQLite format 3\x00" + b"\xff" * 2000),
         score("train.npz", "--workspace", "ws"), r"not a usable workspace database",
         lambda root: Workspace(workspace_file(root))),
    Case("workspace-is-a-folder", lambda root: [good_npz(root), workspace_file(root).mkdir(parents=True)],
         score("train.npz", "--workspace", "ws"), r"is a folder, not a workspace file",
         lambda root: Workspace(workspace_file(root))),
    # files the tool writes (issue 13): never an input or inside one, never a foreign file, never a FIFO
    Case("out-is-the-input-npz", good_npz, score_to("train.npz", "train.npz"),
         r"train\.npz: --out is, or lies inside, the input .*train\.npz; influence-lens never writes over its data",
         writing("train.npz", "train.npz")),
    Case("out-is-the-manifest", lambda root: manifest(root, ["path,label", "img0.png,a", "img1.png,b"]),
         score_to("m.csv", "m.csv"), r"m\.csv: --out is, or lies inside, the input .*m\.csv",
         writing("m.csv", "m.csv")),
    Case("out-is-an-image-of-the-manifest", lambda root: manifest(root, ["path,label", "img0.png,a", "img1.png,b"]),
         score_to("m.csv", "img1.png", "--force"), r"img1\.png: --out is, or lies inside, the input .*img1\.png",
         writing("m.csv", "img1.png", force=True)),
    Case("out-inside-the-image-folder", good_folder, score_to("folder", "folder/class_0/scores.csv"),
         r"scores\.csv: --out is, or lies inside, the input .*folder;", writing("folder", "folder/class_0/scores.csv")),
    Case("out-a-link-to-the-input", lambda root: [good_npz(root), linked(root / "link.csv", root / "train.npz")],
         score_to("train.npz", "link.csv", "--force"), r"link\.csv: --out is, or lies inside, the input .*train\.npz",
         writing("train.npz", "link.csv", force=True)),
    Case("out-in-a-linked-folder-of-the-input",
         lambda root: [good_folder(root), linked(root / "view", root / "folder")],
         score_to("folder", "view/scores.csv"), r"--out is, or lies inside, the input .*folder;",
         writing("folder", "view/scores.csv")),
    Case("out-a-file-not-written-by-the-tool",
         lambda root: [good_npz(root), (root / "notes.csv").write_text("mine\n")],
         score_to("train.npz", "notes.csv"),
         r"notes\.csv: exists and was not written by influence-lens \(or was changed since\); .*--force",
         writing("train.npz", "notes.csv")),
    Case("out-is-a-fifo", lambda root: [good_npz(root), fifo(root / "out.csv")], score("train.npz", "--force"),
         r"out\.csv: --out exists and is not a regular file", writing("train.npz", "out.csv", force=True)),
    Case("out-is-a-device", good_npz, score_to("train.npz", "/dev/null", "--force"),
         r"/dev/null: --out exists and is not a regular file", writing("train.npz", "/dev/null", force=True)),
    Case("workspace-folder-is-a-file", lambda root: [good_npz(root), (root / "ws").write_text("x")],
         score("train.npz", "--workspace", "ws"), r"ws: (--workspace|the workspace folder) is a file, not a folder",
         lambda root: Workspace.for_data("x", root / "ws")),
    Case("workspace-inside-the-image-folder", good_folder, score("folder", "--workspace", "folder/ws"),
         r"folder/ws: --workspace is, or lies inside, the input",
         lambda root: check_folder(root / "folder" / "ws", [root / "folder"])),
    # files of the wrong kind where a file is expected
    Case("input-is-a-fifo", lambda root: fifo(root / "data.npz"), score("data.npz"),
         r"data\.npz: not a regular file \(a FIFO", loading("data.npz")),
    Case("decisions-is-a-fifo", lambda root: [good_npz(root), fifo(root / "d.csv")], retrain("d.csv"),
         r"d\.csv: not a regular file \(a FIFO", reading_decisions("d.csv")),
    # numbers at the edges of their type
    Case("seed-negative", good_npz, score("train.npz", "--seed", "-1"),
         rf"seed must be an integer in 0\.\.{MAX_SEED}, got -1",
         lambda root: TrainConfig(seed=-1).validate()),
    Case("seed-beyond-64-bits", good_npz, score("train.npz", "--seed", str(2**64)),
         rf"seed must be an integer in 0\.\.{MAX_SEED}, got {2**64}", lambda root: TrainConfig(seed=2**64).validate()),
    Case("seed-negative-on-retrain", lambda root: [good_npz(root), decisions(root, ["3,drop,"])],
         retrain("decisions.csv", "--seed", "-5", "--noise-rate", "0.2"), r"seed must be an integer in .*got -5",
         None),
    Case("epochs-absurd", good_npz, score("train.npz", "--epochs", str(10**12)),
         rf"epochs must be at most {MAX_EPOCHS:,}, got {10**12:,}",
         lambda root: TrainConfig(epochs=10**12).validate()),
    Case("threads-zero", good_npz, score("train.npz", "--threads", "0"), r"threads must be a positive integer, got 0",
         lambda root: TrainConfig(threads=0).validate()),
    # resource bombs: sizes checked before anything is allocated
    Case("npz-decompression-bomb", lambda root: npz_declaring(root, (10**6, 1000, 1000)), score("bomb.npz"),
         r"bomb\.npz: its arrays take 931\.3 GiB once decompressed, more than the", loading("bomb.npz")),
    npz_case("npz-hundreds-of-thousands-of-classes", r"bad\.npz: 200,000 classes, more than the 5,000",
             images=IMAGES, labels=TWO_CLASSES, class_names=np.array([f"c{i}" for i in range(200_000)])),
    Case("decisions-file-too-large", lambda root: [good_npz(root), decisions(root, ["3,drop,"] * 4000)],
         retrain("decisions.csv"), r"decisions\.csv: 32,023 bytes, more than 19,456 for the decisions on 18 training",
         reading_decisions("decisions.csv")),
    # silent wrong results, now refused
    npz_case("npz-2d-class-names", r"class_names must be a 1-D array of names, got shape \(1, 2\)", images=IMAGES,
             labels=TWO_CLASSES, class_names=np.array([["a", "b"]])),
    csv_case("csv-integers-mixed-with-names", ["path,label", "img0.png,0", "img1.png,1", "img2.png,cat"],
             r"m\.csv: labels mix class numbers \('0'\) and class names \('cat'\)"),
    csv_case("csv-underscore-number-is-a-name", ["path,label", "img0.png,1_0", "img1.png,0"],
             r"labels mix class numbers \('0'\) and class names \('1_0'\)"),
    Case("folder-names-differing-in-unicode-normalisation", unicode_twin_folders, score("folder"),
         r"class folders 'cafe\\u0301' and 'caf\\xe9' differ only in their Unicode normalisation", loading("folder")),
    Case("folder-link-to-a-file-outside", folder_linking_out, score("folder"),
         r"class_0/elsewhere\.png is a link to a file outside the folder", loading("folder")),
    Case("val-and-val-from-train", good_npz, score("train.npz", "--val", "train.npz", "--val-from-train", "0.2"),
         r"--val and --val-from-train both give a validation set; use one of them", None),
    # issue 19: options that ran with a silently wrong value, or failed with a traceback or the wrong words
    Case("method-that-looks-like-a-path", good_npz,  # no --out: the default name is built from the method
         ["score", "train.npz", "--method", "../nope/x", "--epochs", "2", "--device", "cpu"],
         r"unknown method '\.\./nope/x'; valid choices: .*loss", lambda root: make_scorer("../nope/x")),
    Case("empty-train-path", lambda root: None, score(""), r"TRAIN is empty: give a path", None),
    Case("empty-val-path", good_npz, score("train.npz", "--val", ""), r"--val is empty: give a path", None),
    Case("dashboard-port-too-large", lambda root: None, ["dashboard", "--port", "70000"],
         r"--port must be a TCP port from 1 to 65535, got 70000",
         lambda root: streamlit_command(data="sample", port=70000, workspace=None, data_root=None, extra=[])),
    Case("dashboard-port-negative", lambda root: None, ["dashboard", "--port", "-1"],
         r"--port must be a TCP port from 1 to 65535, got -1",
         lambda root: streamlit_command(data="sample", port=-1, workspace=None, data_root=None, extra=[])),
    Case("noise-rate-negative", good_npz, score("train.npz", "--noise-rate", "-0.2"),
         r"noise rate must be in \[0, 1\), got -0\.2", lambda root: RunSettings(noise_rate=-0.2).validate()),
    Case("noise-rate-nan", good_npz, score("train.npz", "--noise-rate", "nan"),
         r"noise rate must be in \[0, 1\), got nan",
         lambda root: RunSettings(noise_rate=float("nan")).validate()),
    Case("noise-rate-negative-on-retrain", lambda root: [good_npz(root), decisions(root, ["3,drop,"])],
         retrain("decisions.csv", "--noise-rate", "-0.2"), r"noise rate must be in \[0, 1\), got -0\.2", None),
    Case("val-from-train-zero", good_npz, score("train.npz", "--val-from-train", "0"),
         r"--val-from-train must be a fraction in \(0, 0\.5\), got 0\.0", None),
    # issue 19: your own model files
    Case("backbone-forward-raises", lambda root: backbone_file(root, _Flat(fail=True)),
         score("train.npz", "--backbone", "bb.pt"),
         r"bb\.pt: the backbone failed on a batch of shape \(18, 1, 8, 8\) .*this backbone always fails",
         with_backbone()),
    Case("backbone-3-channel-conv-on-grayscale",
         lambda root: backbone_file(root, torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten())),
         score("train.npz", "--backbone", "bb.pt"), r"bb\.pt: the backbone failed on a batch of shape \(18, 1, 8, 8\)",
         with_backbone()),
    Case("backbone-mean-of-the-wrong-length", lambda root: backbone_file(root, _Flat(mean=[0.5, 0.5, 0.5, 0.5, 0.5])),
         score("train.npz", "--backbone", "bb.pt"),
         r"bb\.pt: the module's mean attribute is \[0\.5, .*the data has 1 channel\(s\), so it must hold 1",
         with_backbone()),
    Case("backbone-image-size-negative", lambda root: backbone_file(root, _Flat(image_size=-3)),
         score("train.npz", "--backbone", "bb.pt"), r"bb\.pt: the module's image_size attribute is -3; it must be",
         size_of_backbone()),
    Case("backbone-image-size-nan", lambda root: backbone_file(root, _Flat(image_size=float("nan"))),
         score("train.npz", "--backbone", "bb.pt"), r"bb\.pt: the module's image_size attribute is nan; it must be",
         size_of_backbone()),
    Case("backbone-image-size-huge", lambda root: backbone_file(root, _Flat(image_size=100000)),
         score("train.npz", "--backbone", "bb.pt"), r"image_size attribute is 100000; it must be a side length in "
         r"pixels from 2 to 4096", size_of_backbone()),
    Case("backbone-returns-zero-features",
         lambda root: backbone_file(root, torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 0))),
         score("train.npz", "--backbone", "bb.pt"), r"bb\.pt: the backbone returned \(18, 0\), 0 features per image",
         with_backbone()),
    Case("embeddings-an-npz-archive", lambda root: embeddings_file(root, name="emb.npz"),
         score("train.npz", "--embeddings", "emb.npz"), r"emb\.npz: an \.npz archive; --embeddings takes one",
         with_embeddings("emb.npz")),
    Case("embeddings-with-zero-columns", lambda root: embeddings_file(root, np.zeros((18, 0), np.float32)),
         score("train.npz", "--embeddings", "emb.npy"), r"emb\.npy: embeddings have 0 columns \(shape \(18, 0\)\)",
         with_embeddings("emb.npy")),
    Case("embeddings-with-a-negative-index",
         lambda root: [embeddings_file(root), raw_npz(root, "neg.npz", images=make_dataset().images,
                                                      labels=make_dataset().labels, index=np.arange(18) - 1)],
         score("neg.npz", "--embeddings", "emb.npy"), r"neg\.npz: index -1 is negative; with --embeddings",
         with_embeddings("emb.npy", "neg.npz")),
    Case("weights-is-a-folder", lambda root: [good_npz(root), (root / "w").mkdir()],
         score("train.npz", "--weights", "w"), r"w: --weights is a folder; give the file itself",
         lambda root: TrainConfig(weights=str(root / "w")).validate()),
    Case("weights-is-a-fifo", lambda root: [good_npz(root), fifo(root / "w.pt")],
         score("train.npz", "--weights", "w.pt"), r"w\.pt: --weights is not a regular file \(a FIFO",
         lambda root: TrainConfig(weights=str(root / "w.pt")).validate()),
    # issue 19: silently wrong results, now refused
    Case("npz-one-populated-class", lambda root: raw_npz(root, images=IMAGES, labels=np.zeros(4, np.int64),
                                                         class_names=np.array(["a", "b", "c"])),
         score("bad.npz"), r"bad\.npz: only class 'a' has samples \(4\); 'b', 'c' have none",
         lambda root: load_run_data(RunSettings(data=str(root / "bad.npz")))),
    Case("every-file-of-two-classes-unreadable-skipping", folder_with_unreadable_classes,
         score("folder", "--skip-unreadable"), r"folder: only class 'class_0' has samples \(3\)",
         lambda root: load_run_data(RunSettings(data=str(root / "folder")))),
    Case("decisions-underscore-index", lambda root: [good_npz(root), decisions(root, ["1_0,drop,"])],
         retrain("decisions.csv"), r"decisions\.csv: decision 1 has index '1_0', not an integer",
         reading_decisions("decisions.csv")),
    Case("decisions-label-both-a-name-and-a-number", lambda root: [numbered_classes_npz(root),
                                                                    decisions(root, ["3,relabel,2"])],
         retrain("decisions.csv"), r"new_label '2' is ambiguous: class '2' is label 3, and label 2 is class '10'",
         reading_decisions("decisions.csv")),
    Case("decisions-unterminated-quote", lambda root: [good_npz(root), decisions(root, ["3,drop,", '"4,drop,'])],
         retrain("decisions.csv"), r"decisions\.csv, line 3: a quote \(\"\) opened there is never closed",
         reading_decisions("decisions.csv")),
    csv_case("csv-two-label-columns", ["path,label,label", "img0.png,a,b", "img1.png,b,a"],
             r"m\.csv: column 'label' appears more than once in the header"),
    csv_case("csv-unterminated-quote", ["path,label", "img0.png,a", '"img1.png,b', "img2.png,a"],
             r"m\.csv, line 3: a quote \(\"\) opened there is never closed"),
    npz_case("npz-uint64-label-at-the-top-of-its-type", r"bad\.npz: label 18446744073709551615 is too large",
             images=IMAGES, labels=np.array([0, 1, 0, 2**64 - 1], np.uint64), class_names=np.array(["a", "b"])),
    Case("weights-with-nan", lambda root: [good_npz(root), torch.save({"conv.weight": torch.full((2,), np.nan)},
                                                                      root / "w.pt")],
         score("train.npz", "--weights", "w.pt", "--model", "small-cnn", "--freeze", "none"),
         r"w\.pt: tensor 'conv\.weight' contains NaN or infinite values", None),
]


def params(cases: list[Case]) -> list:
    return [pytest.param(case, id=case.name, marks=case.marks) for case in cases]


@pytest.mark.parametrize("case", params(CASES))
def test_catalogue_cli(case: Case, tmp_path, monkeypatch, capsys):
    """``main(argv)`` exactly as the console script calls it: status 2, one clear last line."""
    case.build(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    status = main(case.args)
    err = capsys.readouterr().err
    last_line = err.strip().splitlines()[-1]
    assert status == 2
    assert last_line.startswith("influence-lens: error: ")
    assert re.search(case.message, last_line), last_line
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", params([case for case in CASES if case.api is not None]))
def test_catalogue_api(case: Case, tmp_path):
    """The engine raises the tool's own error type with the same message, and writes nothing."""
    case.build(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(InfluenceLensError, match=case.message):
        case.api(tmp_path)
    assert snapshot(tmp_path) == before


SUBPROCESS_ROWS = ("missing-path", "truncated-jpeg", "csv-path-escaping-folder", "npz-labels-out-of-range",
                   "unknown-method", "diverging-learning-rate", "decisions-unknown-action")


@pytest.mark.parametrize("case", params([case for case in CASES if case.name in SUBPROCESS_ROWS]))
def test_catalogue_as_a_real_process(case: Case, tmp_path):
    """A sample of the rows through ``python -m engine.cli``: exactly one stderr line, status 2."""
    case.build(tmp_path)
    before = snapshot(tmp_path)
    result = run_cli(*case.args, cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("influence-lens")]
    assert len(lines) == 1 and re.search(case.message, lines[0]), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert snapshot(tmp_path) == before


def test_skip_unreadable_recovers_and_reports_which(tmp_path):
    """Corrupt files are left out and named on stderr; odd colour modes are converted, not refused."""
    folder = truncated_jpeg(tmp_path)  # 3 × 3 good grayscale PNGs, class_1/cut.jpg cut in half
    (folder / "class_0" / "text.png").write_text("not an image")
    (folder / "class_0" / "empty.png").write_bytes(b"")
    Image.fromarray(np.full((8, 8, 4), 200, dtype=np.uint8)).save(folder / "class_0" / "rgba.png")
    Image.fromarray(np.full((8, 8, 3), 90, dtype=np.uint8)).convert("P").save(folder / "class_1" / "palette.png")
    result = run_cli(*score("folder", "--skip-unreadable"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "skipped 3 unreadable image(s) in folder" in result.stderr
    for name in ("cut.jpg", "text.png", "empty.png"):
        assert re.search(rf"skipped .*{name}: unreadable image", result.stderr)
    assert last_json_line(result.stdout)["n"] == 11
    table = np.loadtxt(tmp_path / "out.csv", delimiter=",", skiprows=1, usecols=(0, 2))  # index, score (1: path)
    assert len(table) == 11
    loaded = load_dataset(folder, skip_unreadable=True)
    assert loaded.images.shape == (11, 8, 8, 3)  # grayscale promoted to RGB beside the RGBA / palette files
    assert sorted(table[:, 0].astype(int)) == sorted(loaded.index)
    assert not {"class_0/empty.png", "class_0/text.png", "class_1/cut.jpg"} & set(loaded.paths)


def test_images_of_other_sizes_are_resized_and_said(tmp_path):
    """A folder mixing sizes is brought to its most common size; a validation set of another size (or
    colour) to the training images' shape: the tool recovers and says so on stderr."""
    folder = good_folder(tmp_path)  # 3 classes × 3 grayscale 8×8 PNGs
    save_image(np.full((9, 9), 77, np.uint8), folder / "class_1" / "z.png")
    Image.fromarray(np.full((16, 12, 3), 200, dtype=np.uint8)).save(folder / "class_0" / "wide.png")
    loaded = load_dataset(folder)
    assert loaded.images.shape == (11, 8, 8, 3)  # the RGB file promotes the set to RGB
    assert loaded.notes == (f"{folder}: resized 2 of 11 images to 8×8, the most common of 3 sizes",)
    z = loaded.images[list(loaded.paths).index("class_1/z.png")]
    assert (z == 77).all()  # a flat image stays flat: resized, not cropped or padded
    result = run_cli(*score("folder"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "resized 2 of 11 images to 8×8" in result.stderr and last_json_line(result.stdout)["n"] == 11

    good_npz(tmp_path)
    save_npz(make_dataset(per_class=3, shape=(9, 9, 3)), tmp_path / "val.npz")  # against 8×8 grayscale training
    result = run_cli(*score("train.npz", "--val", "val.npz"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "validation images are 9×9 RGB, converted to the training images' 8×8 grayscale" in result.stderr
    validation = conform(load_dataset(tmp_path / "val.npz"), load_dataset(tmp_path / "train.npz").image_shape,
                         "validation")
    assert validation.image_shape == (8, 8) and len(validation.notes) == 1
    with pytest.raises(DataError, match=r"validation images are \(9, 9, 3\), training images are \(8, 8\)"):
        score_methods(load_dataset(tmp_path / "train.npz"), ["loss"], validation=load_dataset(tmp_path / "val.npz"))


def test_a_diverging_learning_rate_is_lowered_and_said(tmp_path):
    good_npz(tmp_path)
    result = run_cli(*score("train.npz", "--lr", "30", "--epochs", "3"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    warning = "the training loss became .* at learning rate 30; started again at 3"
    assert re.search(f"warning: {warning}", result.stderr)
    (restart,) = [w for w in last_json_line(result.stdout)["warnings"] if w["code"] == "training-restarted"]
    assert re.fullmatch(warning, restart["message"])


MEMORY_PROBE = """
import resource, sys
from PIL import Image, PngImagePlugin
from engine.data import load_image_folder
from engine.errors import DataError
vm = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 64 * 2**20, resource.RLIM_INFINITY))
try:
    load_image_folder(sys.argv[1])
except DataError as exc:
    print("refused:", exc)
try:
    Image.open(sys.argv[2]).load()
except MemoryError:
    print("decoding it: MemoryError")
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for the memory limit")
def test_huge_image_is_refused_before_it_is_decoded(tmp_path):
    """Under an address-space limit 64 MiB above the loaded interpreter, the 100-megapixel image
    is refused with our message, while decoding that same file runs out of memory."""
    folder = good_folder(tmp_path)
    big = write_blank_png(folder / "class_0" / "big.png", 10000, 10000)
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(folder), str(big)], capture_output=True,
                            text=True, timeout=120)
    assert "refused: " in result.stdout and "10000×10000, larger than" in result.stdout, result.stderr
    assert "decoding it: MemoryError" in result.stdout


# --- issue 13: the cases the tool now handles rather than refuses ---------------------------------

def test_a_score_table_the_tool_wrote_is_replaced_atomically(tmp_path, monkeypatch, capsys):
    """A second run over its own CSV replaces it (no --force needed); a disk that fills half-way through
    the write leaves the previous file whole, and no temporary file behind."""
    import pandas as pd

    good_npz(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(score("train.npz")) == 0
    first = (tmp_path / "out.csv").read_text()
    assert main(score("train.npz", "--seed", "1")) == 0
    second = (tmp_path / "out.csv").read_text()
    assert second != first

    def disk_full(frame, target, **kwargs):
        (open(target, "w") if isinstance(target, (str, Path)) else target).write("index,sco")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", disk_full)
    assert main(score("train.npz", "--seed", "2")) == 2
    assert capsys.readouterr().err.strip().endswith("out.csv: cannot write it (No space left on device)")
    assert (tmp_path / "out.csv").read_text() == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv", "train.npz"]


def test_force_replaces_a_foreign_file_but_never_an_input(tmp_path, monkeypatch, capsys):
    good_npz(tmp_path)
    (tmp_path / "notes.csv").write_text("mine\n")
    monkeypatch.chdir(tmp_path)
    assert main(score_to("train.npz", "notes.csv", "--force")) == 0
    assert (tmp_path / "notes.csv").read_text().startswith("index,score,rank,")
    before = snapshot(tmp_path)
    assert main(score_to("train.npz", "train.npz", "--force")) == 2
    assert "lies inside, the input" in capsys.readouterr().err and snapshot(tmp_path) == before


def test_a_run_estimated_beyond_the_limit_is_refused_unless_forced(tmp_path, monkeypatch, capsys):
    """The estimate comes from the first training steps; --force runs it anyway."""
    import engine.progress

    good_npz(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(engine.progress, "MAX_ESTIMATED_HOURS", 1e-9)
    assert main(score("train.npz", "--epochs", "8")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(r"error: training would take about [\d,]+ hours on this device \(8 steps at .* s each\), "
                     r"more than 1e-09; .*--force", err), err
    assert not (tmp_path / "out.csv").exists()
    assert main(score("train.npz", "--epochs", "8", "--force")) == 0
    capsys.readouterr()


def test_a_stage_that_cannot_be_saved_does_not_stop_the_run(tmp_path, monkeypatch, caplog):
    """torch.save reports a full disk as RuntimeError: the stage is logged as unsaved, the value returned."""
    from engine.stages import PLAIN, StageStore

    def disk_full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", disk_full)
    store = StageStore(tmp_path / "stages")
    assert store.fetch("train", "k", lambda: {"x": torch.ones(2)}, PLAIN)["x"].sum() == 2
    assert "could not save this stage, the run goes on without it" in caplog.text
    assert list((tmp_path / "stages").iterdir()) == []  # no temporary left behind


def test_exif_orientation_is_applied(tmp_path):
    """A photo stored 8 wide × 4 high with EXIF orientation 6 (rotate 90°) is 4 wide × 8 high upright."""
    from engine.data import read_image

    image = Image.fromarray(np.tile(np.arange(8, dtype=np.uint8) * 30, (4, 1)))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "photo.jpg", exif=exif, quality=100)
    assert read_image(tmp_path / "photo.jpg").shape == (8, 4)


def test_manifest_header_with_spaces_and_labels_that_only_look_numeric(tmp_path):
    """"path, label" reads as path,label; "1_0" is a class name (int() would read it as 10); a label typed
    in two Unicode normalisations is one class."""
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    path = manifest(tmp_path, ["path, label", "img0.png, 1_0", f"img1.png,{nfc}", f"img2.png,{nfd}", "img3.png,1_0"])
    loaded = load_dataset(path)
    assert loaded.class_names == ("1_0", nfc)
    assert loaded.labels.tolist() == [0, 1, 1, 0]


def test_training_gives_the_same_weights_whatever_the_callers_thread_count():
    """Issue 12 bug 8: the dashboard's jobs run with one thread, the CLI with the machine's; training
    takes its thread count from the recipe, so both get the same weights and accuracies."""
    from engine.data import load_sample

    data = load_sample("train")
    weights = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            trained = train(data, TrainConfig(epochs=2, device="cpu"))
            assert torch.get_num_threads() == threads  # restored after training
            weights.append(torch.cat([v.flatten().double() for v in trained.model.state_dict().values()]))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(weights[0], weights[1])


# --- issue 19: the cases the tool now handles rather than failing with a traceback ---------------

@pytest.mark.parametrize("steps", range(1, 13))
def test_every_small_number_of_optimizer_steps_trains(steps):
    """The one-cycle warm-up of exactly one step (4 steps in all) was a ZeroDivisionError in PyTorch."""
    trained = train(make_dataset(), TrainConfig(epochs=steps, batch_size=64, device="cpu"))  # 18 rows: 1 step/epoch
    assert len(trained.history) == steps


def test_four_steps_through_the_cli_and_retrain(tmp_path, monkeypatch, capsys):
    good_npz(tmp_path)
    decisions(tmp_path, ["3,drop,"])
    monkeypatch.chdir(tmp_path)
    assert main(score("train.npz", "--epochs", "4")) == 0
    assert main(retrain("decisions.csv", "--epochs", "4")) == 0
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("workspace", [False, True])
def test_ctrl_c_during_score_says_how_to_resume(workspace, tmp_path, monkeypatch, capsys):
    import engine.cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    good_npz(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(engine.cli, "score_into" if workspace else "score_methods", interrupted)
    args = score("train.npz", *(["--workspace", "ws"] if workspace else []))
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and not (tmp_path / "out.csv").exists()
    last = err.strip().splitlines()[-1]
    assert last.startswith("influence-lens: interrupted; ")
    assert ("resume with the same command" if workspace else "resume with --workspace DIR") in last
    assert "score train.npz --method loss" in last


def test_ctrl_c_during_retrain_is_not_a_traceback(tmp_path, monkeypatch, capsys):
    import engine.cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    good_npz(tmp_path)
    decisions(tmp_path, ["3,drop,"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(engine.cli, "retrain_comparison", interrupted)
    assert main(retrain("decisions.csv")) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "interrupted; nothing was written; run it again: influence-lens retrain" in err


# --- issue 19: memory asked for before anything checked it --------------------------------------

@pytest.mark.parametrize(("build", "args", "message"), [
    (good_folder, score("folder", "--image-size", "4096"),
     r"training on 9 images of 4096×4096 needs about [\d,.]+ GiB of memory, more than the 16\.0 GiB available"),
    (lambda root: embeddings_file(root, np.zeros((18, 200_000), np.float32)),
     score("train.npz", "--embeddings", "emb.npy", method="if-last"),
     r"the head curvature of if-last on 200,000-column embeddings needs about [\d,.]+ GiB of memory"),
    (lambda root: [good_npz(root, per_class=400)], score("train.npz", "--image-size", "4096"),
     r"loading 1,200 images of train\.npz at --image-size 4096 needs about 18\.8 GiB of memory, more than the 16\.0"),
], ids=["image-size-4096-on-8x8-images", "if-last-on-200000-dim-embeddings", "image-size-4096-on-1200-images"])
def test_memory_is_estimated_and_refused_before_it_is_asked_for(build, args, message, tmp_path, monkeypatch, capsys):
    """On a machine with 16 GiB available (patched, so the test does not depend on this one)."""
    import engine.memory

    monkeypatch.setattr(engine.memory, "available_bytes", lambda: 16 * 2**30)
    build(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert re.search(message, last) and last.endswith("pass --force to try anyway"), last
    assert "Traceback" not in err and snapshot(tmp_path) == before


def test_force_tries_a_run_above_the_memory_estimate(tmp_path, monkeypatch, capsys):
    import engine.memory

    monkeypatch.setattr(engine.memory, "available_bytes", lambda: 2**20)  # 1 MiB: any training is above it
    good_npz(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(score("train.npz")) == 2
    assert "needs about" in capsys.readouterr().err
    assert main(score("train.npz", "--force")) == 0 and (tmp_path / "out.csv").exists()


def test_a_damaged_blob_in_the_workspace_is_named_not_a_traceback(tmp_path, monkeypatch, capsys):
    good_npz(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(score("train.npz", "--workspace", "ws")) == 0
    with sqlite3.connect(workspace_file(tmp_path)) as con:
        con.execute("UPDATE results SET scores = ?", (b"\x93NUMPY damaged",))
    con.close()
    capsys.readouterr()
    assert main(score("train.npz", "--workspace", "ws")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(r"\.sqlite: the stored results of run \w+ are damaged \(ValueError: .*move the file away",
                     err.strip().splitlines()[-1]), err


def test_a_float_tiff_named_png_decodes_to_its_values_not_black(tmp_path):
    from engine.data import read_image

    Image.fromarray(np.full((8, 8), 0.5, np.float32), mode="F").save(tmp_path / "x.png", format="TIFF")
    assert (read_image(tmp_path / "x.png") == 128).all()
    Image.fromarray(np.full((8, 8), 1e6, np.float32), mode="F").save(tmp_path / "y.png", format="TIFF")
    with pytest.raises(DataError, match=r"y\.png \(TIFF of mode F\): float images must lie in \[0, 1\] or "):
        read_image(tmp_path / "y.png")


def test_numbered_folder_classes_are_named_beside_their_labels(tmp_path, monkeypatch):
    """Folders 0, 1, 2, 10 sort as 0, 1, 10, 2: label 2 is the class "10". The CSV names each label, and
    the decisions export writes a name that reads back as that class."""
    import pandas as pd

    from engine.pipeline import decision_label

    write_image_folder(make_dataset(classes=4, per_class=3), tmp_path / "tmp")
    folder = tmp_path / "folder"
    folder.mkdir()
    for position, name in enumerate(("0", "1", "10", "2")):
        (tmp_path / "tmp" / f"class_{position}").rename(folder / name)
    monkeypatch.chdir(tmp_path)
    assert main(score("folder")) == 0
    table = pd.read_csv(tmp_path / "out.csv", dtype={"given_class": str})
    assert list(table.columns[:6]) == ["index", "path", "score", "rank", "given_label", "given_class"]
    in_ten = table[table["path"].str.startswith("10/")]
    assert len(in_ten) == 3 and (in_ten["given_label"] == 2).all() and (in_ten["given_class"] == "10").all()
    train_set = load_dataset(folder)
    for label in range(4):
        decisions(tmp_path, [f"0,relabel,{decision_label(train_set.class_names, label)}"])
        assert read_decisions(str(tmp_path / "decisions.csv"), train_set)["new_label"].tolist() == [label]


@pytest.mark.slow
def test_the_dashboard_checks_memory_before_a_run(tmp_path, monkeypatch):
    """The set-up page's Run: the same estimate, refused with the figures (no --force there)."""
    from conftest import REPO_ROOT
    from streamlit.testing.v1 import AppTest

    import engine.memory

    monkeypatch.setattr(engine.memory, "available_bytes", lambda: 16 * 2**30)
    good_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["app.py", "--workspace", str(tmp_path / "ws")])
    at = AppTest.from_file(str(REPO_ROOT / "dashboard" / "app.py"), default_timeout=120).run()
    at.text_input(key="setup_data").set_value(str(tmp_path / "folder")).run()
    at.multiselect(key="setup_methods").set_value(["loss"])
    at.number_input(key="setup_image_size").set_value(4096)
    at.button(key="run").click().run()
    errors = [e.value for e in at.error]
    assert any("needs about" in e and "16&#46;0 GiB available" in e for e in errors), errors
    assert not any("--force" in e for e in errors)


@pytest.mark.slow
def test_ctrl_c_in_a_real_process_during_training(tmp_path):
    """SIGINT while the CLI trains: status 130, "interrupted; resume with ...", no traceback, no output."""
    import signal
    import time

    from conftest import REPO_ROOT

    good_npz(tmp_path)
    process = subprocess.Popen([sys.executable, "-m", "engine.cli", *score("train.npz", "--epochs", "100000",
                                                                           "--workspace", "ws", "--force")],
                               cwd=tmp_path, stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                               # as from a terminal: a suite started in the background inherits SIGINT ignored
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen, deadline = b"", time.monotonic() + 120
    while b"training" not in seen and time.monotonic() < deadline and process.poll() is None:
        seen += os.read(process.stderr.fileno(), 4096)
    assert b"training" in seen, seen
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    err = (seen + err).decode()
    assert process.returncode == 130, err
    assert "Traceback" not in err and out == b"" and not (tmp_path / "out.csv").exists()
    assert "influence-lens: interrupted; resume with the same command (the stages saved in ws are reused)" in err
