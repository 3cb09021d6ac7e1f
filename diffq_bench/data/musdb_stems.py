"""MUSDB18 in its original format (``.stem.mp4``), decoded once into the MusDB18-HQ layout.

MUSDB18 (what most copies are, and what the ``musdb`` package's 7-second sample set is) stores each
track as one MP4 file with five AAC streams, in the order of the musdb package's ``mus.yaml``
(``stem_id``): 0 mixture, 1 drums, 2 bass, 3 other, 4 vocals, 44.1 kHz stereo::

    <root>/train/<track>.stem.mp4
    <root>/test/<track>.stem.mp4

:func:`decode` reads each file with ``stempeg`` (``pip install 'diffq-bench[musdb]'``, and the
``ffmpeg``/``ffprobe`` binaries) and writes its stems as 16-bit WAVs (values clipped to [-1, 1], as
the musdb package's own WAV conversion does) under ``<cache>/musdb18-decoded/<key>/``, in the
MusDB18-HQ layout, so :class:`diffq_bench.data.musdb.MusdbHQ` indexes and reads it like MusDB18-HQ
(random-access training segments, every format check). A track is decoded again when its
``.stem.mp4`` changed (size or modification time, recorded in its ``source.json``); decoded tracks
whose file is gone are removed. A file that does not decode, holds another number of streams,
another sample rate or channel count, or streams of unequal length is a ``DataCorruptError``
naming it.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import typing as tp
from pathlib import Path

import numpy as np
import soundfile as sf

from .. import io
from .errors import DataCorruptError, DataMissingError
from .musdb import STEMS

SUFFIX = ".stem.mp4"
#: written last in each decoded track folder: the source file's size and mtime, the decoder
MARKER = "source.json"
#: bump when the decoded files change for the same source (older caches are decoded again)
FORMAT_VERSION = 1
INSTALL = "pip install 'diffq-bench[musdb]'"


def stem_files(root: tp.Union[str, Path], split: str) -> tp.List[Path]:
    """The ``.stem.mp4`` files of ``<root>/<split>``, sorted by name (empty when none)."""
    folder = Path(root) / split
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(SUFFIX))


def detect_format(root: tp.Union[str, Path]) -> tp.Optional[str]:
    """``"wav"`` (MusDB18-HQ track folders), ``"stem.mp4"`` (MUSDB18 files) or None (neither) from
    the files present in ``<root>/{train,test}``.

    Raises:
        DataCorruptError: both formats are present (which one to read is ambiguous).
    """
    root = Path(root)
    stems = any(stem_files(root, split) for split in ("train", "test"))
    folders = any((root / split).is_dir() and any(p.is_dir() for p in (root / split).iterdir())
                  for split in ("train", "test"))
    if stems and folders:
        raise DataCorruptError(f"{root} holds both MUSDB18 .stem.mp4 files and MusDB18-HQ track folders "
                               "under train/ or test/: keep one format there (move the other to its own folder)")
    return "stem.mp4" if stems else "wav" if folders else None


def require_stempeg() -> tp.Any:
    """The ``stempeg`` module, after checking that it and ffmpeg/ffprobe are installed.

    Raises:
        DataMissingError: one line naming what to install.
    """
    try:
        stempeg = importlib.import_module("stempeg")
    except ImportError:
        raise DataMissingError("reading MUSDB18 .stem.mp4 files needs the musdb/stempeg packages: "
                               f"{INSTALL} (or use MusDB18-HQ WAVs)") from None
    missing = [tool for tool in ("ffmpeg", "ffprobe") if shutil.which(tool) is None]
    if missing:
        raise DataMissingError(f"reading MUSDB18 .stem.mp4 files needs the {' and '.join(missing)} "
                               "binary (stempeg calls it): install ffmpeg (apt-get install ffmpeg, "
                               "conda install ffmpeg or brew install ffmpeg) and put it on PATH")
    return stempeg


def cache_folder(root: tp.Union[str, Path], cache_dir: tp.Union[str, Path]) -> Path:
    """Where the stems of ``root``'s files are decoded (one folder per dataset location)."""
    key = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:16]
    return Path(cache_dir) / "musdb18-decoded" / f"v{FORMAT_VERSION}-{key}"


