"""Demucs v2: waveform-domain music source separation (Défossez et al. 2019).

A U-Net on the raw waveform: ``depth`` encoder blocks ``Conv1d(k, stride) -> ReLU -> Conv1d(1x1,
2C) -> GLU``, a 2-layer bidirectional LSTM + linear at the bottleneck, and mirror decoder blocks
``Conv1d(context, 2C) -> GLU -> ConvTranspose1d(k, stride) [-> ReLU]`` fed with the U-Net skips.
No padding anywhere: :meth:`Demucs.valid_length` gives the input length that makes every strided
convolution exact, and the output is center-trimmed. As in v2's defaults the input is upsampled
x2 before the encoder (and the output downsampled back), instead of upsampling inside the decoder.

At paper size (``channels=64, depth=6``, 4 stereo sources) the model has 265,679,496 parameters.
"""
from __future__ import annotations

import math
import typing as tp

import torch
from torch import nn

SOURCES = ("drums", "bass", "other", "vocals")


def center_trim(tensor: torch.Tensor, reference: tp.Union[torch.Tensor, int]) -> torch.Tensor:
    """Trim the last dimension of ``tensor`` symmetrically to the length of ``reference``.

    Args:
        tensor: tensor to trim (``[..., T]``).
        reference: a tensor whose last dimension gives the target length, or that length.
    """
    length = reference if isinstance(reference, int) else reference.size(-1)
    delta = tensor.size(-1) - length
    if delta < 0:
        raise ValueError(f"cannot trim a length-{tensor.size(-1)} tensor to the longer length {length}")
    if delta:
        tensor = tensor[..., delta // 2: tensor.size(-1) - (delta - delta // 2)]
    return tensor


def _resample(x: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    # Windowed-sinc resampling (torchaudio.functional needs no codec, see FIELD-NOTES); imported
    # lazily so that building or counting a model does not pay torchaudio's import time.
    from torchaudio.functional import resample
    return resample(x, orig, new)


class BLSTM(nn.Module):
    """Bidirectional LSTM over time followed by a linear projection back to ``dim`` channels.

    Args:
        dim: number of channels in and out.
        layers: number of stacked LSTM layers.
    """

    def __init__(self, dim: int, layers: int = 2, device: tp.Any = None):
        super().__init__()
        self.lstm = nn.LSTM(input_size=dim, hidden_size=dim, num_layers=layers,
                            bidirectional=True, device=device)
        self.linear = nn.Linear(2 * dim, dim, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(2, 0, 1)  # [B, C, T] -> [T, B, C]
        x = self.lstm(x)[0]
        x = self.linear(x)
        return x.permute(1, 2, 0)


def rescale_module(module: nn.Module, reference: float) -> None:
    """Demucs' "rescale" init: divide each conv's weight and bias by sqrt(std(weight)/reference).

    This brings every convolution's weight std closer to ``reference`` at init, which the paper
    reports speeds up training and improves SDR.
    """
    for sub in module.modules():
        if isinstance(sub, (nn.Conv1d, nn.ConvTranspose1d)):
            if sub.weight.is_meta:  # parameter counting only: nothing to rescale
                continue
            with torch.no_grad():
                scale = (sub.weight.std() / reference) ** 0.5
                sub.weight.div_(scale)
                if sub.bias is not None:
                    sub.bias.div_(scale)


class Demucs(nn.Module):
    """The Demucs v2 separator.

    Args:
        sources: names of the separated sources (output order).
        audio_channels: 2 for stereo, 1 for mono.
        channels: channels of the first encoder layer (64 in the paper).
        depth: number of encoder/decoder layers (6 in the paper).
        growth: channel multiplier from one layer to the next.
        kernel_size: kernel of the strided convolutions.
        stride: stride of the strided convolutions.
        context: kernel of the decoder's 1st convolution (time context of the rewrite).
        lstm_layers: layers of the bottleneck BiLSTM (0 for none).
        glu: GLU after the 1x1 "rewrite" convolutions (else ReLU and no channel doubling).
        rescale: reference std of the rescale init (0 disables it).
        resample: upsample the input x2 before the network (v2 default).
        normalize: standardize the input by the mono mixture's mean/std (and undo it at output).
        samplerate: sample rate of the audio (recorded for callers, not used by the forward).
        device: where to allocate the parameters (``"meta"`` to count parameters for free).
    """

    def __init__(self, sources: tp.Sequence[str] = SOURCES, audio_channels: int = 2,
                 channels: int = 64, depth: int = 6, growth: float = 2.0, kernel_size: int = 8,
                 stride: int = 4, context: int = 3, lstm_layers: int = 2, glu: bool = True,
                 rescale: float = 0.1, resample: bool = True, normalize: bool = False,
                 samplerate: int = 44100, device: tp.Any = None):
        super().__init__()
        for key, value, low in (("audio_channels", audio_channels, 1), ("channels", channels, 1),
                                ("depth", depth, 1), ("kernel_size", kernel_size, 1),
                                ("stride", stride, 1), ("context", context, 1),
                                ("lstm_layers", lstm_layers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Demucs {key} must be an integer >= {low}, got {value!r}")
        if not sources:
            raise ValueError("Demucs needs at least one source")
        if growth <= 0:
            raise ValueError(f"Demucs growth must be > 0, got {growth!r}")
        if stride > kernel_size:
            raise ValueError(f"Demucs stride ({stride}) must be <= kernel_size ({kernel_size})")
        self.sources = list(sources)
        self.audio_channels = audio_channels
        self.depth = depth
        self.kernel_size = kernel_size
        self.stride = stride
        self.context = context
        self.resample = resample
        self.normalize = normalize
        self.samplerate = samplerate
        ch_scale = 2 if glu else 1

        def activation() -> nn.Module:
            return nn.GLU(dim=1) if glu else nn.ReLU()

        self.encoder = nn.ModuleList()
        self.decoder = nn.ModuleList()
        in_channels = audio_channels
        for index in range(depth):
            self.encoder.append(nn.Sequential(
                nn.Conv1d(in_channels, channels, kernel_size, stride, device=device), nn.ReLU(),
                nn.Conv1d(channels, ch_scale * channels, 1, device=device), activation()))
            out_channels = in_channels if index > 0 else len(self.sources) * audio_channels
            decode: tp.List[nn.Module] = [
                nn.Conv1d(channels, ch_scale * channels, context, device=device), activation(),
                nn.ConvTranspose1d(channels, out_channels, kernel_size, stride, device=device)]
            if index > 0:  # the last decoder layer outputs the waveforms: no ReLU there
                decode.append(nn.ReLU())
            self.decoder.insert(0, nn.Sequential(*decode))
            in_channels = channels
            channels = int(growth * channels)
        self.lstm = BLSTM(in_channels, lstm_layers, device=device) if lstm_layers else None
        if rescale:
            rescale_module(self, reference=rescale)

    def valid_length(self, length: int) -> int:
        """Smallest input length >= ``length`` for which every strided convolution is exact.

        The output of the forward on such an input is at least ``length`` samples long and is
        center-trimmed by callers (:func:`center_trim`).
        """
        if self.resample:
            length *= 2
        for _ in range(self.depth):
            length = max(1, math.ceil((length - self.kernel_size) / self.stride) + 1)
            length += self.context - 1
        for _ in range(self.depth):
            length = (length - 1) * self.stride + self.kernel_size
        if self.resample:
            length = math.ceil(length / 2)
        return int(length)

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        """Separate ``mix`` ``[B, audio_channels, T]`` into ``[B, sources, audio_channels, T']``.

        ``T'`` is shorter than ``T`` (valid convolutions); feed :meth:`valid_length` samples and
        center-trim the output to get a given length.
        """
        if mix.dim() != 3 or mix.size(1) != self.audio_channels:
            raise ValueError(f"Demucs expects [batch, {self.audio_channels}, time], got {tuple(mix.shape)}")
        x = mix
        if self.normalize:
            mono = mix.mean(dim=1, keepdim=True)
            mean = mono.mean(dim=-1, keepdim=True)
            std = mono.std(dim=-1, keepdim=True)
            x = (x - mean) / (1e-5 + std)
        if self.resample:
            x = _resample(x, 1, 2)
        saved = []
        for encode in self.encoder:
            x = encode(x)
            saved.append(x)
        if self.lstm is not None:
            x = self.lstm(x)
        for decode in self.decoder:
            x = x + center_trim(saved.pop(-1), x)
            x = decode(x)
        if self.resample:
            x = _resample(x, 2, 1)
        if self.normalize:
            x = x * std + mean
        return x.view(x.size(0), len(self.sources), self.audio_channels, x.size(-1))


def count_parameters(**kwargs: tp.Any) -> int:
    """Number of parameters of ``Demucs(**kwargs)``, computed on the meta device (no memory)."""
    model = Demucs(device="meta", **kwargs)
    return sum(p.numel() for p in model.parameters())
