"""Loaders of the official image formats on format-faithful fixtures, and the embedded digits."""
import json
import os
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image

from diffq_bench.data import cifar, digits, images
from diffq_bench.data.errors import DataCorruptError, DataMissingError

from fixtures import make_cifar10_fixture, make_imagefolder, py2_style_batch

torch.set_num_threads(1)


def test_cifar10_reader_layout(tmp_path):
    make_cifar10_fixture(tmp_path)
    x, y, names = cifar.read_cifar(tmp_path, "cifar10", train=True, verify_checksums=False)
    assert x.shape == (20, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    assert names == ["c%d" % i for i in range(10)]
    assert (x[3, 5, 5] == [3, 103, 197]).all() and list(y[:12]) == [i % 10 for i in range(12)]
    assert x[0, 0, 1, 0] == 255 and x[0, 1, 0, 0] == 0
    tx, ty, _ = cifar.read_cifar(tmp_path / "cifar-10-batches-py", "cifar10", train=False,
                                  verify_checksums=False)
    assert tx.shape == (4, 32, 32, 3) and list(ty) == [0, 1, 2, 3]


def test_cifar_checksums_are_checked_unless_disabled(tmp_path):
    make_cifar10_fixture(tmp_path)
    with pytest.raises(DataCorruptError, match="official checksum.*re-extract the official archive"):
        cifar.read_cifar(tmp_path, "cifar10", train=True)


def test_cifar100_reader(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 6), ("test", 3)):
        py2_style_batch(folder / name, rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         np.arange(n) * 17 % 100, label_key="fine_labels",
                         extra={b"coarse_labels": [0] * n})
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"x%d" % i for i in range(100)],
                                                b"coarse_label_names": [b"y"] * 20}, protocol=2))
    x, y, names = cifar.read_cifar(tmp_path, "cifar100", train=True, verify_checksums=False)
    assert x.shape == (6, 32, 32, 3) and list(y) == [0, 17, 34, 51, 68, 85] and len(names) == 100


def test_cifar_missing_names_path(tmp_path):
    with pytest.raises(DataMissingError, match="cifar-10-batches-py"):
        cifar.read_cifar(tmp_path, "cifar10", train=True)
    with pytest.raises(ValueError, match="cifar100"):
        cifar.read_cifar(tmp_path, "cifar11", train=True)


