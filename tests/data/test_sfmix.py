"""sfmix: SoundFont reader, rendering, and the MusDB18-HQ-layout set built from it."""
import json

import numpy as np
import pytest
import soundfile as sf

from diffq_bench.data import sfmix
from diffq_bench.data.musdb import SOURCES, MusdbHQ
from diffq_bench.data.soundfont import SoundFont, SoundFontError


@pytest.fixture(scope="module")
def font():
    return SoundFont(sfmix.soundfont_path())


def fundamental(wave, samplerate):
    """Pitch by autocorrelation (first peak after the zero-lag lobe), in Hz."""
    x = wave - wave.mean()
    ac = np.correlate(x, x, mode="full")[len(x) - 1:]
    below = np.argmax(ac < 0)  # end of the zero-lag lobe
    return samplerate / (below + np.argmax(ac[below:samplerate // 50]))


def test_general_midi_presets(font):
    assert font.preset_name(0, 52) == "Choir Aahs"
    assert font.preset_name(0, 53) == "Voice Oohs"
    assert "Bass" in font.preset_name(0, 33)
    assert len(font.zones(128, 0)) > 20  # the standard drum kit: one zone per drum at least
    for program in sfmix.BASS_PROGRAMS + sfmix.OTHER_PROGRAMS + sfmix.VOICE_PROGRAMS:
        assert font.zones(0, program)
    with pytest.raises(SoundFontError, match="no preset"):
        font.zones(5, 5)


@pytest.mark.parametrize("program", [0, 48, 52])  # piano, strings, choir (organs sound 16' octaves)
def test_render_plays_at_pitch(font, program):
    sr = 16000
    low = font.render(0, program, 57, 100, 0.6, sr)[2000:8000]   # A3 = 220 Hz
    high = font.render(0, program, 69, 100, 0.6, sr)[2000:8000]  # A4 = 440 Hz
    assert np.abs(low).max() > 1e-3
    f_low, f_high = fundamental(low, sr), fundamental(high, sr)
    assert f_high / f_low == pytest.approx(2.0, rel=0.05)
    assert f_high == pytest.approx(440, rel=0.06)


def test_render_velocity_and_release(font):
    loud = font.render(0, 0, 60, 120, 0.3, 16000)
    soft = font.render(0, 0, 60, 40, 0.3, 16000)
    assert len(loud) > 0.3 * 16000  # note-on time plus the release tail
    assert np.abs(soft).max() < np.abs(loud).max()
    drum = font.render(128, 0, 38, 100, 0.1, 16000)  # snare: a one-shot sample
    assert np.abs(drum).max() > 0.05


def test_not_a_soundfont(tmp_path):
    bad = tmp_path / "x.sf2"
    bad.write_bytes(b"RIFF\x04\x00\x00\x00WAVE")
    with pytest.raises(SoundFontError, match="not a SoundFont"):
        SoundFont(bad)


def test_build_layout_and_read_back(tmp_path):
    folder = sfmix.build_sfmix(tmp_path, samplerate=8000, train_tracks=2, test_tracks=1,
                               duration=2.0, seed=3)
    assert json.loads((folder / sfmix.MARKER).read_text())["seed"] == 3
    db = MusdbHQ(folder, samplerate=8000, channels=2, valid_tracks=["sfmix train 001"])
    assert [t.name for t in db.tracks("train")] == ["sfmix train 000"]
    track = db.tracks("test")[0]
    assert track.length == 16000
    audio = db.read(track)
    mix, sources = audio[0], audio[1:]
    # 16-bit files: the mixture equals the sum of the stems up to rounding (4 half-LSBs).
    assert float((mix - sources.sum(0)).abs().max()) <= 3 / 32768
    for index, name in enumerate(SOURCES):  # every stem is audible and in stereo
        stem = sources[index]
        assert float(stem.pow(2).mean().sqrt()) > 1e-3, name
        assert not np.allclose(stem[0].numpy(), stem[1].numpy())
    assert float(mix.abs().max()) < 1.0
    assert not list(tmp_path.glob(".*tmp*"))


def test_build_is_seeded_and_cached(tmp_path):
    a = sfmix.build_sfmix(tmp_path / "a", samplerate=8000, train_tracks=1, test_tracks=1,
                          duration=1.0, seed=0)
    b = sfmix.build_sfmix(tmp_path / "b", samplerate=8000, train_tracks=1, test_tracks=1,
                          duration=1.0, seed=0)
    c = sfmix.build_sfmix(tmp_path / "a", samplerate=8000, train_tracks=1, test_tracks=1,
                          duration=1.0, seed=1)
    rel = "train/sfmix train 000/mixture.wav"
    assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert (a / rel).read_bytes() != (c / rel).read_bytes()
    stamp = (a / rel).stat().st_mtime_ns
    again = sfmix.build_sfmix(tmp_path / "a", samplerate=8000, train_tracks=1, test_tracks=1,
                              duration=1.0, seed=0)
    assert again == a and (a / rel).stat().st_mtime_ns == stamp  # not rendered twice


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_write(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise OSError("disk full")
        return sf.write(*args, **kwargs)

    monkeypatch.setattr(sfmix.sf, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        sfmix.build_sfmix(tmp_path, samplerate=8000, train_tracks=1, test_tracks=1, duration=1.0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, match", [
    ({"samplerate": 100}, "samplerate"), ({"train_tracks": 0}, "train_tracks"),
    ({"duration": 0.1}, "duration")])
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sfmix.build_sfmix(tmp_path, **kwargs)
