"""MNIST input pipeline: reads the IDX files shipped in ``data/`` and checks them.

Nothing is downloaded. Each file is checked against the size and the sha256 of its
decompressed bytes listed in ``data/README.md``; a missing, truncated or altered
file raises an error that names the file and says how to restore it.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "data"

IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10


class _FileSpec(NamedTuple):
    """What one IDX file must contain once decompressed."""

    magic: int  # 2051 for images, 2049 for labels
    count: int  # number of examples
    size: int  # decompressed size in bytes, header included
    sha256: str  # of the decompressed bytes


FILES: dict[str, _FileSpec] = {
    "train-images-idx3-ubyte.gz": _FileSpec(
        2051,
        60_000,
        47_040_016,
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    "train-labels-idx1-ubyte.gz": _FileSpec(
        2049,
        60_000,
        60_008,
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    "t10k-images-idx3-ubyte.gz": _FileSpec(
        2051,
        10_000,
        7_840_016,
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    "t10k-labels-idx1-ubyte.gz": _FileSpec(
        2049,
        10_000,
        10_008,
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
}

SPLITS = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

_RESTORE_HINT = (
    "The four MNIST files ship with the repository in examples/mnist/data/; "
    "restore them with `git checkout -- examples/mnist/data/`."
)


class DataError(ValueError):
    """A data file is missing, truncated or does not match its checksum."""


def read_idx(path: str | Path) -> np.ndarray:
    """Reads one gzip-compressed IDX file and verifies it.

    Args:
        path: path to one of the four files listed in ``FILES``; the file name
            selects the expected size and checksum.

    Returns:
        A uint8 array of shape ``(count, 28, 28)`` for images or ``(count,)`` for
        labels.

    Raises:
        DataError: if the file is missing, is not valid gzip, has the wrong
            size, header or sha256, or is not one of the known files.
    """
    path = Path(path)
    spec = FILES.get(path.name)
    if spec is None:
        raise DataError(
            f"{path} is not one of the MNIST files {sorted(FILES)}; "
            "pass the path of one of them."
        )
    if not path.is_file():
        raise DataError(f"MNIST file {path} is missing. {_RESTORE_HINT}")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(
            f"MNIST file {path} is corrupt: it is not a complete gzip file "
            f"({e}). {_RESTORE_HINT}"
        ) from e
    if len(raw) != spec.size:
        raise DataError(
            f"MNIST file {path} is corrupt: it decompresses to {len(raw)} bytes "
            f"but {spec.size} were expected. {_RESTORE_HINT}"
        )
    digest = hashlib.sha256(raw).hexdigest()
    if digest != spec.sha256:
        raise DataError(
            f"MNIST file {path} is corrupt: the sha256 of its decompressed bytes "
            f"is {digest} but {spec.sha256} was expected. {_RESTORE_HINT}"
        )
    if spec.magic == 2051:
        magic, count, rows, cols = struct.unpack(">IIII", raw[:16])
        shape: tuple[int, ...] = (count, rows, cols)
        offset = 16
    else:
        magic, count = struct.unpack(">II", raw[:8])
        shape = (count,)
        offset = 8
    # With a matching checksum the header is right; this guards the table above.
    if magic != spec.magic or count != spec.count:
        raise DataError(f"MNIST file {path} has an unexpected IDX header.")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def load_split(
    split: str, data_dir: str | Path = DATA_DIR, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Loads the images and labels of one split.

    Args:
        split: ``"train"`` (60,000 examples) or ``"test"`` (10,000 examples).
        data_dir: directory holding the four ``.gz`` files.
        limit: if given, keep only the first ``limit`` examples (for quick runs).

    Returns:
        ``(images, labels)``: uint8 arrays of shapes ``(n, 28, 28, 1)`` and
        ``(n,)``.

    Raises:
        DataError: if a file is missing or corrupt (see ``read_idx``).
        ValueError: if ``split`` is unknown or ``limit`` is not positive.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}.")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be a positive number of examples, got {limit}.")
    images_file, labels_file = SPLITS[split]
    images = read_idx(Path(data_dir) / images_file)[..., None]
    labels = read_idx(Path(data_dir) / labels_file)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def normalize(images: np.ndarray) -> np.ndarray:
    """Maps uint8 pixels to float32 in [0, 1]."""
    return images.astype(np.float32) / np.float32(255.0)


def train_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields one epoch of shuffled training batches, dropping the remainder.

    Args:
        images: uint8 images of shape ``(n, 28, 28, 1)``.
        labels: int labels of shape ``(n,)``.
        batch_size: examples per batch; every batch has exactly this size.
        rng: source of the shuffling permutation.

    Yields:
        ``(images, labels)`` with float32 images in [0, 1] and int32 labels.
    """
    perm = rng.permutation(len(images))
    for start in range(0, len(perm) - batch_size + 1, batch_size):
        idx = perm[start : start + batch_size]
        yield normalize(images[idx]), labels[idx].astype(np.int32)


def eval_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int, *, pad: bool = True
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yields every example once, in order, in batches of ``batch_size``.

    Padding the last batch keeps a single compiled shape; the mask marks the real
    examples. Padding is only harmless when examples are independent, that is with
    running statistics: pass ``pad=False`` to evaluate with batch statistics, so
    that the last batch is shorter instead.

    Args:
        images: uint8 images of shape ``(n, 28, 28, 1)``.
        labels: int labels of shape ``(n,)``.
        batch_size: examples per batch.
        pad: whether to pad the last batch to ``batch_size``.

    Yields:
        ``(images, labels, mask)``: float32 images, int32 labels and a float32
        mask that is 1 for real examples and 0 for padding.
    """
    n = len(images)
    for start in range(0, n, batch_size):
        x = normalize(images[start : start + batch_size])
        y = labels[start : start + batch_size].astype(np.int32)
        mask = np.ones(len(x), np.float32)
        missing = batch_size - len(x) if pad else 0
        if missing:
            x = np.concatenate([x, np.zeros((missing, *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, np.zeros(missing, y.dtype)])
            mask = np.concatenate([mask, np.zeros(missing, mask.dtype)])
        yield x, y, mask
