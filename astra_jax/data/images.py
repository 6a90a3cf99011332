"""Pure-numpy image-classification loaders: IDX (MNIST / Fashion-MNIST) and CIFAR pickles.

Every bad input raises :class:`DatasetError` (a ``ValueError``) whose message says how to fix it.
"""

from __future__ import annotations

import gzip
import pickle
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dims
IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dim
SPLITS = ("train", "test")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist/"
FASHION_MNIST_HINT = (
    "install Debian's dataset-fashion-mnist package (`apt-get install dataset-fashion-mnist`) "
    "or pass --data-dir DIR holding the IDX files"
)
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# name -> (format, default dir, sub-folder names accepted below data_dir, num_classes)
_DATASETS: dict[str, tuple[str, str | None, tuple[str, ...], int]] = {
    "fashion_mnist": ("idx", FASHION_MNIST_DIR, ("fashion-mnist", "fashion_mnist"), 10),
    "mnist": ("idx", None, ("mnist",), 10),
    "cifar10": ("cifar10", None, ("cifar-10-batches-py",), 10),
    "cifar100": ("cifar100", None, ("cifar-100-python",), 100),
}
_CIFAR_FILES = {"cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                "cifar100": {"train": ["train"], "test": ["test"]}}
# Class names, where the data do not carry them (grids label their rows with these).
CLASS_NAMES = {
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
    "mnist": tuple(str(i) for i in range(10)),
}


def class_name(dataset: str, label: int) -> str:
    """A readable name for ``label`` of ``dataset`` (its number when unknown)."""
    names = CLASS_NAMES.get(dataset, ())
    return names[label] if 0 <= label < len(names) else str(label)


# Per-channel (mean, std) of pixels scaled to [0, 1].
_STATS = {"fashion_mnist": ((0.2860,), (0.3530,)), "mnist": ((0.1307,), (0.3081,)),
          "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
          "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}


class DatasetError(ValueError):
    """A dataset could not be found, parsed or validated; the message names the fix."""


@dataclass(frozen=True)
class ImageSplit:
    """One split: ``images`` uint8 [N, H, W, C], ``labels`` int32 [N]."""

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
        raise DatasetError(f"{path}: corrupt or truncated gzip file ({e}); re-download or replace it") from e


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Parse an uint8 IDX file (gzipped or raw), checking magic number, dims and byte count."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DatasetError(f"{path}: truncated IDX file ({len(data)} bytes, no header); re-download it")
    got = int.from_bytes(data[:4], "big")
    if got != magic:
        raise DatasetError(f"{path}: bad IDX magic number 0x{got:08x}, expected 0x{magic:08x}; "
                           "is this the right (images vs labels) file?")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(data)} < {header} bytes); re-download it")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise DatasetError(f"{path}: file {what}: {len(data)} bytes but dims {dims} need {expected}; "
                           "re-download it")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _missing(name: str, where: str, files: list[str]) -> DatasetError:
    hint = FASHION_MNIST_HINT if name == "fashion_mnist" else f"pass --data-dir DIR holding {', '.join(files)}"
    return DatasetError(f"{name}: {', '.join(files)} not found in {where}; {hint}")


def _resolve_dir(name: str, data_dir: str | None, probe: list[str]) -> Path:
    """Return the folder holding ``probe`` files: ``data_dir`` itself or a known sub-folder of it."""
    _, default, subdirs, _ = _DATASETS[name]
    if data_dir is None and default is None:
        raise _missing(name, "(no default location)", probe)
    base = Path(data_dir if data_dir is not None else default)
    for cand in (base, *(base / s for s in subdirs)):
        if all(any((cand / f).is_file() for f in _variants(p)) for p in probe):
            return cand
    raise _missing(name, f"{base} (or its sub-folders {', '.join(subdirs)})", probe)


def _variants(stem: str) -> tuple[str, str]:
    return (stem + ".gz", stem)


