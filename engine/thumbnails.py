"""Gallery thumbnails as a workspace stage: small images of the rows, stored once per run and row.

The gallery shows a page of cards at a time; at a million rows it must read that page's thumbnails and
nothing else. Scoring a method stores the thumbnails of its ranking's top rows (the pages a reviewer
opens first, :data:`STAGE_ROWS`); any other page's are made when it is first shown, from the row's own
file (or stored image), and stored too, so a reload or a second tab reads them back.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from engine.data import Dataset, original_image
from engine.metrics import ranking
from engine.workspace import Workspace

THUMBNAIL_PX = 112  # a gallery card's image box; a smaller image is stored as it is (the browser upscales it)
JPEG_QUALITY = 90  # a photo shrunk to a card: 0.06 ms and 2.6 kB where a PNG takes 2.4 ms and 13 kB
STAGE_ROWS = 1024  # top rows per scored method whose thumbnails are stored with its scores


def encode(dataset: Dataset, position: int, size: int = THUMBNAIL_PX) -> bytes:
    """One row at most ``size`` px on its long side: a photo shrunk to that size as a JPEG, a smaller
    image (a digit, a 32-px CIFAR row) as a lossless PNG, enlarged by nearest neighbour in the browser
    so its pixels stay crisp."""
    image = original_image(dataset, position, size)
    image = image.squeeze(-1) if image.ndim == 3 and image.shape[2] == 1 else image
    picture = Image.fromarray(np.ascontiguousarray(image))
    picture.thumbnail((size, size), Image.BILINEAR)  # a stored image larger than a card (no file to read)
    buffer = io.BytesIO()
    if max(picture.size) >= size and picture.mode in ("RGB", "L"):
        picture.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        picture.save(buffer, format="PNG")
    return buffer.getvalue()


def media_type(image: bytes) -> str:
    """The MIME type of a stored thumbnail, from its first bytes."""
    return "image/jpeg" if image[:3] == b"\xff\xd8\xff" else "image/png"


def thumbnails(workspace: Workspace, key: str, dataset: Dataset, positions, size: int = THUMBNAIL_PX) -> list[bytes]:
    """The thumbnails of ``positions`` (rows of ``dataset``, the run ``key``'s training set), in order: read
    from the workspace, the missing ones made and stored."""
    positions = [int(p) for p in np.atleast_1d(positions)]
    indices = [int(dataset.index[p]) for p in positions]
    found = workspace.thumbnails(key, indices, size)
    made = {i: encode(dataset, p, size) for p, i in zip(positions, indices, strict=True) if i not in found}
    if made:
        workspace.save_thumbnails(key, size, made)
    return [found.get(i) or made[i] for i in indices]


def store_top(workspace: Workspace, key: str, dataset: Dataset, scores: np.ndarray) -> None:
    """Store the thumbnails of the :data:`STAGE_ROWS` highest-scored rows (this ranking's first gallery pages)."""
    thumbnails(workspace, key, dataset, ranking(scores)[:STAGE_ROWS])
