"""CIFAR-10 and CIFAR-100, read from torchvision's on-disk layout of python pickles.

Data lives in ``$ROBENCH_DATA/cifar-10-batches-py/`` and ``$ROBENCH_DATA/cifar-100-python/``
(``~/.cache/robench/data`` when ``$ROBENCH_DATA`` is unset); when absent, the archive is
downloaded there with torchvision's URL and checksum. A folder under ``$ROBENCH_DATA`` that
exists but lacks some batch files is an error listing them, not a download over what the
user put there; in robench's own cache an incomplete folder is downloaded again.

The batches are pickles, and unpickling runs whatever code a file names. So they are read
with :class:`RestrictedUnpickler`, which rebuilds numpy arrays and plain data and refuses
every other global (DESIGN.md §8: never an arbitrary unpickle).
"""

from __future__ import annotations

import codecs
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

import robench
from robench import ConfigError, DataNotFoundError, DataShape, ImageData, Norm, Split

ENV_VAR = "ROBENCH_DATA"
CACHE_DIR = Path("~/.cache/robench/data")
"""Download target when ``$ROBENCH_DATA`` is unset (``~`` is expanded at lookup time)."""
SOURCE_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The globals a pickled ndarray names, under numpy 1 and numpy 2 module paths."""
    try:  # numpy 2 moved numpy.core to numpy._core; importing the old path warns
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # protocol-2 pickles written by python 3 encode bytes as _codecs.encode(str, 'latin1')
        ("_codecs", "encode"): codecs.encode,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    return allowed


ALLOWED_GLOBALS = _numpy_globals()


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and plain data, and refuses anything else."""

    def find_class(self, module: str, name: str) -> Any:
        """Return an allowed global; raise :class:`pickle.UnpicklingError` for the rest."""
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to load global {module}.{name}: a dataset pickle may only hold numpy arrays and plain data"
            ) from None


def restricted_load(path: Path) -> object:
    """Unpickle ``path`` with :class:`RestrictedUnpickler`.

    ``latin1`` decodes python-2 strings as the original CIFAR files need: numpy array buffers
    survive it byte for byte, and keys arrive as ``str`` (bytes keys stay bytes).
    """
    with path.open("rb") as f:
        return RestrictedUnpickler(f, encoding="latin1").load()


def data_root() -> Path:
    """``$ROBENCH_DATA`` if set and non-empty, else the user cache."""
    value = os.environ.get(ENV_VAR, "")
    return Path(value).expanduser() if value else CACHE_DIR.expanduser()


def _download(torchvision_class: str, root: Path) -> None:
    """Fetch and extract the archive into ``root`` with torchvision's URL and md5.

    ``torchvision.datasets.CIFAR10(root, download=True)`` would also unpickle every batch
    with plain pickle, so only its download helper and the class's URL are used.
    """
    # Imported here: torchvision is slow to import and only this fallback needs it.
    import torchvision.datasets
    from torchvision.datasets.utils import download_and_extract_archive

    spec = getattr(torchvision.datasets, torchvision_class)
    download_and_extract_archive(spec.url, str(root), filename=spec.filename, md5=spec.tgz_md5)


def _get(batch: dict[Any, Any], key: str) -> Any:
    """``batch[key]``, whether the file's keys are str or bytes."""
    for candidate in (key, key.encode()):
        if candidate in batch:
            return batch[candidate]
    raise ValueError(f"no {key!r} entry (keys: {', '.join(sorted(map(repr, batch)))})")