def test_unpickler_refuses_code(tmp_path):
    folder = make_cifar10_fixture(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    (folder / "data_batch_2").write_bytes(pickle.dumps({"data": Evil()}, protocol=2))
    with pytest.raises(DataCorruptError, match="refusing global"):
        cifar.read_cifar(tmp_path, "cifar10", train=True, verify_checksums=False)


def test_writer_manifest_roundtrip_and_torchvision(tmp_path):
    rng = np.random.default_rng(1)
    tr = rng.integers(0, 256, (13, 32, 32, 3), dtype=np.uint8)
    te = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    sums = cifar.write_cifar10_batches(tmp_path, tr, np.arange(13) % 10, te, np.arange(4), list("abcdefghij"))
    assert json.loads((tmp_path / "checksums.json").read_text()) == sums
    manifest = tmp_path / "checksums.json"
    x, y, names = cifar.read_cifar(tmp_path, "cifar10", train=True, manifest=manifest)  # verified by it
    assert (x == tr).all() and list(y) == list(np.arange(13) % 10) and names == list("abcdefghij")
    # Format-faithful: torchvision's own reader (checksums off: these are not the official files).
    from torchvision.datasets import CIFAR10

    class Unchecked(CIFAR10):
        train_list = [[f"data_batch_{i}", None] for i in range(1, 6)]
        test_list = [["test_batch", None]]
        meta = {**CIFAR10.meta, "md5": None}
        base_folder = "."
    tv = Unchecked(str(tmp_path), train=True, download=False)
    assert (tv.data == tr).all() and tv.targets == list(np.arange(13) % 10) and tv.classes == list("abcdefghij")
    with open(tmp_path / "test_batch", "r+b") as f:  # corrupt one byte
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(DataCorruptError, match="test_batch.*checksums.json"):
        cifar.read_cifar(tmp_path, "cifar10", train=False, manifest=manifest)


def test_imagefolder_classes_from_train(tmp_path):
    make_imagefolder(tmp_path)
    make_imagefolder(tmp_path / "x", splits=("val",), classes=("eel",))
    classes = images.imagefolder_classes(tmp_path)
    assert classes == {"cat": 0, "dog": 1, "eel": 2}
    tf = images.timm_image_transform(16, False, {"crop_pct": 1.0})
    val = images.imagefolder_split(tmp_path / "x", "val", classes, tf)  # only 'eel': index stays 2
    assert len(val) == 3 and {val[i][1] for i in range(3)} == {2} and val[0][0].shape == (3, 16, 16)
    train = images.imagefolder_split(tmp_path, "train", classes, images.timm_image_transform(16, True, {}))
    assert len(train) == 9 and sorted({train[i][1] for i in range(9)}) == [0, 1, 2]


def test_imagefolder_errors(tmp_path):
    make_imagefolder(tmp_path, splits=("train",))
    with pytest.raises(DataMissingError, match="val"):
        images.imagefolder_classes(tmp_path)
    make_imagefolder(tmp_path, splits=("val",), classes=("cat", "yak"))
    with pytest.raises(DataCorruptError, match="yak"):
        images.imagefolder_split(tmp_path, "val", {"cat": 0, "dog": 1, "eel": 2})
    with pytest.raises(ValueError, match="create_transform"):
        images.timm_image_transform(16, True, {"nope": 1})


class _Noise(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.rand(2) + random.random() + float(np.random.rand()), i


def test_seeded_loader_is_deterministic_and_leaves_global_rng():
    torch.manual_seed(123)
    random.seed(5)
    before = (torch.get_rng_state(), random.getstate())
    a = [b for b in images.make_loader(_Noise(), 4, True, seed=1, epoch=3)]
    b = [b for b in images.make_loader(_Noise(), 4, True, seed=1, epoch=3)]
    c = [b for b in images.make_loader(_Noise(), 4, True, seed=1, epoch=4)]
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert len(a) == 2  # drop_last: 10 items, batches of 4
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c))
    # The same item gets the same augmentation whatever its position in the epoch.
    with_workers = [b for b in images.make_loader(_Noise(), 4, True, seed=1, epoch=3, num_workers=1)]
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, with_workers))


def test_subset_is_fixed():
    ds = list(range(100))
    s1, s2 = images.subset(ds, 10, 0), images.subset(ds, 10, 0)
    assert list(s1) == list(s2) and len(s1) == 10 and images.subset(ds, 0, 0) is ds


def test_digits_split_and_formats(tmp_path):
    split = digits.load_split()
    assert {k: len(v[1]) for k, v in split.items()} == {"train": 1257, "val": 180, "test": 360}
    for name in ("val", "test"):  # stratified: every digit present in roughly its share
        counts = np.bincount(split[name][1], minlength=10)
        assert counts.min() >= 0.8 * counts.mean()
    folder = digits.ensure_imagefolder(tmp_path)
    png = sorted((folder / "test" / "3").iterdir())[0]
    first3 = split["test"][0][split["test"][1] == 3][0]
    assert (np.asarray(Image.open(png)) == first3).all()
    mtime = (folder / digits.MANIFEST).stat().st_mtime_ns
    assert digits.ensure_imagefolder(tmp_path) == folder  # written once
    assert (folder / digits.MANIFEST).stat().st_mtime_ns == mtime
    cifar_dir = digits.ensure_cifar(tmp_path)
    x, y, names = cifar.read_cifar(cifar_dir, "cifar10", train=True, manifest=cifar_dir / cifar.CHECKSUMS_FILE)
    assert x.shape == (1437, 32, 32, 3) and names == [str(d) for d in range(10)]
    assert (y[-180:] == split["val"][1]).all() and (x[..., 0] == x[..., 2]).all()
    # Upsampling keeps the content: 4x4 block means follow the 8x8 source.
    small = x[:50, ..., 0].reshape(50, 8, 4, 8, 4).mean((2, 4))
    corr = np.corrcoef(small.ravel(), split["train"][0][:50].ravel().astype(float))[0, 1]
    assert corr > 0.9
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left over


