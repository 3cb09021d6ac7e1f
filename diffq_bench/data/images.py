"""Image datasets in their official on-disk formats: ImageFolder (ImageNet) and CIFAR pickles.

- ImageFolder: ``<root>/train/<class>/*.{jpg,png,...}`` and ``<root>/val/<class>/...`` (and
  optionally ``test/``), read by timm's folder dataset with timm's train/eval transforms. The class
  indices always come from ``train/`` so a split missing a class cannot shift the labels.
- CIFAR-10/100: the official python pickle batches are read (checksums verified, safe unpickler)
  and written by :mod:`diffq_bench.data.cifar`; this module holds the CIFAR augmentation and the
  array-backed dataset.

Loaders are plain ``torch.utils.data.DataLoader`` (no CUDA prefetcher), with per-sample seeded
augmentation: the batches of epoch ``e`` depend only on ``(seed, e)``, with or without workers.
"""
from __future__ import annotations

import contextlib
import random
import typing as tp
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset

from .errors import DataCorruptError, DataMissingError



# ------------------------------------------------------------------------------ ImageFolder
IMAGEFOLDER_HELP = ("expected the ImageFolder layout <root>/train/<class>/<image> and "
                    "<root>/val/<class>/<image> (see scripts/prepare_imagenet.md)")


