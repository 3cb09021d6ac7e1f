"""Separation task: nSDR, chunked full-track inference, SDR dependency errors, task contract on
MusDB18-HQ fixtures, and every quantizer end to end on sfmix through the runner (debug size)."""
import json
import sys

import pytest
import torch
from torch import nn

from diffq_bench.config import compose
from diffq_bench.data.errors import DataCorruptError, DataMissingError
from diffq_bench.quant import QUANTIZERS
from diffq_bench.tasks import get_task
from diffq_bench.tasks import separation_metrics as metrics_audio
from diffq_bench.tasks.separation import MusdbDemucsTask, SfmixTask

from fixtures import make_musdb

TINY_MODEL = {"channels": 4, "depth": 2, "lstm_layers": 1, "batch_size": 2, "segment": 0.05,
              "segment_stride": 0.05, "shift": 0.01, "eval_segment": 0.1}


def test_nsdr_values():
    torch.manual_seed(0)
    ref = torch.randn(4, 2, 1000)
    assert (metrics_audio.nsdr(ref, ref) > 80).all()
    assert torch.allclose(metrics_audio.nsdr(ref, torch.zeros_like(ref)), torch.zeros(4), atol=1e-4)
    # error energy a tenth of the signal's: 10 dB exactly
    noise = torch.randn(4, 2, 1000)
    noise = noise / noise.flatten(1).norm(dim=1).view(4, 1, 1) * ref.flatten(1).norm(dim=1).view(4, 1, 1)
    assert torch.allclose(metrics_audio.nsdr(ref, ref + noise / 10 ** 0.5), torch.full((4,), 10.0),
                          atol=1e-3)
    with pytest.raises(ValueError, match="differ in shape"):
        metrics_audio.nsdr(ref, ref[:, :, :10])


class ShrinkingIdentity(nn.Module):
    """Separates nothing but behaves like Demucs geometrically: needs extra context on both sides
    and returns a shorter output; each "source" is the mixture times its index + 1."""

    def __init__(self, margin=37):
        super().__init__()
        self.margin = margin

    def valid_length(self, length):
        return length + 2 * self.margin + 3

    def forward(self, mix):
        core = mix[..., self.margin:mix.size(-1) - self.margin]
        return torch.stack([core * (i + 1) for i in range(4)], dim=1)


@pytest.mark.parametrize("length, segment, overlap", [(1000, 300, 0.25), (1000, 1000, 0.25),
                                                     (999, 128, 0.5), (50, 300, 0.0), (1001, 100, 0.0)])
def test_separate_overlap_add_is_exact(length, segment, overlap):
    torch.manual_seed(0)
    mix = torch.randn(2, length)
    out = metrics_audio.separate(ShrinkingIdentity(), mix, segment, overlap)
    assert out.shape == (4, 2, length)
    for i in range(4):
        assert torch.allclose(out[i], mix * (i + 1), atol=1e-5)


def test_separate_rejects_bad_chunking():
    with pytest.raises(ValueError, match="overlap"):
        metrics_audio.separate(ShrinkingIdentity(), torch.zeros(2, 10), 5, overlap=1.0)
    with pytest.raises(ValueError, match="segment"):
        metrics_audio.separate(ShrinkingIdentity(), torch.zeros(2, 10), 0)


def test_sdr_without_museval_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "museval", None)  # import fails as when it is absent
    ref = torch.randn(4, 2, 100)
    with pytest.raises(RuntimeError, match="apt-get install ffmpeg.*pip install"):
        metrics_audio.museval_sdr(ref, ref, 44100)


def test_paper_config_has_paper_size():
    task = get_task("musdb_demucs")
    assert sum(p.numel() for p in task._geometry.parameters()) == 265_679_496
    assert task.samplerate == 44100 and task.audio_channels == 2


@pytest.mark.parametrize("kwargs, match", [({"loss": "l3"}, "unknown loss"),
                                           ({"eval_overlap": 1.0}, "eval_overlap"),
                                           ({"segment": 0}, "segment"),
                                           ({"batch_size": 0}, "batch_size"),
                                           ({"depth": 0}, "depth")])