def _load_idx(name: str, data_dir: str | None, split: str, num_classes: int) -> ImageSplit:
    img_stem, lbl_stem = _IDX_FILES[split]
    folder = _resolve_dir(name, data_dir, [img_stem, lbl_stem])
    img_path, lbl_path = (next(folder / v for v in _variants(s) if (folder / v).is_file())
                          for s in (img_stem, lbl_stem))
    images = read_idx(img_path, IDX_IMAGES_MAGIC)[..., None]
    labels = read_idx(lbl_path, IDX_LABELS_MAGIC).astype(np.int32)
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(f"{img_path} has {images.shape[0]} images but {lbl_path} has {labels.shape[0]} "
                           "labels; the files belong to different splits or one is corrupt")
    return _check_labels(ImageSplit(images, labels, num_classes, name), lbl_path)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Refuse everything but the numpy classes a CIFAR pickle needs (pickles can run code)."""

    _ALLOWED = {("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):  # noqa: D102
        module = module.replace("numpy.core", "numpy._core", 1) if module.startswith("numpy.core") else module
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _load_cifar(name: str, data_dir: str | None, split: str, num_classes: int) -> ImageSplit:
    files = _CIFAR_FILES[name][split]
    folder = _resolve_dir(name, data_dir, files)
    key = b"labels" if name == "cifar10" else b"fine_labels"
    images, labels = [], []
    for f in files:
        path = folder / f
        try:
            with path.open("rb") as fh:
                d = _NumpyOnlyUnpickler(fh, encoding="bytes").load()
            data = np.asarray(d[b"data"], dtype=np.uint8)
            lab = np.asarray(d[key], dtype=np.int32)
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise DatasetError(f"{path}: not a valid {name} pickle ({type(e).__name__}: {e}); "
                               "re-download it") from e
        if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != lab.shape[0]:
            raise DatasetError(f"{path}: expected data [N, 3072] with N labels, got data {data.shape} "
                               f"and {lab.shape[0]} labels; re-download it")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab)
    split_ = ImageSplit(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), num_classes, name)
    return _check_labels(split_, folder)


def _check_labels(s: ImageSplit, where: Path) -> ImageSplit:
    if s.labels.size and (s.labels.min() < 0 or s.labels.max() >= s.num_classes):
        raise DatasetError(f"{where}: labels outside [0, {s.num_classes}) "
                           f"(min {s.labels.min()}, max {s.labels.max()}); the file is corrupt")
    return s


def load_image_dataset(name: str, data_dir: str | None = None, split: str = "train") -> ImageSplit:
    """Load ``split`` ("train"/"test") of dataset ``name``; ``data_dir`` is its folder or the parent."""
    if name not in _DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(_DATASETS))}")
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    fmt, _, _, num_classes = _DATASETS[name]
    loader = _load_idx if fmt == "idx" else _load_cifar
    return loader(name, None if data_dir is None else str(data_dir), split, num_classes)


def pad_to(images: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad [N, H, W, C] symmetrically (extra pixel bottom/right) to [N, size, size, C]."""
    _, h, w, _ = images.shape
    if size < h or size < w:
        raise DatasetError(f"pad_to: size {size} is smaller than images {h}x{w}; choose size >= {max(h, w)}")
    top, left = (size - h) // 2, (size - w) // 2
    return np.pad(images, ((0, 0), (top, size - h - top), (left, size - w - left), (0, 0)))


def upsample(images: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour [N, H, W, C] -> [N, factor*H, factor*W, C] (each pixel a block)."""
    if factor < 1:
        raise DatasetError(f"upsample: factor {factor} must be an integer >= 1")
    return images if factor == 1 else images.repeat(factor, axis=1).repeat(factor, axis=2)


def channel_stats(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel that ``normalize`` uses for ``dataset``."""
    if dataset not in _STATS:
        raise DatasetError(f"unknown dataset {dataset!r}; known datasets: {', '.join(sorted(_STATS))}")
    return _STATS[dataset]


def normalize(images: np.ndarray, dataset: str = "fashion_mnist") -> np.ndarray:
    """uint8 -> float32 ``(x / 255 - mean) / std`` with the per-channel constants of ``dataset``."""
    if dataset not in _STATS:
        raise DatasetError(f"normalize: unknown dataset {dataset!r}; known datasets: {', '.join(sorted(_STATS))}")
    mean, std = (np.asarray(v, dtype=np.float32) for v in _STATS[dataset])
    return ((images.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


def batches(split: ImageSplit, batch_size: int, *, rng: np.random.Generator | None = None,
            drop_remainder: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield one epoch of ``(images, labels)`` batches, shuffled when ``rng`` is given."""
    if batch_size <= 0:
        raise DatasetError(f"batches: batch_size must be positive, got {batch_size}")
    n = len(split)
    order = rng.permutation(n) if rng is not None else np.arange(n)
    stop = n - n % batch_size if drop_remainder else n
    for i in range(0, stop, batch_size):
        idx = order[i:i + batch_size]
        yield split.images[idx], split.labels[idx]


def augment_flip_crop(images: np.ndarray, rng: np.random.Generator, pad: int = 2) -> np.ndarray:
    """Random crop after zero-padding by ``pad`` plus random horizontal flip, vectorized over [N, H, W, C]."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    oy, ox = rng.integers(0, 2 * pad + 1, size=(2, n))
    rows = oy[:, None] + np.arange(h)                              # [N, H]
    cols = ox[:, None] + np.arange(w)                              # [N, W]
    cols = np.where(rng.random(n)[:, None] < 0.5, cols[:, ::-1], cols)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
