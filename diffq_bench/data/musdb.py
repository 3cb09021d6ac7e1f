"""MusDB18-HQ in its official on-disk layout, read with soundfile.

Layout (the official MusDB18-HQ archive, and what :mod:`diffq_bench.data.sfmix` writes)::

    <root>/train/<track>/{mixture,drums,bass,other,vocals}.wav
    <root>/test/<track>/{mixture,drums,bass,other,vocals}.wav

Splits: ``train`` = the train folder minus the validation tracks, ``valid`` = those tracks (the
standard 14 of MusDB/open-unmix/Demucs, see :func:`musdb_validation_tracks`), ``test`` = the test
folder. Training reads random-access segments straight from the WAVs (no decoding of whole tracks).

Bad data is an error naming the file (:class:`~diffq_bench.data.errors.DataCorruptError`): a WAV
that does not open, has another sample rate or channel count, holds no sample, or whose stems differ
in length; a read that comes back shorter than the header said (a truncated file). With
``skip_bad_files`` the tracks holding such files (found when the set is indexed, from the headers)
are left out instead and their bad files counted per split (:attr:`MusdbHQ.skipped`); a file that
turns out truncated only when read is always an error. A split left without a track is an error.
"""
from __future__ import annotations

import dataclasses
import fractions
import importlib.util
import math
import typing as tp
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from ..models.demucs import SOURCES
from .errors import DataCorruptError, DataMissingError

STEMS = ("mixture",) + SOURCES
SPLITS = ("train", "valid", "test")

# The validation split of the musdb package (musdb 0.4.3, musdb/configs/mus.yaml, key
# ``validation_tracks``), used by open-unmix and Demucs. Kept here because importing musdb needs an
# ffmpeg binary; :func:`musdb_validation_tracks` prefers the installed package's file when present.
MUSDB_VALIDATION_TRACKS = (
    "Actions - One Minute Smile",
    "Clara Berry And Wooldog - Waltz For My Victims",
    "Johnny Lokke - Promises & Lies",
    "Patrick Talbot - A Reason To Leave",
    "Triviul - Angelsaint",
    "Alexander Ross - Goodbye Bolero",
    "Fergessen - Nos Palpitants",
    "Leaf - Summerghost",
    "Skelpolu - Human Mistakes",
    "Young Griffo - Pennies",
    "ANiMAL - Rockshow",
    "James May - On The Line",
    "Meaxic - Take A Step",
    "Traffic Experiment - Sirens",
)


def musdb_validation_tracks() -> tp.List[str]:
    """The 14 standard validation track names, read from the musdb package's ``configs/mus.yaml``
    when musdb is installed (without importing it: that needs ffmpeg), else the copy above."""
    spec = importlib.util.find_spec("musdb")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "configs" / "mus.yaml"
        if path.is_file():
            import yaml  # a dependency of hydra/omegaconf
            tracks = yaml.safe_load(path.read_text()).get("validation_tracks")
            if tracks:
                return list(tracks)
    return list(MUSDB_VALIDATION_TRACKS)


@dataclasses.dataclass
class Track:
    """One track folder: ``name``, ``folder`` and its length in samples (all stems agree)."""
    name: str
    folder: Path
    length: int


