"""Demucs v2 model: exact paper size, shapes, valid lengths, init, input checks."""
import pytest
import torch

from diffq_bench.models.demucs import Demucs, center_trim, count_parameters


def test_paper_size_parameter_count_is_exact():
    # Demucs v2 at paper size (channels 64, depth 6, BiLSTM, GLU, 4 stereo sources).
    assert count_parameters() == 265_679_496
    # 4 bytes per float32 parameter: the 1013 MiB of the DiffQ paper's table.
    assert round(count_parameters() * 4 / 2 ** 20) == 1013


def test_count_follows_architecture():
    small = count_parameters(channels=8, depth=3, lstm_layers=0)
    assert small < count_parameters(channels=8, depth=3, lstm_layers=1)
    assert count_parameters(channels=8, depth=3, glu=False) < count_parameters(channels=8, depth=3)
    model = Demucs(channels=8, depth=3)
    assert small == sum(p.numel() for p in Demucs(channels=8, depth=3, lstm_layers=0).parameters())
    assert model.lstm is not None and model.lstm.lstm.num_layers == 2


@pytest.mark.parametrize("resample", [True, False])
@pytest.mark.parametrize("length", [100, 1000, 4321])
def test_valid_length_gives_long_enough_output(resample, length):
    torch.manual_seed(0)
    model = Demucs(channels=4, depth=3, lstm_layers=1, resample=resample, audio_channels=1)
    valid = model.valid_length(length)
    assert valid >= length
    with torch.no_grad():
        out = model(torch.randn(2, 1, valid))
    assert out.shape[:3] == (2, 4, 1)
    assert out.size(-1) >= length
    assert center_trim(out, length).size(-1) == length
    # Exact strided convolutions: the output length is exactly what the geometry predicts.
    expected = valid * (2 if resample else 1)
    for _ in range(3):
        expected = (expected - 8) // 4 + 1
    for _ in range(3):
        expected = (expected - 2 - 1) * 4 + 8  # context-3 conv, then transposed conv
    if resample:
        expected = (expected + 1) // 2
    assert out.size(-1) == expected


def test_rescale_init_brings_conv_std_to_reference():
    torch.manual_seed(0)
    plain = Demucs(channels=8, depth=3, rescale=0)
    torch.manual_seed(0)
    scaled = Demucs(channels=8, depth=3, rescale=0.1)
    conv_plain = plain.encoder[1][0].weight.std()
    conv_scaled = scaled.encoder[1][0].weight.std()
    # std / sqrt(std / ref) = sqrt(std * ref): closer to the reference than before.
    assert torch.allclose(conv_scaled, (conv_plain * 0.1).sqrt(), rtol=1e-4)


def test_normalize_is_scale_equivariant():
    torch.manual_seed(0)
    model = Demucs(channels=4, depth=2, lstm_layers=1, normalize=True).eval()
    x = torch.randn(1, 2, model.valid_length(500))
    with torch.no_grad():
        a = model(x)
        b = model(3 * x)
    assert torch.allclose(3 * a, b, atol=1e-4)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="depth"):
        Demucs(depth=0)
    with pytest.raises(ValueError, match="stride"):
        Demucs(kernel_size=4, stride=8)
    model = Demucs(channels=4, depth=2, lstm_layers=1)
    with pytest.raises(ValueError, match="expects"):
        model(torch.randn(1, 1, 1000))
    with pytest.raises(ValueError, match="longer"):
        center_trim(torch.zeros(10), 11)
