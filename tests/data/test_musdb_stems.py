"""musdb_demucs on a partial copy (``task.valid_tracks``) and on MUSDB18's original ``.stem.mp4``
files (decoded once through stempeg into the MusDB18-HQ layout). Before, the task refused any copy
without the 14 standard validation tracks and read MusDB18-HQ WAVs only."""
import json
import logging
import shutil
import sys
import types

import numpy as np
import pytest
import soundfile as sf

from diffq_bench.data import musdb as mdb
from diffq_bench.data import musdb_stems
from diffq_bench.data.errors import DataCorruptError, DataMissingError
from diffq_bench.tasks import get_task

from fixtures import write_track

TINY = dict(channels=4, depth=2, lstm_layers=0, segment=0.05, segment_stride=0.05, shift=0.0,
            repitch=0.0, batch_size=2, eval_segment=0.05)


def _partial_copy(root):
    for i, name in enumerate(["A - One", "B - Two", "C - Three"]):
        write_track(root / "train" / name, 4410 + 100 * i, i)
    write_track(root / "test" / "Z - Test", 5000, 9)


def test_valid_tracks_default_is_musdbs_fourteen_and_bad_values_are_refused():
    assert get_task("musdb_demucs").valid_tracks == list(mdb.MUSDB_VALIDATION_TRACKS)
    for bad in ([], ["A", "A"], "A - One", [""], [3]):
        with pytest.raises(ValueError, match="task.valid_tracks must be a non-empty list of distinct"):
            get_task("musdb_demucs", valid_tracks=bad)


def test_partial_copy_runs_with_its_own_valid_tracks(tmp_path):
    _partial_copy(tmp_path / "musdb18hq")
    with pytest.raises(DataMissingError, match="validation track.*not found.*task.valid_tracks"):
        get_task("musdb_demucs", **TINY).setup(tmp_path, tmp_path / "cache", "cpu")
    task = get_task("musdb_demucs", valid_tracks=["C - Three"], **TINY)
    task.setup(tmp_path, tmp_path / "cache", "cpu")
    assert [t.name for t in task.db.tracks("train")] == ["A - One", "B - Two"]
    assert [t.name for t in task.db.tracks("valid")] == ["C - Three"]
    assert [t.name for t in task.db.tracks("test")] == ["Z - Test"]
    assert task.data_dir == tmp_path / "musdb18hq"
    assert set(task.evaluate(task.build_model(), "valid")) >= {"nsdr", "nsdr_vocals"}


def test_format_is_detected_from_the_files(tmp_path):
    assert musdb_stems.detect_format(tmp_path) is None
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "A.stem.mp4").write_bytes(b"x")
    assert musdb_stems.detect_format(tmp_path) == "stem.mp4"
    write_track(tmp_path / "test" / "Z", 100, 0)
    with pytest.raises(DataCorruptError, match="both MUSDB18 .stem.mp4 files and MusDB18-HQ track folders"):
        musdb_stems.detect_format(tmp_path)
    (tmp_path / "train" / "A.stem.mp4").unlink()
    assert musdb_stems.detect_format(tmp_path) == "wav"


class FakeStempeg:
    """stempeg.read_stems on made-up files: five deterministic streams per file (the file's bytes
    seed them), recording each call."""

    def __init__(self, streams=5, rate=44100, length=4000):
        self.calls = []
        self.streams, self.rate, self.length = streams, rate, length

    def audio(self, path):
        seed = int.from_bytes(open(path, "rb").read()[:4].ljust(4, b"\0"), "little")
        rng = np.random.default_rng(seed)
        return (0.3 * rng.standard_normal((self.streams, self.length, 2))).astype(np.float32)

    def read_stems(self, filename, dtype=np.float64, always_3d=False, **kwargs):
        self.calls.append(filename)
        return self.audio(filename).astype(dtype), self.rate

    def install(self, monkeypatch):
        module = types.ModuleType("stempeg")
        module.read_stems = self.read_stems
        monkeypatch.setitem(sys.modules, "stempeg", module)
        monkeypatch.setattr(musdb_stems.shutil, "which", lambda tool: f"/usr/bin/{tool}")
        return self


