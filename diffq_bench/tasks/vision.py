"""Image classification tasks: ImageNet (timm models), CIFAR-10/100 (the paper's models), digits.

Every task reads its data through the loader of the official format
(:mod:`diffq_bench.data.images`), trains with cross-entropy (optionally label smoothing, or
timm's mixup/cutmix), and reports top-1 (the paper's metric, in percent), top-5 and the mean loss.

- ``imagenet``: ImageFolder ``<data>/imagenet/{train,val}`` (or ``<data>`` itself), timm's
  train/eval transforms, any timm model (``pretrained=False`` always) or a CIFAR model by name.
  ``valid`` and ``test`` are both ``val/`` unless a labelled ``test/`` folder exists.
- ``cifar10`` / ``cifar100``: the official python batches under ``<data>``; random crop (pad 4) +
  flip, CIFAR normalisation; ``valid_size`` > 0 holds out the last training images for validation,
  0 validates on the test set.
- ``digits``: scikit-learn's digits written once under ``<data>/digits`` in both formats; option
  ``format`` picks which loader reads them: ``imagefolder`` (timm transforms, like ImageNet) or
  ``cifar`` (CIFAR-10 pickles, checksums verified against the written manifest).
"""
from __future__ import annotations

import dataclasses
import math
import typing as tp
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

from ..data import digits as digits_data
from ..data.cifar import CHECKSUMS_FILE, CIFAR_SPECS, OFFICIAL_FIX, find_cifar_folder, open_cifar, read_cifar_split
from ..data.errors import DataMissingError
from ..data.images import (
    ArrayImageDataset,
    Batches,
    cifar_transform,
    collate_skipping,
    imagefolder_classes,
    imagefolder_split,
    make_loader,
    seeded_rng,
    subset,
    timm_image_transform,
)
from ..models.cifar import CIFAR_MODELS, create_cifar_model
from .base import Task

SPLITS = ("valid", "test")


def create_image_model(name: str, num_classes: int, model_kwargs: tp.Optional[dict] = None
                       ) -> nn.Module:
    """A CIFAR model of :data:`CIFAR_MODELS` or any timm model, freshly initialised.

    Args:
        name: key of ``CIFAR_MODELS`` or a timm model name (``deit_base_patch16_224``...).
        num_classes: output classes.
        model_kwargs: extra constructor arguments (``img_size``, ``drop_path_rate``, ``widths``...).
    Raises:
        ValueError: unknown name (lists the CIFAR models; timm names come from ``timm.list_models``).
    """
    kwargs = dict(model_kwargs or {})
    if name in CIFAR_MODELS:
        return create_cifar_model(name, num_classes, **kwargs)
    import timm  # only for timm models: its import takes seconds
    if not timm.is_model(name):
        raise ValueError(f"unknown image model {name!r}; valid: {', '.join(sorted(CIFAR_MODELS))} "
                         "or a timm model name (timm.list_models())")
    try:
        # pretrained=False always: nothing is ever downloaded.
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise ValueError(f"bad model_kwargs for timm model {name!r}: {exc}") from exc


class _MixedBatches:
    """Training batches with timm's mixup/cutmix applied once per batch, seeded by (seed, epoch, index).

    Mixing in the batch stream rather than in :meth:`step` keeps one mixed batch per step even
    when a quantizer runs several forwards on it (sub-network sampling), and makes it reproducible.
    """

    def __init__(self, loader: tp.Any, mixup: tp.Callable, seed: int, epoch: int):
        self.loader, self.mixup, self.seed, self.epoch = loader, mixup, seed, epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> tp.Iterator[tp.Tuple[torch.Tensor, torch.Tensor]]:
        for index, (images, target) in enumerate(self.loader):
            if len(images) % 2:  # a skipped unreadable file (skip_bad_files): mixup pairs need an even batch
                images, target = images[:-1], target[:-1]
            with seeded_rng(self.seed, self.epoch, index, 1):
                yield self.mixup(images, target)  # (mixed images, soft targets)


def _topk_correct(logits: torch.Tensor, target: torch.Tensor, k: int) -> int:
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    return int((top == target[:, None]).any(dim=-1).sum())


