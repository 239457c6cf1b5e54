"""Data loading: the shared CIFAR-10 arrays, ImageNet-style image folders, and top-1 evaluation.

Images on disk are uint8 RGB, HWC. Everything handed to a model is float32 NCHW, scaled to
[0, 1] and normalised with a per-channel mean/std (see :func:`cora.zoo.model_input_spec`).

Calibration split (``cifar10_calib.npz``: 5,000 images, 500 per class, stored sorted by
class): ``split="search"`` takes, for each class in order, the first ``n/10`` images of that
class in file order; ``split="holdout"`` is every other image (``5000 - n``). The split is
class-balanced and deterministic, and the two parts are disjoint.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets

# one definition of the input normalisation, the class names and the image transform
from cora.preprocessing import model_transform
from cora.zoo import paths
from cora.zoo.registry import CIFAR10_CLASSES, IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CIFAR10_CLASSES",
    "load_npz",
    "NpzImageDataset",
    "calibration_indices",
    "split_indices",
    "balanced_subset",
    "dataset_labels",
    "cifar10_test",
    "cifar10_calibration",
    "make_loader",
    "image_folder",
    "model_transform",
    "ImageFolderDataset",
    "evaluate",
]

TEST_FILE = "data/cifar10_test.npz"
CALIB_FILE = "data/cifar10_calib.npz"


def load_npz(path: str | os.PathLike, shared: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read ``images`` (uint8 ``[N, 32, 32, 3]``, RGB, HWC) and ``labels`` (int64 ``[N]``).

    ``path`` is a file path or a path relative to the shared folder (e.g.
    ``"data/cifar10_test.npz"``). Returns numpy arrays. Raises ``FileNotFoundError`` naming
    the places looked at, ``ValueError`` for missing arrays or wrong shapes/dtypes.
    """
    file = paths.find_file(path, shared)
    try:
        with np.load(file, allow_pickle=False) as z:
            missing = [k for k in ("images", "labels") if k not in z.files]
            if missing:
                raise ValueError(f"{file} lacks array(s) {missing}; it has {sorted(z.files)}")
            images, labels = z["images"], z["labels"]
    except (OSError, EOFError) as e:  # not an npz / truncated
        raise ValueError(f"{file} is not a readable .npz file: {e}") from e
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise ValueError(f"{file}: images must be [N, 32, 32, 3] (HWC RGB), got {list(images.shape)}")
    if images.dtype != np.uint8:
        raise ValueError(f"{file}: images must be uint8, got {images.dtype}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{file}: labels must be [N] with N = {images.shape[0]}, got {list(labels.shape)}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{file}: labels must be integers, got {labels.dtype}")
    return images, labels.astype(np.int64, copy=False)


class NpzImageDataset(Dataset):
    """uint8 HWC RGB images + labels as a Dataset of normalised tensors.

    The whole array is converted once (CIFAR is small: 10,000 images are 123 MB in float32),
    so indexing is a cheap slice. Attributes: ``images`` float32 ``[N, 3, H, W]`` (normalised),
    ``labels`` int64 ``[N]``. Items are ``(float32 [3, H, W], int64 scalar)``.
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        x = torch.as_tensor(np.asarray(images))
        if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 [N, H, W, 3], got {x.dtype} {list(x.shape)}")
        y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        if y.shape != (x.shape[0],):
            raise ValueError(f"labels must be [N] with N = {x.shape[0]}, got {list(y.shape)}")
        m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        x = x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        self.images = x.sub_(m).div_(s).contiguous()
        self.labels = y
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images float32 [N, 3, H, W], labels int64 [N])``."""
        return self.images, self.labels

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> NpzImageDataset:
        """The images at ``indices`` (in that order) as a dataset of their own (no re-normalisation)."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        out = NpzImageDataset.__new__(NpzImageDataset)
        out.images, out.labels = self.images[idx], self.labels[idx]
        out.mean, out.std = self.mean, self.std
        return out


def calibration_indices(labels: np.ndarray | torch.Tensor, n: int, split: str = "search") -> np.ndarray:
    """Indices (int64, ascending) of the class-balanced calibration split.

    ``search``: for each class, its first ``n / num_classes`` images in file order;
    ``holdout``: all the others. Needs ``n`` a multiple of the class count, with at least one
    image per class and no more than the smallest class holds.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    k = len(classes)
    counts = np.bincount(labels)[classes]
    if split not in ("search", "holdout"):
        raise ValueError(f"split must be 'search' or 'holdout', got {split!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < k or n % k or n // k > counts.min():
        raise ValueError(
            f"n must be a multiple of {k} between {k} and {k * int(counts.min())} "
            f"(class-balanced split of {len(labels)} images), got {n!r}"
        )
    per = n // k
    search = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per] for c in classes]))
    if split == "search":
        return search
    mask = np.ones(len(labels), dtype=bool)
    mask[search] = False
    return np.flatnonzero(mask)


