"""One-class sources (IDX, CIFAR-10 binary and python, class folders), the protocol, and real MNIST."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from cavga.data import (
    ANOMALOUS,
    NORMAL,
    detect_format,
    load_dataset,
    read_cifar10,
    read_class_folders,
    read_idx,
    read_oneclass,
)
from cavga.errors import ConfigError, DataError

# ---------------------------------------------------------------- IDX


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX by its documented layout: 0, 0, type 0x08 (ubyte), ndim, big-endian uint32 dims, data."""
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx(root: Path, seed: int = 0, gz: bool = True, dotted: bool = False) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    arrays = (
        rng.integers(0, 256, (12, 4, 5), dtype=np.uint8),
        np.array([0, 1, 2] * 4, dtype=np.uint8),
        rng.integers(0, 256, (6, 4, 5), dtype=np.uint8),
        np.array([2, 0, 1, 0, 2, 1], dtype=np.uint8),
    )
    root.mkdir(parents=True, exist_ok=True)
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    for name, array in zip(names, arrays, strict=True):
        if dotted:
            name = name.replace("-idx", ".idx")
        data = idx_bytes(array)
        if gz:
            with gzip.open(root / f"{name}.gz", "wb") as f:
                f.write(data)
        else:
            (root / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize(("gz", "dotted"), [(True, False), (False, False), (False, True), (True, True)])
def test_read_idx_round_trip(tmp_path, gz, dotted):
    arrays = write_idx(tmp_path, gz=gz, dotted=dotted)
    out = read_idx(tmp_path)
    assert len(out) == 4
    for got, want in zip(out, arrays, strict=True):
        assert np.array_equal(got, want)
    assert out[0].dtype == np.uint8 and out[0].shape == (12, 4, 5)


def test_idx_errors_name_the_file(tmp_path):
    write_idx(tmp_path, gz=False)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    good = labels.read_bytes()
    labels.write_bytes(b"\x00\x01\x08\x01" + good[4:])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.*magic"):
        read_idx(tmp_path)
    labels.write_bytes(good[:-1])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.*5 data bytes.*needs 6"):
        read_idx(tmp_path)
    labels.write_bytes(idx_bytes(np.zeros(5, dtype=np.uint8)))
    with pytest.raises(DataError, match=r"t10k-images.*6 images.*t10k-labels.*5 labels"):
        read_idx(tmp_path)
    labels.unlink()
    with pytest.raises(DataError, match=r"missing.*t10k-labels-idx1-ubyte"):
        read_idx(tmp_path)
    with pytest.raises(DataError, match="no IDX files"):
        read_idx(tmp_path / "nothing")


def test_oneclass_protocol_on_idx(tmp_path):
    train_images, train_labels, test_images, test_labels = write_idx(tmp_path)
    assert detect_format(tmp_path) == "oneclass"
    splits = read_oneclass(tmp_path, normal_class=1)
    assert len(splits.train) == int((train_labels == 1).sum()) == 4
    assert splits.train.labels == [NORMAL] * 4 and splits.train.defect_types == ["1"] * 4
    s = splits.train[1]  # the second class-1 image is train index 4
    assert torch.allclose(s.image[0], torch.from_numpy(train_images[4] / 255).float())
    assert s.path.endswith("train-images-idx3-ubyte.gz#4") and s.mask is None
    assert splits.test.labels == [ANOMALOUS if v != 1 else NORMAL for v in test_labels]
    assert splits.test.defect_types == [str(v) for v in test_labels]
    assert not splits.test.has_masks and splits.info["normal_class"] == "1"
    with pytest.raises(DataError, match=r"class '7'.*\['0', '1', '2'\]"):
        read_oneclass(tmp_path, normal_class=7)
    with pytest.raises(ConfigError, match="normal_class"):
        load_dataset(tmp_path)
    other = load_dataset(tmp_path, normal_class="2").test.labels
    assert other == [NORMAL if v == 2 else ANOMALOUS for v in test_labels]


# ---------------------------------------------------------------- CIFAR-10


def fake_cifar(n_per_batch: int = 4, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """batch name -> (data uint8 (N, 3072) in CHW order, labels)."""
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {
        n: (rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8), rng.integers(0, 10, n_per_batch)) for n in names
    }


def write_cifar_binary(root: Path, batches) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, (data, labels) in batches.items():
        records = np.concatenate([labels.astype(np.uint8)[:, None], data], axis=1)
        (root / f"{name}.bin").write_bytes(records.tobytes())


def write_cifar_python(root: Path, batches, protocol: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, (data, labels) in batches.items():
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in labels],
            b"data": data,
            b"filenames": [f"{i}.png".encode() for i in range(len(data))],
        }
        with (root / name).open("wb") as f:
            pickle.dump(batch, f, protocol=protocol)


def expected_cifar(batches, names):
    data = np.concatenate([batches[n][0] for n in names])
    labels = np.concatenate([batches[n][1] for n in names])
    # Independent of the reader's reshape: pixel (y, x) channel c is byte c*1024 + y*32 + x.
    images = np.empty((len(data), 32, 32, 3), dtype=np.uint8)
    for c in range(3):
        images[..., c] = data[:, c * 1024 : (c + 1) * 1024].reshape(-1, 32, 32)
    return images, labels


