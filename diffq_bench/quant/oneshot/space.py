"""The bit-width configuration space of a one-shot MPQ supernet.

A configuration maps each quantized layer to ``(weight bits, input bits)``; input bits are 0 for
layers whose input stays float (no activation candidates, or a layer without an input quantizer).
"""
from __future__ import annotations

import typing as tp

import torch

from ..errors import QuantizerError

Config = tp.Dict[str, tp.Tuple[int, int]]


class ConfigSpace:
    """Candidates per layer, and the configurations the supernet trains and searches with.

    Args:
        layers: the quantized layers, in model order.
        bits: weight bit-width candidates (sorted ascending).
        act_bits: input bit-width candidates (sorted ascending; empty: float inputs).
        act_layers: the layers whose input is quantized.
    """

    def __init__(self, layers: tp.Sequence[str], bits: tp.Sequence[int], act_bits: tp.Sequence[int],
                 act_layers: tp.Collection[str]):
        self.layers = list(layers)
        self.bits = list(bits)
        self.act_bits = list(act_bits)
        self.act_layers = set(act_layers) if self.act_bits else set()

    def _act(self, layer: str, index: int) -> int:
        return self.act_bits[index] if layer in self.act_layers else 0

    def max(self) -> Config:
        """Every layer at its highest candidates."""
        return {n: (self.bits[-1], self._act(n, -1)) for n in self.layers}

    def mid(self) -> Config:
        """Every layer at its middle candidates (the search's starting point)."""
        w, a = (len(self.bits) - 1) // 2, (len(self.act_bits) - 1) // 2
        return {n: (self.bits[w], self._act(n, a)) for n in self.layers}

    def lowest(self) -> Config:
        """Every layer at its lowest candidates (the cheapest configuration)."""
        return {n: (self.bits[0], self._act(n, 0)) for n in self.layers}

    def sample(self, frozen: tp.Mapping[str, tp.Sequence[int]]) -> Config:
        """A random configuration (global torch RNG) avoiding the ``frozen`` weight candidates."""
        cfg = {}
        for n in self.layers:
            wc = [b for b in self.bits if b not in frozen.get(n, [])] or self.bits
            w = wc[int(torch.randint(len(wc), ()))]
            a = self.act_bits[int(torch.randint(len(self.act_bits), ()))] if n in self.act_layers else 0
            cfg[n] = (w, a)
        return cfg

    def candidates(self) -> tp.Dict[str, tp.Tuple[tp.List[int], tp.List[int]]]:
        """Per layer, its weight and input candidates (no input candidates: float input)."""
        return {n: (self.bits, self.act_bits if n in self.act_layers else []) for n in self.layers}

    def check(self, cfg: Config) -> Config:
        """``cfg`` with int bits, after checking it covers every layer with valid candidates."""
        missing = set(self.layers) - set(cfg)
        if missing:
            raise QuantizerError(f"configuration lacks layer(s) {sorted(missing)}")
        for n, (w, a) in cfg.items():
            valid_a = self.act_bits if n in self.act_layers else [0]
            if w not in self.bits or a not in valid_a:
                raise QuantizerError(f"layer {n!r}: bits ({w}, {a}) not among the candidates "
                                     f"{self.bits} x {valid_a}")
        return {n: (int(w), int(a)) for n, (w, a) in cfg.items()}
