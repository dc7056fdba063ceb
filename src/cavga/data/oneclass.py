"""The one-class protocol (MNIST, Fashion-MNIST, CIFAR-10, class folders).

Train on one class of the train split; test on the whole test split, that class NORMAL and the others
ANOMALOUS. Sources are read from local files by their documented byte layouts; never downloaded.
"""

from __future__ import annotations

import codecs
import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cavga.data.dataset import DatasetSplits, Record, make_splits
from cavga.data.io import list_image_files, list_subdirs
from cavga.data.transforms import Preprocess
from cavga.data.types import ANOMALOUS, NORMAL
from cavga.errors import ConfigError, DataError

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# IDX type byte -> numpy dtype (big-endian multi-byte values), from the format's documentation.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = ["test_batch"]
CIFAR_RECORD = 1 + 3 * 32 * 32  # binary version: 1 label byte, then 1024 R, 1024 G, 1024 B bytes
SOURCES = ("idx", "cifar10", "folders")


# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)


def _idx_file(root: Path, name: str) -> Path | None:
    dotted = name.replace("-idx", ".idx")  # train-images-idx3-ubyte -> train-images.idx3-ubyte
    for base in (name, dotted):
        for candidate in (root / base, root / f"{base}.gz"):
            if candidate.is_file():
                return candidate
    return None


def find_idx_files(root: str | Path) -> dict[str, Path] | None:
    """The four MNIST-style IDX files in ``root`` (raw or .gz, dashed or dotted names), or None."""
    root = Path(root)
    found = {key: _idx_file(root, name) for key, name in IDX_NAMES.items()}
    if all(found.values()):
        return found  # type: ignore[return-value]
    if any(found.values()):
        missing = [IDX_NAMES[k] for k, v in found.items() if v is None]
        raise DataError(f"incomplete IDX dataset in {root}: missing {missing} (raw or .gz)")
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from e


def read_idx_file(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """Parse one IDX file: magic 0x00 0x00 <type> <ndim>, then ndim big-endian uint32 sizes, then data."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    dims_count = data[3]
    if ndim is not None and dims_count != ndim:
        raise DataError(f"{path} has {dims_count} dimensions, expected {ndim}")
    header = 4 + 4 * dims_count
    if len(data) < header:
        raise DataError(f"{path} is truncated inside its header")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims_count)]
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(f"{path} holds {len(data) - header} data bytes but its header {dims} needs {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(root: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read MNIST-style IDX files: (train_images uint8 NxHxW, train_labels, test_images, test_labels)."""
    files = find_idx_files(root)
    if files is None:
        raise DataError(f"no IDX files in {root}: expected {list(IDX_NAMES.values())} (raw or .gz)")
    return _idx_arrays(files)


def _idx_arrays(files: dict[str, Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    out = []
    for split in ("train", "test"):
        images = read_idx_file(files[f"{split}_images"], ndim=3)
        labels = read_idx_file(files[f"{split}_labels"], ndim=1)
        if images.dtype != np.uint8:
            raise DataError(f"{files[f'{split}_images']} holds {images.dtype} values, expected uint8 pixels")
        if len(images) != len(labels):
            raise DataError(
                f"{files[f'{split}_images']} has {len(images)} images but "
                f"{files[f'{split}_labels']} has {len(labels)} labels"
            )
        out += [images, labels.astype(np.int64)]
    return out[0], out[1], out[2], out[3]


# ---------------------------------------------------------------- CIFAR-10


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    # numpy's own protocol-5 reconstructor (numpy.core.numeric._frombuffer), without the module lookup.
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, "latin1").
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that builds dicts, lists, bytes, numbers and numpy arrays, and refuses any other global."""

    def find_class(self, module: str, name: str) -> Any:
        multiarray = ("numpy.core.multiarray", "numpy._core.multiarray")
        if module in multiarray and name in ("_reconstruct", "scalar"):
            return getattr(_multiarray(), name)
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if module == "numpy" and name == "dtype":
            return np.dtype
        if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
            return _frombuffer
        if module == "_codecs" and name == "encode":
            return _latin1_encode
        raise pickle.UnpicklingError(f"refused to load {module}.{name} (only numpy arrays are allowed)")


def _multiarray() -> Any:
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return multiarray


def restricted_pickle_load(path: str | Path) -> Any:
    """Unpickle ``path`` admitting only numpy arrays and plain containers; anything else is a DataError."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: {e}") from e
    except Exception as e:  # truncated or malformed pickles raise EOFError, ValueError, ...
        raise DataError(f"{path} is not a readable CIFAR-10 python batch: {e}") from e


def _cifar_dirs(root: Path) -> list[Path]:
    return [root, root / "cifar-10-batches-bin", root / "cifar-10-batches-py"]


def find_cifar10(root: str | Path) -> tuple[str, Path] | None:
    """("binary" | "python", folder) where CIFAR-10 batch files are, or None. Binary wins (no pickle)."""
    root = Path(root)
    for kind, suffix in (("binary", ".bin"), ("python", "")):
        for folder in _cifar_dirs(root):
            if (folder / f"{CIFAR_TEST[0]}{suffix}").is_file() or (folder / f"{CIFAR_TRAIN[0]}{suffix}").is_file():
                return kind, folder
    return None


def _cifar_binary(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data = _read_bytes(path)
    if not data or len(data) % CIFAR_RECORD:
        raise DataError(f"{path} has {len(data)} bytes, not a multiple of the {CIFAR_RECORD}-byte CIFAR-10 record")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, CIFAR_RECORD)
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), records[:, 0].astype(np.int64)


