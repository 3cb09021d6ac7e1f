"""Music source separation tasks: Demucs v2 on MusDB18-HQ, and on the embedded sfmix set.

Training follows Demucs v2: random segments of the four sources (``valid_length(segment) +
shift`` samples), augmented (random per-source shift, channel swap, sign flip, remixing across
the batch), mixed by summation, separated, L1 loss against the center-trimmed sources.
Evaluation separates whole tracks of the real mixture file in overlapping chunks and reports nSDR
(always) and museval's BSS-Eval v4 SDR when ``sdr=True`` (slow; needs museval and ffmpeg).
"""
from __future__ import annotations

import dataclasses
import math
import typing as tp
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..data import musdb as mdb
from ..data import musdb_stems
from ..data import sfmix as sfmix_data
from ..data.errors import DataMissingError
from ..data.images import Batches
from ..models.demucs import Demucs, center_trim
from . import separation_metrics as metrics
from .base import Task

#: the largest tempo change of the repitch augmentation, in percent (Demucs v2)
MAX_TEMPO = 12.0

LOSSES: tp.Dict[str, tp.Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "l1": F.l1_loss,
    "mse": F.mse_loss,
}


#: the task fields that are :class:`~diffq_bench.models.demucs.Demucs` arguments
ARCH_FIELDS = ("audio_channels", "channels", "depth", "growth", "kernel_size", "stride", "context",
               "lstm_layers", "glu", "rescale", "resample", "normalize", "samplerate")


