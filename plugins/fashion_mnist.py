"""Fashion-MNIST, the default dataset (the Adver-Fine paper's), read from its idx files.

Lookup order (DESIGN.md §8), first complete folder wins:

1. ``$ROBENCH_DATA/fashion-mnist/`` or torchvision's layout ``$ROBENCH_DATA/FashionMNIST/raw/``;
2. the Debian package ``dataset-fashion-mnist`` in :data:`DEBIAN_DIR`;
3. an earlier download in ``~/.cache/robench/data`` (only when ``$ROBENCH_DATA`` is unset);
4. a torchvision download into ``$ROBENCH_DATA`` (or ``~/.cache/robench/data``).

A folder of step 1 that exists but lacks some of the four files stops the lookup with an
error listing them: the user named ``$ROBENCH_DATA``, so reading another copy instead (the
Debian one, say) would silently evaluate on data they did not choose. Only robench's own
places (steps 2 to 4) fall through to the next. A ``$ROBENCH_DATA`` with neither folder
goes on to step 2, as with no ``$ROBENCH_DATA``.

The idx files are parsed here rather than through torchvision, so the Debian copy works
without torchvision's folder layout and a damaged file gets a message that names it.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

import robench
from robench import ConfigError, DataNotFoundError, DataShape, ImageData, Norm, Split

ENV_VAR = "ROBENCH_DATA"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs the four idx .gz files."""
CACHE_DIR = Path("~/.cache/robench/data")
"""Download target when ``$ROBENCH_DATA`` is unset (``~`` is expanded at lookup time)."""

IMAGES_MAGIC = 2051  # idx header: 0x00 0x00, type 0x08 (ubyte), 3 dimensions
LABELS_MAGIC = 2049  # idx header: 0x00 0x00, type 0x08 (ubyte), 1 dimension
FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
ALL_FILES = tuple(stem for pair in FILES.values() for stem in pair)
HOW_TO_GET = (
    "To get the data: `apt-get install dataset-fashion-mnist`, or put the four idx files ("
    + ", ".join(ALL_FILES)
    + f"; plain or .gz) under ${ENV_VAR}/fashion-mnist/, or run once where the torchvision "
    "download can reach the internet."
)


def data_root() -> Path | None:
    """The folder named by ``$ROBENCH_DATA``, or None when it is unset or empty."""
    value = os.environ.get(ENV_VAR, "")
    return Path(value).expanduser() if value else None


def download_root() -> Path:
    """Where a download goes: ``$ROBENCH_DATA`` if set, else the user cache."""
    return data_root() or CACHE_DIR.expanduser()


def candidates() -> list[tuple[Path, str]]:
    """Every folder searched before downloading, in order, with a label saying why."""
    return [*named_candidates(), *default_candidates()]


def named_candidates() -> list[tuple[Path, str]]:
    """The folders under ``$ROBENCH_DATA`` (none when it is unset): a partial one is an error."""
    root = data_root()
    if root is None:
        return []
    return [(root / "fashion-mnist", f"${ENV_VAR}"), (root / "FashionMNIST" / "raw", f"${ENV_VAR}, torchvision layout")]


def default_candidates() -> list[tuple[Path, str]]:
    """robench's own places, searched after ``$ROBENCH_DATA``'s; the download cache only when it is unset."""
    debian = (DEBIAN_DIR, "Debian package dataset-fashion-mnist")
    if data_root() is not None:
        return [debian]
    return [debian, (CACHE_DIR.expanduser() / "FashionMNIST" / "raw", "download cache")]


