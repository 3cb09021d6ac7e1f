"""An exponential moving average of the trained parameters (timm's ModelEma; the one-shot MPQ
recipe searches and evaluates its EMA model, decay 0.9997)."""
from __future__ import annotations

import contextlib
import typing as tp

import torch


class WeightEMA:
    """``shadow ← decay·shadow + (1 − decay)·param`` after every optimizer step.

    Args:
        params: the tensors averaged (model and quantizer parameters).
        decay: the averaging decay, in (0, 1).
    """

    def __init__(self, params: tp.Sequence[torch.Tensor], decay: float):
        self.params = list(params)
        self.decay = float(decay)
        self.shadow = [p.detach().clone() for p in self.params]

    def matches(self, params: tp.Sequence[torch.Tensor]) -> bool:
        """Whether ``params`` are the tensors this average follows (a phase change may alter them)."""
        return len(params) == len(self.params) and all(a is b for a, b in zip(params, self.params))

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - self.decay)

    @contextlib.contextmanager
    def swapped(self) -> tp.Iterator[None]:
        """The averaged values in the parameters for the duration of the block (evaluation, the
        best state), the trained ones back afterwards."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            for param, value in zip(self.params, self.shadow):
                param.copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.params, saved):
                    param.copy_(value)

    def state_dict(self) -> tp.List[torch.Tensor]:
        return [t.detach().cpu().clone() for t in self.shadow]

    def load_state_dict(self, state: tp.Sequence[torch.Tensor]) -> None:
        if len(state) != len(self.shadow):
            raise ValueError(f"EMA state holds {len(state)} tensors, the run averages {len(self.shadow)}")
        with torch.no_grad():
            for mine, saved in zip(self.shadow, state):
                mine.copy_(saved)