def _stem_files(root, names=("A - One", "B - Two", "C - Three"), test=("Z - Test",)):
    for split, tracks in (("train", names), ("test", test)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(tracks):
            (root / split / f"{name}.stem.mp4").write_bytes(bytes([i + 1, len(split), 7, 7]) + b"mp4")


def test_stem_mp4_copy_is_decoded_once_and_read_like_musdb_hq(tmp_path, monkeypatch):
    fake = FakeStempeg().install(monkeypatch)
    _stem_files(tmp_path / "musdb18")
    task = get_task("musdb_demucs", valid_tracks=["B - Two"], **TINY)
    task.setup(tmp_path, tmp_path / "cache", "cpu")
    assert len(fake.calls) == 4
    assert [t.name for t in task.db.tracks("train")] == ["A - One", "C - Three"]
    assert [t.name for t in task.db.tracks("valid")] == ["B - Two"]
    assert task.data_dir == tmp_path / "musdb18"  # the fingerprint covers the user's .stem.mp4 files
    assert sorted(task.data_fingerprint()["groups"]) == [
        "test/Z - Test.stem.mp4", "train/A - One.stem.mp4", "train/B - Two.stem.mp4", "train/C - Three.stem.mp4"]
    track = task.db.tracks("test")[0]
    audio = task.db.read(track)  # [mixture, drums, bass, other, vocals], 16-bit
    want = np.clip(fake.audio(tmp_path / "musdb18" / "test" / "Z - Test.stem.mp4"), -1, 1)
    assert audio.shape == (5, 2, 4000)
    assert np.abs(audio.numpy() - want.transpose(0, 2, 1)).max() <= 1 / 32768 + 1e-7
    get_task("musdb_demucs", valid_tracks=["B - Two"], **TINY).setup(tmp_path, tmp_path / "cache", "cpu")
    assert len(fake.calls) == 4  # nothing changed: nothing decoded again
    changed = tmp_path / "musdb18" / "train" / "A - One.stem.mp4"
    changed.write_bytes(b"\x09\x09\x09\x09changed")
    (tmp_path / "musdb18" / "train" / "C - Three.stem.mp4").unlink()
    again = get_task("musdb_demucs", valid_tracks=["B - Two"], **TINY)
    again.setup(tmp_path, tmp_path / "cache", "cpu")
    assert fake.calls[4:] == [str(changed)]  # only the changed file
    assert [t.name for t in again.db.tracks("train")] == ["A - One"]  # the removed one is gone
    assert np.allclose(again.db.read(again.db.tracks("train")[0]).numpy(),
                       np.clip(fake.audio(changed), -1, 1).transpose(0, 2, 1), atol=1 / 32768 + 1e-7)


@pytest.mark.parametrize("fake, message", [
    (FakeStempeg(streams=2), "holds 2 audio stream(s), expected 5"),
    (FakeStempeg(rate=48000), "has sample rate 48000 Hz, expected 44100 Hz"),
])
def test_bad_stem_file_names_the_file(tmp_path, monkeypatch, fake, message):
    fake.install(monkeypatch)
    _stem_files(tmp_path / "musdb18")
    with pytest.raises(DataCorruptError, match=f"A - One.stem.mp4 {message}".replace("(", r"\(").replace(")", r"\)")):
        get_task("musdb_demucs", valid_tracks=["B - Two"], **TINY).setup(tmp_path, tmp_path / "cache", "cpu")


def test_missing_stempeg_or_ffmpeg_is_one_line_naming_the_install(tmp_path, monkeypatch):
    _stem_files(tmp_path / "musdb18")
    monkeypatch.setitem(sys.modules, "stempeg", None)  # import fails as when it is absent
    with pytest.raises(DataMissingError) as err:
        get_task("musdb_demucs", valid_tracks=["B - Two"], **TINY).setup(tmp_path, tmp_path / "cache", "cpu")
    assert str(err.value) == ("reading MUSDB18 .stem.mp4 files needs the musdb/stempeg packages: "
                              "pip install 'diffq-bench[musdb]' (or use MusDB18-HQ WAVs)")
    FakeStempeg().install(monkeypatch)
    monkeypatch.setattr(musdb_stems.shutil, "which", lambda tool: None if tool == "ffprobe" else "/bin/x")
    with pytest.raises(DataMissingError, match=r"needs the ffprobe binary \(stempeg calls it\): install ffmpeg"):
        get_task("musdb_demucs", valid_tracks=["B - Two"], **TINY).setup(tmp_path, tmp_path / "cache", "cpu")


def test_the_cli_prints_the_missing_package_as_one_line(tmp_path, monkeypatch, capsys):
    from diffq_bench import cli
    from diffq_bench.config import compose
    _stem_files(tmp_path / "musdb18")
    monkeypatch.setitem(sys.modules, "stempeg", None)
    # handlers an earlier test left on the root logger (Hydra's, bound to a closed captured stream
    # when tests share a worker process) would print '--- Logging error ---' into stderr
    monkeypatch.setattr(logging.root, "handlers", [])
    cfg = compose(["task=musdb_demucs", 'task.valid_tracks=["B - Two"]', f"paths.root={tmp_path / 'out'}",
                   f"paths.data={tmp_path}", f"paths.cache={tmp_path / 'cache'}", "task.channels=4",
                   "task.depth=2", "task.lstm_layers=0", "runtime.progress=false"])
    with pytest.raises(SystemExit) as code:
        cli._hydra_task(cfg)
    assert code.value.code == cli.EXIT_FAILED
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["diffq-bench: data missing: reading MUSDB18 .stem.mp4 files needs the musdb/stempeg "
                   "packages: pip install 'diffq-bench[musdb]' (or use MusDB18-HQ WAVs)"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg binary to write a .stem.mp4")
def test_real_stem_mp4_written_by_stempeg_is_read(tmp_path):
    stempeg = pytest.importorskip("stempeg")
    t = np.arange(22050) / 44100
    sources = np.stack([0.1 * np.sin(2 * np.pi * f * t)[:, None].repeat(2, 1) for f in (220, 330, 440, 550)])
    streams = np.concatenate([sources.sum(0, keepdims=True), sources]).astype(np.float32)
    root = tmp_path / "musdb18"
    for split, name in (("train", "A - One"), ("train", "B - Two"), ("test", "Z - Test")):
        (root / split).mkdir(parents=True, exist_ok=True)
        stempeg.write_stems(str(root / split / f"{name}.stem.mp4"), streams, sample_rate=44100,
                            writer=stempeg.StreamsWriter(codec="aac"))
    task = get_task("musdb_demucs", valid_tracks=["B - Two"], **TINY)
    task.setup(tmp_path, tmp_path / "cache", "cpu")
    track = task.db.tracks("test")[0]
    assert abs(track.length - 22050) <= 2048  # AAC pads to whole frames
    audio = task.db.read(track).numpy()
    for k in range(5):  # lossy, but each stream is the one written, in MUSDB18's order
        assert np.abs(audio[k, :, 2048:20000] - streams[k, 2048:20000].T).max() < 0.05
    cached = musdb_stems.cache_folder(root, tmp_path / "cache") / "test" / "Z - Test"
    assert json.loads((cached / musdb_stems.MARKER).read_text())["source"] == "Z - Test.stem.mp4"
    assert sf.info(str(cached / "vocals.wav")).samplerate == 44100
