"""Format-faithful data fixtures shared by the data and task tests (CIFAR pickles, ImageFolder,
MusDB18-HQ WAVs), written into a test's temporary folder."""
import pickle

import numpy as np
import soundfile as sf
from PIL import Image

from diffq_bench.data import musdb as mdb

SR = 44100


def py2_style_batch(path, data, labels, label_key="labels", extra=None):
    """A batch as the official (python 2) files are: byte-string keys, uint8 rows of 3072."""
    content = {b"batch_label": b"training batch 1 of 5", b"data": data,
               label_key.encode(): list(map(int, labels)),
               b"filenames": [b"f%d.png" % i for i in range(len(labels))], **(extra or {})}
    path.write_bytes(pickle.dumps(content, protocol=2))


def make_cifar10_fixture(root, per_batch=4):
    """cifar-10-batches-py with known pixels: image i has R=i, G=100+i, B=200-i everywhere but (0,1)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    n = 0
    for name in ["data_batch_%d" % k for k in range(1, 6)] + ["test_batch"]:
        ids = np.arange(n, n + per_batch)
        planes = np.stack([np.full((len(ids), 32, 32), v, np.uint8)
                           for v in (ids[:, None, None], 100 + ids[:, None, None], 200 - ids[:, None, None])], 1)
        planes[:, 0, 0, 1] = 255  # marks row 0, column 1 of the red plane: checks row-major layout
        py2_style_batch(folder / name, planes.reshape(len(ids), 3072), ids % 10)
        n += per_batch
    (folder / "batches.meta").write_bytes(pickle.dumps(
        {b"label_names": [b"c%d" % i for i in range(10)], b"num_vis": 3072}, protocol=2))
    return folder


def make_imagefolder(root, splits=("train", "val"), classes=("cat", "dog", "eel"), per_class=3, size=20):
    rng = np.random.default_rng(0)
    for split in splits:
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                noise = rng.integers(0, 40, (size, size + 4, 3), dtype=np.uint8)
                pixels = np.full((size, size + 4, 3), 60 * c, np.uint8) + noise
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def write_track(folder, length, seed, samplerate=SR, channels=2, lengths=None):
    """One track folder with the five stems; mixture = sum of the sources (as in MusDB-HQ)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    sources = {s: (0.2 * rng.standard_normal((length, channels))).astype(np.float32)
               for s in mdb.SOURCES}
    stems = {"mixture": sum(sources.values()) / 2, **sources}
    for stem, audio in stems.items():
        n = (lengths or {}).get(stem, length)
        sf.write(str(folder / f"{stem}.wav"), audio[:n], samplerate, subtype="PCM_16")
    return stems


def make_musdb(root, length=2205, test_length=3000):
    for i, name in enumerate(["A - One", "B - Two"]):
        write_track(root / "train" / name, length + 100 * i, i)
    for i, name in enumerate(mdb.MUSDB_VALIDATION_TRACKS):
        write_track(root / "train" / name, length // 2, 100 + i)
    write_track(root / "test" / "Z - Test", test_length, 9)


#: config of the test-only toy task (tests/conftest.py's ToyTask) as conf/task/toy.yaml
TOY_YAML = """\
# @package _global_
task:
  name: toy
  n_train: 192
  batch_size: 16
  hidden: 128
  dropout: 0.1
train:
  epochs: 2
optim:
  lr: 0.003
"""


#: result metrics that differ between two runs of the same config (timings)
VOLATILE_METRICS = ("wall_time_s",)


def stable_metrics(result):
    """A result's metrics without the timings: what two runs of one config must agree on."""
    return {k: v for k, v in result["metrics"].items() if k not in VOLATILE_METRICS}
