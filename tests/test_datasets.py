"""Dataset plugins: lookup order, idx parsing, CIFAR pickles and the restricted unpickler.

Every test except the real-data one redirects the Debian folder, the download cache and the
download itself, so none reads the machine's data or touches the network.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from robench.context import ImageData
from robench.errors import ConfigError, DataNotFoundError
from robench.plugins import cifar, fashion_mnist
from robench.plugins.cifar import CIFAR10, CIFAR100, RestrictedUnpickler
from robench.plugins.fashion_mnist import FashionMNIST

REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class OfflineError(RuntimeError):
    """What the patched download raises: a stand-in for a machine without internet."""


@pytest.fixture
def downloads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """Patch both plugins' downloads to fail offline; the list records each attempt."""
    calls: list[tuple[str, ...]] = []

    def fail(*args: object) -> None:
        calls.append(tuple(str(a) for a in args))
        raise OfflineError("no route to host (test)")

    monkeypatch.setattr(fashion_mnist, "_download", fail)
    monkeypatch.setattr(cifar, "_download", fail)
    return calls


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, downloads: list[tuple[str, ...]]) -> Path:
    """No $ROBENCH_DATA, an empty Debian folder and cache under tmp_path, downloads failing."""
    monkeypatch.delenv("ROBENCH_DATA", raising=False)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.setattr(fashion_mnist, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(cifar, "CACHE_DIR", tmp_path / "cache")
    return tmp_path


# -- Fashion-MNIST ----------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    """Write ``array`` as an idx ubyte file, gzipped when the name ends in .gz."""
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def tiny_fashion(directory: Path, gz: bool, seed: int) -> dict[str, np.ndarray]:
    """Write all four idx files (5 train, 3 test samples) into ``directory``; return them."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.array([0, 9, 3, 3, 7], dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([1, 2, 8], dtype=np.uint8),
    }
    for stem, array in arrays.items():
        magic = fashion_mnist.IMAGES_MAGIC if array.ndim == 3 else fashion_mnist.LABELS_MAGIC
        write_idx(directory / (f"{stem}.gz" if gz else stem), array, magic)
    return arrays


def assert_split(data: ImageData, arrays: dict[str, np.ndarray], split: str) -> None:
    """``data`` holds exactly the images (with a channel axis added) and labels written."""
    images, labels = (arrays[stem] for stem in fashion_mnist.FILES[split])
    assert data.images.dtype == torch.uint8 and data.labels.dtype == torch.int64
    assert torch.equal(data.images, torch.from_numpy(images).unsqueeze(1))
    assert data.labels.tolist() == labels.tolist()


@pytest.mark.skipif(
    not REAL_FASHION_MNIST.is_dir(),
    reason=f"{REAL_FASHION_MNIST} absent: `apt-get install dataset-fashion-mnist` to run this",
)
def test_real_fashion_mnist_loads(monkeypatch: pytest.MonkeyPatch, downloads: list[tuple[str, ...]]) -> None:
    monkeypatch.delenv("ROBENCH_DATA", raising=False)
    dataset = FashionMNIST()
    assert str(REAL_FASHION_MNIST) in dataset.locate()
    for split, size in (("train", 60000), ("test", 10000)):
        data = dataset.load(split)
        assert data.images.shape == (size, 1, 28, 28) and data.images.dtype == torch.uint8
        assert data.labels.shape == (size,) and data.labels.dtype == torch.int64
        assert data.labels.min() == 0 and data.labels.max() == 9
        assert data.labels.bincount().tolist() == [size // 10] * 10  # balanced classes
        assert data.images.float().std() > 50  # real pictures, not a blank buffer
    assert downloads == []


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
def test_robench_data_takes_precedence(isolated: Path, monkeypatch: pytest.MonkeyPatch, gz: bool) -> None:
    tiny_fashion(fashion_mnist.DEBIAN_DIR, gz=True, seed=1)  # a rival the lookup must skip
    ours = tiny_fashion(isolated / "data" / "fashion-mnist", gz=gz, seed=2)
    monkeypatch.setenv("ROBENCH_DATA", str(isolated / "data"))
    dataset = FashionMNIST()
    assert dataset.locate().startswith(str(isolated / "data" / "fashion-mnist"))
    assert_split(dataset.load("train"), ours, "train")
    assert_split(dataset.load("test"), ours, "test")


def test_robench_data_torchvision_layout(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ours = tiny_fashion(isolated / "data" / "FashionMNIST" / "raw", gz=False, seed=3)
    monkeypatch.setenv("ROBENCH_DATA", str(isolated / "data"))
    assert_split(FashionMNIST().load("test"), ours, "test")


def test_debian_folder_used_when_robench_data_unset(isolated: Path) -> None:
    ours = tiny_fashion(fashion_mnist.DEBIAN_DIR, gz=True, seed=4)
    dataset = FashionMNIST()
    assert "Debian" in dataset.locate()
    assert_split(dataset.load("train"), ours, "train")


def test_download_is_the_last_resort(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written: dict[str, np.ndarray] = {}

    def fake_download(root: Path) -> Path:
        written.update(tiny_fashion(root / "FashionMNIST" / "raw", gz=True, seed=5))
        return root / "FashionMNIST" / "raw"

    monkeypatch.setattr(fashion_mnist, "_download", fake_download)
    monkeypatch.setenv("ROBENCH_DATA", str(isolated / "data"))
    assert "downloaded" in FashionMNIST().locate()
    # The second lookup finds the download in $ROBENCH_DATA, torchvision layout.
    assert "torchvision layout" in FashionMNIST().locate()
    assert_split(FashionMNIST().load("train"), written, "train")


def test_missing_names_every_place_and_the_fix(
    isolated: Path, monkeypatch: pytest.MonkeyPatch, downloads: list[tuple[str, ...]]
) -> None:
    data = isolated / "data"
    monkeypatch.setenv("ROBENCH_DATA", str(data))
    # A partial Debian folder: the message must say which file it lacks.
    write_idx(fashion_mnist.DEBIAN_DIR / "train-images-idx3-ubyte.gz", np.zeros((1, 28, 28)), 2051)
    with pytest.raises(DataNotFoundError) as info:
        FashionMNIST().locate()
    message = str(info.value)
    for place in (data / "fashion-mnist", data / "FashionMNIST" / "raw", fashion_mnist.DEBIAN_DIR):
        assert str(place) in message
    assert "lacks train-labels-idx1-ubyte(.gz)" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "$ROBENCH_DATA/fashion-mnist/" in message
    assert "OfflineError: no route to host (test)" in message
    assert downloads == [(str(data),)]


def test_missing_without_robench_data_mentions_cache(isolated: Path, downloads: list[tuple[str, ...]]) -> None:
    with pytest.raises(DataNotFoundError) as info:
        FashionMNIST().load("train")
    message = str(info.value)
    assert "$ROBENCH_DATA is not set" in message
    assert str(fashion_mnist.DEBIAN_DIR) in message
    assert str(isolated / "cache" / "FashionMNIST" / "raw") in message
    assert downloads == [(str(isolated / "cache"),)]


def _truncated(path: Path) -> None:
    write_idx(path, np.zeros((5, 28, 28), dtype=np.uint8), fashion_mnist.IMAGES_MAGIC)
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100]))


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda p: write_idx(p, np.zeros(5), 2049), "magic number 2049, expected 2051"),
        (_truncated, "data bytes"),
        (lambda p: p.write_bytes(b"<html>404 Not Found</html>"), "cannot read it"),
        (lambda p: p.write_bytes(p.read_bytes()[:-20]), "cannot read it"),
        (lambda p: write_idx(p, np.zeros((5, 32, 32)), 2051), "expected (28, 28)"),
    ],
    ids=["wrong-magic", "truncated", "not-gzip", "cut-gzip", "wrong-shape"],
)
def test_corrupt_idx_file_is_named(isolated: Path, damage: Callable[[Path], object], expected: str) -> None:
    tiny_fashion(fashion_mnist.DEBIAN_DIR, gz=True, seed=6)
    path = fashion_mnist.DEBIAN_DIR / "train-images-idx3-ubyte.gz"
    damage(path)
    with pytest.raises(DataNotFoundError, match="not a valid idx file") as info:
        FashionMNIST().load("train")
    assert str(path) in str(info.value) and expected in str(info.value)


def test_label_count_and_range_are_checked(isolated: Path) -> None:
    tiny_fashion(fashion_mnist.DEBIAN_DIR, gz=False, seed=7)
    labels = fashion_mnist.DEBIAN_DIR / "t10k-labels-idx1-ubyte"
    write_idx(labels, np.array([1, 2]), fashion_mnist.LABELS_MAGIC)
    with pytest.raises(DataNotFoundError, match="2 labels for 3 images"):
        FashionMNIST().load("test")
    write_idx(labels, np.array([1, 2, 10]), fashion_mnist.LABELS_MAGIC)
    with pytest.raises(DataNotFoundError, match="label 10 is not a class index"):
        FashionMNIST().load("test")


def test_fashion_mnist_contract(isolated: Path) -> None:
    assert FashionMNIST.name == "fashion-mnist"
    assert FashionMNIST.shape.channels == 1 and FashionMNIST.shape.num_classes == 10
    assert FashionMNIST.default_eps == {"linf": 0.1, "l2": 1.5}
    assert fashion_mnist.robench_datasets() == [FashionMNIST]
    assert FashionMNIST.create({}).params() == {}
    with pytest.raises(ConfigError, match="unknown split"):
        FashionMNIST().load("val")  # type: ignore[arg-type]


# -- CIFAR ------------------------------------------------------------------------------


def write_batch(
    path: Path, n: int, label_key: str, classes: int, seed: int, bytes_keys: bool
) -> tuple[np.ndarray, list[int]]:
    """Write a CIFAR batch like the originals: numpy data, list labels, protocol 2."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, classes, n)]
    batch = {"batch_label": "batch", "data": data, label_key: labels, "filenames": ["a.png"] * n}
    keyed: dict[str | bytes, object] = {k.encode() if bytes_keys else k: v for k, v in batch.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(keyed, protocol=2))
    return data, labels


def cifar10_folder(folder: Path, classes: int = 10) -> None:
    """Fill ``folder`` with one-image CIFAR-10 batches (labels drawn from ``classes``)."""
    for name in (*CIFAR10.train_files, *CIFAR10.test_files):
        write_batch(folder / name, 1, "labels", classes, 0, bytes_keys=True)


def assert_cifar(data: ImageData, raw: list[tuple[np.ndarray, list[int]]]) -> None:
    """Images are each row reshaped channel-major; labels are concatenated in file order."""
    pixels = np.concatenate([r[0] for r in raw])
    images = data.images
    assert images.dtype == torch.uint8 and images.shape == (len(pixels), 3, 32, 32)
    # Channel c, row h, column w sits at c*1024 + h*32 + w of the flat row.
    assert images[1, 2, 3, 4] == pixels[1, 2 * 1024 + 3 * 32 + 4]
    assert images[0, 0, 31, 0] == pixels[0, 31 * 32]
    assert torch.equal(images.reshape(len(pixels), -1), torch.from_numpy(pixels))
    assert data.labels.dtype == torch.int64
    assert data.labels.tolist() == [v for r in raw for v in r[1]]


@pytest.mark.parametrize("bytes_keys", [True, False], ids=["bytes-keys", "str-keys"])
def test_cifar10_loads_torchvision_layout(isolated: Path, monkeypatch: pytest.MonkeyPatch, bytes_keys: bool) -> None:
    folder = isolated / "data" / "cifar-10-batches-py"
    train = [write_batch(folder / f"data_batch_{i}", 2, "labels", 10, i, bytes_keys) for i in range(1, 6)]
    test = [write_batch(folder / "test_batch", 3, "labels", 10, 9, bytes_keys)]
    monkeypatch.setenv("ROBENCH_DATA", str(isolated / "data"))
    assert CIFAR10().locate() == str(folder)
    assert_cifar(CIFAR10().load("train"), train)
    assert_cifar(CIFAR10().load("test"), test)


def test_cifar100_uses_fine_labels(isolated: Path) -> None:
    folder = isolated / "cache" / "cifar-100-python"  # $ROBENCH_DATA unset: the cache
    train = write_batch(folder / "train", 4, "fine_labels", 100, 1, bytes_keys=True)
    test = write_batch(folder / "test", 2, "fine_labels", 100, 2, bytes_keys=True)
    assert_cifar(CIFAR100().load("train"), [train])
    assert_cifar(CIFAR100().load("test"), [test])


def py2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled as python 2 wrote the original files: str opcodes, numpy.core names."""

    def string(raw: bytes) -> bytes:  # BINSTRING: a python-2 str
        return b"T" + struct.pack("<I", len(raw)) + raw

    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + string(b"b")
        + b"\x87R(K\x01" + struct.pack("<BI", ord("J"), data.shape[0]) + b"M\x00\x0c\x86"
        + b"cnumpy\ndtype\n" + string(b"u1") + b"K\x00K\x01\x87R(K\x03" + string(b"|")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89" + string(data.tobytes()) + b"tb"
    )  # fmt: skip
    items = b"".join(b"K" + bytes([v]) for v in labels)
    return b"\x80\x02}(" + string(b"data") + array + string(b"labels") + b"](" + items + b"eu."


def test_python2_pickles_are_accepted(isolated: Path) -> None:
    # The original files name numpy.core.multiarray (numpy 2 says numpy._core) and hold
    # python-2 strs, which latin1 must turn back into the exact pixel bytes.
    folder = isolated / "cache" / "cifar-10-batches-py"
    cifar10_folder(folder)
    data = np.random.default_rng(0).integers(0, 256, (2, 3072), dtype=np.uint8)
    (folder / "test_batch").write_bytes(py2_batch(data, [4, 9]))
    assert_cifar(CIFAR10().load("test"), [(data, [4, 9])])


def test_restricted_unpickler_refuses_os_system(isolated: Path) -> None:
    sentinel = isolated / "pwned"
    command = f"touch {sentinel}".encode()
    # What pickle.dumps writes for os.system(command): GLOBAL, one-tuple, REDUCE (the call).
    payload = b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(command)) + command + b"\x85R."
    with pytest.raises(pickle.UnpicklingError, match=r"refused to load global \w+\.system"):
        RestrictedUnpickler(io.BytesIO(payload)).load()
    folder = isolated / "cache" / "cifar-10-batches-py"
    cifar10_folder(folder)
    (folder / "data_batch_1").write_bytes(payload)
    with pytest.raises(DataNotFoundError, match="not a valid CIFAR batch") as info:
        CIFAR10().load("train")
    assert "system" in str(info.value) and str(folder / "data_batch_1") in str(info.value)
    assert not sentinel.exists()  # refused before the call, never executed


def test_cifar_bad_batches_are_named(isolated: Path) -> None:
    folder = isolated / "cache" / "cifar-100-python"
    write_batch(folder / "test", 1, "fine_labels", 100, 0, bytes_keys=True)
    (folder / "train").write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8)}, 2))
    with pytest.raises(DataNotFoundError, match="no 'fine_labels' entry"):
        CIFAR100().load("train")
    batch = {b"data": np.zeros((2, 10), np.uint8), b"fine_labels": [0, 1]}
    (folder / "train").write_bytes(pickle.dumps(batch, 2))
    with pytest.raises(DataNotFoundError, match=r"expected uint8 \(N, 3072\)"):
        CIFAR100().load("train")
    (folder / "train").write_bytes(b"\x80\x02}q\x00")  # cut off mid-pickle
    with pytest.raises(DataNotFoundError, match="not a valid CIFAR batch"):
        CIFAR100().load("train")


def test_cifar_labels_out_of_range(isolated: Path) -> None:
    folder = isolated / "cache" / "cifar-10-batches-py"
    cifar10_folder(folder, classes=100)  # CIFAR-100 labels in CIFAR-10 files
    with pytest.raises(DataNotFoundError, match=r"has classes 0\.\.9"):
        CIFAR10().load("train")


def test_cifar_missing_names_place_and_download_error(isolated: Path, downloads: list[tuple[str, ...]]) -> None:
    # An incomplete folder in robench's own cache is downloaded again (one in $ROBENCH_DATA is
    # an error instead: tests/test_bad_inputs.py).
    data = isolated / "cache"
    write_batch(data / "cifar-10-batches-py" / "data_batch_1", 1, "labels", 10, 0, True)
    with pytest.raises(DataNotFoundError) as info:
        CIFAR10().locate()
    message = str(info.value)
    assert str(data / "cifar-10-batches-py") in message
    assert "lacks data_batch_2" in message and "test_batch" in message
    assert "OfflineError: no route to host (test)" in message
    assert "$ROBENCH_DATA/cifar-10-batches-py/" in message
    assert downloads == [("CIFAR10", str(data))]


def test_cifar_download_fallback(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_download(torchvision_class: str, root: Path) -> None:
        assert torchvision_class == "CIFAR100"
        write_batch(root / "cifar-100-python" / "train", 2, "fine_labels", 100, 0, True)
        write_batch(root / "cifar-100-python" / "test", 2, "fine_labels", 100, 1, True)

    monkeypatch.setattr(cifar, "_download", fake_download)
    assert CIFAR100().locate() == str(isolated / "cache" / "cifar-100-python")
    assert len(CIFAR100().load("test")) == 2


def test_cifar_contract() -> None:
    assert cifar.robench_datasets() == [CIFAR10, CIFAR100]
    assert (CIFAR10.name, CIFAR100.name) == ("cifar10", "cifar100")
    assert (CIFAR10.shape.num_classes, CIFAR100.shape.num_classes) == (10, 100)
    for cls in (CIFAR10, CIFAR100):
        assert len(cls.shape.mean) == len(cls.shape.std) == 3
        assert cls.default_eps == {"linf": 8 / 255, "l2": 0.5}
        assert (cls.shape.channels, cls.shape.height, cls.shape.width) == (3, 32, 32)
    with pytest.raises(ConfigError, match="unknown split"):
        CIFAR10().load("val")  # type: ignore[arg-type]