def imagefolder_classes(root: tp.Union[str, Path]) -> tp.Dict[str, int]:
    """Class name -> index, from the sub-folders of ``<root>/train`` (sorted, as timm does).

    Raises:
        DataMissingError: when ``root``, ``train/`` or ``val/`` is missing or has no class folder.
    """
    root = Path(root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataMissingError(f"image dataset not found: {root / split} does not exist; {IMAGEFOLDER_HELP}")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise DataMissingError(f"{root / 'train'} has no class folder; {IMAGEFOLDER_HELP}")
    return {name: index for index, name in enumerate(classes)}


def imagefolder_split(root: tp.Union[str, Path], folder: str, class_to_idx: tp.Dict[str, int],
                      transform: tp.Optional[tp.Callable] = None) -> Dataset:
    """timm's folder dataset for ``<root>/<folder>`` with the class indices of ``train/``.

    Args:
        root: dataset root (holds ``train/`` and ``val/``).
        folder: split folder name (``train``, ``val``, ``test``).
        class_to_idx: mapping from :func:`imagefolder_classes`.
        transform: applied to each PIL image (timm transform).
    Raises:
        DataMissingError: missing folder; DataCorruptError: a class the training set lacks, or no image.
    """
    from timm.data import create_dataset
    path = Path(root) / folder
    if not path.is_dir():
        raise DataMissingError(f"image dataset split not found: {path}; {IMAGEFOLDER_HELP}")
    unknown = sorted(p.name for p in path.iterdir() if p.is_dir() and p.name not in class_to_idx)
    if unknown:
        raise DataCorruptError(f"{path} has class folders absent from train/: {unknown[:5]}")
    # search_split=False: root is already the split folder; timm would otherwise look for root/<split>.
    dataset = create_dataset("", root=str(path), split=folder, search_split=False,
                             class_map=dict(class_to_idx), transform=transform)
    if len(dataset) == 0:
        raise DataCorruptError(f"no image found under {path}; {IMAGEFOLDER_HELP}")
    return dataset


def timm_image_transform(img_size: int, train: bool, options: tp.Optional[tp.Dict[str, tp.Any]] = None
                         ) -> tp.Callable:
    """timm's train or eval transform (RandomResizedCrop+flip+... / resize+center crop+normalize).

    Args:
        img_size: side of the (square) network input.
        train: random training augmentation when True, deterministic eval transform otherwise.
        options: extra keyword arguments of ``timm.data.create_transform`` (``crop_pct``,
            ``interpolation``, ``hflip``, ``scale``, ``auto_augment``, ``re_prob``, ``mean``, ``std``...).
    """
    from timm.data import create_transform
    options = dict(options or {})
    for key in ("scale", "ratio", "mean", "std"):
        if options.get(key) is not None:
            options[key] = tuple(options[key])
    if not train:
        # Only these keys mean something for the eval transform.
        options = {k: v for k, v in options.items()
                   if k in ("crop_pct", "crop_mode", "interpolation", "mean", "std")}
    try:
        return create_transform(input_size=int(img_size), is_training=train, **options)
    except TypeError as exc:
        raise ValueError(f"bad image transform option ({exc}); valid keys are the keyword "
                         f"arguments of timm.data.create_transform") from exc


# ------------------------------------------------------------------------------------ CIFAR
def cifar_transform(train: bool, mean: tp.Sequence[float], std: tp.Sequence[float],
                    padding: int = 4, hflip: float = 0.5) -> tp.Callable:
    """Standard CIFAR augmentation (random 32x32 crop of the 4-padded image, horizontal flip)."""
    from torchvision import transforms as T
    ops: tp.List[tp.Any] = []
    if train:
        if padding > 0:
            ops.append(T.RandomCrop(32, padding=int(padding)))
        if hflip > 0:
            ops.append(T.RandomHorizontalFlip(p=float(hflip)))
    ops += [T.ToTensor(), T.Normalize(tuple(mean), tuple(std))]
    return T.Compose(ops)


class ArrayImageDataset(Dataset):
    """(image, label) pairs from uint8 HWC arrays; the transform gets a PIL image."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: tp.Optional[tp.Callable]):
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tp.Tuple[tp.Any, int]:
        from PIL import Image
        image = Image.fromarray(self.images[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


# ---------------------------------------------------------------------------------- loaders
class SeededDataset(Dataset):
    """Runs the wrapped dataset's (random) transform under an RNG seeded by (seed, epoch, index).

    The global python/numpy/torch RNG states are restored afterwards, so augmentation neither
    depends on nor disturbs the training RNG (quantization noise, dropout), and a resumed epoch
    sees exactly the same images.
    """

    def __init__(self, dataset: Dataset, seed: int, epoch: int, repeats: int = 1):
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.repeats = int(repeats)

    def __len__(self) -> int:
        return len(self.dataset) * self.repeats  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tp.Any:
        # occurrence ``index`` of image ``index // repeats``: each copy its own augmentation
        with seeded_rng(self.seed, self.epoch, int(index)):
            return self.dataset[int(index) // self.repeats]


@contextlib.contextmanager
def seeded_rng(*keys: int) -> tp.Iterator[None]:
    """Seed python's, numpy's and torch's (CPU) global RNGs from ``keys``; restore them on exit."""
    local = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(local)
            random.seed(local)
            np.random.seed(local)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def subset(dataset: Dataset, size: int, seed: int) -> Dataset:
    """A fixed random subset of ``size`` items (all of them when ``size`` is 0 or too large)."""
    if size <= 0 or size >= len(dataset):  # type: ignore[arg-type]
        return dataset
    generator = torch.Generator().manual_seed(int(seed))
    indices = torch.randperm(len(dataset), generator=generator)[:size].sort().values  # type: ignore[arg-type]
    return Subset(dataset, indices.tolist())


def make_loader(dataset: Dataset, batch_size: int, train: bool, seed: int, epoch: int = 0,
                num_workers: int = 0, repeats: int = 1) -> DataLoader:
    """A CPU-safe DataLoader; training order and augmentation depend only on (seed, epoch).

    Args:
        dataset: map-style dataset of (image tensor, label).
        batch_size: images per batch.
        train: shuffle, seeded augmentation and drop the last incomplete batch (BatchNorm).
        seed: run seed.
        epoch: epoch index (changes the order and the augmentation).
        num_workers: worker processes (0: in the main process).
        repeats: repeated augmentation (DeiT's RASampler): each image of the shuffled order
            appears ``repeats`` times in a row, each copy differently augmented, and an epoch
            still holds ``len(dataset)`` images (so ``1/repeats`` of them are seen per epoch).
    """
    if not train:
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    generator = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
    seeded = SeededDataset(dataset, seed, epoch, repeats)
    if repeats == 1:
        sampler: tp.Iterable[int] = RandomSampler(seeded, generator=generator)
    else:
        order = torch.randperm(len(dataset), generator=generator)  # type: ignore[arg-type]
        sampler = (order[:, None] * repeats + torch.arange(repeats)).reshape(-1)[:len(dataset)].tolist()
    return DataLoader(seeded, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=len(dataset) > batch_size, generator=generator)