@dataclasses.dataclass(eq=False, kw_only=True)
class ImageClassificationTask(Task):
    """Shared by the image tasks: model, loaders, mixup, cross-entropy, top-1/top-5 evaluation.

    Args:
        model: model name (see :func:`create_image_model`).
        model_kwargs: extra model constructor arguments.
        batch_size: training batch size.
        eval_batch_size: evaluation batch size.
        augment: training augmentation options (format-specific, see the subclass).
        label_smoothing: cross-entropy label smoothing (ignored when ``mixup`` is set: mixup
            has its own ``label_smoothing`` option).
        mixup: options of ``timm.data.Mixup`` (``mixup_alpha``, ``cutmix_alpha``,
            ``label_smoothing``...); empty/None disables it.
        train_subset: use a fixed random subset of this many training images (0: all); for debug runs.
        eval_subset: same for the validation and test sets.
        repeated_aug: each image appears this many times in a row per epoch, differently
            augmented (DeiT's repeated augmentation: 3); 1 disables it.
        skip_bad_files: an image file that does not decode is left out of its batch and counted
            (:meth:`skipped_files`, ``skipped_files_<split>`` in result.json) instead of failing
            the run with its path (the default). Image-file formats only: the CIFAR batches are
            checked whole by their MD5, so the CIFAR-format tasks refuse ``true``.
    """
    metric: tp.ClassVar[str] = "top1"
    lower_is_better: tp.ClassVar[bool] = False

    model: str
    model_kwargs: tp.Dict[str, tp.Any] = dataclasses.field(default_factory=dict)
    batch_size: int = 128
    eval_batch_size: int = 256
    augment: tp.Dict[str, tp.Any] = dataclasses.field(default_factory=dict)
    label_smoothing: float = 0.0
    mixup: tp.Optional[tp.Dict[str, tp.Any]] = None
    train_subset: int = 0
    eval_subset: int = 0
    repeated_aug: int = 1
    skip_bad_files: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.skip_bad_files, bool):
            raise ValueError(f"task.skip_bad_files must be true or false, got {self.skip_bad_files!r}")
        #: paths of the unreadable files left out per split (``skip_bad_files``), in this process
        self._skipped: tp.Dict[str, tp.Set[str]] = {split: set() for split in ("train",) + SPLITS}
        self._int_field("repeated_aug")
        self._int_field("batch_size")
        self._int_field("eval_batch_size")
        self._int_field("train_subset", 0)
        self._int_field("eval_subset", 0)
        if not 0.0 <= float(self.label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        self.model_kwargs = dict(self.model_kwargs or {})
        self.augment = dict(self.augment or {})
        self.mixup = dict(self.mixup or {})
        self.num_classes = 0
        self.datasets: tp.Dict[str, Dataset] = {}
        self._mixup: tp.Optional[tp.Callable] = None

    # ---------------------------------------------------------------------------- data
    def _load(self) -> tp.Tuple[tp.Dict[str, Dataset], int]:
        """Datasets ``train`` (with augmentation), ``valid``, ``test`` and the number of classes."""
        raise NotImplementedError

    def setup(self, data_root: tp.Union[str, Path], cache_dir: tp.Union[str, Path],
              device: tp.Union[str, torch.device], num_workers: int = 0, seed: int = 0) -> None:
        super().setup(data_root, cache_dir, device, num_workers, seed)
        datasets, self.num_classes = self._load()
        # The subsets use a fixed seed, not the run seed: every run of a debug grid sees the same data.
        self.datasets = {"train": subset(datasets["train"], self.train_subset, 0)}
        for split in SPLITS:
            self.datasets[split] = subset(datasets[split], self.eval_subset, 1)
        if self.mixup:
            from timm.data import Mixup
            if self.batch_size % 2:
                raise ValueError(f"mixup/cutmix needs an even batch_size, got {self.batch_size}")
            try:
                self._mixup = Mixup(num_classes=self.num_classes, **self.mixup)
            except TypeError as exc:
                raise ValueError(f"bad mixup option ({exc}); valid keys are the arguments of "
                                 "timm.data.Mixup") from exc

    def build_model(self) -> nn.Module:
        if not self.num_classes:
            raise RuntimeError(f"task {self.name!r}: call setup() before build_model()")
        return create_image_model(self.model, self.num_classes, self.model_kwargs)

    def check_model(self) -> None:
        """The model on the meta device, with 10 classes standing in for the data's."""
        with torch.device("meta"):
            create_image_model(self.model, self.num_classes or 10, self.model_kwargs)

    def skipped_files(self) -> tp.Dict[str, int]:
        """{split: number of distinct unreadable image files left out} (``skip_bad_files``; all zero
        otherwise: a bad file is then an error). Counted by this process over what it read: a
        resumed run counts the files of the epochs it ran itself."""
        return {split: len(paths) for split, paths in self._skipped.items()}

    def _batches(self, loader: tp.Any, split: str) -> Batches:
        """``loader``'s batches, unreadable files recorded under ``split`` (``skip_bad_files``)."""
        return Batches(loader, self._skipped[split] if self.skip_bad_files else None)

    def loads_own_shard(self) -> bool:
        """Each process reads only its part of the global batch, except under mixup/cutmix,
        which pairs images across the whole global batch."""
        return self._mixup is None

    def train_batches(self, epoch: int) -> tp.Iterable[tp.Any]:
        shard = self.train_shard if self.loads_own_shard() else (0, 1, 1)
        loader = self._batches(make_loader(self.datasets["train"], self.batch_size, True, self.seed, epoch,
                                           self.num_workers, self.repeated_aug, self.skip_bad_files, shard),
                               "train")
        if self._mixup is not None:
            return _MixedBatches(loader, self._mixup, self.seed, epoch)
        return loader

    # ------------------------------------------------------------------------ compute
    def step(self, model: nn.Module, batch: tp.Any) -> tp.Tuple[torch.Tensor, tp.Dict[str, float]]:
        images, target = (t.to(self.device, non_blocking=True) for t in batch)
        if target.is_floating_point():  # soft targets from mixup/cutmix
            logits = model(images)
            loss = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            return loss, {}  # accuracy against mixed targets means nothing
        logits = model(images)
        loss = F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)
        top1 = 100.0 * _topk_correct(logits.detach(), target, 1) / len(target)
        return loss, {"top1": top1}

    def evaluate_parts(self, model: nn.Module, split: str) -> tp.Dict[str, tp.List[float]]:
        """Per-batch summed cross-entropy (no smoothing), top-1 / top-5 hits and counts on
        ``split``, for the batches of this process's shard."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        # eval_subset may shrink after setup (diffq_bench/finish.py's restore check on a subset of
        # the test set): the same fixed subset rule, applied again (a no-op when it did not change)
        dataset = subset(self.datasets[split], self.eval_subset, 1)
        order = list(BatchSampler(SequentialSampler(dataset), self.eval_batch_size, drop_last=False))
        mine = [batch for i, batch in enumerate(order) if self.shard_owns(i)]
        loader = self._batches(DataLoader(dataset, batch_sampler=mine, num_workers=self.num_workers,
                                          collate_fn=collate_skipping if self.skip_bad_files else None), split)
        was_training = model.training
        model.eval()
        parts: tp.Dict[str, tp.List[float]] = {"loss": [], "top1": [], "top5": [], "count": []}
        try:
            with torch.no_grad():
                for images, target in loader:
                    images, target = images.to(self.device), target.to(self.device)
                    logits = model(images).float()
                    parts["loss"].append(float(F.cross_entropy(logits, target, reduction="sum")))
                    parts["top1"].append(float(_topk_correct(logits, target, 1)))
                    parts["top5"].append(float(_topk_correct(logits, target, 5)))
                    parts["count"].append(float(len(target)))
        finally:
            model.train(was_training)
        return parts

    def combine_parts(self, parts: tp.Mapping[str, tp.Sequence[float]]) -> tp.Dict[str, float]:
        """Top-1 / top-5 accuracy (percent) and mean cross-entropy over all shards."""
        total = math.fsum(parts["count"])
        if total == 0:
            raise ValueError(f"task {self.name!r}: the evaluation set is empty")
        return {"top1": 100.0 * math.fsum(parts["top1"]) / total,
                "top5": 100.0 * math.fsum(parts["top5"]) / total,
                "loss": math.fsum(parts["loss"]) / total}


# ------------------------------------------------------------------------- format readers
def _imagefolder_datasets(root: Path, img_size: int, augment: dict, eval_options: dict,
                          skip_bad: bool = False) -> tp.Tuple[tp.Dict[str, Dataset], int]:
    classes = imagefolder_classes(root)
    train_tf = timm_image_transform(img_size, True, augment)
    eval_tf = timm_image_transform(img_size, False, eval_options)
    test_folder = "test" if (root / "test").is_dir() else "val"
    datasets = {"train": imagefolder_split(root, "train", classes, train_tf, skip_bad),
                "valid": imagefolder_split(root, "val", classes, eval_tf, skip_bad),
                "test": imagefolder_split(root, test_folder, classes, eval_tf, skip_bad)}
    return datasets, len(classes)


def _cifar_datasets(root: Path, variant: str, augment: dict, verify_checksums: bool,
                    valid_size: int, manifest: tp.Optional[Path] = None, fix: str = OFFICIAL_FIX
                    ) -> tp.Tuple[tp.Dict[str, Dataset], int]:
    spec = CIFAR_SPECS[variant]
    options = {"mean": spec.mean, "std": spec.std, "padding": 4, "hflip": 0.5, **augment}
    unknown = sorted(set(options) - {"mean", "std", "padding", "hflip"})
    if unknown:
        raise ValueError(f"unknown CIFAR augment option(s) {unknown}; valid: mean, std, padding, hflip")
    folder = open_cifar(root, variant, verify_checksums, manifest, fix)  # every file checked once
    images, labels, _ = read_cifar_split(folder, variant, train=True)
    test_images, test_labels, _ = read_cifar_split(folder, variant, train=False)
    if not 0 <= valid_size < len(images):
        raise ValueError(f"valid_size must be in [0, {len(images) - 1}] for {variant}, got {valid_size}")
    train_tf = cifar_transform(True, options["mean"], options["std"], options["padding"], options["hflip"])
    eval_tf = cifar_transform(False, options["mean"], options["std"])
    keep = len(images) - valid_size
    test = ArrayImageDataset(test_images, test_labels, eval_tf)
    datasets: tp.Dict[str, Dataset] = {
        "train": ArrayImageDataset(images[:keep], labels[:keep], train_tf),
        # The held-out images are the last ones (CIFAR-10: the end of data_batch_5).
        "valid": ArrayImageDataset(images[keep:], labels[keep:], eval_tf) if valid_size else test,
        "test": test}
    return datasets, spec.num_classes


def _eval_options(augment: dict) -> dict:
    return {k: v for k, v in augment.items() if k in ("crop_pct", "crop_mode", "interpolation", "mean", "std")}


# ------------------------------------------------------------------------------- tasks
@dataclasses.dataclass(eq=False, kw_only=True)
class ImageNetTask(ImageClassificationTask):
    """ImageNet (or any ImageFolder data set) with a timm model.

    Defaults: the ResNet-50 recipe (``conf/task/imagenet_resnet50.yaml``); the other ImageNet
    files own their model, image size, augmentation and batch.

    Args:
        img_size: network input side (timm transforms resize/crop to it).
        augment: keyword arguments of ``timm.data.create_transform`` (``scale``, ``hflip``,
            ``auto_augment``, ``re_prob``, ``interpolation``, ``crop_pct``, ``mean``, ``std``...);
            the eval transform takes ``crop_pct``/``crop_mode``/``interpolation``/``mean``/``std``.
        folder: sub-folder of the data root holding ``train/`` and ``val/``.
        other: see :class:`ImageClassificationTask`.
    """
    name: tp.ClassVar[str] = "imagenet"
    fingerprint_depth: tp.ClassVar[int] = 2  # train/<class>: a changed class folder is named

    model: str = "resnet50"
    folder: str = "imagenet"
    img_size: int = 224
    batch_size: int = 256
    augment: tp.Dict[str, tp.Any] = dataclasses.field(
        default_factory=lambda: {"interpolation": "bilinear", "crop_pct": 0.875})

    def __post_init__(self) -> None:
        super().__post_init__()
        self._int_field("img_size", 8)

    def _load(self) -> tp.Tuple[tp.Dict[str, Dataset], int]:
        root = self.data_root / self.folder
        if not root.is_dir() and (self.data_root / "train").is_dir():
            root = self.data_root  # the data root is the ImageFolder itself
        if not (root / "train").is_dir() or not (root / "val").is_dir():
            raise DataMissingError(
                f"ImageNet not found: expected {root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG "
                f"(set paths.data or DIFFQ_BENCH_DATA to the folder holding '{self.folder}/'; "
                "see scripts/prepare_imagenet.md to lay out the official archives)")
        self.data_dir = root
        return _imagefolder_datasets(root, self.img_size, self.augment, _eval_options(self.augment),
                                     self.skip_bad_files)


@dataclasses.dataclass(eq=False, kw_only=True)
class Cifar10Task(ImageClassificationTask):
    """CIFAR-10 from the official python batches.

    Defaults: the ResNet-18 recipe (``conf/task/cifar10_resnet18.yaml``); the other CIFAR files
    own their model.

    Args:
        verify_checksums: check the files' MD5 against the official sums (false only for fixtures).
        valid_size: training images held out for validation (0: validate on the test set).
        augment: ``padding`` (random crop, default 4), ``hflip`` (default 0.5), ``mean``, ``std``.
        other: see :class:`ImageClassificationTask`.
    """
    name: tp.ClassVar[str] = "cifar10"
    variant: tp.ClassVar[str] = "cifar10"

    model: str = "resnet18"
    eval_batch_size: int = 500
    # the official diffq CIFAR example's normalisation (examples/cifar/src/data.py)
    augment: tp.Dict[str, tp.Any] = dataclasses.field(default_factory=lambda: {
        "padding": 4, "hflip": 0.5, "mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.2010]})
    verify_checksums: bool = True
    valid_size: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._int_field("valid_size", 0)
        self.verify_checksums = bool(self.verify_checksums)
        if self.skip_bad_files:
            raise ValueError(f"task.skip_bad_files=true does not apply to {self.name}: its batch files "
                             "are read whole and checked by their MD5; set it to false")

    def _load(self) -> tp.Tuple[tp.Dict[str, Dataset], int]:
        self.data_dir = find_cifar_folder(self.data_root, self.variant)
        fix = ("re-extract the official archive (for a test fixture, set task.verify_checksums=false "
               "explicitly)")
        return _cifar_datasets(self.data_root, self.variant, self.augment, self.verify_checksums,
                               self.valid_size, fix=fix)


@dataclasses.dataclass(eq=False, kw_only=True)
class Cifar100Task(Cifar10Task):
    """CIFAR-100 (fine labels) from the official python batches; options as :class:`Cifar10Task`."""
    name: tp.ClassVar[str] = "cifar100"
    variant: tp.ClassVar[str] = "cifar100"

    augment: tp.Dict[str, tp.Any] = dataclasses.field(default_factory=lambda: {
        "padding": 4, "hflip": 0.5, "mean": [0.5071, 0.4867, 0.4408], "std": [0.2675, 0.2565, 0.2671]})


@dataclasses.dataclass(eq=False, kw_only=True)
class DigitsTask(ImageClassificationTask):
    """scikit-learn's handwritten digits, written once in an official format and read back.

    Defaults: ``conf/task/digits.yaml`` (ImageFolder); ``digits_cifar.yaml`` owns its format and
    augmentation.

    Args:
        format: ``imagefolder`` (timm loader + transforms) or ``cifar`` (CIFAR-10 pickle loader).
        img_size: network input side for ``imagefolder`` (the CIFAR format is 32x32).
        augment: as :class:`ImageNetTask` or :class:`Cifar10Task`, depending on ``format``.
        other: see :class:`ImageClassificationTask`.
    """
    name: tp.ClassVar[str] = "digits"
    FORMATS: tp.ClassVar[tp.Tuple[str, ...]] = ("imagefolder", "cifar")

    model: str = "resnet"
    model_kwargs: tp.Dict[str, tp.Any] = dataclasses.field(
        default_factory=lambda: {"widths": [32, 64, 128], "blocks": [1, 1, 1], "stem_stride": 2})
    format: str = "imagefolder"
    img_size: int = 32
    batch_size: int = 64
    augment: tp.Dict[str, tp.Any] = dataclasses.field(default_factory=lambda: {
        "scale": [0.7, 1.0], "ratio": [0.9, 1.1], "hflip": 0.0, "color_jitter": 0.0, "crop_pct": 1.0,
        "mean": [0.305, 0.305, 0.305], "std": [0.376, 0.376, 0.376]})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.format not in self.FORMATS:
            raise ValueError(f"unknown digits format {self.format!r}; valid: {', '.join(self.FORMATS)}")
        if self.format == "cifar" and self.img_size != 32:
            raise ValueError(f"the CIFAR format is 32x32: img_size must be 32, got {self.img_size!r}")
        if self.format == "cifar" and self.skip_bad_files:
            raise ValueError("task.skip_bad_files=true applies to format=imagefolder only: the CIFAR "
                             "format's batch files are read whole and checked by their MD5")

    def _load(self) -> tp.Tuple[tp.Dict[str, Dataset], int]:
        root = self.data_root / "digits"
        if self.format == "imagefolder":
            folder = digits_data.ensure_imagefolder(root)
            self.data_dir = folder
            return _imagefolder_datasets(folder, self.img_size, self.augment, _eval_options(self.augment),
                                         self.skip_bad_files)
        folder = digits_data.ensure_cifar(root)
        self.data_dir = folder
        # Not the CIFAR-10 release: checked against the manifest written with the files.
        return _cifar_datasets(folder, "cifar10", self.augment, True, digits_data.SPLIT_SIZES["val"],
                               manifest=folder / CHECKSUMS_FILE,
                               fix=f"delete {folder}: the embedded digits are written again on the next run")


VISION_TASKS: tp.Dict[str, tp.Type[Task]] = {
    cls.name: cls for cls in (ImageNetTask, Cifar10Task, Cifar100Task, DigitsTask)}
