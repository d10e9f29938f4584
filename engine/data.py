"""Datasets: loading (npz, image folder, CSV manifest, sample), validation, splits, noise.

A dataset is uint8 images (N×H×W or N×H×W×C), integer labels in [0, C), class names and a
stable per-sample index that survives subsetting, so scores always map back to the user's files.
Every loader validates at the door and raises :class:`DataError` naming the file and the problem.
"""

from __future__ import annotations

import csv
import io
import os
import re
import stat
import unicodedata
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

import sample_data
from engine.errors import DataError, OptionError
from engine.listings import Headers, cache_file, known
from engine.sources import ArraySource, FileSource, LazyImages, Names, is_lazy, machine_memory, memory_budget

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
NOISE_KINDS = ("symmetric", "pair")
# Refuse images larger than this many pixels before decoding them, so a 20k×20k file cannot
# exhaust memory (the classifier works on small images anyway).
MAX_IMAGE_PIXELS = 4096 * 4096
# Classes at most: the confusion counts (guidance) and cleanlab's confident joint are C×C arrays, and
# 5,000² float64 is 200 MB; a stray huge integer label must not make a billion class names either.
MAX_CLASSES = 5_000
# Decompressed arrays of one .npz at most, checked from the archive's headers before anything is
# allocated: a few kB of compressed zeros can inflate to more than the machine's memory.
MAX_NPZ_BYTES = 16 * 2**30
_INTEGER = re.compile(r"-?[0-9]+")  # what a manifest reads as an integer label (int() also takes "1_0", "١")