def read_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch file as (uint8 Nx3x32x32 images, int64 labels).

    :raises DataNotFoundError: the file cannot be unpickled safely or is not a CIFAR batch
    """
    try:
        batch = restricted_load(path)
        if not isinstance(batch, dict):
            raise TypeError(f"it holds a {type(batch).__name__}, not a dict")
        data = np.asarray(_get(batch, "data"))
        labels = np.asarray(_get(batch, label_key), dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, OSError, TypeError, ValueError) as exc:
        raise _corrupt(path, str(exc)) from exc
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise _corrupt(path, f"'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.shape != (len(data),):
        raise _corrupt(path, f"{labels.shape} labels for {len(data)} images")
    # Each row is channel-major: 1024 red, then 1024 green, then 1024 blue values.
    return data.reshape(-1, 3, 32, 32), labels


def _corrupt(path: Path, problem: str) -> DataNotFoundError:
    return DataNotFoundError(
        f"{path} is not a valid CIFAR batch: {problem}. Delete the folder and let robench "
        "download it again, or replace it with the original python-version archive."
    )


@dataclass(frozen=True, kw_only=True)
class CifarDataset(robench.Dataset):
    """Shared loader for the CIFAR datasets; subclasses name their folder and files."""

    folder: ClassVar[str]
    train_files: ClassVar[tuple[str, ...]]
    test_files: ClassVar[tuple[str, ...]]
    label_key: ClassVar[str]
    torchvision_class: ClassVar[str]
    default_eps: ClassVar[dict[Norm, float]] = {"linf": 8 / 255, "l2": 0.5}

    def _missing(self, directory: Path) -> list[str]:
        files = (*self.train_files, *self.test_files)
        return [name for name in files if not (directory / name).is_file()]

    def find_data(self) -> Path:
        """The folder holding every batch file, downloading it if need be.

        :raises DataNotFoundError: the ``$ROBENCH_DATA`` folder lacks some files, or nothing
            was found and the download failed; the message says where robench looked and how
            to get the data
        """
        root = data_root()
        directory = root / self.folder
        missing = self._missing(directory)
        if not missing:
            return directory
        if directory.is_dir() and os.environ.get(ENV_VAR):  # named by the user: never download over it
            raise DataNotFoundError(
                f"{self.name} in ${ENV_VAR} is incomplete: {directory} lacks {', '.join(missing)}. "
                f"Add the missing files (from the python-version archive, {SOURCE_PAGE}), or remove the "
                "folder to let robench download it there."
            )
        state = "does not exist" if not directory.is_dir() else "lacks " + ", ".join(missing)
        try:
            _download(self.torchvision_class, root)
        except Exception as exc:  # any failure (offline, disk, checksum) ends the same way
            error = f"{type(exc).__name__}: {exc}"
        else:
            missing = self._missing(directory)
            if not missing:
                return directory
            error = f"it finished but {directory} lacks {', '.join(missing)}"
        raise DataNotFoundError(self._not_found(directory, state, root, error))

    def _not_found(self, directory: Path, state: str, root: Path, error: str) -> str:
        source = f"${ENV_VAR}" if os.environ.get(ENV_VAR) else f"${ENV_VAR} unset, user cache"
        files = ", ".join((*self.train_files, *self.test_files))
        return (
            f"{self.name} not found. Looked in:\n  {directory} ({source}): {state}\n"
            f"Then tried the torchvision download into {root}, which failed: {error}\n"
            f"To get the data: download the python-version archive from {SOURCE_PAGE} "
            f"({self.folder}: {files}), extract "
            f"it under ${ENV_VAR} so that ${ENV_VAR}/{self.folder}/ exists, and set "
            f"{ENV_VAR}; or run once where the download can reach the internet."
        )

    def locate(self) -> str:
        """The folder holding the batch files (downloads them if need be)."""
        return str(self.find_data())

    def load(self, split: Split) -> ImageData:
        """Load ``split`` as uint8 Nx3x32x32 images and int64 labels."""
        if split not in ("train", "test"):
            raise ConfigError(f"unknown split {split!r}; use 'train' or 'test'")
        directory = self.find_data()
        files = self.train_files if split == "train" else self.test_files
        parts = [read_batch(directory / name, self.label_key) for name in files]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        if labels.size and (labels.min() < 0 or labels.max() >= self.shape.num_classes):
            raise DataNotFoundError(
                f"{directory}: labels span {labels.min()}..{labels.max()}, but {self.name} "
                f"has classes 0..{self.shape.num_classes - 1}; the files belong to another "
                "dataset or are damaged."
            )
        return ImageData(images=torch.from_numpy(images), labels=torch.from_numpy(labels))


@dataclass(frozen=True, kw_only=True)
class CIFAR10(CifarDataset):
    """CIFAR-10: 32x32 colour images, 10 classes, 50k train / 10k test."""

    name: ClassVar[str] = "cifar10"
    # DVERGE's normalisation constants.
    shape: ClassVar[DataShape] = DataShape(
        channels=3,
        height=32,
        width=32,
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2023, 0.1994, 0.2010),
    )
    folder: ClassVar[str] = "cifar-10-batches-py"
    train_files: ClassVar[tuple[str, ...]] = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files: ClassVar[tuple[str, ...]] = ("test_batch",)
    label_key: ClassVar[str] = "labels"
    torchvision_class: ClassVar[str] = "CIFAR10"


@dataclass(frozen=True, kw_only=True)
class CIFAR100(CifarDataset):
    """CIFAR-100: 32x32 colour images, 100 fine classes, 50k train / 10k test."""

    name: ClassVar[str] = "cifar100"
    shape: ClassVar[DataShape] = DataShape(
        channels=3,
        height=32,
        width=32,
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    )
    folder: ClassVar[str] = "cifar-100-python"
    train_files: ClassVar[tuple[str, ...]] = ("train",)
    test_files: ClassVar[tuple[str, ...]] = ("test",)
    label_key: ClassVar[str] = "fine_labels"
    torchvision_class: ClassVar[str] = "CIFAR100"


@robench.hookimpl
def robench_datasets() -> list[type[robench.Dataset]]:
    """Register CIFAR-10 and CIFAR-100."""
    return [CIFAR10, CIFAR100]
