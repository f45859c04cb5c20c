"""Datasets for the batched-hosts backend (SPEC §11 "batched hosts").

Two sources, both returned as one :class:`HostDataset` whose tensors live on the engine's device:

- ``"digits"`` (default, embedded): the 1,797 8x8 grey handwritten digits that scikit-learn ships
  (``sklearn.datasets.load_digits``, no download). Pixel values 0..16. A fixed permutation (seed
  ``split_seed``) splits it into ``n_val`` validation images and the rest for training, so every
  run and every env sees the same split. 8x8 survives the host's three 2x pools (8 -> 4 -> 2 -> 1);
  ``image_size`` optionally upsamples (bilinear) for hosts that want more spatial extent.
- ``"cifar10"``: CIFAR-10 from a local directory in the standard python-pickle layout
  (``data_batch_1`` .. ``data_batch_5`` for training, ``test_batch`` for validation; each a pickled
  dict with ``b'data'`` uint8 ``[N, 3072]`` (channel-major 3x32x32) and ``b'labels'``).

Images are stored as uint8 (CIFAR's 50k training images are 150 MB that way, 600 MB as float32)
and normalised per channel on gather by :meth:`HostDataset.images`, with the training split's
mean and std, so the minibatch gather is the only place that touches float pixels.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"
DATASETS = ("digits", "cifar10")


@dataclass(frozen=True)
class HostDataset:
    """A train/validation split on one device; pixels uint8 ``[N, C, H, W]``, labels int64 ``[N]``."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    mean: torch.Tensor  # [C] float32, training-split pixel mean per channel
    std: torch.Tensor  # [C] float32, training-split pixel std per channel
    n_classes: int

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[-1])

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float32 images from stored uint8 pixels (channel dim at -3)."""
        shape = (self.in_channels, 1, 1)
        return (x.to(torch.float32) - self.mean.view(shape)) / self.std.view(shape)


def _finish(
    name: str,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    n_classes: int,
    device: torch.device | str,
) -> HostDataset:
    dev = torch.device(device)
    xf = x_train.to(torch.float32)
    mean = xf.mean(dim=(0, 2, 3))
    std = xf.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return HostDataset(
        name=name,
        x_train=x_train.contiguous().to(dev),
        y_train=y_train.to(torch.int64).to(dev),
        x_val=x_val.contiguous().to(dev),
        y_val=y_val.to(torch.int64).to(dev),
        mean=mean.to(dev),
        std=std.to(dev),
        n_classes=n_classes,
    )


def load_digits(
    device: torch.device | str = "cpu", n_val: int = 360, image_size: int = 8, split_seed: int = 0
) -> HostDataset:
    """scikit-learn's 8x8 digits, split once by a fixed permutation (see the module docstring)."""
    from sklearn.datasets import load_digits as _sk_load_digits

    raw = _sk_load_digits()
    n = raw.images.shape[0]
    if not 0 < n_val < n:
        raise ValueError(f"load_digits: n_val must be in 1..{n - 1}, got {n_val}")
    x = torch.as_tensor(raw.images, dtype=torch.float32).reshape(n, 1, 8, 8)
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x * (255.0 / 16.0)).round().clamp(0, 255).to(torch.uint8)  # uint8 like CIFAR
    y = torch.as_tensor(raw.target, dtype=torch.int64)
    perm = torch.as_tensor(np.random.default_rng(split_seed).permutation(n))
    val, train = perm[:n_val], perm[n_val:]
    return _finish("digits", x[train], y[train], x[val], y[val], 10, device)


def read_cifar_batch(path: Path | str) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR-10 pickle file -> (uint8 images ``[N, 3, 32, 32]``, int64 labels ``[N]``)."""
    with open(path, "rb") as fh:
        d = pickle.load(fh, encoding="bytes")
    if b"data" not in d or b"labels" not in d:
        raise ValueError(f"{path}: expected a pickled dict with keys b'data' and b'labels', got {sorted(d)!r}")
    data = np.asarray(d[b"data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' must be uint8 [N, 3072], got shape {data.shape}")
    x = torch.from_numpy(data.copy()).reshape(-1, 3, 32, 32)
    y = torch.as_tensor(np.asarray(d[b"labels"], dtype=np.int64))
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{path}: {x.shape[0]} images but {y.shape[0]} labels")
    return x, y


def load_cifar10(path: Path | str, device: torch.device | str = "cpu") -> HostDataset:
    """CIFAR-10 from ``path`` (the directory holding the python-pickle batches)."""
    root = Path(path)
    expected = (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE)
    missing = [f for f in expected if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 directory {str(root)!r} lacks {', '.join(missing)}; expected the python-pickle "
            f"files {', '.join(expected)} (as unpacked from cifar-10-python.tar.gz, folder "
            f"'cifar-10-batches-py')"
        )
    parts = [read_cifar_batch(root / f) for f in CIFAR_TRAIN_FILES]
    x_train = torch.cat([p[0] for p in parts])
    y_train = torch.cat([p[1] for p in parts])
    x_val, y_val = read_cifar_batch(root / CIFAR_TEST_FILE)
    return _finish("cifar10", x_train, y_train, x_val, y_val, 10, device)


def load_dataset(
    name: str, path: str | Path | None = None, device: torch.device | str = "cpu", **digits_kwargs: int
) -> HostDataset:
    """Dispatch on ``name`` (one of :data:`DATASETS`); ``path`` is required for ``"cifar10"``."""
    if name == "digits":
        return load_digits(device, **digits_kwargs)
    if name == "cifar10":
        if path is None:
            raise ValueError("dataset 'cifar10' needs data_path: a directory with data_batch_1..5 and test_batch")
        return load_cifar10(path, device)
    raise ValueError(f"dataset: expected one of {DATASETS}, got {name!r}")