class MusdbHQ:
    """Index of a MusDB18-HQ-layout folder, with checks of the format.

    Args:
        root: folder holding ``train/`` and ``test/``.
        samplerate: expected sample rate of every WAV (44100 for MusDB18-HQ).
        channels: expected channels of every WAV (2 for MusDB18-HQ).
        valid_tracks: names of the train tracks used for validation (MusDB's 14 when None).
        prepare_hint: how to obtain the data, appended to "data missing" errors.
        fix: what to do about a bad file, ending "data corrupt" errors.
        skip_bad_files: leave out the tracks holding a bad file (:attr:`skipped` lists those files).
    Raises:
        DataMissingError: folder, split or stem missing (the message names the path and layout).
        DataCorruptError: a bad WAV (see the module docstring) unless skipped, or a split without
            a usable track.
    """

    def __init__(self, root: tp.Union[str, Path], samplerate: int = 44100, channels: int = 2,
                 valid_tracks: tp.Optional[tp.Sequence[str]] = None, prepare_hint: str = "",
                 fix: str = "replace it with the official archive's file", skip_bad_files: bool = False):
        self.root = Path(root)
        self.samplerate = int(samplerate)
        self.channels = int(channels)
        self.hint = prepare_hint
        self.fix = fix
        self.skip_bad_files = skip_bad_files
        valid = musdb_validation_tracks() if valid_tracks is None else list(valid_tracks)
        self._tracks: tp.Dict[str, tp.List[Track]] = {}
        #: per split, the bad files whose tracks were left out (``skip_bad_files``)
        self.skipped: tp.Dict[str, tp.List[Path]] = {split: [] for split in SPLITS}
        train, bad_train = self._scan("train")
        names = {t.name for t in train} | set(bad_train)
        missing = [v for v in valid if v not in names]
        if missing:
            raise DataMissingError(f"validation track(s) {missing} not found in {self.root / 'train'}"
                                   f"{self._hint()}")
        self._tracks["train"] = [t for t in train if t.name not in valid]
        self._tracks["valid"] = [t for t in train if t.name in valid]
        for name, paths in bad_train.items():
            self.skipped["valid" if name in valid else "train"].extend(paths)
        self._tracks["test"], bad_test = self._scan("test")
        self.skipped["test"] = [p for paths in bad_test.values() for p in paths]
        if not self._tracks["train"]:
            raise DataMissingError(f"no training track left in {self.root / 'train'} once the "
                                   f"{len(valid)} validation tracks are set aside{self._hint()}")
        if valid and not self._tracks["valid"]:
            raise DataCorruptError(f"every validation track in {self.root / 'train'} has a bad file "
                                   f"({', '.join(map(str, self.skipped['valid'][:3]))}): restore them")

    def _hint(self) -> str:
        return f". {self.hint}" if self.hint else ""

    def _bad(self, path: Path, problem: str) -> None:
        if not self.skip_bad_files:
            raise DataCorruptError(f"{path} {problem}; {self.fix}, or set task.skip_bad_files=true "
                                   "to leave its track out (the count is recorded in result.json)")

    def _stem_problem(self, path: Path) -> tp.Tuple[tp.Optional[str], int]:
        """(what is wrong with one stem's header, or None; its length in samples)."""
        try:
            info = sf.info(str(path))
        except Exception as exc:  # noqa: BLE001 - libsndfile's errors (RuntimeError subclasses, ...)
            return f"is not a readable WAV file ({str(exc).strip()[:160]})", 0
        if info.samplerate != self.samplerate:
            return f"has sample rate {info.samplerate} Hz, expected {self.samplerate} Hz", 0
        if info.channels != self.channels:
            return f"has {info.channels} channel(s), expected {self.channels}", 0
        if info.frames <= 0:
            return "holds no sample", 0
        return None, int(info.frames)

    def _scan(self, folder: str) -> tp.Tuple[tp.List[Track], tp.Dict[str, tp.List[Path]]]:
        """The good tracks of ``<root>/<folder>`` and, per left-out track, its bad files."""
        base = self.root / folder
        layout = "<root>/{train,test}/<track>/{" + ",".join(STEMS) + "}.wav"
        if not base.is_dir():
            raise DataMissingError(f"MusDB18-HQ folder {base} does not exist (expected layout "
                                   f"{layout}){self._hint()}")
        tracks: tp.List[Track] = []
        bad: tp.Dict[str, tp.List[Path]] = {}
        for folder_path in sorted(p for p in base.iterdir() if p.is_dir()):
            lengths, broken = {}, []
            for stem in STEMS:
                path = folder_path / f"{stem}.wav"
                if not path.is_file():
                    raise DataMissingError(f"missing stem {path} (expected layout {layout})"
                                           f"{self._hint()}")
                problem, lengths[stem] = self._stem_problem(path)
                if problem is not None:
                    self._bad(path, problem)
                    broken.append(path)
            if not broken and len(set(lengths.values())) != 1:
                # the stems that disagree with the mixture (all of them if the mixture is the odd one)
                odd = [s for s in SOURCES if lengths[s] != lengths["mixture"]]
                self._bad(folder_path / f"{odd[0]}.wav", f"has {lengths[odd[0]]} samples but the "
                          f"mixture {lengths['mixture']} (stems of one track differ in length: {lengths})")
                broken = [folder_path / f"{s}.wav" for s in odd]
            if broken:
                bad[folder_path.name] = broken
            else:
                tracks.append(Track(folder_path.name, folder_path, lengths["mixture"]))
        if not tracks and not bad:
            raise DataMissingError(f"no track folder in {base} (expected layout {layout})"
                                   f"{self._hint()}")
        if not tracks:
            raise DataCorruptError(f"every track in {base} has a bad file (first: {next(iter(bad.values()))[0]}); "
                                   f"{self.fix}")
        return tracks, bad

    def tracks(self, split: str) -> tp.List[Track]:
        """The tracks of ``split`` (``train``, ``valid`` or ``test``), sorted by name."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        return list(self._tracks[split])

    def read(self, track: Track, offset: int = 0, length: tp.Optional[int] = None,
             stems: tp.Sequence[str] = STEMS) -> torch.Tensor:
        """Audio of ``stems`` of ``track`` as a float32 tensor ``[len(stems), channels, T]``.

        Args:
            track: a track of this set.
            offset: first sample to read.
            length: samples to read (to the end when None); zero-padded past the end.
            stems: which stems, in order.
        """
        frames = track.length - offset if length is None else length
        expected = max(0, min(frames, track.length - offset))  # past the end: zero padding
        out = np.zeros((len(stems), self.channels, frames), dtype=np.float32)
        for index, stem in enumerate(stems):
            path = track.folder / f"{stem}.wav"
            try:
                data, _ = sf.read(str(path), start=offset, frames=frames, dtype="float32", always_2d=True)
            except Exception as exc:  # noqa: BLE001 - libsndfile's errors: the file changed or is damaged
                raise DataCorruptError(f"{path} cannot be read at sample {offset} "
                                       f"({str(exc).strip()[:160]}); {self.fix}") from None
            if data.shape[0] < expected or data.shape[1] != self.channels:
                raise DataCorruptError(f"{path} gave {data.shape[0]} samples at {offset}, expected "
                                       f"{expected}: the file is truncated or changed since it was "
                                       f"indexed; {self.fix}")
            out[index, :, :data.shape[0]] = data.T
        return torch.from_numpy(out)


class SegmentDataset(torch.utils.data.Dataset):
    """Fixed-length training segments of the sources, every ``stride`` samples of every track.

    Each item is ``[len(SOURCES), channels, length]``; the mixture is rebuilt as their sum after
    augmentation (as Demucs does), so remixed batches stay consistent.

    Args:
        db: the dataset index.
        split: which split to cut.
        length: samples per segment.
        stride: samples between segment starts.
    """

    def __init__(self, db: MusdbHQ, split: str, length: int, stride: int):
        if length <= 0 or stride <= 0:
            raise ValueError(f"segment length and stride must be > 0 samples, got {length}, {stride}")
        self.db = db
        self.length = length
        self.index: tp.List[tp.Tuple[Track, int]] = []
        for track in db.tracks(split):
            count = max(1, 1 + (track.length - length) // stride)  # short tracks: one padded item
            self.index.extend((track, k * stride) for k in range(count))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> torch.Tensor:
        track, offset = self.index[item]
        return self.db.read(track, offset, self.length, stems=SOURCES)


def change_pitch_tempo(audio: torch.Tensor, semitones: int, tempo: float,
                       n_fft: int = 2048) -> torch.Tensor:
    """``audio`` ``[..., T]`` with its pitch moved by ``semitones`` and its tempo multiplied by
    ``tempo`` (output ``~T / tempo`` samples): a phase-vocoder time stretch then a resampling,
    in place of Demucs' soundstretch (which needs an external binary).
    """
    ratio = 2 ** (semitones / 12)
    hop = n_fft // 4
    shape = audio.shape
    flat = audio.reshape(-1, shape[-1])
    window = torch.hann_window(n_fft, device=audio.device)
    spec = torch.stft(flat, n_fft, hop, window=window, return_complex=True)
    advance = torch.linspace(0, math.pi * hop, spec.size(-2), device=audio.device)[..., None]
    stretched = torchaudio.functional.phase_vocoder(spec, tempo / ratio, advance)
    length = int(round(shape[-1] * ratio / tempo))
    out = torch.istft(stretched, n_fft, hop, window=window, length=length)
    if semitones:  # played ratio times faster: resample by ratio (a small fraction: fast kernels)
        frac = fractions.Fraction(ratio).limit_denominator(64)
        out = torchaudio.functional.resample(out, frac.numerator, frac.denominator)
    return out.reshape(*shape[:-1], out.size(-1))


def repitch(sources: torch.Tensor, generator: torch.Generator, proba: float,
            max_pitch: int = 2, max_tempo: float = 12.0, tempo_std: float = 5.0) -> torch.Tensor:
    """Demucs v2's repitch augmentation on ``[B, S, C, T]``: each source of each item, with
    probability ``proba``, gets its pitch moved by an integer number of semitones in
    ``[-max_pitch, max_pitch]`` and its tempo changed by ``N(0, tempo_std)`` percent clipped to
    ``±max_tempo``; every source is then cut to ``(1 - max_tempo/100)·T`` samples.
    """
    batch, num, channels, time = sources.shape
    out_len = int((1 - max_tempo / 100) * time)
    out = sources[..., :out_len].clone()
    draws = torch.rand(batch, num, generator=generator)
    pitches = torch.randint(-max_pitch, max_pitch + 1, (batch, num), generator=generator)
    tempos = (torch.randn(batch, num, generator=generator) * tempo_std).clamp(-max_tempo, max_tempo)
    for b in range(batch):
        for s in range(num):
            if draws[b, s] < proba:
                moved = change_pitch_tempo(sources[b, s], int(pitches[b, s]),
                                           1 + float(tempos[b, s]) / 100)
                out[b, s] = moved[..., :out_len] if moved.size(-1) >= out_len else \
                    torch.nn.functional.pad(moved, (0, out_len - moved.size(-1)))
    return out


def augment(sources: torch.Tensor, generator: torch.Generator, shift: int = 0,
            flip: bool = True, remix_group: int = 4,
            scale: tp.Optional[tp.Sequence[float]] = None) -> torch.Tensor:
    """Demucs' data augmentation on a batch of sources ``[B, S, C, T]``.

    - random time shift: each source of each item is cropped at its own offset in ``[0, shift)``
      (the output is ``shift`` samples shorter), so sources are re-aligned at random;
    - channel swap and sign flip, independently per source and item (``flip``);
    - volume: each source of each item scaled by a factor uniform in ``scale = [low, high]``;
    - remixing: within groups of ``remix_group`` items, each source is permuted across items, so a
      mixture combines sources from different tracks (0 or 1 disables it).

    Args:
        sources: batch of sources.
        generator: the only source of randomness (epochs are reproducible).
        shift: maximum shift in samples (0 disables it).
        flip: enable channel swaps and sign flips.
        remix_group: group size for remixing.
        scale: volume range (None disables it; Demucs v2: [0.25, 1.25]).
    """
    batch, num, channels, time = sources.shape
    if shift:
        if shift >= time:
            raise ValueError(f"shift ({shift}) must be shorter than the segment ({time} samples)")
        length = time - shift
        offsets = torch.randint(shift, (batch, num, 1, 1), generator=generator)
        idx = offsets + torch.arange(length).view(1, 1, 1, length)
        sources = sources.gather(3, idx.expand(batch, num, channels, length))
    if flip:
        if channels == 2:
            left = torch.randint(2, (batch, num, 1, 1), generator=generator)
            order = torch.cat([left, 1 - left], dim=2).expand(-1, -1, -1, sources.size(-1))
            sources = sources.gather(2, order)
        signs = torch.randint(2, (batch, num, 1, 1), generator=generator) * 2 - 1
        sources = sources * signs.to(sources.dtype)
    if scale is not None:
        low, high = scale
        gains = low + (high - low) * torch.rand(batch, num, 1, 1, generator=generator)
        sources = sources * gains.to(sources.dtype)
    if remix_group > 1 and batch >= remix_group:
        groups = batch // remix_group
        head = sources[:groups * remix_group].view(groups, remix_group, num, channels, -1)
        perm = torch.argsort(torch.rand(groups, remix_group, num, generator=generator), dim=1)
        head = head.gather(1, perm.view(groups, remix_group, num, 1, 1).expand_as(head))
        sources = torch.cat([head.reshape(-1, num, channels, head.size(-1)),
                             sources[groups * remix_group:]])
    return sources