def idx_file(directory: Path, stem: str) -> Path | None:
    """``stem`` or ``stem.gz`` in ``directory``; the plain file first, as it reads faster."""
    for path in (directory / stem, directory / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def missing_files(directory: Path) -> list[str]:
    """The idx files ``directory`` lacks (each may be plain or .gz)."""
    return [f"{stem}(.gz)" for stem in ALL_FILES if idx_file(directory, stem) is None]


def _download(root: Path) -> Path:
    """Download with torchvision into ``root``; return the folder holding the idx files."""
    # Imported here: torchvision is slow to import and only this fallback needs it.
    from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

    TorchvisionFashionMNIST(str(root), download=True)
    return root / "FashionMNIST" / "raw"


def find_data() -> tuple[Path, str]:
    """The first folder holding all four idx files, and its label; download as a last resort.

    :raises DataNotFoundError: a ``$ROBENCH_DATA`` folder lacks some files (no other copy is
        used then), or nothing was found and the download failed; the message lists every
        folder searched and how to get the data
    """
    looked: list[str] = []
    found = _first_complete(named_candidates(), looked)
    if found is None and any(directory.is_dir() for directory, _ in named_candidates()):
        raise _incomplete(looked)
    found = found or _first_complete(default_candidates(), looked)
    if found is not None:
        return found
    root = download_root()
    try:
        directory = _download(root)
    except Exception as exc:  # any failure (offline, disk, torchvision) ends the same way
        error = f"{type(exc).__name__}: {exc}"
    else:
        missing = missing_files(directory)
        if not missing:
            return directory, f"downloaded by torchvision into {root}"
        error = f"it finished but {directory} lacks {', '.join(missing)}"
    if data_root() is None:
        looked.insert(0, f"  ${ENV_VAR} is not set")
    raise DataNotFoundError(
        "Fashion-MNIST not found. Looked in:\n"
        + "\n".join(looked)
        + f"\nThen tried the torchvision download into {root}, which failed: {error}\n"
        + HOW_TO_GET
    )


def _first_complete(folders: list[tuple[Path, str]], looked: list[str]) -> tuple[Path, str] | None:
    """The first of ``folders`` holding all four files; each incomplete one adds a line to ``looked``."""
    for directory, label in folders:
        missing = missing_files(directory)
        if not missing:
            return directory, label
        state = "does not exist" if not directory.is_dir() else "lacks " + ", ".join(missing)
        looked.append(f"  {directory} ({label}): {state}")
    return None


def _incomplete(looked: list[str]) -> DataNotFoundError:
    return DataNotFoundError(
        f"Fashion-MNIST in ${ENV_VAR} is incomplete:\n"
        + "\n".join(looked)
        + f"\nrobench reads the folder ${ENV_VAR} names, not another copy: add the missing idx files "
        f"there (plain or .gz), or remove the incomplete folder (or unset {ENV_VAR}) to use robench's "
        "defaults (the Debian package dataset-fashion-mnist, then a download)."
    )


def _corrupt(path: Path, problem: str) -> DataNotFoundError:
    return DataNotFoundError(
        f"{path} is not a valid idx file: {problem}. Replace it with an intact copy "
        "(reinstall dataset-fashion-mnist, or delete it and download again)."
    )


def read_idx(path: Path, magic: int, item_shape: tuple[int, ...]) -> np.ndarray:
    """Parse an idx ubyte file (plain or gzip) into an array of shape ``(N, *item_shape)``.

    :raises DataNotFoundError: the file is unreadable, truncated, or not the expected kind
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise _corrupt(path, f"cannot read it ({exc})") from exc
    ndim = 1 + len(item_shape)
    header = 4 + 4 * ndim
    found = int.from_bytes(raw[:4], "big")
    if len(raw) >= 4 and found != magic:
        raise _corrupt(path, f"magic number {found}, expected {magic}")
    if len(raw) < header:
        raise _corrupt(path, f"only {len(raw)} bytes, shorter than its header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if tuple(dims[1:]) != item_shape:
        raise _corrupt(path, f"items of shape {dims[1:]}, expected {item_shape}")
    if len(raw) - header != math.prod(dims):
        raise _corrupt(path, f"header says {dims} but it holds {len(raw) - header} data bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


@dataclass(frozen=True, kw_only=True)
class FashionMNIST(robench.Dataset):
    """Fashion-MNIST: 28x28 grey images of clothing, 10 classes, 60k train / 10k test."""

    name: ClassVar[str] = "fashion-mnist"
    shape: ClassVar[DataShape] = DataShape(
        channels=1, height=28, width=28, num_classes=10, mean=(0.2860,), std=(0.3530,)
    )
    # 0.1 is the Adver-Fine paper's stated Fashion-MNIST eps.
    default_eps: ClassVar[dict[Norm, float]] = {"linf": 0.1, "l2": 1.5}

    def locate(self) -> str:
        """The folder holding the idx files and how it was found (downloads if need be)."""
        directory, label = find_data()
        return f"{directory} ({label})"

    def load(self, split: Split) -> ImageData:
        """Load ``split`` as uint8 Nx1x28x28 images and int64 labels."""
        if split not in FILES:
            raise ConfigError(f"unknown split {split!r}; use 'train' or 'test'")
        directory, _ = find_data()
        images_path, labels_path = (idx_file(directory, stem) for stem in FILES[split])
        assert images_path is not None and labels_path is not None  # find_data checked
        images = read_idx(images_path, IMAGES_MAGIC, (self.shape.height, self.shape.width))
        labels = read_idx(labels_path, LABELS_MAGIC, ())
        if len(images) != len(labels):
            raise _corrupt(labels_path, f"{len(labels)} labels for {len(images)} images")
        if labels.size and int(labels.max()) >= self.shape.num_classes:
            raise _corrupt(labels_path, f"label {int(labels.max())} is not a class index 0..9")
        return ImageData(
            images=torch.from_numpy(images.copy()).unsqueeze(1),
            labels=torch.from_numpy(labels.astype(np.int64)),
        )


@robench.hookimpl
def robench_datasets() -> list[type[robench.Dataset]]:
    """Register Fashion-MNIST."""
    return [FashionMNIST]
