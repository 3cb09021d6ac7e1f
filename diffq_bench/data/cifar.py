"""CIFAR-10/100 in the official python pickle format: read, verify, write.

The official batches are ``cifar-10-batches-py/data_batch_1..5``, ``test_batch``, ``batches.meta``
and ``cifar-100-python/train``, ``test``, ``meta``. The official files are always checked against
the official MD5 sums: a ``checksums.json`` found next to them may only add checks for files the
release does not have (its use is logged), never replace an official sum. A data set in this format
that is not the release (the embedded digits) is checked against the manifest its writer names
explicitly. Turning the check off is an explicit option and is logged. Every failure is a
:class:`~diffq_bench.data.errors.DataCorruptError` or ``DataMissingError`` naming the file, with the
fix the calling task passes (its own option names: only the CIFAR tasks have ``verify_checksums``).
The pickles are read with an unpickler that only accepts the globals numpy arrays need, so a
tampered file cannot run code. :func:`write_cifar10_batches`
writes a data set in the CIFAR-10 format (the embedded digits).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pickle
import typing as tp
from pathlib import Path

import numpy as np

from .. import io
from .errors import DataCorruptError, DataMissingError

logger = logging.getLogger(__name__)

CHECKSUMS_FILE = "checksums.json"
#: what to do about a file that is not the official release's (a task passes its own advice)
OFFICIAL_FIX = "re-extract the official archive"


def md5sum(path: tp.Union[str, Path], chunk: int = 1 << 20) -> str:
    """MD5 hex digest of a file."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------- official layouts
@dataclasses.dataclass(frozen=True)
class CifarSpec:
    """Official layout of one CIFAR variant."""
    folder: str
    train: tp.Tuple[tp.Tuple[str, str], ...]  # (file, md5)
    test: tp.Tuple[tp.Tuple[str, str], ...]
    meta: tp.Tuple[str, str]
    label_key: str
    names_key: str
    num_classes: int
    mean: tp.Tuple[float, float, float]
    std: tp.Tuple[float, float, float]