@dataclass(frozen=True)
class Dataset:
    """Images, labels, class names and a stable index per sample (see module docstring). ``images`` is
    an array, or a :class:`engine.sources.LazyImages` that decodes rows on access when the decoded
    set would not fit the memory budget.

    ``holds_features``: on the head-only path (:mod:`engine.frozen`) ``images`` holds a frozen
    backbone's N×D feature rows instead (float32, or a float16 memory map), and ``image_shape`` is
    ``(D,)``. The flag says so where the rows are made and is checked here, so code that treats
    features differently (the task, augmentation) asks the dataset instead of guessing from a shape;
    everything else (training, scorers) runs on those rows unchanged."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    index: np.ndarray = field(default=None)  # type: ignore[assignment]
    source: str = ""
    paths: tuple[str, ...] | None = None
    skipped: tuple[str, ...] = ()  # unreadable files left out at load (``skip_unreadable=True``)
    notes: tuple[str, ...] = ()  # what loading changed, e.g. images resized to one size
    holds_features: bool = False

    def __post_init__(self) -> None:
        if self.index is None:
            object.__setattr__(self, "index", np.arange(len(self.labels), dtype=np.int64))
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        _validate(self)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    @property
    def channels(self) -> int:
        return int(self.images.shape[3]) if self.images.ndim == 4 else 1

    def with_labels(self, labels: np.ndarray) -> Dataset:
        """A copy with other labels (same images, classes and index)."""
        return replace(self, labels=np.asarray(labels, dtype=np.int64))

    def subset(self, selection: np.ndarray) -> Dataset:
        """Rows chosen by a boolean mask or integer positions; the stable index is kept."""
        selection = np.asarray(selection)
        paths = None if self.paths is None else tuple(np.asarray(self.paths, dtype=object)[selection])
        images = self.images.take(selection) if is_lazy(self.images) else self.images[selection]
        return replace(self, images=images, labels=self.labels[selection],
                       index=self.index[selection], paths=paths)


def _validate(ds: Dataset) -> None:
    where = ds.source or "dataset"
    images, labels = ds.images, ds.labels
    array_like = isinstance(images, (np.ndarray, LazyImages))
    if ds.holds_features:
        if not array_like or images.ndim != 2 or images.dtype not in (np.float16, np.float32):
            raise DataError(f"{where}: feature rows must be an N×D float16 or float32 array, got "
                            f"{getattr(images, 'dtype', type(images))} of shape {getattr(images, 'shape', '?')}")
    elif not array_like or images.dtype != np.uint8:
        raise DataError(f"{where}: images must be a uint8 array, got {getattr(images, 'dtype', type(images))}")
    elif images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise DataError(f"{where}: images must be N×H×W or N×H×W×C with C in (1, 3), got shape {images.shape}")
    if not isinstance(labels, np.ndarray) or labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: labels must be a 1-D integer array")
    if len(images) != len(labels):
        raise DataError(f"{where}: {len(images)} images but {len(labels)} labels")
    if 0 in images.shape[1:]:
        raise DataError(f"{where}: images have an empty dimension, shape {images.shape}")
    index = ds.index
    if not isinstance(index, np.ndarray) or index.shape != labels.shape or not np.issubdtype(index.dtype, np.integer):
        raise DataError(f"{where}: index must be 1-D integers, one per sample")
    if len(labels) == 0:
        raise DataError(f"{where}: the dataset has zero samples")
    if len(ds.class_names) < 2:
        raise DataError(f"{where}: a classifier needs at least 2 classes, found {len(ds.class_names)}")
    if len(ds.class_names) > MAX_CLASSES:
        raise DataError(f"{where}: {len(ds.class_names):,} classes, more than the {MAX_CLASSES:,} this tool handles "
                        "(it builds classes × classes arrays)")
    if len(set(ds.class_names)) < len(ds.class_names):
        repeated = next(c for c in ds.class_names if ds.class_names.count(c) > 1)
        raise DataError(f"{where}: class names must be distinct, {repeated!r} appears more than once")
    if labels.min() < 0 or labels.max() >= len(ds.class_names):
        bad = labels[(labels < 0) | (labels >= len(ds.class_names))][0]
        raise DataError(f"{where}: label {bad} is out of range for {len(ds.class_names)} classes")
    index = np.asarray(ds.index)
    if not (np.diff(index) > 0).all() and len(np.unique(index)) != len(index):  # increasing: unique, in O(N)
        raise DataError(f"{where}: the sample index has duplicates")


def _as_uint8_images(images: np.ndarray, where: str) -> np.ndarray:
    """Accept float images in [0, 1] or [0, 255] by rescaling; refuse anything else."""
    if images.dtype == np.uint8:
        return images
    if np.issubdtype(images.dtype, np.integer):
        if images.size and (images.min() < 0 or images.max() > 255):
            raise DataError(f"{where}: integer images must lie in 0..255")
        return images.astype(np.uint8)
    if np.issubdtype(images.dtype, np.floating):
        if not np.isfinite(images).all():
            raise DataError(f"{where}: images contain NaN or infinite values")
        top = float(images.max()) if images.size else 0.0
        if images.size and images.min() < 0:
            raise DataError(f"{where}: float images must be non-negative (in [0, 1] or [0, 255])")
        if top <= 1.0:
            return np.round(images * 255).astype(np.uint8)
        if top <= 255.0:
            return np.round(images).astype(np.uint8)
        raise DataError(f"{where}: float images must lie in [0, 1] or [0, 255], max is {top}")
    raise DataError(f"{where}: images have unsupported dtype {images.dtype}")


def _squeeze_gray(images: np.ndarray) -> np.ndarray:
    return images[..., 0] if images.ndim == 4 and images.shape[3] == 1 else images


def load_npz(path: str | Path) -> Dataset:
    """An ``.npz`` with ``images``, integer ``labels`` and optional ``class_names`` / ``index``."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise DataError(f"{where}: file not found")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{where}: not a .npz archive (expected a zip of arrays, as numpy.savez writes)")
    mapped = _mapped_images(path, where) if _npz_bytes(path, where) > memory_budget() else None
    if mapped is None:
        _check_npz_size(path, where)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files if mapped is None or k != "images"}
    except Exception as exc:  # zipfile, pickle and value errors all mean "not a readable npz"
        raise DataError(f"{where}: not a readable .npz file ({exc.__class__.__name__}: {exc})") from None
    if mapped is not None:
        arrays["images"] = mapped
    for key in ("images", "labels"):
        if key not in arrays:
            raise DataError(f"{where}: missing array {key!r} (found: {', '.join(sorted(arrays)) or 'none'})")
    images = _squeeze_gray(arrays["images"] if mapped is not None else _as_uint8_images(np.asarray(arrays["images"]),
                                                                                        where))
    if images.ndim not in (3, 4):
        raise DataError(f"{where}: images must be N×H×W or N×H×W×C, got shape {images.shape}")
    labels = np.asarray(arrays["labels"])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if labels.dtype.kind == "u" and labels.size and int(labels.max()) >= MAX_CLASSES:  # before int64 wraps it
        _integer_class_names(int(labels.max()), where)
    if len(images) != len(labels):
        raise DataError(f"{where}: {len(images)} images but {len(labels)} labels")
    if "class_names" in arrays:
        names = np.atleast_1d(arrays["class_names"])
        if names.ndim != 1:
            raise DataError(f"{where}: class_names must be a 1-D array of names, got shape {names.shape}")
        class_names = tuple(str(c) for c in names)
    else:
        class_names = _integer_class_names(int(labels.max()) if labels.size else -1, where)
    index = arrays.get("index")
    if index is not None and (index.shape != labels.shape or not np.issubdtype(index.dtype, np.integer)):
        raise DataError(f"{where}: index must be 1-D integers, one per sample, got {index.dtype} {index.shape}")
    if mapped is not None:  # rows read on access (a view keeps them unread)
        images = LazyImages(ArraySource(images), np.arange(len(images)), images.shape[1:])
    return Dataset(images, labels.astype(np.int64), class_names,
                   None if index is None else index.astype(np.int64), source=where)


