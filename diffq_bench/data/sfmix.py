"""sfmix: an embedded, MusDB18-HQ-layout music set rendered from a real General-MIDI soundfont.

Each track is a procedurally arranged, seeded piece (tempo, key, chord progression, instruments,
drum pattern, melody are drawn from a seeded generator) played with the recorded instrument, drum
and voice samples of ``TimGM6mb.sf2``, the GM soundfont shipped inside the ``pretty_midi``
package (GPL-2; read from the installed package at run time, never copied into this repository).

Stems: ``drums`` (GM percussion kit), ``bass`` (a GM bass), ``other`` (piano / guitar / organ /
strings comping the chords), ``vocals`` (GM "Choir Aahs" / "Voice Oohs" / "Synth Voice" singing a
melody); each is rendered mono, leveled, panned to stereo; ``mixture`` is their sum. The set is
written once, atomically, as ``{train,test}/<track>/{mixture,drums,bass,other,vocals}.wav``
(16-bit PCM) and read back through :class:`diffq_bench.data.musdb.MusdbHQ`, like the real data.
See docs/sfmix.md.
"""
from __future__ import annotations

import json
import typing as tp
from pathlib import Path

import numpy as np
import soundfile as sf

from .. import io
from ..models.demucs import SOURCES
from .soundfont import SoundFont

FORMAT_VERSION = 2  # bump whenever the rendered audio changes (cached sets are per version)
MARKER = "sfmix.json"
BASS_PROGRAMS = (32, 33, 34, 35, 36, 37, 38, 39)
OTHER_PROGRAMS = (0, 1, 2, 4, 16, 19, 24, 25, 26, 48, 49, 50)
VOICE_PROGRAMS = (52, 53, 54)
SUSTAINED = (16, 19, 48, 49, 50)  # organs and strings hold whole-bar chords
MAJOR = (0, 2, 4, 5, 7, 9, 11)
MINOR = (0, 2, 3, 5, 7, 8, 10)
PROGRESSIONS = ((0, 4, 5, 3), (0, 5, 3, 4), (5, 3, 0, 4), (0, 3, 4, 3), (0, 3, 0, 4), (0, 6, 5, 4))
# Loudness of each stem relative to the drums (dB), before a random +-3 dB per track.
LEVELS_DB = {"drums": 0.0, "bass": -2.0, "other": -4.0, "vocals": -1.0}


def soundfont_path() -> Path:
    """The GM soundfont inside the installed pretty_midi package."""
    try:
        import pretty_midi
    except ImportError as exc:
        raise FileNotFoundError("sfmix needs the pretty_midi package (it ships the soundfont): "
                                "pip install pretty_midi") from exc
    path = Path(pretty_midi.__file__).parent / "TimGM6mb.sf2"
    if not path.is_file():
        raise FileNotFoundError(f"pretty_midi's soundfont {path} is missing; reinstall pretty_midi")
    return path


class _Score:
    """Notes of one stem: (start s, duration s, bank, program, key, velocity)."""

    def __init__(self) -> None:
        self.notes: tp.List[tp.Tuple[float, float, int, int, int, int]] = []

    def add(self, start: float, dur: float, bank: int, program: int, key: int, vel: int) -> None:
        self.notes.append((start, dur, bank, program, int(key), int(np.clip(vel, 1, 127))))


