"""Stage 2 of one-shot MPQ: budgeted greedy search of per-layer bit widths, without retraining.

A configuration maps each quantized layer to ``(weight bits, input bits)`` (0 = float input). The
search starts from the mid configuration and moves one layer's bit width one notch at a time:

- descent, while the cost exceeds the budget: the move with the least error increase per cost
  saved, ``(err(new) − err) / (cost − cost(new))``;
- ascent, while moves fit in the budget: the move with the largest error decrease per cost added,
  among moves that lower the error.

Each "error" is a measurement (BN recalibration + evaluation on the calibration batches), by far
the expensive part. Two things make the search cheap without changing what it optimises:

- measurements are cached per configuration (the final configuration is never measured twice);
- ``lazy=True`` (default) is the accelerated greedy of Minoux (1978): a move's score measured in
  an earlier round is kept as a bound (a cut only hurts more once other layers were cut; a gain
  only shrinks once other layers were raised), and each round re-measures the best-ranked moves,
  in order, until the best one is freshly measured. The move taken is always scored by a fresh
  measurement from the current configuration; a layer that just moved is re-measured from scratch.
  Where the bound assumption holds this takes exactly the moves of the exhaustive search
  (``lazy=False``, which re-measures every move every round) with a few measurements per round
  instead of one per layer and axis.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import typing as tp

import torch
from torch import nn

from ..errors import QuantizerError
from .space import Config

logger = logging.getLogger(__name__)

#: layer -> (weight-bit candidates, input-bit candidates; empty: the input stays float)
Candidates = tp.Dict[str, tp.Tuple[tp.Sequence[int], tp.Sequence[int]]]
TOL = 1 + 1e-9  # cost <= budget * TOL counts as within budget (float sums of sizes)


def layer_macs(module: nn.Module, x: torch.Tensor, out: tp.Any, weights: tp.Sequence[torch.Tensor]) -> float:
    """Multiply-accumulates per sample of one forward of ``module`` (first dim = batch).

    Args:
        module: the layer; x: its first input; out: its output.
        weights: its quantized weight tensors (Linear / RNN / attention matrices).
    """
    batch = max(1, x.shape[0]) if x.dim() > 0 else 1
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and torch.is_tensor(out):
        return out.numel() / batch * module.weight[0].numel()
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d)):
        return x.numel() / batch * module.weight[0].numel()
    if not x.is_floating_point():  # embeddings: lookups, no MACs
        return 0.0
    rows = x.numel() / max(1, x.shape[-1]) / batch  # tokens / time steps per sample
    return rows * sum(w.numel() for w in weights if w.dim() > 1)


@dataclasses.dataclass
class _Move:
    index: int            # enumeration order: ties go to the first, as in a plain min/max scan
    key: tp.Tuple[str, int, int]  # (layer, axis, current bits): a moved layer gets new keys
    config: Config
    delta_cost: float     # cost saved (descent) or added (ascent), > 0


def _moves(cfg: Config, candidates: Candidates, step: int,
           cost: tp.Callable[[Config], float]) -> tp.List[_Move]:
    """Every one-notch move of one layer's weight or input bits (``step`` -1 down, +1 up)."""
    base = cost(cfg)
    out = []
    for layer, cands in candidates.items():
        for axis in (0, 1):
            values = list(cands[axis])
            if cfg[layer][axis] not in values:
                continue
            j = values.index(cfg[layer][axis]) + step
            if not 0 <= j < len(values):
                continue
            pair = list(cfg[layer])
            pair[axis] = values[j]
            new = dict(cfg)
            new[layer] = (pair[0], pair[1])
            delta = (base - cost(new)) * -step
            out.append(_Move(len(out), (layer, axis, cfg[layer][axis]), new, delta))
    return out


