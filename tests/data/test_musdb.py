"""MusDB18-HQ loader on format-faithful fixtures (44.1 kHz stereo 16-bit WAVs, official layout)."""
import pytest
import soundfile as sf
import torch

from diffq_bench.data import musdb as mdb
from diffq_bench.data.errors import DataCorruptError, DataMissingError

from fixtures import make_musdb, write_track


@pytest.fixture
def musdb_root(tmp_path):
    """Two training tracks plus the 14 standard validation tracks (a strict loader needs them all)."""
    root = tmp_path / "musdb18hq"
    make_musdb(root)
    return root


def test_standard_validation_tracks():
    tracks = mdb.musdb_validation_tracks()
    assert len(tracks) == 14 and len(set(tracks)) == 14
    assert "Leaf - Summerghost" in tracks and "Traffic Experiment - Sirens" in tracks


def test_splits(musdb_root):
    db = mdb.MusdbHQ(musdb_root)
    assert [t.name for t in db.tracks("train")] == ["A - One", "B - Two"]
    assert [t.name for t in db.tracks("valid")] == sorted(mdb.MUSDB_VALIDATION_TRACKS)
    assert [t.name for t in db.tracks("test")] == ["Z - Test"]
    assert [t.length for t in db.tracks("train")] == [2205, 2305]
    custom = mdb.MusdbHQ(musdb_root, valid_tracks=["A - One"])
    assert [t.name for t in custom.tracks("valid")] == ["A - One"]
    assert len(custom.tracks("train")) == 15
    with pytest.raises(ValueError, match="valid: train, valid, test"):
        db.tracks("dev")


def test_read_matches_files(musdb_root):
    db = mdb.MusdbHQ(musdb_root)
    track = db.tracks("test")[0]
    audio = db.read(track)
    assert audio.shape == (5, 2, 3000) and audio.dtype == torch.float32
    vocals, _ = sf.read(str(track.folder / "vocals.wav"), dtype="float32")
    assert torch.equal(audio[4], torch.from_numpy(vocals.T.copy()))
    part = db.read(track, offset=2900, length=200, stems=("bass",))
    assert part.shape == (1, 2, 200)
    assert torch.equal(part[0, :, :100], audio[2, :, 2900:])
    assert not part[0, :, 100:].any()  # past the end: zero padding


def test_missing_data_errors_name_the_path(tmp_path, musdb_root):
    with pytest.raises(DataMissingError, match="nowhere"):
        mdb.MusdbHQ(tmp_path / "nowhere", prepare_hint="get it")
    (musdb_root / "test" / "Z - Test" / "drums.wav").unlink()
    with pytest.raises(DataMissingError, match="drums.wav"):
        mdb.MusdbHQ(musdb_root)


def test_missing_validation_track(musdb_root):
    with pytest.raises(DataMissingError, match="validation track"):
        mdb.MusdbHQ(musdb_root, valid_tracks=["Nope - Nothing"])


def test_format_errors(tmp_path):
    root = tmp_path / "m"
    write_track(root / "train" / "A", 1000, 1)
    write_track(root / "test" / "T", 1000, 2, samplerate=22050)
    with pytest.raises(ValueError, match="22050 Hz, expected 44100"):
        mdb.MusdbHQ(root, valid_tracks=[])
    with pytest.raises(ValueError, match="1 channel"):
        root2 = tmp_path / "m2"
        write_track(root2 / "train" / "A", 1000, 1, channels=1)
        mdb.MusdbHQ(root2, valid_tracks=[])
    root3 = tmp_path / "m3"
    write_track(root3 / "train" / "A", 1000, 1, lengths={"bass": 900})
    with pytest.raises(ValueError, match="differ in length"):
        mdb.MusdbHQ(root3, valid_tracks=[])


def test_segments(musdb_root):
    db = mdb.MusdbHQ(musdb_root)
    data = mdb.SegmentDataset(db, "train", length=1000, stride=500)
    # 2205 -> starts 0, 500, 1000 ; 2305 -> 0, 500, 1000
    assert len(data) == 6
    item = data[1]
    assert item.shape == (4, 2, 1000)
    track = db.tracks("train")[0]
    assert torch.equal(item, db.read(track, 500, 1000, stems=mdb.SOURCES))
    with pytest.raises(ValueError, match="> 0"):
        mdb.SegmentDataset(db, "train", length=0, stride=1)


def test_augment_shift_flip_remix():
    torch.manual_seed(0)
    batch = torch.randn(8, 4, 2, 50)
    out = mdb.augment(batch, torch.Generator().manual_seed(1), shift=10, flip=False, remix_group=0)
    assert out.shape == (8, 4, 2, 40)
    for b in range(8):
        for s in range(4):  # every source is a crop of itself at some offset < shift
            assert any(torch.equal(out[b, s], batch[b, s, :, o:o + 40]) for o in range(10))
    flipped = mdb.augment(batch, torch.Generator().manual_seed(1), shift=0, flip=True, remix_group=0)
    for b in range(8):
        for s in range(4):
            x, y = batch[b, s], flipped[b, s]
            assert any(torch.equal(y, sign * x[list(order)]) for sign in (1, -1)
                       for order in ((0, 1), (1, 0)))
    remixed = mdb.augment(batch, torch.Generator().manual_seed(1), shift=0, flip=False, remix_group=4)
    for group in (slice(0, 4), slice(4, 8)):  # sources move only inside their group
        for s in range(4):
            assert torch.allclose(remixed[group, s].sum(0), batch[group, s].sum(0), atol=1e-5)
    assert not torch.equal(remixed, batch)
    again = mdb.augment(batch, torch.Generator().manual_seed(1), shift=10, flip=True, remix_group=4)
    assert torch.equal(again, mdb.augment(batch, torch.Generator().manual_seed(1), 10, True, 4))
    with pytest.raises(ValueError, match="shorter than the segment"):
        mdb.augment(batch, torch.Generator(), shift=50)


