"""Vocabulary of the paper tables: methods, published numbers, rows and sections, value ordering.

Shared by :mod:`diffq_bench.results` (which builds sections from the run store) and
:mod:`diffq_bench.results_render` (which prints them); import these names from
:mod:`diffq_bench.results`.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import typing as tp

#: method display order, names, and the axes that identify a configuration of the method
METHODS: tp.Dict[str, tp.Tuple[str, tp.Tuple[str, ...]]] = {
    "none": ("Float", ()),
    "qat": ("QAT", ("quant.bits",)),
    "lsq": ("LSQ", ("quant.bits",)),
    "quant_noise": ("Quant-Noise", ("quant.bits", "quant.p")),
    "quant_noise_ipq": ("Quant-Noise iPQ", ("quant.n_centroids", "quant.block_size", "quant.p")),
    "dsq": ("DSQ", ("quant.bits", "quant.act_bits")),
    "oneshot_mpq": ("One-shot MPQ", ("quant.budget_kind", "quant.budget")),
    "diffq": ("DiffQ", ("lambda", "group_size")),
}
_SHORT = {"quant.bits": "{} bits", "quant.p": "p={}", "quant.n_centroids": "K={}",
          "quant.block_size": "block {}", "quant.act_bits": "A{}", "quant.budget_kind": "{}",
          "quant.budget": "≤{}", "lambda": "λ={}", "group_size": "g={}"}


def _order(value: tp.Any) -> tp.Tuple[int, float, str]:
    """Sort key mixing None, numbers and strings deterministically (numbers numerically)."""
    if value is None:
        return (0, 0.0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, float(value), "") if not math.isnan(value) else (1, math.inf, "nan")
    return (2, 0.0, str(value))


def _fmt_axis(value: tp.Any) -> str:
    if isinstance(value, float) and value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _published(value: float) -> str:
    """A published number as printed in its source: 18.0 stays 18.0, 91.72 stays 91.72."""
    value = float(value)
    return f"{value:.1f}" if value == int(value) else f"{value:g}"


@dataclasses.dataclass
class Reference:
    """A published number (``results/reference/*.yaml`` entry); ``value`` None means a claim only."""
    task: str
    quant: str
    metric: str
    source: str
    provenance: str
    model: tp.Optional[str] = None
    match: tp.Dict[str, tp.Any] = dataclasses.field(default_factory=dict)
    value: tp.Optional[float] = None
    size_mb: tp.Optional[float] = None
    label: tp.Optional[str] = None
    note: tp.Optional[str] = None
    matchable: bool = True


@dataclasses.dataclass
class Row:
    """Runs of one configuration (differing only by seed), or a published number we lack."""
    quant: str
    label: str
    axes: tp.Dict[str, tp.Any]
    runs: tp.List[tp.Dict[str, tp.Any]]
    reference: tp.Optional[Reference] = None

    def values(self, key: str) -> tp.List[float]:
        return [float(r["metrics"][key]) for r in self.runs
                if isinstance(r.get("metrics", {}).get(key), (int, float))]

    def mean(self, key: str) -> tp.Optional[float]:
        vals = self.values(key)
        return sum(vals) / len(vals) if vals else None

    def std(self, key: str) -> tp.Optional[float]:
        vals = self.values(key)
        return statistics.stdev(vals) if len(vals) > 1 else None


@dataclasses.dataclass
class Section:
    """One benchmark (task, model): its rows, metric and the extra axes that vary."""
    task: str
    model: tp.Optional[str]
    metric: str
    lower_is_better: bool
    rows: tp.List[Row]
    extra_axes: tp.List[str]
    notes: tp.List[str]

    @property
    def title(self) -> str:
        return f"{self.task} ({self.model})" if self.model else self.task


def method_label(quant: str, axes: tp.Mapping[str, tp.Any]) -> str:
    """Human name of a configuration: ``QAT 4 bits``, ``DiffQ (λ=1, g=16)``."""
    name, keys = METHODS.get(quant, (quant, ()))
    parts = [_SHORT[k].format(_fmt_axis(axes[k])) for k in keys if axes.get(k) is not None]
    if not parts:
        return name
    if quant in ("qat", "lsq") or (quant == "quant_noise" and len(parts) == 2):
        return f"{name} {parts[0]}" + (f" ({', '.join(parts[1:])})" if parts[1:] else "")
    return f"{name} ({', '.join(parts)})"