def arrange(rng: np.random.Generator, duration: float) -> tp.Dict[str, _Score]:
    """A seeded random arrangement of ``duration`` seconds, one score per source."""
    bpm = rng.uniform(88, 140)
    beat = 60.0 / bpm
    scale = MAJOR if rng.random() < 0.5 else MINOR
    tonic = int(rng.integers(40, 48))  # E2..B2: the bass register
    progression = PROGRESSIONS[int(rng.integers(len(PROGRESSIONS)))]
    n_bars = int(np.ceil(duration / (4 * beat)))
    scores = {name: _Score() for name in SOURCES}

    def degree(d: int, octave: int = 0) -> int:
        return tonic + 12 * (octave + d // 7) + scale[d % 7]

    # Drums: kick/snare backbeat with random extra kicks, hats or ride on 8ths, crash on bar 1.
    hat = int(rng.choice([42, 42, 51, 44]))
    kicks = [0] + [int(x) for x in rng.choice([3, 5, 6, 7], size=int(rng.integers(0, 3)), replace=False)]
    for bar in range(n_bars):
        t0 = bar * 4 * beat
        for eighth in range(8):
            t = t0 + eighth * beat / 2
            scores["drums"].add(t, beat / 2, 128, 0, hat, rng.integers(60, 100) + 15 * (eighth % 2 == 0))
            if eighth in kicks or eighth == 4 and rng.random() < 0.7:
                scores["drums"].add(t, beat / 2, 128, 0, 36, rng.integers(95, 127))
            if eighth in (2, 6):
                scores["drums"].add(t, beat / 2, 128, 0, 38, rng.integers(90, 125))
        if bar % 4 == 0:
            scores["drums"].add(t0, 2 * beat, 128, 0, int(rng.choice([49, 57])), rng.integers(90, 120))
        elif rng.random() < 0.25:
            scores["drums"].add(t0 + 3.5 * beat, beat / 2, 128, 0, 46, rng.integers(70, 100))

    # Bass: chord roots (sometimes fifths / octaves) on quarters or eighths.
    bass_prog = int(rng.choice(BASS_PROGRAMS))
    sub = 2 if rng.random() < 0.5 else 1
    for bar in range(n_bars):
        root = progression[bar % 4]
        for k in range(4 * sub):
            step = beat / sub
            choice = rng.random()
            key = degree(root) + (7 if choice < 0.15 else 12 if choice < 0.25 else 0)
            scores["bass"].add(bar * 4 * beat + k * step, 0.9 * step, 0, bass_prog, key,
                               rng.integers(85, 115))

    # Other: triads in octave 4, held (organ/strings) or struck on each beat (piano/guitar).
    other_prog = int(rng.choice(OTHER_PROGRAMS))
    for bar in range(n_bars):
        root = progression[bar % 4]
        chord = [degree(root + i, 2) for i in (0, 2, 4)]
        hits = [(0.0, 4.0)] if other_prog in SUSTAINED else [(float(b), 0.95) for b in range(4)]
        for off, length in hits:
            for key in chord:
                scores["other"].add(bar * 4 * beat + off * beat, length * beat, 0, other_prog, key,
                                    rng.integers(70, 105))

    # Vocals: phrases of a random walk on the scale, chord tones on the downbeats, rests between.
    voice_prog = int(rng.choice(VOICE_PROGRAMS))
    pos, d = 0.0, int(rng.integers(0, 5))
    total_beats = n_bars * 4
    while pos < total_beats:
        phrase_end = min(total_beats, pos + float(rng.choice([4, 6, 8])))
        while pos < phrase_end:
            length = float(rng.choice([0.5, 1.0, 1.0, 1.5, 2.0]))
            if pos % 4 == 0:
                d = progression[int(pos // 4) % 4] + int(rng.choice([0, 2, 4]))
            else:
                d = int(np.clip(d + rng.choice([-2, -1, -1, 1, 1, 2]), 0, 11))
            scores["vocals"].add(pos * beat, 0.95 * length * beat, 0, voice_prog, degree(d, 2),
                                 rng.integers(80, 115))
            pos += length
        pos += float(rng.choice([1, 2]))  # breath
    return scores


def render_track(font: SoundFont, rng: np.random.Generator, duration: float,
                 samplerate: int) -> tp.Dict[str, np.ndarray]:
    """Stems ``{source: [T, 2] float32}`` and ``mixture`` of one seeded track."""
    length = int(duration * samplerate)
    stems = {}
    for name, score in arrange(rng, duration).items():
        mono = np.zeros(length, dtype=np.float32)
        for start, dur, bank, program, key, vel in score.notes:
            first = int(start * samplerate)
            if first >= length:
                continue
            wave = font.render(bank, program, key, vel, dur, samplerate)[:length - first]
            mono[first:first + len(wave)] += wave
        rms = float(np.sqrt(np.mean(mono ** 2))) + 1e-8
        gain_db = LEVELS_DB[name] + rng.uniform(-3, 3)
        mono *= 0.1 * 10 ** (gain_db / 20) / rms
        pan = rng.uniform(0.35, 0.65) if name in ("bass", "vocals") else rng.uniform(0.15, 0.85)
        angle = pan * np.pi / 2  # constant-power pan
        stems[name] = np.stack([mono * np.cos(angle), mono * np.sin(angle)], axis=1)
    peak = float(np.abs(sum(stems.values())).max())
    if peak > 0.95:  # keep the 16-bit mixture unclipped, so it stays the sum of the stems
        for name in stems:
            stems[name] *= 0.95 / peak
    stems = {k: v.astype(np.float32) for k, v in stems.items()}
    stems["mixture"] = sum(stems[name] for name in SOURCES)
    return stems


def track_names(split: str, count: int) -> tp.List[str]:
    """Names of the tracks of a split (``sfmix train 000``...)."""
    return [f"sfmix {split} {i:03d}" for i in range(count)]


def build_sfmix(root: tp.Union[str, Path], samplerate: int = 16000, train_tracks: int = 24,
                test_tracks: int = 8, duration: float = 10.0, seed: int = 0) -> Path:
    """Render the set once into a folder under ``root`` and return that folder.

    The folder name encodes every argument, so different variants never collide; it is renamed
    into place only once complete (a marker file records the arguments), so an interrupted or
    concurrent build never leaves a half-written set that looks finished.

    Args:
        root: parent folder (the runner's data folder).
        samplerate: Hz of the WAVs (8000..48000).
        train_tracks: tracks in ``train/`` (validation tracks are taken from these).
        test_tracks: tracks in ``test/``.
        duration: seconds per track (1..120).
        seed: seed of the arrangements (same seed, same audio).
    """
    if not 8000 <= samplerate <= 48000:
        raise ValueError(f"sfmix samplerate must be in [8000, 48000] Hz, got {samplerate}")
    if not 1 <= train_tracks <= 1000 or not 1 <= test_tracks <= 1000:
        raise ValueError(f"sfmix train_tracks and test_tracks must be in [1, 1000], "
                         f"got {train_tracks}, {test_tracks}")
    if not 1.0 <= duration <= 120.0:
        raise ValueError(f"sfmix duration must be in [1, 120] seconds, got {duration}")
    params = {"version": FORMAT_VERSION, "samplerate": int(samplerate), "train_tracks": int(train_tracks),
              "test_tracks": int(test_tracks), "duration": float(duration), "seed": int(seed)}
    target = Path(root) / (f"sfmix-v{FORMAT_VERSION}-sr{samplerate}-{train_tracks}x{test_tracks}"
                           f"-{duration:g}s-seed{seed}")
    if (target / MARKER).is_file():
        return target
    font = SoundFont(soundfont_path())
    with io.atomic_dir(target, MARKER) as tmp:
        for split_id, (split, count) in enumerate((("train", train_tracks), ("test", test_tracks))):
            for index, name in enumerate(track_names(split, count)):
                rng = np.random.default_rng([seed, split_id, index])
                folder = tmp / split / name
                folder.mkdir(parents=True)
                for stem, audio in render_track(font, rng, duration, samplerate).items():
                    sf.write(str(folder / f"{stem}.wav"), audio, samplerate, subtype="PCM_16")
        (tmp / MARKER).write_text(json.dumps(params, indent=1))
    return target