@pytest.mark.parametrize("semitones, tempo", [(0, 1.1), (2, 1.0), (-2, 0.92)])
def test_pitch_and_tempo_change(semitones, tempo):
    import math
    sr = 16000
    sine = torch.sin(2 * math.pi * 440 * torch.arange(2 * sr) / sr)[None]
    out = mdb.change_pitch_tempo(sine, semitones, tempo)
    assert abs(out.size(-1) - 2 * sr / tempo) <= 2  # tempo: duration / tempo
    peak = float(torch.fft.rfft(out[0]).abs().argmax()) * sr / out.size(-1)
    assert peak == pytest.approx(440 * 2 ** (semitones / 12), abs=1.5)  # pitch: x 2^(s/12)


def test_repitch_and_scale_augmentations():
    gen = torch.Generator().manual_seed(0)
    sources = torch.randn(3, 4, 2, 8000)
    out = mdb.repitch(sources, gen, proba=0.0)
    assert torch.equal(out, sources[..., :7040])  # cut to (1 - 12%) of the length, untouched
    moved = mdb.repitch(sources, gen, proba=1.0)
    assert moved.shape == (3, 4, 2, 7040) and not torch.allclose(moved, out)
    ones = torch.ones(64, 4, 2, 10)
    gains = mdb.augment(ones, gen, flip=False, remix_group=0, scale=[0.25, 1.25])[..., 0, 0]
    assert 0.25 <= float(gains.min()) < 0.4 and 1.1 < float(gains.max()) <= 1.25
    assert torch.equal(gains[..., None, None].expand_as(ones), mdb.augment(
        ones, torch.Generator().manual_seed(0).manual_seed(1), flip=False, remix_group=0, scale=None)
        * gains[..., None, None])


# ---------------------------------------------------------------- bad data: error or recorded skip
BAD_WAVS = {
    "garbage": lambda path: path.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk"),
    "zero-bytes": lambda path: path.write_bytes(b""),
    "no-samples": lambda path: sf.write(str(path), torch.zeros(0, 2).numpy(), 44100, subtype="PCM_16"),
}


@pytest.mark.parametrize("kind", sorted(BAD_WAVS))
def test_corrupt_wav_is_an_error_with_its_path(musdb_root, kind):
    bad = musdb_root / "test" / "Z - Test" / "bass.wav"
    BAD_WAVS[kind](bad)
    with pytest.raises(DataCorruptError, match=rf"{bad} .*skip_bad_files=true"):
        mdb.MusdbHQ(musdb_root)


@pytest.mark.parametrize("kind", sorted(BAD_WAVS))
def test_corrupt_wav_track_skipped_on_request_and_counted(musdb_root, kind):
    write_track(musdb_root / "test" / "Y - Other", 2000, 7)
    bad = musdb_root / "test" / "Z - Test" / "bass.wav"
    BAD_WAVS[kind](bad)
    BAD_WAVS[kind](musdb_root / "train" / "Leaf - Summerghost" / "mixture.wav")
    db = mdb.MusdbHQ(musdb_root, skip_bad_files=True)
    assert [t.name for t in db.tracks("test")] == ["Y - Other"]
    assert {split: len(paths) for split, paths in db.skipped.items()} == {"train": 0, "valid": 1, "test": 1}
    assert db.skipped["test"] == [bad] and len(db.tracks("valid")) == 13


def test_unequal_stems_are_corrupt_or_skipped(musdb_root):
    write_track(musdb_root / "test" / "Y - Odd", 1000, 3, lengths={"bass": 900})
    with pytest.raises(DataCorruptError, match=r"Y - Odd/bass\.wav has 900 samples but the mixture 1000"):
        mdb.MusdbHQ(musdb_root)
    db = mdb.MusdbHQ(musdb_root, skip_bad_files=True)
    assert db.skipped["test"] == [musdb_root / "test" / "Y - Odd" / "bass.wav"]


def test_split_without_a_usable_track_is_an_error_naming_it(musdb_root):
    BAD_WAVS["garbage"](musdb_root / "test" / "Z - Test" / "drums.wav")
    with pytest.raises(DataCorruptError, match=rf"every track in {musdb_root / 'test'} has a bad file"):
        mdb.MusdbHQ(musdb_root, skip_bad_files=True)
    (musdb_root / "test" / "Z - Test").rename(musdb_root / "elsewhere")
    with pytest.raises(DataMissingError, match=rf"no track folder in {musdb_root / 'test'}"):
        mdb.MusdbHQ(musdb_root)


def test_wav_truncated_after_indexing_is_an_error_not_silence(musdb_root):
    db = mdb.MusdbHQ(musdb_root)
    track = db.tracks("test")[0]
    path = track.folder / "vocals.wav"
    path.write_bytes(path.read_bytes()[:2000])  # libsndfile now sees fewer frames than indexed
    with pytest.raises(DataCorruptError, match=rf"{path} gave \d+ samples at 0, expected 3000.*truncated"):
        db.read(track)