def test_repeated_augmentation_sampler():
    class Count(torch.utils.data.Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            return torch.rand(()), i  # the augmentation: a draw of the seeded RNG

    batches = list(images.make_loader(Count(), 6, True, seed=0, epoch=0, repeats=3))
    values = torch.cat([b[0] for b in batches])
    ids = torch.cat([b[1] for b in batches]).tolist()
    assert len(ids) == 12 and all(ids[i] == ids[i + 1] == ids[i + 2] for i in range(0, 12, 3))
    assert len(set(ids)) == 4 and len(set(values.tolist())) == 12  # 4 images x 3 distinct copies
    again = torch.cat([b[0] for b in images.make_loader(Count(), 6, True, seed=0, epoch=0, repeats=3)])
    assert torch.equal(values, again)


# ---------------------------------------------------------------- bad data: one clear error
def _official_sums(monkeypatch, folder):
    """Make the fixture's files 'official' by patching the official MD5s to theirs."""
    spec = cifar.CIFAR_SPECS["cifar10"]
    sums = {p.name: cifar.md5sum(p) for p in folder.iterdir()}
    patched = cifar.CifarSpec(**{**spec.__dict__,
                                 "train": tuple((n, sums[n]) for n, _ in spec.train),
                                 "test": tuple((n, sums[n]) for n, _ in spec.test),
                                 "meta": (spec.meta[0], sums[spec.meta[0]])})
    monkeypatch.setitem(cifar.CIFAR_SPECS, "cifar10", patched)


def test_checksums_manifest_cannot_replace_the_official_sums(tmp_path, caplog):
    folder = make_cifar10_fixture(tmp_path)
    # A manifest listing the fixture's own sums used to replace the official ones: now ignored.
    (folder / "checksums.json").write_text(json.dumps({p.name: cifar.md5sum(p) for p in folder.iterdir()}))
    with pytest.raises(DataCorruptError, match="data_batch_1: MD5 .* differs from the official checksum"):
        cifar.read_cifar(tmp_path, "cifar10", train=True)


def test_checksums_manifest_only_adds_checks_and_is_logged(tmp_path, monkeypatch, caplog):
    folder = make_cifar10_fixture(tmp_path)
    _official_sums(monkeypatch, folder)
    (folder / "readme.txt").write_text("notes")
    sums = {"readme.txt": cifar.md5sum(folder / "readme.txt"), "data_batch_1": "0" * 32}
    (folder / "checksums.json").write_text(json.dumps(sums))
    with caplog.at_level("WARNING", logger="diffq_bench.data.cifar"):
        x, _, _ = cifar.read_cifar(tmp_path, "cifar10", train=True)
    assert len(x) == 20  # the manifest's wrong entry for an official file did not replace its sum
    assert "checksums.json" in caplog.text and "['data_batch_1'] are ignored" in caplog.text
    (folder / "readme.txt").write_text("changed")
    with pytest.raises(DataCorruptError, match=r"readme\.txt: MD5 .*/checksums\.json checksum"):
        cifar.read_cifar(tmp_path, "cifar10", train=True)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b"[1, 2]", b'{"data_batch_1": 5}'])
def test_garbage_checksums_json_is_corrupt_naming_it(tmp_path, monkeypatch, content):
    folder = make_cifar10_fixture(tmp_path)
    _official_sums(monkeypatch, folder)
    (folder / "checksums.json").write_bytes(content)
    with pytest.raises(DataCorruptError, match=r"checksums\.json is not a valid checksum manifest.*delete it"):
        cifar.read_cifar(tmp_path, "cifar10", train=True)
    with pytest.raises(DataCorruptError, match=r"checksums\.json is not a valid checksum manifest"):
        cifar.read_cifar(tmp_path, "cifar10", train=True, verify_checksums=True,
                         manifest=folder / "checksums.json")


def test_cifar_batch_with_bad_encoding_field_is_corrupt(tmp_path):
    folder = make_cifar10_fixture(tmp_path)
    # Protocol-2 bytes pickle as _codecs.encode(text, 'latin1'): an unknown codec name -> LookupError.
    raw = pickle.dumps({"data": b"xyz", "labels": [0]}, protocol=2)
    assert raw.count(b"latin1") == 1
    (folder / "data_batch_3").write_bytes(raw.replace(b"latin1", b"nocode"))
    with pytest.raises(DataCorruptError, match=r"data_batch_3 is not a readable CIFAR pickle batch \(LookupError"):
        cifar.read_cifar(tmp_path, "cifar10", train=True, verify_checksums=False)


