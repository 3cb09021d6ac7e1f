"""A minimal SoundFont 2 reader and note renderer (``struct`` on the RIFF chunks, numpy only).

Enough of the SF2 spec (2.04) to play a General-MIDI preset note by note: preset -> instrument ->
sample zones with key/velocity ranges, root key and tuning, loop points and sample modes, initial
attenuation, pan and the volume envelope's attack/hold/decay/sustain/release. Modulators, filters,
LFOs and effects are ignored (the stems only need the real recorded samples played at pitch).
Used by :mod:`diffq_bench.data.sfmix` with the GM soundfont that ships inside pretty_midi.
"""
from __future__ import annotations

import dataclasses
import struct
import typing as tp
from pathlib import Path

import numpy as np

# Generator operators (SF2 spec section 8.1.2) used here.
GEN_START, GEN_END, GEN_LOOP_START, GEN_LOOP_END = 0, 1, 2, 3
GEN_START_COARSE, GEN_END_COARSE, GEN_LOOP_START_COARSE, GEN_LOOP_END_COARSE = 4, 12, 45, 50
GEN_PAN, GEN_ATTACK, GEN_HOLD, GEN_DECAY, GEN_SUSTAIN, GEN_RELEASE = 17, 34, 35, 36, 37, 38
GEN_INSTRUMENT, GEN_KEY_RANGE, GEN_VEL_RANGE, GEN_ATTENUATION = 41, 43, 44, 48
GEN_COARSE_TUNE, GEN_FINE_TUNE, GEN_SAMPLE_ID, GEN_SAMPLE_MODES = 51, 52, 53, 54
GEN_SCALE_TUNING, GEN_ROOT_KEY = 56, 58
RANGE_GENS = (GEN_KEY_RANGE, GEN_VEL_RANGE)
# Generators whose preset-level value is added to the instrument-level one (timecents, cB...).
ADDITIVE = (GEN_PAN, GEN_ATTACK, GEN_HOLD, GEN_DECAY, GEN_SUSTAIN, GEN_RELEASE, GEN_ATTENUATION,
            GEN_COARSE_TUNE, GEN_FINE_TUNE)


class SoundFontError(ValueError):
    """The file is not a SoundFont 2 the reader understands (the message says what is wrong)."""


@dataclasses.dataclass
class Sample:
    name: str
    start: int
    end: int
    loop_start: int
    loop_end: int
    rate: int
    pitch: int
    correction: int


@dataclasses.dataclass
class Zone:
    """Merged generators of one instrument zone reached through one preset zone."""
    gens: tp.Dict[int, int]
    key_range: tp.Tuple[int, int]
    vel_range: tp.Tuple[int, int]
    sample: Sample


def _chunks(data: bytes, start: int, end: int) -> tp.Iterator[tp.Tuple[bytes, int, int]]:
    pos = start
    while pos + 8 <= end:
        cid, size = struct.unpack_from("<4sI", data, pos)
        yield cid, pos + 8, size
        pos += 8 + size + (size & 1)


def _records(blob: bytes, fmt: str) -> tp.List[tuple]:
    size = struct.calcsize(fmt)
    return [struct.unpack_from(fmt, blob, i) for i in range(0, len(blob) - size + 1, size)]


def _zone_gens(bags: tp.List[tuple], gens: tp.List[tuple], first: int, last: int
               ) -> tp.List[tp.Dict[int, tp.Any]]:
    """Generators of bags ``first..last-1`` as dicts (ranges decoded to (lo, hi) tuples)."""
    zones = []
    for b in range(first, last):
        out: tp.Dict[int, tp.Any] = {}
        for oper, amount in gens[bags[b][0]:bags[b + 1][0]]:
            if oper in RANGE_GENS:
                out[oper] = (amount & 0xFF, (amount >> 8) & 0xFF)
            else:
                out[oper] = struct.unpack("<h", struct.pack("<H", amount))[0]
        zones.append(out)
    return zones


def _split_global(zones: tp.List[tp.Dict[int, tp.Any]], terminal: int
                  ) -> tp.Tuple[tp.Dict[int, tp.Any], tp.List[tp.Dict[int, tp.Any]]]:
    # A first zone without the terminal generator (instrument / sampleID) is the global zone.
    if zones and terminal not in zones[0]:
        return zones[0], [z for z in zones[1:] if terminal in z]
    return {}, [z for z in zones if terminal in z]