def split_indices(num_images: int, n: int, split: str = "search", seed: int = 0) -> np.ndarray:
    """The calibration split of a dataset without a fixed one (an image folder).

    A random permutation of ``range(num_images)`` seeded with ``seed``: ``search`` is its first
    ``min(n, num_images)`` entries (in permutation order), ``holdout`` the others (ascending), so the
    two never overlap whatever ``n`` is.
    """
    if split not in ("search", "holdout"):
        raise ValueError(f"split must be 'search' or 'holdout', got {split!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    perm = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed)).numpy()
    return perm[:n] if split == "search" else np.sort(perm[n:])


def dataset_labels(data: Dataset) -> np.ndarray:
    """The labels of a dataset, without loading its images: an :class:`NpzImageDataset`, an image
    folder, a ``Subset`` of either, or any dataset (then read item by item)."""
    if isinstance(data, NpzImageDataset):
        return data.labels.numpy()
    if isinstance(data, datasets.DatasetFolder):
        return np.asarray(data.targets, dtype=np.int64)
    if isinstance(data, Subset):
        return dataset_labels(data.dataset)[np.asarray(data.indices, dtype=np.int64)]
    return np.asarray([int(data[i][1]) for i in range(len(data))], dtype=np.int64)


def balanced_subset(data: Dataset, limit: int | None) -> Dataset:
    """The first ``limit`` images of ``data``, class-balanced: the classes take turns (in label
    order), each giving its next image in dataset order, until ``limit`` are chosen (a class that
    runs out drops out); the chosen images keep their dataset order. ``data`` itself when ``limit``
    is ``None`` or not below its size."""
    if limit is None:
        return data
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    if limit >= len(data):
        return data
    labels = dataset_labels(data)
    rank = np.empty(len(labels), dtype=np.int64)  # position of each image within its class
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        rank[where] = np.arange(len(where))
    order = np.lexsort((labels, rank))  # by rank, then by class
    idx = np.sort(order[:limit])
    return data.subset(idx) if isinstance(data, NpzImageDataset) else Subset(data, idx.tolist())


def cifar10_test(
    shared: str | os.PathLike | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> NpzImageDataset:
    """The 10,000 shared CIFAR-10 test images (JPEG copy) as a normalised dataset."""
    images, labels = load_npz(TEST_FILE, shared)
    return NpzImageDataset(images, labels, mean, std)


def cifar10_calibration(
    n: int = 1600,
    shared: str | os.PathLike | None = None,
    split: str = "search",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> NpzImageDataset:
    """Calibration images from ``cifar10_calib.npz``: ``split="search"`` gives ``n`` images
    (``n/10`` per class); ``split="holdout"`` the ``5000 - n`` others. See the module doc."""
    images, labels = load_npz(CALIB_FILE, shared)
    idx = calibration_indices(labels, n, split)
    return NpzImageDataset(images[idx], labels[idx], mean, std)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int | None = None) -> DataLoader:
    """A single-process DataLoader; shuffling uses its own generator seeded with ``seed``
    (so the order does not depend on the global RNG when a seed is given)."""
    gen = None
    if shuffle:
        gen = torch.Generator()
        if seed is not None:
            gen.manual_seed(int(seed))
        else:
            gen.seed()
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=0)


class ImageFolderDataset(datasets.ImageFolder):
    """An ImageNet-style folder (one sub-folder of images per class, classes sorted by name).

    Each image is resized (short side to ``resize_size``, default
    ``round(image_size * 256 / 224)``), centre-cropped to ``image_size``, turned into float32
    CHW in [0, 1] and normalised; items are ``(float32 [3, image_size, image_size], int)``.
    Raises ``FileNotFoundError`` if the folder is missing and ``ValueError`` if it holds no
    images; reading an image that cannot be decoded (corrupt, truncated, not an image) raises a
    one-line ``ValueError`` naming the file.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        resize_size: int | None = None,
    ) -> None:
        root = Path(path).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist (expected class sub-folders of images)")
        if resize_size is None:
            resize_size = int(round(image_size * 256 / 224))
        try:
            super().__init__(str(root), transform=model_transform(image_size, resize_size, mean, std))
        except FileNotFoundError as e:  # torchvision's error for no class folders / no images
            raise ValueError(f"image folder {root} has no images in class sub-folders: {e}") from e

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            sample = self.loader(path)
            if self.transform is not None:
                sample = self.transform(sample)
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, struct.error, ... for a bad file
            msg = " ".join(str(e).split()) or "no details"
            raise ValueError(f"cannot read image {path} ({type(e).__name__}: {msg}); remove or replace it") from e
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target


def image_folder(
    path: str | os.PathLike,
    image_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    resize_size: int | None = None,
) -> ImageFolderDataset:
    """Shorthand for :class:`ImageFolderDataset`."""
    return ImageFolderDataset(path, image_size, mean, std, resize_size)


def _batches(data: Dataset | DataLoader, batch_size: int):
    # An in-memory dataset is sliced directly: no per-item indexing and collation.
    if isinstance(data, NpzImageDataset):
        for i in range(0, len(data), batch_size):
            yield data.images[i : i + batch_size], data.labels[i : i + batch_size]
    else:
        yield from (data if isinstance(data, DataLoader) else make_loader(data, batch_size))


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: Dataset | DataLoader,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    memory_format: torch.memory_format = torch.contiguous_format,
) -> float:
    """Top-1 accuracy in percent of ``model`` on a dataset or loader of ``(x, y)`` batches.

    Runs in eval mode and restores the model's previous training flags afterwards. ``memory_format``:
    the layout of the image batches handed to the model (``torch.channels_last``: faster CPU convs, for
    a model that computes the same on it).
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    correct = total = 0
    try:
        for x, y in _batches(data, batch_size):
            x = x.to(device)
            pred = model(x.contiguous(memory_format=memory_format) if x.dim() == 4 else x).argmax(dim=1)
            correct += (pred.cpu() == torch.as_tensor(y)).sum().item()
            total += y.numel()
    finally:
        for m, flag in modes:
            m.train(flag)
    if total == 0:
        raise ValueError("evaluate() got no samples")
    return 100.0 * correct / total