def _npz_headers(path: Path, where: str) -> dict[str, tuple[zipfile.ZipInfo, tuple[int, ...], np.dtype, bool]]:
    """Each ``.npy`` member's zip entry, shape, dtype and Fortran order, from the headers alone."""
    from numpy.lib import format as npy

    headers = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as member:
                    version = npy.read_magic(member)
                    read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
                    shape, fortran, dtype = read_header(member)
                headers[info.filename[:-4]] = (info, shape, dtype, fortran)
    except Exception as exc:  # a damaged archive or header: the same words as np.load's own failures
        raise DataError(f"{where}: not a readable .npz file ({exc.__class__.__name__}: {exc})") from None
    return headers


def _npz_bytes(path: Path, where: str) -> int:
    return sum(int(np.prod(shape, dtype=object)) * dtype.itemsize
               for _, shape, dtype, _ in _npz_headers(path, where).values())


def _mapped_images(path: Path, where: str) -> np.memmap | None:
    """The ``images`` member memory-mapped, when it is stored uncompressed (``numpy.savez``) as uint8;
    None otherwise (it is then loaded whole, if it fits)."""
    from numpy.lib import format as npy

    entry = _npz_headers(path, where).get("images")
    if entry is None or entry[0].compress_type != zipfile.ZIP_STORED or entry[2] != np.uint8 or entry[3]:
        return None
    info = entry[0]
    with open(path, "rb") as handle:  # the member's data follow its local header (30 bytes, name, extra)
        handle.seek(info.header_offset + 26)
        name_length, extra_length = np.frombuffer(handle.read(4), dtype="<u2")
        handle.seek(info.header_offset + 30 + int(name_length) + int(extra_length))
        version = npy.read_magic(handle)
        (npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0)(handle)
        offset = handle.tell()
    size = int(np.prod(entry[1], dtype=object))
    if offset + size > info.header_offset + 30 + int(name_length) + int(extra_length) + info.file_size \
            or offset + size > path.stat().st_size:
        return None  # a header promising more than the archive holds: refused by the size check
    return np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=tuple(entry[1]))