def _cifar_python(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = restricted_pickle_load(path)
    if not isinstance(batch, dict):
        raise DataError(f"{path} does not hold a CIFAR-10 batch dict")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"{path} lacks the 'data' and 'labels' entries of a CIFAR-10 batch")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {len(labels)} labels for {len(data)} images")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


@dataclass
class _ArraySplit:
    images: np.ndarray
    labels: np.ndarray
    files: list[tuple[str, int]]  # (file, number of images from it), in order

    def path(self, index: int) -> str:
        for file, count in self.files:
            if index < count:
                return f"{file}#{index}"
            index -= count
        raise IndexError(index)


def _cifar_splits(root: Path) -> tuple[_ArraySplit, _ArraySplit]:
    found = find_cifar10(root)
    if found is None:
        raise DataError(
            f"no CIFAR-10 batches in {root}: expected data_batch_1..5(.bin) and test_batch(.bin), "
            "optionally inside cifar-10-batches-bin/ or cifar-10-batches-py/"
        )
    kind, folder = found
    suffix, reader = (".bin", _cifar_binary) if kind == "binary" else ("", _cifar_python)
    splits = []
    for names in (CIFAR_TRAIN, CIFAR_TEST):
        parts = []
        for name in names:
            path = folder / f"{name}{suffix}"
            if not path.is_file():
                raise DataError(f"CIFAR-10 ({kind} version) batch missing: {path}")
            parts.append((path, *reader(path)))
        splits.append(
            _ArraySplit(
                images=np.concatenate([p[1] for p in parts]),
                labels=np.concatenate([p[2] for p in parts]),
                files=[(str(p[0]), len(p[1])) for p in parts],
            )
        )
    return splits[0], splits[1]


