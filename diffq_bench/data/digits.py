"""The embedded image set: scikit-learn's handwritten digits written in the official formats.

``sklearn.datasets.load_digits`` ships 1,797 real 8x8 handwritten digits (16 grey levels) inside the
package, so the vision tasks have a default that needs no download. It is written once, atomically,
in two official on-disk formats so the real loaders are exercised end to end:

- ImageFolder: ``<root>/imagefolder/{train,val,test}/<digit>/<index>.png`` (native 8x8 greyscale
  PNGs, levels scaled to 0..255), read like ImageNet.
- CIFAR-10 python batches: ``<root>/cifar-10-batches-py/`` (images upsampled to 32x32x3 uint8,
  ``data_batch_1..5`` + ``test_batch`` + ``batches.meta`` + ``checksums.json``), read like CIFAR-10.
  The training batches hold the ImageFolder ``train`` images followed by the ``val`` ones, so
  holding out the last ``len(val)`` images (``valid_size``) gives the same validation set.

The split is fixed (seed 0, stratified by digit): 1,257 train, 180 val, 360 test.
"""
from __future__ import annotations

import json
import typing as tp
from pathlib import Path

import numpy as np

from .. import io
from .cifar import write_cifar10_batches

SPLIT_SIZES = {"val": 180, "test": 360}  # the rest (1,257) is train
CLASS_NAMES = [str(d) for d in range(10)]
IMAGEFOLDER = "imagefolder"
CIFAR_FOLDER = "cifar-10-batches-py"
MANIFEST = "digits.json"


def load_split() -> tp.Dict[str, tp.Tuple[np.ndarray, np.ndarray]]:
    """The fixed split: name -> (images (N, 8, 8) uint8 in 0..255, labels (N,) int64)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    # 16 grey levels (0..16) -> 0..255 so PNG viewers and 8-bit pipelines see the full range.
    images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    from sklearn.model_selection import train_test_split
    # Stratified by digit with exact split sizes; fixed seed: the data set never changes.
    index = np.arange(len(labels))
    rest, test = train_test_split(index, test_size=SPLIT_SIZES["test"], stratify=labels, random_state=0)
    train, val = train_test_split(rest, test_size=SPLIT_SIZES["val"], stratify=labels[rest],
                                  random_state=0)
    parts = {"train": train, "val": val, "test": test}
    out = {}
    for name, chunk in parts.items():
        idx = np.sort(chunk)
        out[name] = (images[idx], labels[idx])
    return out


def upsample32(images: np.ndarray) -> np.ndarray:
    """(N, 8, 8) uint8 -> (N, 32, 32, 3) uint8, bilinear (PIL), grey replicated on RGB."""
    from PIL import Image
    big = [np.asarray(Image.fromarray(img, mode="L").resize((32, 32), Image.BILINEAR))
           for img in images]
    return np.repeat(np.stack(big)[..., None], 3, axis=3)


def ensure_imagefolder(root: tp.Union[str, Path]) -> Path:
    """Write the digits as an ImageFolder under ``<root>/imagefolder`` unless already there.

    Returns:
        the ImageFolder root (holds ``train/``, ``val/``, ``test/``).
    """
    from PIL import Image
    final = Path(root) / IMAGEFOLDER
    if (final / MANIFEST).is_file():
        return final
    with io.atomic_dir(final, MANIFEST) as tmp:
        counts = {}
        for split, (images, labels) in load_split().items():
            for name in CLASS_NAMES:
                (tmp / split / name).mkdir(parents=True)
            for index, (image, label) in enumerate(zip(images, labels)):
                Image.fromarray(image, mode="L").save(tmp / split / CLASS_NAMES[label] / f"{index:04d}.png")
            counts[split] = int(len(labels))
        (tmp / MANIFEST).write_text(json.dumps({"source": "sklearn.datasets.load_digits",
                                                "counts": counts}, indent=1))
    return final


def ensure_cifar(root: tp.Union[str, Path]) -> Path:
    """Write the digits as CIFAR-10 python batches under ``<root>/cifar-10-batches-py``.

    Returns:
        the folder holding the batch files (what :func:`diffq_bench.data.images.read_cifar` reads).
    """
    final = Path(root) / CIFAR_FOLDER
    if (final / MANIFEST).is_file():
        return final
    with io.atomic_dir(final, MANIFEST) as tmp:
        split = load_split()
        train_images = np.concatenate([split["train"][0], split["val"][0]])
        train_labels = np.concatenate([split["train"][1], split["val"][1]])
        write_cifar10_batches(tmp, upsample32(train_images), train_labels,
                              upsample32(split["test"][0]), split["test"][1], CLASS_NAMES)
        (tmp / MANIFEST).write_text(json.dumps({
            "source": "sklearn.datasets.load_digits", "upsampled": "bilinear 8x8 -> 32x32, grey on RGB",
            "counts": {"train": len(split["train"][1]), "val (last of train)": len(split["val"][1]),
                       "test": len(split["test"][1])}}, indent=1))
    return final