class SoundFont:
    """The presets and 16-bit sample data of an SF2 file.

    Args:
        path: the ``.sf2`` file.
    Raises:
        SoundFontError: not a RIFF ``sfbk`` file, or a required chunk is missing.
    """

    def __init__(self, path: tp.Union[str, Path]):
        data = Path(path).read_bytes()
        if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"sfbk":
            raise SoundFontError(f"{path} is not a SoundFont 2 file (no RIFF/sfbk header)")
        found: tp.Dict[bytes, bytes] = {}
        for cid, pos, size in _chunks(data, 12, len(data)):
            if cid == b"LIST":
                for sub, spos, ssize in _chunks(data, pos + 4, pos + size):
                    found[sub] = data[spos:spos + ssize]
        needed = [b"smpl", b"phdr", b"pbag", b"pgen", b"inst", b"ibag", b"igen", b"shdr"]
        absent = [n.decode() for n in needed if n not in found]
        if absent:
            raise SoundFontError(f"{path} lacks SF2 chunk(s) {absent}")
        self.data = np.frombuffer(found[b"smpl"], dtype="<i2").astype(np.float32) / 32768.0
        self.phdr = _records(found[b"phdr"], "<20sHHHIII")
        self.pbag = _records(found[b"pbag"], "<HH")
        self.pgen = _records(found[b"pgen"], "<HH")
        self.inst = _records(found[b"inst"], "<20sH")
        self.ibag = _records(found[b"ibag"], "<HH")
        self.igen = _records(found[b"igen"], "<HH")
        self.samples = [Sample(r[0].split(b"\0")[0].decode("latin-1"), *r[1:8])
                        for r in _records(found[b"shdr"], "<20sIIIIIBbHH")]
        # The last phdr/inst/shdr records are the spec's terminal "EOP"/"EOI"/"EOS" entries.
        self.presets = {(r[2], r[1]): i for i, r in enumerate(self.phdr[:-1])}

    def preset_name(self, bank: int, program: int) -> str:
        """Name of preset ``(bank, program)``."""
        return self.phdr[self._preset(bank, program)][0].split(b"\0")[0].decode("latin-1")

    def _preset(self, bank: int, program: int) -> int:
        if (bank, program) not in self.presets:
            raise SoundFontError(f"no preset bank {bank} program {program}; available: "
                                 f"{sorted(self.presets)[:20]}...")
        return self.presets[(bank, program)]

    def zones(self, bank: int, program: int) -> tp.List[Zone]:
        """Every (preset zone x instrument zone) pair of a preset, generators merged per the spec
        (instrument values override instrument globals; preset values add to additive ones)."""
        index = self._preset(bank, program)
        pglobal, pzones = _split_global(
            _zone_gens(self.pbag, self.pgen, self.phdr[index][3], self.phdr[index + 1][3]),
            GEN_INSTRUMENT)
        out = []
        for pz in pzones:
            pz = {**pglobal, **pz}
            inst = pz[GEN_INSTRUMENT]
            iglobal, izones = _split_global(
                _zone_gens(self.ibag, self.igen, self.inst[inst][1], self.inst[inst + 1][1]),
                GEN_SAMPLE_ID)
            for iz in izones:
                gens = {**iglobal, **iz}
                for key in ADDITIVE:
                    if key in pz:
                        gens[key] = gens.get(key, 0) + pz[key]
                key_range = _intersect(gens.get(GEN_KEY_RANGE, (0, 127)), pz.get(GEN_KEY_RANGE, (0, 127)))
                vel_range = _intersect(gens.get(GEN_VEL_RANGE, (0, 127)), pz.get(GEN_VEL_RANGE, (0, 127)))
                if key_range and vel_range:
                    out.append(Zone(gens, key_range, vel_range, self.samples[gens[GEN_SAMPLE_ID]]))
        return out

    def render(self, bank: int, program: int, key: int, velocity: int, duration: float,
               samplerate: int) -> np.ndarray:
        """One note as a mono float32 array (its release tail included).

        Args:
            bank, program: the preset (bank 128 is GM percussion, where ``key`` picks the drum).
            key: MIDI key 0..127.
            velocity: MIDI velocity 1..127 (linear gain, plus the zones' velocity ranges).
            duration: seconds between note-on and note-off.
            samplerate: output sample rate in Hz.
        """
        out: tp.Optional[np.ndarray] = None
        for zone in self.zones(bank, program):
            if not (zone.key_range[0] <= key <= zone.key_range[1]
                    and zone.vel_range[0] <= velocity <= zone.vel_range[1]):
                continue
            wave = self._render_zone(zone, key, duration, samplerate)
            if out is None:
                out = wave
            else:  # layered zones (e.g. stereo pairs) are summed
                if len(wave) > len(out):
                    out, wave = wave, out
                out[:len(wave)] += wave
        if out is None:
            return np.zeros(0, dtype=np.float32)
        return out * (velocity / 127.0) ** 2

    def _render_zone(self, zone: Zone, key: int, duration: float, samplerate: int) -> np.ndarray:
        g, s = zone.gens, zone.sample
        start = s.start + g.get(GEN_START, 0) + 32768 * g.get(GEN_START_COARSE, 0)
        end = s.end + g.get(GEN_END, 0) + 32768 * g.get(GEN_END_COARSE, 0)
        loop_start = s.loop_start + g.get(GEN_LOOP_START, 0) + 32768 * g.get(GEN_LOOP_START_COARSE, 0)
        loop_end = s.loop_end + g.get(GEN_LOOP_END, 0) + 32768 * g.get(GEN_LOOP_END_COARSE, 0)
        pcm = self.data[start:end]
        if len(pcm) < 2 or s.rate <= 0:
            return np.zeros(0, dtype=np.float32)
        root = g.get(GEN_ROOT_KEY, -1)
        root = s.pitch if root < 0 or root > 127 else root
        scale = g.get(GEN_SCALE_TUNING, 100) / 100.0
        cents = ((key - root) * scale * 100 + g.get(GEN_COARSE_TUNE, 0) * 100
                 + g.get(GEN_FINE_TUNE, 0) + s.correction)
        step = 2 ** (cents / 1200) * s.rate / samplerate  # input samples per output sample
        release = _timecents(g.get(GEN_RELEASE, -12000))
        release = min(release, 1.0)  # keep rendered tails short: the arrangement is dense anyway
        n_on = int(duration * samplerate)
        n_total = n_on + int(release * samplerate)
        pos = np.arange(n_total) * step
        ls, le = loop_start - start, min(loop_end - start, len(pcm) - 1)
        looping = g.get(GEN_SAMPLE_MODES, 0) in (1, 3) and ls >= 0 and le - ls > 8
        if looping:
            over = pos >= ls
            pos[over] = ls + np.mod(pos[over] - ls, le - ls)
        else:
            pos = pos[pos < len(pcm) - 1]
        base = pos.astype(np.int64)
        frac = (pos - base).astype(np.float32)
        wave = pcm[base] * (1 - frac) + pcm[np.minimum(base + 1, len(pcm) - 1)] * frac
        env = _envelope(g, len(wave), n_on, samplerate)
        gain = 10 ** (-g.get(GEN_ATTENUATION, 0) / 200.0)  # centibels
        return (wave * env * gain).astype(np.float32)