def _check_npz_size(path: Path, where: str) -> None:
    """Refuse an archive whose arrays would not fit in :data:`MAX_NPZ_BYTES`, from the .npy headers alone."""
    limit = min(MAX_NPZ_BYTES, machine_memory() // 2)
    total = _npz_bytes(path, where)
    if total > limit:
        raise DataError(f"{where}: its arrays take {total / 2**30:,.1f} GiB once decompressed, more than the "
                        f"{limit / 2**30:,.1f} GiB this tool loads (half the memory, at most "
                        f"{MAX_NPZ_BYTES // 2**30} GiB); save the images as uint8 with numpy.savez "
                        "(uncompressed) and they are memory-mapped instead")


def read_image(path: Path, draft: int | None = None) -> np.ndarray:
    """One image file as uint8 H×W or H×W×3; a :class:`DataError` naming the file otherwise.
    ``draft``: a JPEG may be decoded at a reduced scale whose shorter side is still at least this."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # Pillow warns from ~89M pixels; our own, lower limit comes next
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise DataError(f"{path}: image is {img.width}×{img.height}, larger than the "
                                f"{MAX_IMAGE_PIXELS} pixels this tool accepts")
            if draft is not None and img.mode in ("L", "RGB"):
                img.draft(img.mode, (draft, draft))  # JPEG's DCT scaling: a 4000×3000 photo never decodes whole
            upright = ImageOps.exif_transpose(img)  # a phone photo's EXIF orientation, as viewers show it
            if upright.mode.startswith("I;16"):  # 16-bit grayscale PNG: rescale, as convert("L") would clip at 255
                return np.round(np.asarray(upright, dtype=np.float64) / 257.0).astype(np.uint8)
            if upright.mode in ("F", "I"):  # 32-bit float / integer (e.g. a TIFF): convert("L") clips to black
                return _as_uint8_images(np.asarray(upright), f"{path} ({img.format or 'image'} of mode {upright.mode})")
            mode = "L" if grayscale_mode(upright.mode) else "RGB"
            return np.asarray(upright.convert(mode), dtype=np.uint8)
    except DataError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow refuses > ~179M pixels at open, before our check
        raise DataError(f"{path}: image is larger than the {MAX_IMAGE_PIXELS} pixels this tool accepts "
                        f"({exc})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: unreadable image ({exc.__class__.__name__}: {exc})") from None


def grayscale_mode(mode: str) -> bool:
    """Whether a Pillow image of this mode is read as one channel (every other mode is read as RGB)."""
    return mode in ("1", "L", "I", "F") or mode.startswith("I;16")


def most_common_size(sizes: Counter) -> tuple[int, int]:
    """The (H, W) that images of other sizes are resized to: the most common (ties: the first seen)."""
    return max(sizes, key=lambda size: (sizes[size], -list(sizes).index(size)))


def conform_image(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``image`` (uint8 H×W or H×W×3) as ``shape``: grayscale promoted to RGB or RGB to luminance, then
    resized (bilinear; Pillow filters over the whole source area when shrinking)."""
    from PIL import Image

    if image.shape == tuple(shape):
        return image
    pil = Image.fromarray(image).convert("RGB" if len(shape) == 3 else "L")
    if pil.size != (shape[1], shape[0]):
        pil = pil.resize((shape[1], shape[0]), Image.BILINEAR)
    return np.asarray(pil, dtype=np.uint8)


def original_image(dataset: Dataset, position: int, size: int) -> np.ndarray:
    """The row's own file (the real photo, not the resized training copy) at about ``size`` px on its
    long side, for the gallery and the sample detail; the stored image when there is no file."""
    from PIL import Image

    path = original_file(dataset, position)
    if path is None:
        return dataset.images[position]
    try:
        image = Image.fromarray(read_image(path, draft=size))
    except DataError:  # moved or changed since loading: show what was trained on
        return dataset.images[position]
    image.thumbnail((size, size), Image.BILINEAR)
    return np.asarray(image)


def original_file(dataset: Dataset, position: int) -> Path | None:
    """The file a row was loaded from (image folder or manifest data), if it is still there."""
    folder = files_folder(dataset)
    path = None if folder is None else folder / dataset.paths[position]
    return path if path is not None and path.is_file() else None


def files_folder(dataset: Dataset) -> Path | None:
    """The folder a dataset's ``paths`` are relative to (the image folder, or the manifest's); None for
    data not loaded from files."""
    if dataset.paths is None or not dataset.source:
        return None
    source = Path(dataset.source)
    return source if source.is_dir() else source.parent.resolve()


def center_fit(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` with its shorter side resized to ``size`` and centre-cropped to size×size (bilinear)."""
    from PIL import Image, ImageOps

    if image.shape[:2] == (size, size):
        return image
    return np.asarray(ImageOps.fit(Image.fromarray(image), (size, size), Image.BILINEAR), dtype=np.uint8)


def fit_images(dataset: Dataset, size: int) -> Dataset:
    """A loaded dataset's images as size×size (shorter side, centre crop), with a note saying so."""
    if dataset.image_shape[:2] == (size, size):
        return dataset
    if is_lazy(dataset.images):  # resized as rows are read
        images = replace(dataset.images, sample_shape=(size, size, *dataset.image_shape[2:]), fit=size)
    else:
        images = np.stack([center_fit(image, size) for image in dataset.images])
    return replace(dataset, images=images, notes=(*dataset.notes, f"{dataset.source}: images resized to {size}×{size} "
                                                                  "(shorter side, centre crop)"))


def _stack_images(arrays: list[np.ndarray], where: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Stack decoded images, and say what that changed: grayscale is promoted to RGB when the set
    mixes both; images of other sizes are resized to the most common size (ties: the first seen)."""
    if any(a.ndim == 3 for a in arrays):
        arrays = [np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in arrays]
    sizes = Counter(a.shape[:2] for a in arrays)
    if len(sizes) == 1:
        return np.stack(arrays), ()
    target = most_common_size(sizes)
    shape = (*target, *arrays[0].shape[2:])
    moved = len(arrays) - sizes[target]
    note = (f"{where}: resized {moved} of {len(arrays)} images to {target[1]}×{target[0]}, the most common of "
            f"{len(sizes)} sizes")
    return np.stack([conform_image(a, shape) for a in arrays]), (note,)


def conform(dataset: Dataset, image_shape: tuple[int, ...], role: str) -> Dataset:
    """``dataset`` with every image as ``image_shape`` (a validation or test set brought to the
    training images' size and channels), with a note saying so; the same object when it already fits."""
    if dataset.image_shape == tuple(image_shape):
        return dataset
    size = "×".join(str(s) for s in dataset.image_shape[1::-1])
    note = (f"{dataset.source or role}: {role} images are {size}{'' if dataset.channels == 1 else ' RGB'}, "
            f"converted to the training images' {image_shape[1]}×{image_shape[0]}"
            f"{' RGB' if len(image_shape) == 3 else ' grayscale'}")
    images = dataset.images.with_shape(image_shape) if is_lazy(dataset.images) else \
        np.stack([conform_image(image, image_shape) for image in dataset.images])
    return replace(dataset, images=images, notes=(*dataset.notes, note))


def _decode_all(paths: list[Path], where: str, skip_unreadable: bool,
                image_size: int | None = None) -> tuple[list[np.ndarray], list[int], list[str]]:
    """Decode every image; with ``skip_unreadable`` collect failures instead of raising. With
    ``image_size`` each is resized as soon as it is decoded: memory follows the model's input."""
    images, kept, skipped = [], [], []
    for i, p in enumerate(paths):
        try:
            image = read_image(p, image_size)
            images.append(image if image_size is None else center_fit(image, image_size))
            kept.append(i)
        except DataError as exc:
            if not skip_unreadable:
                raise
            skipped.append(str(exc))
    if not images:
        raise DataError(f"{where}: no readable images")
    return images, kept, skipped


def load_image_folder(path: str | Path, *, skip_unreadable: bool = False, image_size: int | None = None,
                      lazy: bool = False, listings: str | Path | None = None) -> Dataset:
    """One sub-folder per class (sorted names are the classes), PNG/JPEG files inside."""
    root = Path(path)
    return _decode_listing(*image_folder_files(root), root=root, where=str(root), skip_unreadable=skip_unreadable,
                           image_size=image_size, lazy=lazy, listings=listings)


def _decode_listing(files: list[Path], labels: np.ndarray, class_names: tuple[str, ...], *, root: Path, where: str,
                    skip_unreadable: bool, image_size: int | None = None, lazy: bool = False,
                    listings: str | Path | None = None) -> Dataset:
    """Decode a listing of image files into a :class:`Dataset`: the index is the listing position, the
    paths relative to ``root``; what was skipped or changed is kept in ``skipped`` / ``notes``. When the
    decoded images would exceed the memory budget (or with ``lazy``), they are listed instead
    (:func:`_lazy_listing`)."""
    if lazy or _decoded_bytes(files, image_size) > memory_budget():
        return _lazy_listing(files, labels, class_names, root=root, where=where, skip_unreadable=skip_unreadable,
                             image_size=image_size, listings=listings)
    decoded, kept, skipped = _decode_all(files, where, skip_unreadable, image_size)
    kept_files = [files[i] for i in kept]
    images, notes = _stack_images(decoded, where)
    return Dataset(images, labels[kept], class_names, np.asarray(kept, dtype=np.int64), source=where,
                   paths=tuple(str(f.relative_to(root)) for f in kept_files), skipped=tuple(skipped), notes=notes)


# Headers read to estimate a listing's decoded size (evenly spaced over the files).
SIZE_PROBES = 200


def _decoded_bytes(files: list[Path], image_size: int | None) -> int:
    """The decoded size of every image, estimated from a few files' headers (unreadable ones skipped)."""
    picked = np.unique(np.linspace(0, len(files) - 1, min(len(files), SIZE_PROBES)).round().astype(int))
    per_image = []
    for i in picked:
        try:
            height, width, rgb = read_header(files[i])
        except DataError:
            continue
        pixels = image_size * image_size if image_size else height * width
        per_image.append(pixels * (3 if rgb else 1))
    return int(np.mean(per_image) * len(files)) if per_image else 0


def read_header(path: Path) -> tuple[int, int, bool]:
    """Height, width (as shown: EXIF rotation applied) and colour of an image file, from its header;
    a :class:`DataError` naming the file as :func:`read_image` would."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height, mode = img.width, img.height, img.mode
                if width * height > MAX_IMAGE_PIXELS:
                    raise DataError(f"{path}: image is {width}×{height}, larger than the "
                                    f"{MAX_IMAGE_PIXELS} pixels this tool accepts")
                # (a PNG's EXIF may follow its pixels: only the one in its header is read, decoding nothing)
                exif = img.getexif() if img.format != "PNG" or "exif" in img.info else {}
                if exif.get(0x0112) in (5, 6, 7, 8):  # rotated by a quarter turn
                    width, height = height, width
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: image is larger than the {MAX_IMAGE_PIXELS} pixels this tool accepts "
                        f"({exc})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: unreadable image ({exc.__class__.__name__}: {exc})") from None
    return height, width, not grayscale_mode(mode)


def _lazy_listing(files: list[Path], labels: np.ndarray, class_names: tuple[str, ...], *, root: Path, where: str,
                  skip_unreadable: bool, image_size: int | None, listings: str | Path | None = None) -> Dataset:
    """A listing too large to decode at once, as a :class:`Dataset` of :class:`LazyImages`: every
    header is read now (sizes, colour, unreadable files skipped or refused as when decoding), the
    pixels when rows are used; with ``listings`` (a workspace folder) only the headers of files that
    changed since the last load (:mod:`engine.listings`). Same shape rule as :func:`_stack_images`: RGB
    if any image is, and the most common size (or ``image_size``²). A file whose header reads but whose
    pixels do not is refused when it is read, naming it."""
    names = Names([str(file.relative_to(root)) for file in files])
    sizes, mtimes = np.zeros(len(files), dtype=np.int64), np.zeros(len(files), dtype=np.int64)
    heights, widths = np.zeros(len(files), dtype=np.int32), np.zeros(len(files), dtype=np.int32)
    colour, readable, stated = (np.zeros(len(files), dtype=bool) for _ in range(3))
    cache = None if listings is None else cache_file(listings, root, where)
    cached = None if cache is None else Headers.load(cache)
    skipped: dict[int, str] = {}
    for i, file in enumerate(files):
        try:
            status = file.stat()
        except OSError as exc:
            problem = DataError(f"{file}: unreadable image ({exc.__class__.__name__}: {exc})")
            if not skip_unreadable:
                raise problem from None
            skipped[i] = str(problem)
            continue
        sizes[i], mtimes[i], stated[i] = status.st_size, status.st_mtime_ns, True
    rows = known(cached, names, sizes, mtimes)
    for i in np.flatnonzero(rows >= 0):
        heights[i], widths[i], colour[i] = cached.heights[rows[i]], cached.widths[rows[i]], cached.colour[rows[i]]
        readable[i] = True
    unread = np.flatnonzero((rows < 0) & stated)
    for i in unread:
        try:
            heights[i], widths[i], colour[i] = read_header(files[i])
            readable[i] = True
        except DataError as exc:
            if not skip_unreadable:
                raise
            skipped[i] = str(exc)
    kept = np.flatnonzero(readable)
    if not len(kept):
        raise DataError(f"{where}: no readable images")
    if cache is not None and len(unread):
        Headers(Names([names[i] for i in kept]), sizes[kept], mtimes[kept], heights[kept], widths[kept],
                colour[kept]).save(cache)
    sizes_seen = Counter(zip(heights[kept].tolist(), widths[kept].tolist(), strict=True))
    target = (image_size, image_size) if image_size else most_common_size(sizes_seen)
    shape = (*target, 3) if colour[kept].any() else target
    notes = ()
    if image_size is None and len(sizes_seen) > 1:
        notes = (f"{where}: resized {len(kept) - sizes_seen[target]} of {len(kept)} images to {target[1]}×{target[0]}, "
                 f"the most common of {len(sizes_seen)} sizes",)
    kept_names = [names[i] for i in kept]
    source = FileSource(root, Names(kept_names), sizes[kept], mtimes[kept])
    images = LazyImages(source, np.arange(len(kept)), shape, fit=image_size)
    return Dataset(images, labels[kept], class_names, kept.astype(np.int64), source=where,
                   paths=tuple(kept_names), skipped=tuple(skipped[i] for i in sorted(skipped)), notes=notes)


def image_folder_files(root: Path) -> tuple[list[Path], np.ndarray, tuple[str, ...]]:
    """The image files of a class-per-folder tree (sorted), their labels and the class names; nothing decoded."""
    where = str(root)
    if not root.is_dir():
        raise DataError(f"{where}: folder not found")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{where}: no class sub-folders (expected one folder per class with images inside)")
    names: dict[str, str] = {}
    for d in class_dirs:
        same = names.setdefault(unicodedata.normalize("NFC", d.name), d.name)
        if same != d.name:
            raise DataError(f"{where}: class folders {ascii(same)} and {ascii(d.name)} differ only in their Unicode "
                            "normalisation (they look the same); merge or rename them")
    inside = root.resolve()
    files: list[Path] = []
    labels: list[int] = []
    for c, d in enumerate(class_dirs):
        with os.scandir(d) as listing:  # the directory's own file types: no stat per file
            entries = sorted((e for e in listing if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES),
                             key=lambda e: e.name)
        folder_inside = d.resolve().is_relative_to(inside)
        found = [d / e.name for e in entries]
        for entry, f in zip(entries, found, strict=True):
            if entry.is_symlink() or not folder_inside:  # only a link can lead outside
                _refuse_link_outside(f, inside, where)
        if not found:
            raise DataError(f"{d}: class folder has no images ({', '.join(IMAGE_SUFFIXES)})")
        files += found
        labels += [c] * len(found)
    if len(class_dirs) < 2:
        raise DataError(f"{where}: only one class folder ({class_dirs[0].name}); a classifier needs at least 2")
    return files, np.asarray(labels, dtype=np.int64), tuple(unicodedata.normalize("NFC", d.name) for d in class_dirs)


def _refuse_link_outside(file: Path, root: Path, where: str) -> None:
    """The one link policy of both loaders: a file (or class folder) may be a link only within the data's
    folder; one that leads outside it is refused (the data root of a shared dashboard stays closed)."""
    if not file.resolve().is_relative_to(root):
        raise DataError(f"{where}: {file.relative_to(file.parents[1])} is a link to a file outside the folder; "
                        "copy the file in instead (links are followed only inside the data's folder)")


def load_csv_manifest(path: str | Path, *, skip_unreadable: bool = False, image_size: int | None = None,
                      lazy: bool = False, listings: str | Path | None = None) -> Dataset:
    """A CSV with columns ``path,label``; paths relative to the CSV, labels names or integers."""
    csv_path = Path(path)
    return _decode_listing(*manifest_files(csv_path), root=csv_path.parent.resolve(), where=str(csv_path),
                           skip_unreadable=skip_unreadable, image_size=image_size, lazy=lazy, listings=listings)


class _Resolver:
    """``path.resolve()`` and ``is_file()`` for many files in few folders: each folder resolved once, then
    one ``lstat`` per file (a million manifest rows took a realpath walk of every component each). A file
    that is itself a link is resolved in full."""

    def __init__(self):
        self.folders: dict[Path, Path] = {}

    def __call__(self, path: Path) -> tuple[Path, bool]:
        if path.name in ("", ".", ".."):
            full = path.resolve()
            return full, full.is_file()
        folder = self.folders.get(path.parent)
        if folder is None:
            folder = self.folders[path.parent] = path.parent.resolve()
        full = folder / path.name
        try:
            mode = os.lstat(full).st_mode
        except (FileNotFoundError, NotADirectoryError):  # as is_file() answers them
            return full, False
        if stat.S_ISLNK(mode):
            full = full.resolve()
            return full, full.is_file()
        return full, stat.S_ISREG(mode)


def manifest_files(csv_path: Path) -> tuple[list[Path], np.ndarray, tuple[str, ...]]:
    """A manifest's image files (resolved, checked to exist inside its folder), labels and class names;
    nothing decoded."""
    where = str(csv_path)
    if not csv_path.is_file():
        raise DataError(f"{where}: file not found")
    try:
        text = csv_path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not UTF-8 text (byte {exc.start})") from None
    if "\x00" in text:
        raise DataError(f"{where}: contains NUL bytes; a manifest is a text CSV with columns path,label")
    try:
        header = [h.strip() for h in (next(csv.reader(io.StringIO(text))) if text.strip() else [])]
        rows = list(csv.DictReader(io.StringIO(text), fieldnames=header))[1:]  # "path, label" is path,label
    except csv.Error as exc:
        raise DataError(f"{where}: not a readable CSV ({exc})") from None
    missing = [c for c in ("path", "label") if c not in header]
    if missing:
        raise DataError(f"{where}: missing column(s) {', '.join(missing)} (header: {','.join(header) or 'empty'})")
    check_csv_text(text, where, header)
    if not rows:
        raise DataError(f"{where}: the manifest has zero rows")
    root = csv_path.parent.resolve()
    resolved = _Resolver()
    files: list[Path] = []
    raw_labels: list[str] = []
    seen: dict[Path, int] = {}
    for line, row in enumerate(rows, start=2):
        rel, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not rel:
            raise DataError(f"{where}, line {line}: blank path")
        if not label:
            raise DataError(f"{where}, line {line}: blank label for {rel}")
        try:
            full, is_file = resolved(root / rel)
            if not full.is_relative_to(root):
                raise DataError(f"{where}, line {line}: path {rel!r} points outside the manifest's folder")
            if full in seen:
                raise DataError(f"{where}, line {line}: duplicate path {rel!r} (first on line {seen[full]})")
            if not is_file:
                raise DataError(f"{where}, line {line}: image not found: {rel}")
        except (OSError, ValueError, RuntimeError) as exc:  # a name too long, a NUL byte, a symlink loop
            raise DataError(f"{where}, line {line}: unusable path {rel!r} ({exc})") from None
        seen[full] = line
        files.append(full)
        raw_labels.append(unicodedata.normalize("NFC", label))  # "café" typed two ways is one class
    numbers = [s for s in raw_labels if _is_int(s)]
    if numbers and len(numbers) < len(raw_labels):
        name = next(s for s in raw_labels if not _is_int(s))
        raise DataError(f"{where}: labels mix class numbers ({numbers[0]!r}) and class names ({name!r}); "
                        "use one or the other")
    if numbers:
        values = [int(s) for s in raw_labels]
        if min(values) < 0:
            raise DataError(f"{where}: negative label {min(values)}")
        class_names = _integer_class_names(max(values), where)
        labels = np.asarray(values, dtype=np.int64)
    else:
        class_names = tuple(sorted(set(raw_labels)))
        position = {name: c for c, name in enumerate(class_names)}
        labels = np.asarray([position[s] for s in raw_labels], dtype=np.int64)
    return files, labels, class_names


def check_csv_text(text: str, where: str, header: list[str]) -> None:
    """What Python's csv reader accepts silently: a quote never closed (the rest of the file becomes one
    cell) and a column named twice (the last one would win)."""
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DataError(f"{where}: column {repeated[0]!r} appears more than once in the header; keep one")
    reader, parsed = csv.reader(io.StringIO(text), strict=True), 0
    try:
        for _ in reader:
            parsed = reader.line_num
    except csv.Error as exc:
        if "unexpected end of data" in str(exc):
            raise DataError(f"{where}, line {parsed + 1}: a quote (\") opened there is never closed") from None
        raise DataError(f"{where}, line {reader.line_num}: not a readable CSV ({exc})") from None


def _integer_class_names(top: int, where: str) -> tuple[str, ...]:
    """Class names "0".."top" for integer labels whose largest value is ``top``."""
    if top >= MAX_CLASSES:
        raise DataError(f"{where}: label {top} is too large; integer labels are class numbers 0..C-1, "
                        f"with at most {MAX_CLASSES} classes")
    return tuple(str(c) for c in range(top + 1))


def _is_int(text: str) -> bool:
    return _INTEGER.fullmatch(text) is not None


def load_sample(split: str = "train") -> Dataset:
    """The embedded default data (scikit-learn's digits), see ``sample_data/README.md``."""
    if split not in sample_data.SPLITS:
        raise OptionError("sample split", split, sample_data.SPLITS)
    return _sample_splits()[split]


@lru_cache(maxsize=1)
def _sample_splits() -> dict[str, Dataset]:
    """The digits, split once per process and shared by every caller."""
    full = Dataset(*sample_data.digits(), source=sample_data.SOURCE)
    parts = stratified_split(full, sample_data.SPLIT_FRACTIONS, seed=sample_data.SPLIT_SEED)
    return dict(zip(sample_data.SPLITS, parts, strict=True))


def load_dataset(spec: str | Path, *, skip_unreadable: bool = False, image_size: int | None = None,
                 lazy: bool = False, listings: str | Path | None = None) -> Dataset:
    """Load ``sample[:split]``, an ``.npz``, an image folder or a ``.csv`` manifest; with ``image_size``,
    every image as image_size² (shorter side, centre crop; files resized one at a time as decoded).
    Image files are listed and read per batch (:class:`engine.sources.LazyImages`) when their decoded
    size exceeds the memory budget, or always with ``lazy`` (a run that reads each image once); with
    ``listings`` (a workspace folder) their headers are remembered there (:mod:`engine.listings`)."""
    dataset = _load_files(spec, skip_unreadable=skip_unreadable, image_size=image_size, lazy=lazy, listings=listings)
    return dataset if image_size is None else fit_images(dataset, image_size)  # arrays (npz, sample): after


def _load_files(spec: str | Path, *, skip_unreadable: bool = False, image_size: int | None = None,
                lazy: bool = False, listings: str | Path | None = None) -> Dataset:
    text = str(spec)
    if text == "sample" or text.startswith("sample:"):
        return load_sample(text.partition(":")[2] or "train")
    path = Path(text)
    if not path.exists():
        raise DataError(f"{text}: no such file or folder")
    if path.is_dir():
        return load_image_folder(path, skip_unreadable=skip_unreadable, image_size=image_size, lazy=lazy,
                                 listings=listings)
    if not path.is_file():  # reading a FIFO would wait forever for a writer
        raise DataError(f"{text}: not a regular file (a FIFO, device or socket); give a data file or folder")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return load_npz(path)
    if suffix == ".csv":
        return load_csv_manifest(path, skip_unreadable=skip_unreadable, image_size=image_size, lazy=lazy,
                                 listings=listings)
    raise DataError(f"{text}: unsupported data file (expected a .npz, a .csv manifest or an image folder)")


def save_npz(dataset: Dataset, path: str | Path) -> None:
    """Write a dataset in the ``.npz`` format :func:`load_npz` reads (index included)."""
    np.savez_compressed(path, images=dataset.images, labels=dataset.labels,
                        class_names=np.asarray(dataset.class_names), index=dataset.index)


def stratified_split(dataset: Dataset, fractions: tuple[float, ...], *, seed: int = 0) -> list[Dataset]:
    """Split into parts with the given fractions (summing to 1), each stratified by label."""
    from sklearn.model_selection import train_test_split

    if not np.isclose(sum(fractions), 1.0) or min(fractions) <= 0:
        raise ValueError(f"fractions must be positive and sum to 1, got {fractions}")
    positions = np.arange(len(dataset))
    parts: list[np.ndarray] = []
    remaining, left = positions, 1.0
    for frac in fractions[:-1]:
        try:
            take, remaining = train_test_split(remaining, train_size=frac / left, random_state=seed,
                                               stratify=dataset.labels[remaining])
        except ValueError as exc:  # too few samples of a class, or parts smaller than the class count
            raise DataError(f"{dataset.source or 'dataset'}: cannot split {len(dataset)} samples into "
                            f"stratified parts {fractions} ({exc})") from None
        parts.append(np.sort(take))
        left -= frac
    parts.append(np.sort(remaining))
    return [dataset.subset(p) for p in parts]


def inject_noise(labels: np.ndarray, num_classes: int, *, rate: float,
                 kind: Literal["symmetric", "pair"] = "symmetric", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Flip exactly ``round(rate * N)`` labels; return ``(noisy_labels, flipped_mask)``.

    ``symmetric`` moves a flipped label to a uniformly chosen other class; ``pair`` moves class
    c to c + 1 mod C (the classic asymmetric noise).
    """
    if kind not in NOISE_KINDS:
        raise OptionError("noise kind", kind, NOISE_KINDS)
    if not 0.0 <= rate < 1.0:
        raise DataError(f"noise rate must be in [0, 1), got {rate}")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    n_flip = int(round(rate * len(labels)))
    flipped = np.zeros(len(labels), dtype=bool)
    flipped[rng.choice(len(labels), size=n_flip, replace=False)] = True
    noisy = labels.copy()
    if kind == "pair":
        noisy[flipped] = (labels[flipped] + 1) % num_classes
    else:
        shift = rng.integers(1, num_classes, size=n_flip)
        noisy[flipped] = (labels[flipped] + shift) % num_classes
    return noisy, flipped