CIFAR_SPECS: tp.Dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        folder="cifar-10-batches-py",
        train=(("data_batch_1", "c99cafc152244af753f735de768cd75f"),
               ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
               ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
               ("data_batch_4", "634d18415352ddfa80567beed471001a"),
               ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb")),
        test=(("test_batch", "40351d587109b95175f43aff81a1287e"),),
        meta=("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
        label_key="labels", names_key="label_names", num_classes=10,
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    "cifar100": CifarSpec(
        folder="cifar-100-python",
        train=(("train", "16019d7e3df5f24257cddd939b257f8d"),),
        test=(("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
        meta=("meta", "7973b15100ade9c7d40fb424638fde48"),
        label_key="fine_labels", names_key="fine_label_names", num_classes=100,
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
}

# The only globals a CIFAR pickle (python 2 originals, or protocol-2 files written by python 3)
# needs: numpy array reconstruction and latin-1 byte strings.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> tp.Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing global {module}.{name} in a CIFAR batch file")
        return super().find_class(module, name)


def read_pickle_batch(path: tp.Union[str, Path]) -> tp.Dict[str, tp.Any]:
    """Read one CIFAR pickle file (dict); byte-string keys are decoded to str.

    Raises:
        DataCorruptError: not a readable CIFAR pickle, or it asks for a forbidden global.
    """
    try:
        with open(path, "rb") as f:
            data = _SafeUnpickler(f, encoding="latin1").load()
    except Exception as exc:  # noqa: BLE001 - the restricted unpickler runs no foreign code: any failure
        # (bad opcode, truncation, an unknown codec in ``_codecs.encode``: LookupError) is a bad file
        raise DataCorruptError(f"{path} is not a readable CIFAR pickle batch "
                               f"({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(data, dict):
        raise DataCorruptError(f"{path} holds a {type(data).__name__}, expected a dict")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in data.items()}


def find_cifar_folder(root: tp.Union[str, Path], variant: str) -> Path:
    """The folder with the batch files: ``<root>/<official folder>`` or ``root`` itself.

    Raises:
        ValueError: unknown variant; DataMissingError: no batch files in either place.
    """
    spec = _spec(variant)
    root = Path(root)
    first = spec.train[0][0]
    for cand in (root / spec.folder, root):
        if (cand / first).is_file():
            return cand
    names = ", ".join(name for name, _ in spec.train + spec.test + (spec.meta,))
    raise DataMissingError(f"{variant} not found: expected the official python batches ({names}) in "
                   f"{root / spec.folder}; download and extract the official '{spec.folder}' "
                   f"archive into {root}")


def read_manifest(path: Path) -> tp.Dict[str, str]:
    """A ``checksums.json`` manifest: file name -> MD5 hex digest.

    Raises:
        DataCorruptError: not JSON, or not a mapping of names to MD5 strings (the message names it).
    """
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataCorruptError(f"{path} is not a valid checksum manifest (not JSON: {exc}); delete "
                               "it or rewrite it as {\"<file>\": \"<md5>\", ...}") from None
    if not isinstance(loaded, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and len(v) == 32 for k, v in loaded.items()):
        raise DataCorruptError(f"{path} is not a valid checksum manifest (expected a JSON object "
                               "of file name -> 32-digit MD5); delete it or rewrite it")
    return loaded


def _check_md5(path: Path, md5: str, source: str, what: str, fix: str) -> None:
    if not path.is_file():
        raise DataMissingError(f"{what} file missing: {path}; {fix}")
    actual = md5sum(path)
    if actual != md5:
        raise DataCorruptError(f"{path}: MD5 {actual} differs from the {source} checksum {md5}; the "
                               f"file is corrupt or not {what}'s: {fix}")


def verify_cifar_checksums(folder: Path, variant: str, manifest: tp.Optional[Path] = None,
                           fix: str = OFFICIAL_FIX) -> None:
    """Check the files of ``folder`` against the official MD5s, or against ``manifest``.

    Args:
        folder: the folder holding the batch files.
        variant: ``cifar10`` or ``cifar100``.
        manifest: None for the official release: its files are checked against the official sums,
            and a ``checksums.json`` in ``folder`` only adds checks for other files. A path: the data
            set is not the release (the embedded digits): every file is checked against it.
        fix: the advice ending a failure message (the calling task's own options).
    Raises:
        DataMissingError: a file is missing; DataCorruptError: a checksum differs, or a manifest
        is unreadable or does not list the variant's files.
    """
    spec = _spec(variant)
    official = {name: md5 for name, md5 in spec.train + spec.test + (spec.meta,)}
    if manifest is not None:
        sums = read_manifest(manifest)
        if set(sums) != set(official):
            raise DataCorruptError(f"{manifest} lists {sorted(sums)}, expected {sorted(official)}; {fix}")
        logger.info("%s: checked against %s (a data set in the %s format, not the official release)",
                    folder, manifest, variant)
        for name, md5 in sums.items():
            _check_md5(folder / name, md5, str(manifest), f"the data set of {manifest.name}", fix)
        return
    for name, md5 in official.items():
        _check_md5(folder / name, md5, "official", f"the {variant} release", fix)
    extra = folder / CHECKSUMS_FILE
    if extra.is_file():
        sums = read_manifest(extra)
        ignored = sorted(set(sums) & set(official))
        added = {name: md5 for name, md5 in sums.items() if name not in official}
        logger.warning("%s: official %s files checked against the official MD5s%s; %d other file(s) "
                       "checked against %s", folder, variant,
                       f" (its entries for {ignored} are ignored)" if ignored else "", len(added), extra)
        for name, md5 in added.items():
            _check_md5(folder / name, md5, str(extra), f"the manifest {extra.name}",
                       f"restore it, or remove its entry from {extra}")


def open_cifar(root: tp.Union[str, Path], variant: str, verify_checksums: bool = True,
               manifest: tp.Optional[Path] = None, fix: str = OFFICIAL_FIX) -> Path:
    """Find a CIFAR folder and check its checksums once (see :func:`verify_cifar_checksums`).

    Args:
        root: folder holding the official folder (``cifar-10-batches-py``...), or that folder itself.
        variant: ``cifar10`` or ``cifar100``.
        verify_checksums: check the MD5 sums (turning it off is logged).
        manifest: the manifest of a data set that is not the official release (None: official sums).
        fix: the advice ending a failure message.
    Returns:
        the folder holding the batch files.
    """
    folder = find_cifar_folder(root, variant)
    if verify_checksums:
        verify_cifar_checksums(folder, variant, manifest, fix)
    else:
        logger.warning("%s: checksum verification disabled (verify_checksums=false)", folder)
    return folder


def read_cifar_split(folder: Path, variant: str, train: bool
                     ) -> tp.Tuple[np.ndarray, np.ndarray, tp.List[str]]:
    """Images (N, 32, 32, 3) uint8, labels (N,) int64 and class names of one split of ``folder``
    (no checksum check: :func:`open_cifar` did it).

    Raises:
        DataMissingError: a batch file is missing; DataCorruptError: a file is malformed, or the
        split holds no image (the message names the file).
    """
    spec = _spec(variant)
    images, labels = [], []
    for name, _ in (spec.train if train else spec.test):
        path = folder / name
        if not path.is_file():
            raise DataMissingError(f"{variant} file missing: {path}")
        batch = read_pickle_batch(path)
        if "data" not in batch or spec.label_key not in batch:
            raise DataCorruptError(f"{path} lacks the 'data' or '{spec.label_key}' entry "
                                   f"(has {sorted(map(str, batch))})")
        try:
            data = np.asarray(batch["data"], dtype=np.uint8)
            batch_labels = np.asarray(batch[spec.label_key], dtype=np.int64)
        except (ValueError, TypeError, OverflowError) as exc:
            raise DataCorruptError(f"{path}: 'data' or '{spec.label_key}' is not numeric ({exc})") from None
        if data.size == 0:
            data = data.reshape(0, 3072)  # an empty batch: reported below as a split without image
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataCorruptError(f"{path}: data has shape {data.shape}, expected (N, 3072)")
        if batch_labels.shape != (len(data),):
            raise DataCorruptError(f"{path}: {len(data)} images but labels of shape {batch_labels.shape}")
        # Rows are channel-major (1024 R, 1024 G, 1024 B), each plane row-major 32x32.
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(batch_labels)
    meta_path = folder / spec.meta[0]
    meta = read_pickle_batch(meta_path)
    raw_names = meta.get(spec.names_key, [])
    names = [n.decode("latin1") if isinstance(n, bytes) else str(n)
             for n in (raw_names if isinstance(raw_names, (list, tuple)) else [])]
    if len(names) != spec.num_classes:
        raise DataCorruptError(f"{meta_path}: {len(names)} class names under "
                               f"'{spec.names_key}', expected {spec.num_classes}")
    all_labels = np.concatenate(labels)
    if not all_labels.size:
        split = "training" if train else "test"
        raise DataCorruptError(f"{folder}: the {split} batches hold no image "
                               f"({', '.join(n for n, _ in (spec.train if train else spec.test))})")
    if all_labels.min() < 0 or all_labels.max() >= spec.num_classes:
        raise DataCorruptError(f"{folder}: labels outside [0, {spec.num_classes - 1}]")
    return np.ascontiguousarray(np.concatenate(images)), all_labels, names


def read_cifar(root: tp.Union[str, Path], variant: str, train: bool, verify_checksums: bool = True,
               manifest: tp.Optional[Path] = None, fix: str = OFFICIAL_FIX
               ) -> tp.Tuple[np.ndarray, np.ndarray, tp.List[str]]:
    """Images (N, 32, 32, 3) uint8, labels (N,) int64 and class names of one CIFAR split.

    Args:
        root: folder holding the official folder (``cifar-10-batches-py``...), or that folder itself.
        variant: ``cifar10`` or ``cifar100``.
        train: the training batches when True, the test batch otherwise.
        verify_checksums, manifest, fix: as :func:`open_cifar`.
    """
    folder = open_cifar(root, variant, verify_checksums, manifest, fix)
    return read_cifar_split(folder, variant, train)


def write_cifar10_batches(folder: tp.Union[str, Path], train_images: np.ndarray,
                          train_labels: np.ndarray, test_images: np.ndarray,
                          test_labels: np.ndarray, names: tp.Sequence[str]) -> tp.Dict[str, str]:
    """Write a data set in the CIFAR-10 python format (5 train batches, test batch, meta).

    Each file is written atomically (temporary file + ``os.replace``) with pickle protocol 2 and
    str keys (readable by torchvision too); a ``checksums.json`` manifest is written last.

    Args:
        folder: destination (created).
        train_images, test_images: (N, 32, 32, 3) uint8.
        train_labels, test_labels: (N,) integer labels.
        names: class names (``label_names`` of ``batches.meta``).
    Returns:
        file name -> MD5 (the manifest's content).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for images in (train_images, test_images):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
            raise ValueError(f"CIFAR images must be (N, 32, 32, 3) uint8, got {images.shape} {images.dtype}")

    def rows(images: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))

    files: tp.Dict[str, tp.Dict[str, tp.Any]] = {}
    chunks = np.array_split(np.arange(len(train_images)), 5)
    for index, chunk in enumerate(chunks, 1):
        files[f"data_batch_{index}"] = {
            "batch_label": f"training batch {index} of 5", "data": rows(train_images[chunk]),
            "labels": [int(x) for x in train_labels[chunk]],
            "filenames": [f"train_{i:05d}.png" for i in chunk]}
    files["test_batch"] = {"batch_label": "testing batch 1 of 1", "data": rows(test_images),
                           "labels": [int(x) for x in test_labels],
                           "filenames": [f"test_{i:05d}.png" for i in range(len(test_images))]}
    files["batches.meta"] = {"label_names": list(names), "num_cases_per_batch": len(chunks[0]),
                             "num_vis": 3072}
    sums = {}
    for name, content in files.items():
        io.write_bytes(folder / name, pickle.dumps(content, protocol=2))
        sums[name] = md5sum(folder / name)
    io.write_bytes(folder / CHECKSUMS_FILE, json.dumps(sums, indent=1).encode())
    return sums


def _spec(variant: str) -> CifarSpec:
    if variant not in CIFAR_SPECS:
        raise ValueError(f"unknown CIFAR variant {variant!r}; valid: {', '.join(CIFAR_SPECS)}")
    return CIFAR_SPECS[variant]