def check_cifar(out, batches):
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    for got, want in zip(
        out, (*expected_cifar(batches, train_names), *expected_cifar(batches, ["test_batch"])), strict=True
    ):
        assert np.array_equal(got, want)
    assert out[0].shape == (20, 32, 32, 3) and out[2].shape == (4, 32, 32, 3)


def test_cifar_binary(tmp_path):
    batches = fake_cifar()
    write_cifar_binary(tmp_path / "cifar-10-batches-bin", batches)
    check_cifar(read_cifar10(tmp_path), batches)
    assert detect_format(tmp_path) == "oneclass"
    splits = read_oneclass(tmp_path, 3)
    assert splits.info["channels"] == 3 and splits.test[0].image.shape == (3, 32, 32)
    assert splits.test[1].path.endswith("test_batch.bin#1")
    assert splits.test.labels == [NORMAL if v == 3 else ANOMALOUS for v in batches["test_batch"][1]]


def test_cifar_binary_bad_size(tmp_path):
    write_cifar_binary(tmp_path, fake_cifar())
    (tmp_path / "data_batch_3.bin").write_bytes(b"\x00" * 3074)
    with pytest.raises(DataError, match=r"data_batch_3\.bin.*3074 bytes.*3073"):
        read_cifar10(tmp_path)


@pytest.mark.parametrize("protocol", [2, 4, pickle.HIGHEST_PROTOCOL])
def test_cifar_python_restricted_unpickler(tmp_path, protocol):
    batches = fake_cifar(seed=protocol)
    write_cifar_python(tmp_path, batches, protocol)
    check_cifar(read_cifar10(tmp_path), batches)
    splits = read_oneclass(tmp_path, normal_class=batches["data_batch_1"][1][0], source="cifar10")
    assert splits.train.paths[0].endswith("data_batch_1#0")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    batches = fake_cifar()
    write_cifar_python(tmp_path, batches, pickle.HIGHEST_PROTOCOL)
    marker = tmp_path / "pwned"
    with (tmp_path / "data_batch_2").open("wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": [0]}, f)
    with pytest.raises(DataError, match=r"data_batch_2.*refused.*system"):
        read_cifar10(tmp_path)
    assert not marker.exists()
    with (tmp_path / "data_batch_2").open("wb") as f:
        pickle.dump({b"data": Path("x"), b"labels": [0]}, f)  # any non-numpy class, however harmless
    with pytest.raises(DataError, match=r"data_batch_2.*refused"):
        read_cifar10(tmp_path)
    (tmp_path / "data_batch_2").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="data_batch_2"):
        read_cifar10(tmp_path)


# ---------------------------------------------------------------- class folders


def test_class_folders(tmp_path, image_writer):
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            for i in range(n):
                image_writer(tmp_path / split / cls / f"{i}.png", (5, 5), seed=i)
    train_files, train_classes, test_files, test_classes = read_class_folders(tmp_path)
    assert train_classes == ["cat"] * 3 + ["dog"] * 3 and len(train_files) == 6
    assert test_classes == ["cat", "cat", "dog", "dog"]
    assert detect_format(tmp_path) == "oneclass"
    splits = read_oneclass(tmp_path, "dog")
    assert [Path(p).parent.name for p in splits.train.paths] == ["dog"] * 3
    assert splits.test.labels == [ANOMALOUS, ANOMALOUS, NORMAL, NORMAL]
    assert splits.test.defect_types == test_classes and splits.info["source"] == "folders"
    with pytest.raises(DataError, match=r"'bird'.*\['cat', 'dog'\]"):
        read_oneclass(tmp_path, "bird")


def test_no_oneclass_source(tmp_path):
    with pytest.raises(DataError, match=r"no one-class source.*IDX.*CIFAR-10.*train/<class>"):
        read_oneclass(tmp_path, 0)
    with pytest.raises(ConfigError, match="source"):
        read_oneclass(tmp_path, 0, source="svhn")
    with pytest.raises(DataError, match="expected train/<class>"):
        read_class_folders(tmp_path)


# ---------------------------------------------------------------- real MNIST


@pytest.fixture(scope="module")
def mnist(shared_data):
    return shared_data / "mnist"


@pytest.mark.realdata
def test_real_mnist_counts(mnist):
    train_images, train_labels, test_images, test_labels = read_idx(mnist)
    assert train_images.shape == (60000, 28, 28) and test_images.shape == (10000, 28, 28)
    assert train_images.dtype == np.uint8
    assert sorted(set(train_labels.tolist())) == list(range(10))
    assert Counter(train_labels.tolist())[0] == 5923 and Counter(test_labels.tolist())[0] == 980
    assert abs(train_images.mean() - 33.32) < 0.01  # PROVENANCE.md: mean train pixel 33.32


@pytest.mark.realdata
def test_real_mnist_oneclass(mnist):
    splits = read_oneclass(mnist, normal_class=0)
    assert len(splits.train) == 5923 and set(splits.train.labels) == {NORMAL}
    assert set(splits.train.defect_types) == {"0"}
    assert len(splits.test) == 10000
    assert Counter(splits.test.labels) == {NORMAL: 980, ANOMALOUS: 9020}
    s = splits.train[0]
    assert s.image.shape == (1, 28, 28) and 0.0 <= s.image.min() and s.image.max() <= 1.0
    assert splits.info["source"] == "idx" and splits.info["counts"]["test_normal"] == 980
    assert detect_format(mnist) == "oneclass"