def read_cifar10(root: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read CIFAR-10: (train_images uint8 Nx32x32x3, train_labels, test_images, test_labels).

    The binary version (data_batch_1..5.bin, test_batch.bin) is parsed by its byte layout; the python
    version (pickles data_batch_1..5, test_batch) only through an unpickler that admits numpy arrays.
    """
    train, test = _cifar_splits(Path(root))
    return train.images, train.labels, test.images, test.labels


# ---------------------------------------------------------------- class folders


def read_class_folders(root: str | Path) -> tuple[list[Path], list[str], list[Path], list[str]]:
    """Read ``<root>/train/<class>/*`` and ``<root>/test/<class>/*``: (train_files, train_classes,
    test_files, test_classes), sorted by class then file name."""
    root = Path(root)
    out: list[Any] = []
    for split in ("train", "test"):
        folder = root / split
        if not folder.is_dir():
            raise DataError(f"{root} is not a class-folder dataset: expected {split}/<class>/<images>")
        files: list[Path] = []
        classes: list[str] = []
        for class_dir in list_subdirs(folder):
            images = list_image_files(class_dir)
            files += images
            classes += [class_dir.name] * len(images)
        if not files:
            raise DataError(f"no images in {folder}/<class>/: expected {split}/<class>/<images>")
        out += [files, classes]
    return out[0], out[1], out[2], out[3]


def is_class_folders(root: Path) -> bool:
    """train/ and test/ with the same (two or more) class sub-folders."""
    if not ((root / "train").is_dir() and (root / "test").is_dir()):
        return False
    train = {p.name for p in list_subdirs(root / "train")}
    test = {p.name for p in list_subdirs(root / "test")}
    return len(train) >= 2 and test <= train and bool(test)


def detect_oneclass_source(root: str | Path) -> str | None:
    """ "idx", "cifar10" or "folders" from the files present in ``root``, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    if find_idx_files(root) is not None:
        return "idx"
    if find_cifar10(root) is not None:
        return "cifar10"
    if is_class_folders(root):
        return "folders"
    return None


# ---------------------------------------------------------------- the protocol


def read_oneclass(
    root: str | Path,
    normal_class: int | str,
    preprocess: Preprocess | None = None,
    source: str | None = None,
) -> DatasetSplits:
    """One-class protocol: train = the train images of ``normal_class``; test = every test image,
    NORMAL for that class and ANOMALOUS for the others. defect_type is the class (name or number) as a
    string; there are no masks. ``source`` ("idx", "cifar10", "folders") is detected when None."""
    root = Path(root)
    if source is None:
        source = detect_oneclass_source(root)
        if source is None:
            raise DataError(
                f"no one-class source in {root}: expected MNIST-style IDX files ({IDX_NAMES['train_images']}, ...), "
                "CIFAR-10 batches (data_batch_1..5, test_batch, .bin or python), or train/<class>/, test/<class>/"
            )
    elif source not in SOURCES:
        raise ConfigError(f"source must be one of {SOURCES}, got {source!r}")
    wanted = str(normal_class)
    info = {"format": "oneclass", "root": str(root), "source": source, "normal_class": wanted}

    if source == "folders":
        train_files, train_classes, test_files, test_classes = read_class_folders(root)
        _check_class(wanted, sorted(set(train_classes)), root)
        train = [
            Record(image=p, label=NORMAL, defect_type=c, path=str(p))
            for p, c in zip(train_files, train_classes, strict=True)
            if c == wanted
        ]
        test = [
            Record(image=p, label=NORMAL if c == wanted else ANOMALOUS, defect_type=c, path=str(p))
            for p, c in zip(test_files, test_classes, strict=True)
        ]
        return make_splits(train, test, preprocess, info)

    if source == "idx":
        files = find_idx_files(root)
        if files is None:
            raise DataError(f"no IDX files in {root}: expected {list(IDX_NAMES.values())} (raw or .gz)")
        tr_images, tr_labels, te_images, te_labels = _idx_arrays(files)
        train_split = _ArraySplit(tr_images, tr_labels, [(str(files["train_images"]), len(tr_images))])
        test_split = _ArraySplit(te_images, te_labels, [(str(files["test_images"]), len(te_images))])
    else:
        train_split, test_split = _cifar_splits(root)

    _check_class(wanted, sorted({str(v) for v in np.unique(train_split.labels)}), root)
    keep = np.flatnonzero(train_split.labels.astype(str) == wanted)
    train_array = train_split.images[keep]  # a copy of only this class: small to hand to DataLoader workers
    train = [
        Record(image=j, label=NORMAL, defect_type=wanted, path=train_split.path(int(i))) for j, i in enumerate(keep)
    ]
    test_names = test_split.labels.astype(str)
    test = [
        Record(
            image=i,
            label=NORMAL if name == wanted else ANOMALOUS,
            defect_type=str(name),
            path=test_split.path(i),
        )
        for i, name in enumerate(test_names)
    ]
    return make_splits(train, test, preprocess, info, train_array=train_array, test_array=test_split.images)


def _check_class(wanted: str, classes: list[str], root: Path) -> None:
    if wanted not in classes:
        shown = sorted(classes, key=lambda c: (len(c), c))
        raise DataError(f"class {wanted!r} is not in the train split of {root}; classes: {shown}")
