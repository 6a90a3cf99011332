"""Tests for astra_jax.data.images (numpy only, synthetic data in tmp_path)."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest

from astra_jax.data.images import (
    FASHION_MNIST_DIR,
    DatasetError,
    ImageSplit,
    augment_flip_crop,
    batches,
    load_image_dataset,
    normalize,
    pad_to,
)


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return header + arr.tobytes()


def write(path: Path, data: bytes, gz: bool) -> None:
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def make_idx(folder: Path, split: str, n: int, gz: bool, seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
    prefix = "train" if split == "train" else "t10k"
    write(folder / f"{prefix}-images-idx3-ubyte", idx_bytes(images), gz)
    write(folder / f"{prefix}-labels-idx1-ubyte", idx_bytes(labels), gz)
    return images, labels


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("split", ["train", "test"])
def test_idx_round_trip(tmp_path, gz, split):
    images, labels = make_idx(tmp_path, split, 7, gz)
    s = load_image_dataset("fashion_mnist", str(tmp_path), split)
    assert isinstance(s, ImageSplit) and s.name == "fashion_mnist" and s.num_classes == 10
    assert s.images.dtype == np.uint8 and s.images.shape == (7, 28, 28, 1)
    assert s.labels.dtype == np.int32 and s.labels.shape == (7,)
    np.testing.assert_array_equal(s.images[..., 0], images)
    np.testing.assert_array_equal(s.labels, labels)


def test_idx_parent_dir_and_mnist(tmp_path):
    images, labels = make_idx(tmp_path / "fashion-mnist", "test", 3, gz=True)
    s = load_image_dataset("fashion_mnist", str(tmp_path), "test")
    np.testing.assert_array_equal(s.images[..., 0], images)
    images, labels = make_idx(tmp_path / "mnist", "train", 4, gz=False, seed=1)
    s = load_image_dataset("mnist", tmp_path, "train")
    assert s.name == "mnist"
    np.testing.assert_array_equal(s.labels, labels)


def cifar_batch(n: int, key: bytes, seed: int):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(x) for x in rng.integers(0, 10, size=n)]
    return {b"batch_label": b"x", key: labels, b"data": data}, data, labels


def dump(path: Path, obj) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def test_cifar10_round_trip(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    all_data, all_labels = [], []
    for i in range(1, 6):
        d, data, labels = cifar_batch(2, b"labels", i)
        dump(folder / f"data_batch_{i}", d)
        all_data.append(data)
        all_labels += labels
    d, test_data, test_labels = cifar_batch(3, b"labels", 9)
    dump(folder / "test_batch", d)
    dump(folder / "batches.meta", {b"label_names": [b"c%d" % i for i in range(10)]})

    train = load_image_dataset("cifar10", str(tmp_path), "train")  # parent dir
    assert train.images.shape == (10, 32, 32, 3) and train.images.dtype == np.uint8
    expect = np.concatenate(all_data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(train.images, expect)
    np.testing.assert_array_equal(train.labels, all_labels)
    test = load_image_dataset("cifar10", str(folder), "test")  # the folder itself
    assert test.num_classes == 10 and test.labels.dtype == np.int32
    np.testing.assert_array_equal(test.images[1, 0, 0], test_data[1, [0, 1024, 2048]])  # R, G, B of pixel 0
    np.testing.assert_array_equal(test.labels, test_labels)


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    d, data, labels = cifar_batch(4, b"fine_labels", 3)
    d[b"fine_labels"] = [99, 0, 50, 7]
    d[b"coarse_labels"] = [1, 2, 3, 4]
    dump(folder / "test", d)
    dump(folder / "meta", {b"fine_label_names": [b"f"] * 100})
    s = load_image_dataset("cifar100", str(folder), "test")
    assert s.num_classes == 100 and s.images.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(s.labels, [99, 0, 50, 7])


def test_cifar_pickle_refuses_arbitrary_objects(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    dump(folder / "test", {b"data": Path("x"), b"fine_labels": []})
    with pytest.raises(DatasetError, match="not a valid cifar100 pickle"):
        load_image_dataset("cifar100", str(folder), "test")


def test_missing_default_fashion_mnist_message(tmp_path, monkeypatch):
    import astra_jax.data.images as images_mod

    monkeypatch.setitem(images_mod._DATASETS, "fashion_mnist",
                        ("idx", str(tmp_path / "nope"), ("fashion-mnist",), 10))
    with pytest.raises(DatasetError) as e:
        load_image_dataset("fashion_mnist", None, "train")
    msg = str(e.value)
    assert "dataset-fashion-mnist" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "--data-dir" in msg


def test_missing_data_dir_message(tmp_path):
    with pytest.raises(DatasetError, match="--data-dir"):
        load_image_dataset("fashion_mnist", str(tmp_path / "empty"), "test")
    with pytest.raises(DatasetError, match="--data-dir DIR holding test_batch"):
        load_image_dataset("cifar10", str(tmp_path), "test")


def test_bad_magic(tmp_path):
    make_idx(tmp_path, "test", 2, gz=False)
    # Swap: label file content where the images should be.
    lbl = (tmp_path / "t10k-labels-idx1-ubyte").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(lbl)
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte.*bad IDX magic number 0x00000801"):
        load_image_dataset("fashion_mnist", str(tmp_path), "test")


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_file(tmp_path, gz):
    make_idx(tmp_path, "test", 3, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    raw = path.read_bytes()[:-10]
    path.unlink()
    write(path, raw, gz)
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte.*truncated"):
        load_image_dataset("fashion_mnist", str(tmp_path), "test")


def test_truncated_gzip_stream(tmp_path):
    make_idx(tmp_path, "test", 3, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte\.gz.*corrupt or truncated gzip"):
        load_image_dataset("fashion_mnist", str(tmp_path), "test")


def test_count_mismatch(tmp_path):
    make_idx(tmp_path, "train", 5, gz=True)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.zeros(4, np.uint8)), gz=False)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match="5 images but .* has 4 labels"):
        load_image_dataset("fashion_mnist", str(tmp_path), "train")


def test_label_out_of_range(tmp_path):
    make_idx(tmp_path, "test", 2, gz=False)
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(np.array([1, 12], np.uint8)), gz=False)
    with pytest.raises(DatasetError, match=r"labels outside \[0, 10\)"):
        load_image_dataset("fashion_mnist", str(tmp_path), "test")


def test_unknown_name_and_split(tmp_path):
    with pytest.raises(DatasetError, match="known datasets: cifar10, cifar100, fashion_mnist, mnist"):
        load_image_dataset("imagenet", str(tmp_path), "train")
    with pytest.raises(DatasetError, match="valid splits: train, test"):
        load_image_dataset("fashion_mnist", str(tmp_path), "val")
    assert issubclass(DatasetError, ValueError)


def test_pad_to():
    x = np.ones((2, 28, 28, 1), np.uint8)
    y = pad_to(x, 32)
    assert y.shape == (2, 32, 32, 1) and y.dtype == np.uint8
    assert y.sum() == x.sum() and y[:, 2:30, 2:30].all() and not y[:, :2].any() and not y[:, :, 30:].any()
    assert pad_to(x, 28).shape == x.shape
    assert pad_to(np.ones((1, 5, 5, 3), np.uint8), 8).shape == (1, 8, 8, 3)
    with pytest.raises(DatasetError, match="smaller than images 28x28"):
        pad_to(x, 27)


def test_normalize():
    x = np.array([0, 255], np.uint8).reshape(1, 1, 2, 1)
    y = normalize(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y.ravel(), [-0.2860 / 0.3530, (1 - 0.2860) / 0.3530], rtol=1e-6)
    assert normalize(np.zeros((1, 2, 2, 3), np.uint8), "cifar10").shape == (1, 2, 2, 3)
    with pytest.raises(DatasetError, match="known datasets"):
        normalize(x, "nope")


def tiny_split(n: int) -> ImageSplit:
    images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)
    return ImageSplit(images, np.arange(n, dtype=np.int32), 10, "tiny")


@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_cover_epoch(shuffle):
    s = tiny_split(23)
    rng = np.random.default_rng(0) if shuffle else None
    out = list(batches(s, 5, rng=rng, drop_remainder=False))
    assert [len(l) for _, l in out] == [5, 5, 5, 5, 3]
    seen = np.concatenate([l for _, l in out])
    np.testing.assert_array_equal(np.sort(seen), np.arange(23))
    for im, l in out:
        np.testing.assert_array_equal(im[:, 0, 0, 0], l)  # images stay paired with labels
    if shuffle:
        assert not np.array_equal(seen, np.arange(23))
    dropped = list(batches(s, 5, rng=rng, drop_remainder=True))
    assert [len(l) for _, l in dropped] == [5, 5, 5, 5]
    with pytest.raises(DatasetError):
        next(batches(s, 0))


def test_augment_flip_crop():
    rng = np.random.default_rng(0)
    x = np.random.default_rng(1).integers(1, 256, size=(64, 8, 8, 3), dtype=np.uint8)
    y = augment_flip_crop(x, rng, pad=2)
    assert y.shape == x.shape and y.dtype == x.dtype
    # Every output is a shifted (and possibly flipped) window of the zero-padded input.
    padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
    for i in range(len(x)):
        cands = [padded[i, a:a + 8, b:b + 8] for a in range(5) for b in range(5)]
        assert any(np.array_equal(y[i], c) or np.array_equal(y[i], c[:, ::-1]) for c in cands)
    # With pad=0 images are either unchanged or exactly mirrored, and both happen.
    z = augment_flip_crop(x, rng, pad=0)
    same = np.array([np.array_equal(z[i], x[i]) for i in range(len(x))])
    flipped = np.array([np.array_equal(z[i], x[i, :, ::-1]) for i in range(len(x))])
    assert np.all(same | flipped) and same.any() and flipped.any()


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(),
                    reason=f"{FASHION_MNIST_DIR} not present (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_test_split():
    s = load_image_dataset("fashion_mnist", None, "test")
    assert s.images.shape == (10000, 28, 28, 1) and s.images.dtype == np.uint8
    assert s.num_classes == 10 and s.labels.shape == (10000,)
    assert set(np.unique(s.labels)) == set(range(10))