def test_cifar_batch_with_non_numeric_data_is_corrupt(tmp_path):
    folder = make_cifar10_fixture(tmp_path)
    (folder / "data_batch_2").write_bytes(pickle.dumps({"data": ["a"] * 3, "labels": [0, 1, 2]}, protocol=2))
    with pytest.raises(DataCorruptError, match="data_batch_2"):
        cifar.read_cifar(tmp_path, "cifar10", train=True, verify_checksums=False)


def test_empty_cifar_split_is_corrupt(tmp_path):
    folder = make_cifar10_fixture(tmp_path)
    for k in range(1, 6):
        (folder / f"data_batch_{k}").write_bytes(pickle.dumps({"data": [], "labels": []}, protocol=2))
    with pytest.raises(DataCorruptError, match="training batches hold no image"):
        cifar.read_cifar(tmp_path, "cifar10", train=True, verify_checksums=False)


def _bad_image(path, kind):
    """Replace the image ``path`` by a bad one; returns the bad file's path."""
    path.unlink()
    if kind == "truncated-jpeg":
        path = path.with_suffix(".jpg")
        pixels = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    elif kind == "garbage":
        path.write_bytes(os.urandom(300))
    else:  # zero-byte PNG
        path.write_bytes(b"")
    return path


@pytest.mark.parametrize("kind", ["truncated-jpeg", "garbage", "zero-byte-png"])
def test_corrupt_image_is_an_error_with_its_path(tmp_path, kind):
    make_imagefolder(tmp_path)
    bad = _bad_image(tmp_path / "val" / "dog" / "1.png", kind)
    classes = images.imagefolder_classes(tmp_path)
    val = images.imagefolder_split(tmp_path, "val", classes, images.timm_image_transform(16, False, {}))
    with pytest.raises(DataCorruptError, match=rf"{bad}.*skip_bad_files=true"):
        list(images.Batches(images.make_loader(val, 4, False, 0)))


def test_corrupt_image_error_from_a_worker_is_one_line(tmp_path):
    make_imagefolder(tmp_path)
    bad = _bad_image(tmp_path / "val" / "dog" / "1.png", "garbage")
    val = images.imagefolder_split(tmp_path, "val", images.imagefolder_classes(tmp_path),
                                   images.timm_image_transform(16, False, {}))
    with pytest.raises(DataCorruptError) as err:
        list(images.Batches(images.make_loader(val, 4, False, 0, num_workers=1)))
    assert str(err.value).startswith(str(bad)) and "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["truncated-jpeg", "garbage", "zero-byte-png"])
def test_corrupt_image_skipped_only_when_asked_and_counted(tmp_path, kind):
    make_imagefolder(tmp_path)
    bad = _bad_image(tmp_path / "val" / "dog" / "1.png", kind)
    val = images.imagefolder_split(tmp_path, "val", images.imagefolder_classes(tmp_path),
                                   images.timm_image_transform(16, False, {}), skip_bad=True)
    skipped = set()
    batches = list(images.Batches(images.make_loader(val, 4, False, 0, skip_bad=True), skipped))
    assert skipped == {str(bad)}
    labels = torch.cat([target for _, target in batches]).tolist()
    assert len(labels) == 8 and labels.count(1) == 2  # left out, never replaced by the next image


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    make_imagefolder(tmp_path)
    for f in (tmp_path / "val" / "eel").iterdir():
        f.unlink()
    (tmp_path / "val" / "eel" / "notes.txt").write_text("not an image")
    classes = images.imagefolder_classes(tmp_path)
    with pytest.raises(DataCorruptError, match=rf"class folder {tmp_path / 'val' / 'eel'} holds no image"):
        images.imagefolder_split(tmp_path, "val", classes)


def test_empty_imagefolder_split_is_an_error_naming_it(tmp_path):
    make_imagefolder(tmp_path)
    (tmp_path / "test").mkdir()
    with pytest.raises(DataCorruptError, match=rf"no image found under {tmp_path / 'test'}"):
        images.imagefolder_split(tmp_path, "test", images.imagefolder_classes(tmp_path))