def _intersect(a: tp.Tuple[int, int], b: tp.Tuple[int, int]) -> tp.Optional[tp.Tuple[int, int]]:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo <= hi else None


def _timecents(value: int) -> float:
    return float(2 ** (value / 1200.0))


def _envelope(g: tp.Dict[int, int], length: int, n_on: int, samplerate: int) -> np.ndarray:
    """DAHDSR volume envelope as a linear gain: linear attack, hold, exponential decay to the
    sustain level (cB of attenuation), linear release from note-off. Computed pointwise, so stages
    longer than the note cost nothing and are simply cut at its end."""
    attack = _timecents(g.get(GEN_ATTACK, -12000)) * samplerate
    hold = _timecents(g.get(GEN_HOLD, -12000)) * samplerate
    decay = min(_timecents(g.get(GEN_DECAY, -12000)), 10.0) * samplerate
    sustain = 10 ** (-max(0, min(1440, g.get(GEN_SUSTAIN, 0))) / 200.0)
    floor = max(sustain, 1e-4)
    t = np.arange(length, dtype=np.float64)
    env = np.where(t < attack, t / max(attack, 1.0),
                   np.where(t < attack + hold, 1.0,
                            floor ** np.clip((t - attack - hold) / max(decay, 1.0), 0.0, 1.0)))
    if n_on < length:
        level = env[max(0, n_on - 1)]
        env[n_on:] = level * np.linspace(1, 0, length - n_on)
    return env.astype(np.float32)