def decode(root: tp.Union[str, Path], cache_dir: tp.Union[str, Path], samplerate: int = 44100,
           channels: int = 2) -> Path:
    """Decode every ``.stem.mp4`` of ``<root>/{train,test}`` that changed since it was last decoded
    (see the module docstring) and return the MusDB18-HQ-layout folder holding their stems.

    Args:
        root: the MUSDB18 folder (``train/`` and ``test/`` of ``.stem.mp4`` files).
        cache_dir: the runner's cache folder (``paths.cache``).
        samplerate: expected sample rate of every stream (44100 for MUSDB18).
        channels: expected channels of every stream (2).
    Raises:
        DataMissingError: no ``.stem.mp4`` under a split, or stempeg/ffmpeg missing.
        DataCorruptError: a file that does not decode or is not a 5-stream stereo stem file.
    """
    root = Path(root)
    target = cache_folder(root, cache_dir)
    for split in ("train", "test"):
        files = stem_files(root, split)
        if not files:
            raise DataMissingError(f"no MUSDB18 track (*{SUFFIX}) in {root / split} (expected layout "
                                   f"<root>/{{train,test}}/<track>{SUFFIX})")
        names = {f.name[:-len(SUFFIX)] for f in files}
        if (target / split).is_dir():
            for old in (target / split).iterdir():  # decoded tracks whose file is gone
                if old.name not in names:
                    shutil.rmtree(old, ignore_errors=True)
        stempeg = None
        for path in files:
            folder = target / split / path.name[:-len(SUFFIX)]
            source = _source(path, samplerate)
            if _decoded(folder) == source:
                continue
            stempeg = stempeg or require_stempeg()
            audio = _read(stempeg, path, samplerate, channels)
            shutil.rmtree(folder, ignore_errors=True)  # a stale decode of an older file
            with io.atomic_dir(folder, MARKER) as tmp:
                for stem, data in zip(STEMS, audio):
                    # 16-bit as the musdb converter and MusDB18-HQ; clipped, not wrapped around
                    sf.write(str(tmp / f"{stem}.wav"), np.clip(data, -1.0, 1.0), samplerate, subtype="PCM_16")
                (tmp / MARKER).write_text(json.dumps(source, indent=1))
    return target


def _source(path: Path, samplerate: int) -> tp.Dict[str, tp.Any]:
    stat = os.stat(path)
    return {"source": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "samplerate": int(samplerate), "version": FORMAT_VERSION}


def _decoded(folder: Path) -> tp.Optional[tp.Dict[str, tp.Any]]:
    """The source record of a complete decoded track folder (None: absent or unreadable)."""
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not all((folder / f"{stem}.wav").is_file() for stem in STEMS):
        return None
    return data if isinstance(data, dict) else None


def _read(stempeg: tp.Any, path: Path, samplerate: int, channels: int) -> np.ndarray:
    """The five streams of ``path`` as float32 ``[5, T, channels]``, checked."""
    fix = "replace it with the file from the MUSDB18 archive (zenodo record 1117372)"
    try:
        audio, rate = stempeg.read_stems(str(path), dtype=np.float32, always_3d=True)
    except Exception as exc:  # noqa: BLE001 - ffmpeg/ffprobe errors come as Warning, RuntimeError...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
        raise DataCorruptError(f"{path} cannot be decoded by stempeg/ffmpeg ({first}); {fix}") from None
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 3 or audio.shape[0] != len(STEMS):
        raise DataCorruptError(f"{path} holds {audio.shape[0] if audio.ndim == 3 else '?'} audio stream(s), "
                               f"expected {len(STEMS)} ({', '.join(STEMS)}); {fix}")
    if int(rate) != int(samplerate):
        raise DataCorruptError(f"{path} has sample rate {rate} Hz, expected {samplerate} Hz; {fix}")
    if audio.shape[2] != channels:
        raise DataCorruptError(f"{path} has {audio.shape[2]} channel(s), expected {channels}; {fix}")
    if audio.shape[1] == 0 or not np.isfinite(audio).all():
        raise DataCorruptError(f"{path} decodes to {'no sample' if audio.shape[1] == 0 else 'non-finite values'}; "
                               f"{fix}")
    return audio