@dataclasses.dataclass(eq=False, kw_only=True)
class MusdbDemucsTask(Task):
    """Demucs v2 on MusDB18-HQ (``<data>/musdb18hq/{train,test}/<track>/<stem>.wav``) or on MUSDB18
    (``<data>/musdb18/{train,test}/<track>.stem.mp4``, decoded once into the cache:
    :mod:`diffq_bench.data.musdb_stems`); the format is detected from the files present.

    Args:
        samplerate: Hz of the data (MusDB18-HQ: 44100; other rates are rejected by the loader).
        audio_channels: channels of the data (MusDB18-HQ: 2).
        channels, depth, growth, kernel_size, stride, context, lstm_layers, glu, rescale,
            resample, normalize: :class:`diffq_bench.models.demucs.Demucs` arguments.
        segment: seconds of audio per training example (before the shift augmentation).
        segment_stride: seconds between consecutive training segments of a track.
        shift: seconds of the random per-source shift augmentation (0 disables it).
        flip: random channel swap and sign flip per source.
        remix_group: remix sources across groups of this many batch items (0/1 disables it).
        scale: per-source volume range of the scale augmentation (null disables it).
        repitch: probability of the pitch/tempo augmentation per source (0 disables it; pitch
            ±2 semitones, tempo N(0, 5%) clipped to ±12%, as Demucs v2).
        repeat: passes over the training segments per epoch (Demucs v2's --repeat).
        batch_size: training segments per batch.
        loss: ``l1`` (Demucs) or ``mse``.
        eval_segment: seconds per chunk when separating full tracks.
        eval_overlap: overlap between chunks, in [0, 1).
        eval_subset: evaluate only the first N tracks of each split (0: all; debug runs: every
            task has an ``eval_subset``, in its own unit).
        sdr: also compute museval BSS-Eval v4 SDR (slow; needs ``pip install 'diffq-bench[eval]'``
            and an ``ffmpeg`` binary).
        skip_bad_files: a track holding a bad WAV (unreadable, wrong rate or channels, empty,
            stems of unequal length: found when the set is indexed) is left out and its bad files
            counted (:meth:`skipped_files`, ``skipped_files_<split>`` in result.json) instead of
            failing the run with the file's path (the default).
        valid_tracks: names of the train tracks held out for validation (default: MusDB's
            standard 14, :data:`diffq_bench.data.musdb.MUSDB_VALIDATION_TRACKS`); a partial copy
            names its own.
    """
    name: tp.ClassVar[str] = "musdb_demucs"
    metric: tp.ClassVar[str] = "nsdr"
    lower_is_better: tp.ClassVar[bool] = False
    data_subdir: tp.ClassVar[str] = "musdb18hq"
    fingerprint_depth: tp.ClassVar[int] = 2  # split/track

    samplerate: int = 44100
    audio_channels: int = 2
    channels: int = 64
    depth: int = 6
    growth: float = 2.0
    kernel_size: int = 8
    stride: int = 4
    context: int = 3
    lstm_layers: int = 2
    glu: bool = True
    rescale: float = 0.1
    resample: bool = True
    normalize: bool = False
    segment: float = 10.0
    segment_stride: float = 1.0
    shift: float = 1.0
    flip: bool = True
    remix_group: int = 4
    scale: tp.Optional[tp.List[float]] = dataclasses.field(default_factory=lambda: [0.25, 1.25])
    repitch: float = 0.2
    repeat: int = 2
    batch_size: int = 64
    loss: str = "l1"
    eval_segment: float = 10.0
    eval_overlap: float = 0.25
    eval_subset: int = 0
    sdr: bool = False
    skip_bad_files: bool = False
    valid_tracks: tp.List[str] = dataclasses.field(default_factory=lambda: list(mdb.MUSDB_VALIDATION_TRACKS))

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_valid_tracks()
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; valid: {', '.join(sorted(LOSSES))}")
        self._int_field("samplerate")
        self._int_field("batch_size")
        self._int_field("repeat")
        if not 0 <= self.repitch <= 1:
            raise ValueError(f"repitch is a probability in [0, 1], got {self.repitch!r}")
        if self.scale is not None and (len(self.scale) != 2 or not 0 <= self.scale[0] <= self.scale[1]):
            raise ValueError(f"scale must be null or [low, high] with 0 <= low <= high, got {self.scale!r}")
        for key in ("segment", "segment_stride", "eval_segment"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0 seconds, got {getattr(self, key)!r}")
        if self.shift < 0 or not 0 <= self.eval_overlap < 1 or self.eval_subset < 0 or self.remix_group < 0:
            raise ValueError(f"need shift >= 0, eval_overlap in [0, 1), eval_subset >= 0, "
                             f"remix_group >= 0; got {self.shift}, {self.eval_overlap}, "
                             f"{self.eval_subset}, {self.remix_group}")
        self.model_kwargs = {key: getattr(self, key) for key in ARCH_FIELDS}
        # Validates the architecture now (bad kwargs fail before any data is touched) for free.
        self._geometry = Demucs(mdb.SOURCES, device="meta", **self.model_kwargs)
        rate = self.samplerate
        self.segment_samples = int(round(self.segment * rate))
        self.stride_samples = max(1, int(round(self.segment_stride * rate)))
        self.shift_samples = int(round(self.shift * rate))
        self.eval_segment_samples = int(round(self.eval_segment * rate))
        self.loss_fn = LOSSES[self.loss]
        self.db: tp.Optional[mdb.MusdbHQ] = None
        self.stems_root: tp.Optional[Path] = None  # the .stem.mp4 folder when the data is MUSDB18

    def _check_valid_tracks(self) -> None:
        names = self.valid_tracks
        if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names or \
                not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise ValueError(f"task.valid_tracks must be a non-empty list of distinct train track names, "
                             f"got {names!r}")
        self.valid_tracks = list(names)

    # ------------------------------------------------------------------------------- data
    def _open(self) -> mdb.MusdbHQ:
        hq, stems = self.data_root / self.data_subdir, self.data_root / "musdb18"
        hint = (f"Download MusDB18-HQ (zenodo record 3338373) and unpack it so that {hq}/train "
                f"and test/ hold one folder per track, or MUSDB18 (zenodo record 1117372, .stem.mp4 "
                f"files) into {stems}/{{train,test}} (set paths.data or DIFFQ_BENCH_DATA to the parent "
                "folder; a partial copy sets task.valid_tracks); or run the embedded set: task=sfmix")
        root = next((folder for folder in (hq, stems) if folder.is_dir()), None)
        if root is None:
            raise DataMissingError(f"MusDB18-HQ not found at {hq} (nor MUSDB18 at {stems}). {hint}")
        kwargs = dict(prepare_hint=hint, skip_bad_files=self.skip_bad_files, valid_tracks=self.valid_tracks)
        if musdb_stems.detect_format(root) == "stem.mp4":
            self.stems_root = root
            decoded = musdb_stems.decode(root, self.cache_dir, self.samplerate, self.audio_channels)
            return mdb.MusdbHQ(decoded, self.samplerate, self.audio_channels,
                               fix=f"delete {decoded} (decoded from {root}) to decode it again", **kwargs)
        return mdb.MusdbHQ(root, self.samplerate, self.audio_channels, **kwargs)

    def skipped_files(self) -> tp.Dict[str, int]:
        """{split: bad files whose tracks were left out} (``skip_bad_files``; zeros otherwise)."""
        if self.db is None:
            return {}
        return {split: len(paths) for split, paths in self.db.skipped.items()}

    def setup(self, data_root, cache_dir, device, num_workers: int = 0, seed: int = 0) -> None:
        """Index the dataset and check its format (sample rate, channels, stems)."""
        super().setup(data_root, cache_dir, device, num_workers, seed)
        self.db = self._open()
        self.data_dir = self.stems_root or self.db.root  # the fingerprint covers the files the user has
        length = self._geometry.valid_length(self.segment_samples) + self.shift_samples
        if self.repitch > 0:  # repitch cuts every source to (1 - max tempo) of its length
            length = int(length / (1 - MAX_TEMPO / 100))
        self.train_set = mdb.SegmentDataset(self.db, "train", length, self.stride_samples)

    def build_model(self) -> nn.Module:
        """A freshly initialised Demucs v2 (rescale init)."""
        return Demucs(mdb.SOURCES, **self.model_kwargs)

    def train_batches(self, epoch: int) -> tp.Iterator[torch.Tensor]:
        """Shuffled, augmented source batches ``[B, 4, C, T]``; reproducible from (seed, epoch)."""
        if self.db is None:
            raise RuntimeError("call setup() before train_batches()")
        gen = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(epoch))
        order = torch.cat([torch.randperm(len(self.train_set), generator=gen)
                           for _ in range(self.repeat)]).tolist()
        loader = torch.utils.data.DataLoader(self.train_set, batch_size=self.batch_size,
                                             sampler=order, num_workers=self.num_workers,
                                             drop_last=len(order) >= self.batch_size)
        for sources in Batches(loader):  # a worker's DataCorruptError stays one line
            if self.repitch > 0:
                sources = mdb.repitch(sources, gen, self.repitch, max_tempo=MAX_TEMPO)
            yield mdb.augment(sources, gen, self.shift_samples, self.flip, self.remix_group,
                              self.scale)

    def num_train_batches(self) -> int:
        """Batches per epoch (the loop's epoch length; :meth:`train_batches` is a generator)."""
        if self.db is None:
            raise RuntimeError("call setup() before num_train_batches()")
        return max(1, self.repeat * len(self.train_set) // self.batch_size)

    def step(self, model: nn.Module, batch: torch.Tensor) -> tp.Tuple[torch.Tensor, tp.Dict[str, float]]:
        """Mix the sources, separate, L1 (or MSE) against the center-trimmed sources."""
        sources = batch.to(self.device)
        estimates = model(sources.sum(dim=1))
        sources = center_trim(sources, estimates)
        loss = self.loss_fn(estimates, sources)
        return loss, {"loss": float(loss.detach())}

    # -------------------------------------------------------------------------- evaluation
    def evaluate(self, model: nn.Module, split: str) -> tp.Dict[str, float]:
        """Separate every track of ``split``; nSDR per source and mean (+ SDR if asked).

        nSDR: per track and source over the whole track, averaged over tracks, then over
        sources (``nsdr``). SDR: museval median over 1 s frames per track, median over tracks
        per source (the SiSEC/MusDB convention), then mean over sources (``sdr``).
        """
        if self.db is None:
            raise RuntimeError("call setup() before evaluate()")
        if split not in ("valid", "test"):
            raise ValueError(f"evaluate split must be 'valid' or 'test', got {split!r}")
        if self.sdr:
            metrics.require_museval()  # fail before the (long) separation, not after it
        tracks = self.db.tracks(split)
        if self.eval_subset:
            tracks = tracks[:self.eval_subset]
        was_training = model.training
        model.eval()
        nsdrs, sdrs = [], []
        try:
            for track in tracks:
                audio = self.db.read(track).to(self.device)
                estimates = metrics.separate(model, audio[0], self.eval_segment_samples,
                                             self.eval_overlap)
                references = audio[1:]
                nsdrs.append(metrics.nsdr(references, estimates).cpu().numpy())
                if self.sdr:
                    sdrs.append(metrics.museval_sdr(references, estimates, self.samplerate))
        finally:
            model.train(was_training)
        out: tp.Dict[str, float] = {}
        per_source = np.mean(nsdrs, axis=0)
        for name, value in zip(mdb.SOURCES, per_source):
            out[f"nsdr_{name}"] = float(value)
        out["nsdr"] = float(per_source.mean())
        if self.sdr:
            with np.errstate(all="ignore"):
                sdr_source = np.nanmedian(np.stack(sdrs), axis=0)
            for name, value in zip(mdb.SOURCES, sdr_source):
                out[f"sdr_{name}"] = float(value)
            out["sdr"] = float(np.nanmean(sdr_source)) if np.isfinite(sdr_source).any() else math.nan
        return out


@dataclasses.dataclass(eq=False, kw_only=True)
class SfmixTask(MusdbDemucsTask):
    """A small Demucs on sfmix, the embedded soundfont-rendered set (see docs/sfmix.md).

    The set is rendered on first use into ``<data>/sfmix/`` and read through the MusDB18-HQ
    loader. The last ``valid_tracks`` train tracks form the validation split.

    Args:
        train_tracks, test_tracks, duration, data_seed: the set's size and seed
            (:func:`diffq_bench.data.sfmix.build_sfmix`); ``data_seed`` is independent of the run
            seed, so every run of a grid sees the same data.
        valid_tracks: how many train tracks are held out for validation (the last ones).
        others: as :class:`MusdbDemucsTask`, with small-model defaults (16 kHz, 16 channels,
            depth 4, 1 s segments, batches of 4).
    """
    name: tp.ClassVar[str] = "sfmix"
    data_subdir: tp.ClassVar[str] = "sfmix"

    train_tracks: int = 24
    test_tracks: int = 8
    valid_tracks: int = 4
    duration: float = 8.0
    data_seed: int = 0
    samplerate: int = 16000
    channels: int = 16
    depth: int = 4
    segment: float = 1.0
    segment_stride: float = 0.5
    shift: float = 0.25
    batch_size: int = 4
    eval_segment: float = 4.0
    scale: tp.Optional[tp.List[float]] = None
    repitch: float = 0.0
    repeat: int = 1

    def _check_valid_tracks(self) -> None:
        if not 1 <= self.valid_tracks < self.train_tracks:
            raise ValueError(f"valid_tracks must be in [1, train_tracks - 1] = "
                             f"[1, {self.train_tracks - 1}], got {self.valid_tracks}")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.set_kwargs = dict(samplerate=self.samplerate, train_tracks=self.train_tracks,
                               test_tracks=self.test_tracks, duration=self.duration,
                               seed=self.data_seed)
        self.valid_names = sfmix_data.track_names("train", self.train_tracks)[-self.valid_tracks:]

    def _open(self) -> mdb.MusdbHQ:
        folder = sfmix_data.build_sfmix(self.data_root / self.data_subdir, **self.set_kwargs)
        return mdb.MusdbHQ(folder, self.samplerate, self.audio_channels,
                           fix=f"delete {folder}: the embedded set is rendered again on the next run",
                           skip_bad_files=self.skip_bad_files,
                           valid_tracks=self.valid_names)