class GreedySearch:
    """Budgeted greedy bit-width search (module docstring).

    Args:
        measure: configuration -> error (lower is better); activates the configuration itself.
        cost: configuration -> cost in the budget's unit.
        candidates: per layer, the weight and input bit candidates (sorted ascending).
        budget: the cost not to exceed.
        lazy: accelerated greedy with score bounds (False: re-measure every move every round).
        max_moves: safety cap on accepted moves.
    """

    def __init__(self, measure: tp.Callable[[Config], float], cost: tp.Callable[[Config], float],
                 candidates: Candidates, budget: float, lazy: bool = True, max_moves: int = 10000):
        self._measure, self.cost, self.candidates = measure, cost, candidates
        self.budget, self.lazy, self.max_moves = float(budget), bool(lazy), int(max_moves)
        self._errors: tp.Dict[tp.Tuple[tp.Tuple[str, int, int], ...], float] = {}
        self.stats = {"measurements": 0, "cache_hits": 0, "moves": 0, "seconds": 0.0}

    def measure(self, cfg: Config) -> float:
        """Error of ``cfg``, measured once per distinct configuration."""
        key = tuple(sorted((n, w, a) for n, (w, a) in cfg.items()))
        if key in self._errors:
            self.stats["cache_hits"] += 1
            return self._errors[key]
        self.stats["measurements"] += 1
        err = self._errors[key] = float(self._measure(cfg))
        return err

    def run(self, start: Config) -> tp.Tuple[Config, float]:
        """Search from ``start``; returns the chosen configuration and its measured error."""
        begin = time.perf_counter()
        cfg, err = dict(start), self.measure(start)
        cfg, err = self._descend(cfg, err)
        cfg, err = self._ascend(cfg, err)
        self.stats["seconds"] = time.perf_counter() - begin
        return cfg, err

    def _descend(self, cfg: Config, err: float) -> tp.Tuple[Config, float]:
        bounds: tp.Dict[tp.Any, float] = {}  # move key -> error increase when last measured
        while self.cost(cfg) > self.budget * TOL and self.stats["moves"] < self.max_moves:
            moves = [m for m in _moves(cfg, self.candidates, -1, self.cost) if m.delta_cost > 0]
            if not moves:
                raise QuantizerError(f"no move lowers the cost {self.cost(cfg):g} towards the budget "
                                     f"{self.budget:g}")
            fresh: tp.Dict[tp.Any, float] = {}
            for m in moves:
                if not self.lazy or m.key not in bounds:
                    fresh[m.key] = self.measure(m.config) - err
            while True:
                best = min(moves, key=lambda m, fresh=fresh: (
                    fresh.get(m.key, bounds.get(m.key, 0.0)) / m.delta_cost, m.index))
                if best.key in fresh:
                    break
                fresh[best.key] = self.measure(best.config) - err
            bounds.update(fresh)
            cfg, err = best.config, self.measure(best.config)
            self.stats["moves"] += 1
        return cfg, err

    def _ascend(self, cfg: Config, err: float) -> tp.Tuple[Config, float]:
        bounds: tp.Dict[tp.Any, float] = {}  # move key -> error decrease when last measured
        while self.stats["moves"] < self.max_moves:
            moves = [m for m in _moves(cfg, self.candidates, +1, self.cost)
                     if m.delta_cost > 0 and self.cost(m.config) <= self.budget * TOL]
            fresh: tp.Dict[tp.Any, float] = {}
            for m in moves:
                if not self.lazy or m.key not in bounds:
                    fresh[m.key] = err - self.measure(m.config)
            best = None
            while True:
                gains = {m.key: fresh.get(m.key, bounds.get(m.key, 0.0)) for m in moves}
                viable = [m for m in moves if gains[m.key] > 0]
                if not viable:
                    best = None
                    break
                best = max(viable, key=lambda m: (gains[m.key] / m.delta_cost, -m.index))
                if best.key in fresh:
                    break
                fresh[best.key] = err - self.measure(best.config)
            if best is None:
                break
            bounds.update(fresh)
            cfg, err = best.config, self.measure(best.config)
            self.stats["moves"] += 1
        return cfg, err


class Supernet(tp.Protocol):
    """What :func:`search_config` needs of a one-shot quantizer (its public API)."""
    model: nn.Module
    budget_kind: str

    def cost(self, cfg: Config) -> float: ...
    def set_config(self, cfg: Config) -> None: ...
    def mid_config(self) -> Config: ...
    def lowest_config(self) -> Config: ...
    def candidates(self) -> Candidates: ...


def search_config(net: Supernet, evaluate: tp.Callable[[nn.Module], float], budget: float,
                  recalibrate: tp.Optional[tp.Callable[[], None]] = None, max_moves: int = 10000,
                  lazy: bool = True) -> tp.Tuple[Config, float, tp.Dict[str, float]]:
    """Greedy retraining-free search of a configuration of ``net`` with ``cost <= budget``.

    Args:
        net: the supernet quantizer (configurations, costs, model).
        evaluate: model -> error on calibration data (lower is better), called in eval mode.
        budget: in the unit of ``net.budget_kind``.
        recalibrate: called after each configuration change, before ``evaluate`` (BN stats).
        max_moves: safety cap on the number of accepted moves.
        lazy: accelerated greedy (module docstring); False measures every move of every round.
    Returns:
        (the chosen configuration, left active with its BN recalibrated; its error; the counters).
    """
    low = net.lowest_config()
    if net.cost(low) > budget * TOL:
        raise QuantizerError(f"{net.budget_kind} budget {budget:g} is below the smallest reachable "
                             f"cost {net.cost(low):g} (every layer at its lowest candidate)")
    was_training = net.model.training

    def activate(cfg: Config) -> None:
        net.set_config(cfg)
        if recalibrate is not None:
            recalibrate()
        net.model.eval()

    def measure(cfg: Config) -> float:
        activate(cfg)
        with torch.no_grad():
            return float(evaluate(net.model))

    greedy = GreedySearch(measure, net.cost, net.candidates(), budget, lazy=lazy, max_moves=max_moves)
    cfg, error = greedy.run(net.mid_config())
    activate(cfg)  # leaves cfg active with its BN recalibrated (its error is already known)
    logger.info("oneshot_mpq search: %s %.4g <= %g, error %.4g; %d measurements, %d moves, %.1f s",
                net.budget_kind, net.cost(cfg), budget, error, greedy.stats["measurements"],
                greedy.stats["moves"], greedy.stats["seconds"])
    net.model.train(was_training)
    return dict(cfg), error, dict(greedy.stats)
