"""Datasets for calibration, demos and benchmarks, with fixed seeded splits.

* ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, no download), upsampled to 16x16.
* ``fashion-mnist``: the real Fashion-MNIST IDX files (``.gz`` or raw) from any folder; Debian's
  ``dataset-fashion-mnist`` package puts them in ``/usr/share/datasets/fashion-mnist``.
  Splits: train 55,000 / validation 5,000 (from the training file, seeded) / test 10,000.
* ``random``: Gaussian inputs with random labels, for smoke tests and timing only.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from mixmatch_plugin.errors import MixMatchError

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist", "~/.cache/mixmatch/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
DATASETS = ("digits", "fashion-mnist", "random")


@dataclass
class Splits:
    """Train, validation and test sets (``TensorDataset`` of float images and int64 labels)."""

    name: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, int, int]

    def loaders(self, batch_size: int = 128, seed: int = 0) -> tuple[DataLoader, DataLoader, DataLoader]:
        """Shuffled (seeded) train loader, and ordered validation and test loaders."""
        return loader(self.train, batch_size, shuffle=True, seed=seed), loader(self.val, batch_size), loader(self.test, batch_size)

    def held_batches(self, batches: int, batch_size: int = 128, seed: int = 0) -> list[Any]:
        """``batches`` seeded random *training* batches, drawn once and kept: re-estimate BatchNorm of
        every candidate on these, so that all see the same ones (``[]`` for 0)."""
        from mixmatch_plugin.evaluation import hold_batches

        return hold_batches(loader(self.train, batch_size, shuffle=True, seed=seed), batches) if batches > 0 else []

    def calibration(self, samples: int = 512, batch_size: int = 64, seed: int = 0) -> DataLoader:
        """A seeded random subset of the *training* split, for signals (never validation or test)."""
        return loader(subset(self.train, samples, seed), batch_size)


def loader(ds: TensorDataset, batch_size: int = 128, *, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A DataLoader with a seeded generator (deterministic order for a given seed)."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen)


class Resized(TensorDataset):
    """A ``TensorDataset`` whose images are resized to ``(C, H, W)`` as they are read.

    Resizing lazily keeps memory at the size of the stored images: resizing Fashion-MNIST's 55,000
    training images to 3x224x224 up front would take 33 GB. ``tensors`` holds the stored images.
    """

    def __init__(self, *tensors: torch.Tensor, shape: Sequence[int]) -> None:
        super().__init__(*tensors)
        self.shape = tuple(int(v) for v in shape)

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, ...]:
        x, *rest = super().__getitem__(index)
        return (_resize(x.unsqueeze(0), self.shape)[0], *rest)


def subset(ds: TensorDataset, n: int, seed: int = 0) -> TensorDataset:
    """A seeded random subset of at most ``n`` samples (still resized lazily for a :class:`Resized` set)."""
    total = len(ds)
    idx = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[: min(n, total)]
    tensors = (t[idx] for t in ds.tensors)
    return Resized(*tensors, shape=ds.shape) if isinstance(ds, Resized) else TensorDataset(*tensors)


def _split(x: torch.Tensor, y: torch.Tensor, n_val: int, seed: int) -> tuple[TensorDataset, TensorDataset]:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    val, train = perm[:n_val], perm[n_val:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


def digits(seed: int = 0, size: int = 16) -> Splits:
    """scikit-learn's digits: 60 % train, 20 % validation, 20 % test (seeded), upsampled to ``size``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - 0.3) / 0.35
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, va, te = (TensorDataset(x[i], y[i]) for i in perm.tensor_split([int(0.6 * len(x)), int(0.8 * len(x))]))
    return Splits("digits", tr, va, te, 10, (1, size, size))


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw): the format of MNIST and Fashion-MNIST."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise MixMatchError(f"cannot read IDX file {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise MixMatchError(f"{path} is not an IDX file (bad magic number)")
    dtypes: dict[int, Any] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise MixMatchError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise MixMatchError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {arr.size}")
    return arr.reshape(shape)


def find_fashion_mnist(root: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding the four Fashion-MNIST IDX files (``.gz`` or raw)."""
    candidates = [Path(root).expanduser()] if root else [Path(d).expanduser() for d in FASHION_MNIST_DIRS]
    if (env := os.environ.get("MIXMATCH_FASHION_MNIST")) and not root:
        candidates.insert(0, Path(env))
    for c in candidates:
        if all((c / f).exists() or (c / f"{f}.gz").exists() for f in FASHION_MNIST_FILES.values()):
            return c
    where = ", ".join(str(c) for c in candidates)
    raise MixMatchError(
        f"Fashion-MNIST IDX files not found in {where}; install them with `apt-get install dataset-fashion-mnist` "
        "(Debian) or pass --data DIR holding train-images-idx3-ubyte[.gz] and the other three files"
    )


def has_fashion_mnist(root: str | os.PathLike[str] | None = None) -> bool:
    with contextlib.suppress(MixMatchError):
        return bool(find_fashion_mnist(root))
    return False


def fashion_mnist(root: str | os.PathLike[str] | None = None, seed: int = 0, n_val: int = 5000) -> Splits:
    """Fashion-MNIST: train 55,000 / validation 5,000 (seeded, from the training file) / test 10,000."""
    folder = find_fashion_mnist(root)

    def load(key: str) -> np.ndarray:
        f = folder / FASHION_MNIST_FILES[key]
        return read_idx(f if f.exists() else f.with_name(f.name + ".gz"))

    mean, std = 0.2860, 0.3530
    xtr, xte = ((torch.from_numpy(load(k).astype(np.float32)) / 255.0 - mean) / std for k in ("train_images", "test_images"))
    ytr, yte = (torch.from_numpy(load(k).astype(np.int64)) for k in ("train_labels", "test_labels"))
    train, val = _split(xtr.unsqueeze(1), ytr, n_val, seed)
    return Splits("fashion-mnist", train, val, TensorDataset(xte.unsqueeze(1), yte), 10, (1, 28, 28))


def random_data(input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, n: int = 256, seed: int = 0) -> Splits:
    """Gaussian inputs and random labels (for timing and smoke tests; not for accuracy claims)."""
    g = torch.Generator().manual_seed(seed)
    shape = _chw(input_shape)

    def make(m: int) -> TensorDataset:
        return TensorDataset(torch.randn(m, *shape, generator=g), torch.randint(0, num_classes, (m,), generator=g))

    return Splits("random", make(n), make(max(n // 4, 8)), make(max(n // 4, 8)), num_classes, shape)


def _chw(shape: Sequence[int]) -> tuple[int, int, int]:
    c, h, w = (int(v) for v in shape)
    return (c, h, w)


def _resize(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Resize a batch of images ``(N, C', H', W')`` to ``(N, C, H, W)``: bilinear, channels repeated or averaged."""
    c, h, w = (int(s) for s in shape)
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    if x.shape[1] != c:
        x = x.mean(1, keepdim=True).repeat(1, c, 1, 1) if c != 1 else x.mean(1, keepdim=True)
    return x


def fit_input(ds: TensorDataset, input_shape: Sequence[int]) -> TensorDataset:
    """Images resized to ``(C, H, W)`` (bilinear, channels repeated or averaged) when read: a :class:`Resized` view."""
    shape = tuple(int(s) for s in input_shape)
    return ds if tuple(ds.tensors[0].shape[1:]) == shape else Resized(*ds.tensors, shape=shape)


def load(name: str, *, root: str | os.PathLike[str] | None = None, seed: int = 0,
         input_shape: Sequence[int] | None = None, num_classes: int = 10) -> Splits:
    """Load ``digits``, ``fashion-mnist`` or ``random`` data, optionally resized to ``input_shape``."""
    if name == "digits":
        s = digits(seed)
    elif name in ("fashion-mnist", "fashion_mnist", "fmnist"):
        s = fashion_mnist(root, seed)
    elif name == "random":
        s = random_data(input_shape or (3, 32, 32), num_classes, seed=seed)
    else:
        raise MixMatchError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if input_shape is not None and tuple(input_shape) != s.input_shape:
        s = Splits(s.name, fit_input(s.train, input_shape), fit_input(s.val, input_shape), fit_input(s.test, input_shape),
                   s.num_classes, _chw(input_shape))
    return s
