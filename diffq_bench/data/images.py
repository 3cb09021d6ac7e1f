"""Image datasets in their official on-disk formats: ImageFolder (ImageNet) and CIFAR pickles.

- ImageFolder: ``<root>/train/<class>/*.{jpg,png,...}`` and ``<root>/val/<class>/...`` (and
  optionally ``test/``), listed as timm's folder reader lists them (same files, same order) and
  read with timm's train/eval transforms. The class indices always come from ``train/`` so a split
  missing a class cannot shift the labels. A split or class folder without an image is an error
  naming it. A file that does not decode (truncated JPEG, garbage, 0-byte PNG) is a
  :class:`~diffq_bench.data.errors.DataCorruptError` naming it by default -- timm's own dataset
  would silently return the next image instead; with ``skip_bad=True`` it is left out of its batch
  and its path reported (:class:`Batches` collects them), so the count can be recorded.
- CIFAR-10/100: the official python pickle batches are read (checksums verified, safe unpickler)
  and written by :mod:`diffq_bench.data.cifar`; this module holds the CIFAR augmentation and the
  array-backed dataset.

Loaders are plain ``torch.utils.data.DataLoader`` (no CUDA prefetcher), with per-sample seeded
augmentation: the batches of epoch ``e`` depend only on ``(seed, e)``, with or without workers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import random
import typing as tp
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Subset, default_collate

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


@dataclasses.dataclass(frozen=True)
class BadFile:
    """What :class:`ImageFiles` returns for an image that does not decode when ``skip_bad`` is set."""
    path: str
    reason: str


class ImageFiles(Dataset):
    """(image, label) from a list of image files, decoded by PIL as RGB (as timm's dataset does).

    Args:
        samples: (path, class index) pairs.
        transform: applied to each PIL image.
        skip_bad: return a :class:`BadFile` for a file that does not decode, instead of raising.
    Raises (on item access):
        DataCorruptError: a file does not decode (unless ``skip_bad``), naming it.
    """

    def __init__(self, samples: tp.Sequence[tp.Tuple[str, int]], transform: tp.Optional[tp.Callable] = None,
                 skip_bad: bool = False):
        self.samples = list(samples)
        self.transform = transform
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tp.Any:
        from PIL import Image
        path, target = self.samples[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")  # decodes every pixel: a truncated file fails here
        except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... on bad bytes
            reason = f"{type(exc).__name__}: {str(exc)[:160]}"
            if self.skip_bad:
                return BadFile(str(path), reason)
            raise DataCorruptError(f"{path} is not a readable image ({reason}); replace or delete it, or "
                                   "set task.skip_bad_files=true to leave bad files out (their count "
                                   "is recorded in result.json)") from None
        if self.transform is not None:
            image = self.transform(image)
        return image, target


def imagefolder_split(root: tp.Union[str, Path], folder: str, class_to_idx: tp.Dict[str, int],
                      transform: tp.Optional[tp.Callable] = None, skip_bad: bool = False) -> ImageFiles:
    """The images of ``<root>/<folder>`` with the class indices of ``train/``.

    Args:
        root: dataset root (holds ``train/`` and ``val/``).
        folder: split folder name (``train``, ``val``, ``test``).
        class_to_idx: mapping from :func:`imagefolder_classes`.
        transform: applied to each PIL image (timm transform).
        skip_bad: images that do not decode are left out (see :class:`ImageFiles`), not an error.
    Raises:
        DataMissingError: missing folder; DataCorruptError: a class the training set lacks, a class
        folder without an image, or no image at all.
    """
    from timm.data.readers.img_extensions import get_img_extensions
    from timm.data.readers.reader_image_folder import find_images_and_targets
    path = Path(root) / folder
    if not path.is_dir():
        raise DataMissingError(f"image dataset split not found: {path}; {IMAGEFOLDER_HELP}")
    class_dirs = sorted(p.name for p in path.iterdir() if p.is_dir())
    unknown = [name for name in class_dirs if name not in class_to_idx]
    if unknown:
        raise DataCorruptError(f"{path} has class folders absent from train/: {unknown[:5]}")
    # timm's own listing (recursive walk, natural sort): the same files in the same order as before.
    samples, _ = find_images_and_targets(str(path), class_to_idx=dict(class_to_idx))
    if not samples:
        raise DataCorruptError(f"no image found under {path}; {IMAGEFOLDER_HELP}")
    found = {target for _, target in samples}
    empty = [name for name in class_dirs if class_to_idx[name] not in found]
    if empty:
        raise DataCorruptError(f"class folder {path / empty[0]} holds no image (extensions "
                               f"{', '.join(get_img_extensions())}; {len(empty)} such folder(s) in {path}): "
                               "restore its images or remove the folder from every split")
    return ImageFiles(samples, transform, skip_bad)


def collate_skipping(items: tp.Sequence[tp.Any]) -> tp.Tuple[tp.Any, tp.List[str]]:
    """``(batch of the readable items or None, paths of the unreadable ones)``: the collate of a
    loader over a dataset built with ``skip_bad=True``."""
    bad = [item.path for item in items if isinstance(item, BadFile)]
    good = [item for item in items if not isinstance(item, BadFile)]
    return (default_collate(good) if good else None), bad


class Batches:
    """The batches of a loader, with the data errors of its workers as one line.

    Args:
        loader: a DataLoader; built with :func:`collate_skipping` when ``skipped`` is given.
        skipped: None (the loader yields plain batches), or a set that collects the paths the
            loader's items left out; a batch whose every image is unreadable is an error.
    """

    def __init__(self, loader: tp.Any, skipped: tp.Optional[tp.Set[str]] = None):
        self.loader, self.skipped = loader, skipped

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> tp.Iterator[tp.Any]:
        try:
            for item in self.loader:
                if self.skipped is None:
                    yield item
                    continue
                batch, bad = item
                self.skipped.update(bad)
                if batch is None:
                    raise DataCorruptError(f"every image of a batch is unreadable ({bad[0]}, ...): the "
                                           "data set is damaged beyond skipping files; restore it")
                yield batch
        except DataCorruptError as exc:
            # A worker's error comes back as "Caught DataCorruptError in DataLoader worker...\n<traceback>";
            # its own message is the text after the last "DataCorruptError: ".
            text = str(exc)
            if text.startswith("Caught ") and "DataCorruptError: " in text:
                raise DataCorruptError(text.rsplit("DataCorruptError: ", 1)[1].strip()) from None
            raise


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


def shard_indices(batch: tp.Sequence[int], rank: int, world: int, accum: int) -> tp.List[int]:
    """This process's part of one global batch of sample indices under data parallelism: the
    ``world * accum`` equal slices of ``batch``, keeping slices ``k * world + rank`` for ``k`` in
    ``range(accum)``, concatenated in ``k`` order (the loop then cuts it into ``accum``
    micro-batches: micro-batch ``k`` of this process is global slice ``k * world + rank``).

    Raises:
        ValueError: the batch does not split into ``world * accum`` equal slices.
    """
    pieces = world * accum
    if len(batch) % pieces:
        raise ValueError(f"a batch of {len(batch)} does not split into {pieces} equal micro-batches "
                         "(task.batch_size must be a multiple of processes x dist.grad_accum)")
    size = len(batch) // pieces
    return [i for k in range(accum) for i in batch[(k * world + rank) * size:(k * world + rank + 1) * size]]


class ShardedBatchSampler:
    """Global batches of ``sampler`` (``batch_size``, ``drop_last``) reduced to this process's
    part (:func:`shard_indices`): each process reads and augments only its own images."""

    def __init__(self, sampler: tp.Iterable[int], batch_size: int, drop_last: bool, shard: tp.Tuple[int, int, int]):
        self.batches = BatchSampler(sampler, batch_size, drop_last)  # type: ignore[arg-type]
        self.shard = shard

    def __iter__(self) -> tp.Iterator[tp.List[int]]:
        for batch in self.batches:
            yield shard_indices(batch, *self.shard)

    def __len__(self) -> int:
        return len(self.batches)


def make_loader(dataset: Dataset, batch_size: int, train: bool, seed: int, epoch: int = 0,
                num_workers: int = 0, repeats: int = 1, skip_bad: bool = False,
                shard: tp.Tuple[int, int, int] = (0, 1, 1)) -> DataLoader:
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
        skip_bad: the dataset may return :class:`BadFile` items: batches are
            ``(batch, bad paths)`` pairs (:func:`collate_skipping`), to read through :class:`Batches`.
        shard: ``(rank, world, accum)``: yield only this process's part of each global training
            batch (:func:`shard_indices`); ``(0, 1, 1)``: whole batches.
    """
    collate = collate_skipping if skip_bad else None
    if not train:
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                          collate_fn=collate)
    generator = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
    seeded = SeededDataset(dataset, seed, epoch, repeats)
    if repeats == 1:
        sampler: tp.Iterable[int] = RandomSampler(seeded, generator=generator)
    else:
        order = torch.randperm(len(dataset), generator=generator)  # type: ignore[arg-type]
        sampler = (order[:, None] * repeats + torch.arange(repeats)).reshape(-1)[:len(dataset)].tolist()
    drop_last = len(dataset) > batch_size  # type: ignore[arg-type]
    if tuple(shard) != (0, 1, 1):
        return DataLoader(seeded, batch_sampler=ShardedBatchSampler(sampler, batch_size, drop_last, shard),
                          num_workers=num_workers, generator=generator, collate_fn=collate)
    return DataLoader(seeded, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=drop_last, generator=generator, collate_fn=collate)