def test_bad_task_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MusdbDemucsTask(**kwargs)
    with pytest.raises(ValueError, match="valid_tracks"):
        SfmixTask(train_tracks=3, valid_tracks=3)


def test_missing_musdb_is_a_clear_error(tmp_path):
    task = get_task("musdb_demucs")
    with pytest.raises(DataMissingError, match="musdb18hq.*task=sfmix"):
        task.setup(tmp_path, tmp_path / "cache", "cpu")


def test_musdb_task_on_format_fixture(tmp_path):
    make_musdb(tmp_path / "musdb18hq", length=4410, test_length=5000)
    torch.manual_seed(0)
    task = MusdbDemucsTask(**TINY_MODEL, eval_subset=1)
    task.setup(tmp_path, tmp_path / "cache", "cpu", seed=0)
    assert task.num_train_batches() == task.repeat * len(task.train_set) // 2 > 0  # repeat 2 (Demucs v2)
    batches = list(task.train_batches(0))
    assert len(batches) == task.num_train_batches()
    assert torch.equal(batches[0], next(iter(task.train_batches(0))))  # reproducible epochs
    assert not torch.equal(batches[0], next(iter(task.train_batches(1))))
    assert batches[0].shape[:3] == (2, 4, 2)
    model = task.build_model()
    loss, metrics = task.step(model, batches[0])
    loss.backward()
    assert metrics["loss"] == pytest.approx(float(loss.detach())) and metrics["loss"] > 0
    out = task.evaluate(model, "test")
    assert set(out) == {"nsdr", "nsdr_drums", "nsdr_bass", "nsdr_other", "nsdr_vocals"}
    assert model.training  # evaluate restores the mode it found
    task.sdr = True
    with pytest.raises(RuntimeError, match="museval"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(sys.modules, "museval", None)
            task.evaluate(model, "valid")


# Debug size for the end-to-end runs: 2 optimizer steps of a 4-channel, depth-2 Demucs on three
# 1 s tracks at 8 kHz.
SFMIX_DEBUG = ["task=sfmix", "train.epochs=1", "train.steps_per_epoch=2", "runtime.progress=false",
               "task.train_tracks=3", "task.test_tracks=1", "task.valid_tracks=1", "task.duration=1.0",
               "task.samplerate=8000", "task.channels=4", "task.depth=2", "task.lstm_layers=1",
               "task.segment=0.25", "task.segment_stride=0.25", "task.shift=0.05",
               "task.batch_size=2", "task.eval_segment=0.5", "quant.min_size=0", "device=cpu"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sfmix_data")


@pytest.mark.slow
@pytest.mark.parametrize("quant", sorted(QUANTIZERS))
def test_sfmix_end_to_end_every_quantizer(quant, data_dir, tmp_path, capsys):
    from diffq_bench import cli
    root = tmp_path / "outputs"
    cfg = compose([*SFMIX_DEBUG, f"quant={quant}", f"paths.root={root}", f"paths.data={data_dir}",
                   f"paths.cache={data_dir / 'cache'}"])
    result = cli.run(cfg)
    assert "| test nsdr |" in capsys.readouterr().out
    m = result["metrics"]
    assert result["task"] == "sfmix" and result["metric"] == "nsdr" and not result["lower_is_better"]
    assert -60 < m["test_nsdr"] < 60
    assert m["test_nsdr_subset_restored"] == m["test_nsdr_subset"]  # reloaded export: the same metric
    assert m["true_size_mb"] > 0
    if quant != "none":  # tiny model: serialization overhead hides the gain
        # in true bytes, and iPQ centroids cost more than 16 bits per weight
        assert 0 < m["bits_per_weight"] < 32 and m["analytic_size_mb"] < m["float_size_mb"]
    (folder,) = list((root / "xps").iterdir())
    assert json.loads((folder / "status.json").read_text())["state"] == "DONE"
    assert (folder / "quantized.th").is_file()


@pytest.mark.slow
def test_museval_sdr_is_the_median_over_one_second_frames():
    """Real BSS-Eval v4 through museval on 3 s of audio (skipped, with the install command as the
    reason, where museval or ffmpeg is absent; scripts/test.sh installs both when it can)."""
    try:
        metrics_audio.require_museval()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    torch.manual_seed(0)
    sr = 8000
    ref = torch.randn(1, 1, 3 * sr)
    noise = torch.randn(1, 1, 3 * sr)
    # Per-second SNR of 10, 30 and 20 dB: the frame median is 20 dB, the whole-track nSDR ~14.4.
    gain = torch.cat([torch.full((sr,), 10 ** (-snr / 20)) for snr in (10, 30, 20)])
    est = ref + gain * noise
    sdr = metrics_audio.museval_sdr(ref, est, sr)
    assert sdr.shape == (1,) and sdr[0] == pytest.approx(20.0, abs=0.3)
    assert float(metrics_audio.nsdr(ref, est)[0]) == pytest.approx(14.4, abs=0.3)


MUSDB_DEBUG = ["task=musdb_demucs", "train.epochs=1", "train.steps_per_epoch=2",
               "runtime.progress=false", "task.channels=4", "task.depth=2", "task.lstm_layers=1",
               "task.segment=0.05", "task.segment_stride=0.05", "task.shift=0.01",
               "task.batch_size=2", "task.eval_segment=0.1", "task.eval_subset=2",
               "quant.min_size=0", "device=cpu"]


@pytest.fixture(scope="module")
def musdb_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("musdb_data")
    make_musdb(root / "musdb18hq", length=8820, test_length=6000)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("quant", sorted(QUANTIZERS))
def test_musdb_end_to_end_every_quantizer(quant, musdb_dir, tmp_path):
    """The paper task's code path (44.1 kHz stereo MusDB18-HQ WAVs) with a debug-size Demucs."""
    from diffq_bench import cli
    cfg = compose([*MUSDB_DEBUG, f"quant={quant}", f"paths.root={tmp_path / 'outputs'}",
                   f"paths.data={musdb_dir}", f"paths.cache={musdb_dir / 'cache'}"])
    result = cli.run(cfg)
    m = result["metrics"]
    assert result["task"] == "musdb_demucs" and result["metric"] == "nsdr"
    assert m["test_nsdr_subset_restored"] == m["test_nsdr_subset"] and -60 < m["test_nsdr"] < 60
    assert {"test_nsdr_drums", "test_nsdr_bass", "test_nsdr_other", "test_nsdr_vocals"} <= set(m)


def test_corrupt_wav_fails_the_task_with_its_path(tmp_path):
    make_musdb(tmp_path / "musdb18hq", length=4410, test_length=5000)
    bad = tmp_path / "musdb18hq" / "test" / "Z - Test" / "vocals.wav"
    bad.write_bytes(b"not a wav at all")
    with pytest.raises(DataCorruptError, match=rf"{bad} is not a readable WAV.*skip_bad_files=true"):
        MusdbDemucsTask(**TINY_MODEL).setup(tmp_path, tmp_path / "cache", "cpu")


def test_corrupt_wav_skipped_on_request_and_counted(tmp_path):
    make_musdb(tmp_path / "musdb18hq", length=4410, test_length=5000)
    (tmp_path / "musdb18hq" / "train" / "B - Two" / "drums.wav").write_bytes(b"")
    task = MusdbDemucsTask(**TINY_MODEL, skip_bad_files=True)
    task.setup(tmp_path, tmp_path / "cache", "cpu")
    assert task.skipped_files() == {"train": 1, "valid": 0, "test": 0}
    assert [t.name for t in task.db.tracks("train")] == ["A - One"]


def test_sfmix_corrupt_wav_advice_is_to_render_again(tmp_path):
    kwargs = dict(train_tracks=3, test_tracks=1, valid_tracks=1, duration=1.0, samplerate=8000,
                  channels=4, depth=2, lstm_layers=1, segment=0.25, segment_stride=0.25, shift=0.05)
    get_task("sfmix", **kwargs).setup(tmp_path, tmp_path / "cache", "cpu")
    (folder,) = (tmp_path / "sfmix").iterdir()
    (folder / "test" / "sfmix test 000" / "bass.wav").write_bytes(b"RIFFjunk")
    with pytest.raises(DataCorruptError, match=rf"bass\.wav is not a readable WAV.*delete {folder}"):
        get_task("sfmix", **kwargs).setup(tmp_path, tmp_path / "cache", "cpu")
