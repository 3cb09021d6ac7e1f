"""One-shot weight-coupled mixed precision, retraining-free (Tang et al., CVPR 2024).

Stage 1 (training, :meth:`OneShotMPQQuantizer.train_step`): one shared float weight per layer,
one LSQ step size per candidate bit width (weights and layer inputs), one BatchNorm per
(weight-bits, act-bits) pair (:class:`SwitchableBN` replaces the model's BN modules, each selected
by the configuration of the quantized layer registered just before it). Each step forwards the
max-bit sub-network (task loss), then ``subnets`` random per-layer configurations with loss
``(1 − kd_weight)·task + kd_weight·KD(max → sub) + bn_align·MSE(BN outputs, max-bit BN outputs)``;
everything is summed into one loss (the loop runs one backward). KD is the task's
``distill_loss(student, teacher)`` when it has one, else the MSE between model outputs.
Every ``sched_every`` steps the bit-width scheduler measures the "turbulence" of each layer's
lowest candidate (share of weights within ``turbulence_eps`` of a rounding boundary) and freezes
that candidate, until the next measurement, for the ``sched_frac`` most turbulent layers.

Stage 2 (:meth:`finalize` -> :meth:`search`, no retraining): greedy search from the mid
configuration, one layer's bit width one notch at a time, descending by least error increase per
cost saved until the budget is met, then ascending by best error decrease per cost while within
budget; BN statistics are recalibrated before every measurement. Export packs the chosen bits
(:mod:`~diffq_bench.quant.oneshot.export`).
"""
from __future__ import annotations

import logging
import typing as tp

import torch
from torch import nn

from ...distributed import sync_init
from ..actquant import act_layers, install_input_hooks, lsq_eval, lsq_init_step, lsq_quantize
from ..base import MB, BaseQuantizer, Calibration, Display, QParam
from ..errors import QuantizerError, check_range
from . import bnpairs, export, schedule
from .bnpairs import SwitchableBN, pair_key
from .distill import supernet_step
from .search import layer_macs, search_config
from .space import Config, ConfigSpace

logger = logging.getLogger(__name__)


#: budget kind -> cost(quantizer, config); the search keeps cost <= budget.
COSTS: tp.Dict[str, tp.Callable[["OneShotMPQQuantizer", Config], float]] = {
    "size_mb": lambda q, c: q.size_bits(c) / 8 / MB,
    "avg_bits": lambda q, c: q.size_bits(c) / max(1, q.quantized_numel()),
    "gbitops": lambda q, c: q.bitops(c) / 1e9,
    "avg_bitops": lambda q, c: q.bitops(c) / max(1.0, sum(q.macs.values())),
}


class OneShotMPQQuantizer(BaseQuantizer):
    """Weight-coupled supernet with per-bit LSQ steps and per-pair BN, then budgeted greedy search.

    Args:
        model: the model (its BatchNorm modules are swapped for :class:`SwitchableBN`).
        bits: candidate weight bit widths (each in 1..16).
        act_bits: candidate input activation bit widths; empty keeps layer inputs in float.
        subnets: random sub-networks per training step (besides the max-bit one).
        kd_weight: weight of distillation in a sub-network's loss (paper: 0.5).
        bn_align: weight of the BN-output alignment term (0 disables it).
        sched_every: training steps between bit-width scheduler updates (0 disables it).
        sched_frac: fraction of layers whose lowest candidate is frozen at each update.
        turbulence_eps: distance to a rounding boundary (in steps) counted as turbulent.
        budget_kind: one of :data:`COSTS` (size_mb, avg_bits, gbitops, avg_bitops).
        budget: the search's budget in that unit.
        calib_batches: training batches used by the search (BN recalibration and error).
        min_size, float16, exclude: see :class:`~diffq_bench.quant.base.BaseQuantizer`.
    """
    name = "oneshot_mpq"
    display = Display("One-shot MPQ", color="tab:olive", axes=(
        ("quant.budget_kind", "{}"), ("quant.budget", "≤{}")), point=("quant.bits", "{}b"))
    config_keys = ("bits", "act_bits", "subnets", "kd_weight", "bn_align", "sched_every", "sched_frac",
                   "turbulence_eps", "budget_kind", "budget", "calib_batches", "min_size", "float16",
                   "exclude")
    default_lr = 1e-3

    def __init__(self, model: nn.Module, bits: tp.Sequence[int] = (2, 3, 4, 5, 6),
                 act_bits: tp.Sequence[int] = (2, 3, 4, 5, 6), subnets: int = 3, kd_weight: float = 0.5,
                 bn_align: float = 0.01, sched_every: int = 50, sched_frac: float = 0.2,
                 turbulence_eps: float = 0.05, budget_kind: str = "avg_bits", budget: float = 4.0,
                 calib_batches: int = 4, min_size: float = 0.01, float16: bool = False,
                 exclude: tp.Sequence[str] = ()):
        self.bits = self._check_candidates("bits", bits, allow_empty=False)
        self.act_bits = self._check_candidates("act_bits", act_bits, allow_empty=True)
        check_range("subnets", subnets, 0, 64, integer=True)
        check_range("kd_weight", kd_weight, 0.0, 1.0)
        check_range("bn_align", bn_align, 0.0, float("inf"))
        check_range("sched_every", sched_every, 0, float("inf"), integer=True)
        check_range("sched_frac", sched_frac, 0.0, 1.0)
        check_range("turbulence_eps", turbulence_eps, 0.0, 0.5)
        if budget_kind not in COSTS:
            raise QuantizerError(f"unknown budget_kind {budget_kind!r}; valid: {', '.join(sorted(COSTS))}")
        check_range("budget", budget, 0.0, float("inf"))
        check_range("calib_batches", calib_batches, 1, 100000, integer=True)
        self.subnets, self.kd_weight, self.bn_align = int(subnets), float(kd_weight), float(bn_align)
        self.sched_every, self.sched_frac = int(sched_every), float(sched_frac)
        self.turbulence_eps, self.budget_kind, self.budget = float(turbulence_eps), budget_kind, float(budget)
        self.calib_batches = self.calibration_batches = int(calib_batches)
        if isinstance(model, nn.modules.batchnorm._BatchNorm):
            raise QuantizerError("oneshot_mpq needs a model with quantizable layers, got a bare BatchNorm")
        # Which BNs get one copy per bit pair depends on which layers are quantized: decided by the
        # base class's own rule (_accepts, needing min_size/exclude) on the plain model, before the swap.
        check_range("min_size", min_size, 0.0, float("inf"))
        self.min_size, self.exclude = float(min_size), [exclude] if isinstance(exclude, str) else list(exclude)
        self._bn_ids: tp.Set[int] = bnpairs.batchnorm_param_ids(model)
        owned = [bn for bn, layer in bnpairs.producers(model, self._quantized_modules(model)).items()
                 if layer is not None]
        abits = self.act_bits or [0]
        bnpairs.swap_batchnorms(model, owned, [pair_key(w, a) for w in self.bits for a in abits])
        self._bn_ids = bnpairs.batchnorm_param_ids(model)
        super().__init__(model, min_size=min_size, float16=float16, exclude=exclude)
        self._setup_layers()

    def _quantized_modules(self, model: nn.Module) -> tp.Set[str]:
        accepted: tp.Dict[int, bool] = {}  # tied parameters follow their first occurrence, as in the base
        out = set()
        for mod_name, module in model.named_modules():
            for attr, param in module._parameters.items():
                if param is None:
                    continue
                if id(param) not in accepted:
                    full = f"{mod_name}.{attr}" if mod_name else attr
                    accepted[id(param)] = self._accepts(full, module, attr, param)
                if accepted[id(param)]:
                    out.add(mod_name)
        return out

    @staticmethod
    def _check_candidates(name: str, values: tp.Any, allow_empty: bool) -> tp.List[int]:
        if isinstance(values, (int, float)):
            values = [values]
        values = list(values)
        if not values and not allow_empty:
            raise QuantizerError(f"{name} needs at least one candidate bit width in 1..16")
        for value in values:
            check_range(name, value, 1, 16, integer=True)
        return sorted({int(v) for v in values})

    def _accepts(self, name, module, attr, param) -> bool:
        return id(param) not in self._bn_ids and super()._accepts(name, module, attr, param)

    def _setup_layers(self) -> None:
        modules = dict(self.model.named_modules())
        owner_name = {id(m): n for n, m in modules.items()}
        self._layer_of = {qp.name: owner_name[id(qp.module)] for qp in self.qparams}
        self.layers = [n for n in modules if n in set(self._layer_of.values())]
        self._index = {qp.name: i for i, qp in enumerate(self.qparams)}
        self._wsteps = nn.ParameterDict()
        for i, qp in enumerate(self.qparams):
            for b in self.bits:
                step = lsq_init_step(qp.param, b, signed=True)
                self._wsteps[f"{i}_{b}"] = nn.Parameter(torch.tensor(step, device=qp.param.device))
        self._act_modules = act_layers(self.model, self.layers) if self.act_bits else {}
        self.space = ConfigSpace(self.layers, self.bits, self.act_bits, self._act_modules)
        self._asteps = nn.ParameterDict()
        self._act_signed: tp.Dict[str, bool] = {}
        for name, module in self._act_modules.items():
            device = next(module.parameters()).device
            for b in self.act_bits:
                self._asteps[f"{self._akey(name)}_{b}"] = nn.Parameter(torch.ones((), device=device))
        self._act_handles = install_input_hooks(self._act_modules, self._act_forward)
        # BN container -> the quantized layer registered just before it (its producer).
        self._bn_owner: tp.Dict[str, str] = {}
        for name, layer in bnpairs.producers(self.model, set(self._layer_of.values())).items():
            if isinstance(modules[name], SwitchableBN):
                if layer is None:  # the pre-swap pass and the base class disagree: a bug, not bad input
                    raise RuntimeError(f"BatchNorm pair container {name!r} has no quantized producer")
                self._bn_owner[name] = layer
        self.macs: tp.Dict[str, float] = {}
        for name in self.layers:
            self._handles.append(modules[name].register_forward_hook(self._count_macs))
        self._frozen: tp.Dict[str, tp.List[int]] = {}
        self._steps_done = 0
        self._searched = False
        self._names = {id(m): n for n, m in self.model.named_modules()}
        self.search_error: tp.Optional[float] = None  # error of the searched configuration
        self.search_stats: tp.Dict[str, float] = {}   # the search's counters
        self.set_config(self.max_config())

    @staticmethod
    def _akey(name: str) -> str:
        return "a_" + name.replace(".", "__")

    # --------------------------------------------------------------------- configurations
    def max_config(self) -> Config:
        """Every layer at its highest candidate bit widths."""
        return self.space.max()

    def mid_config(self) -> Config:
        """Every layer at the middle candidate (the search's starting point)."""
        return self.space.mid()

    def lowest_config(self) -> Config:
        """Every layer at its lowest candidate bit widths (the cheapest configuration)."""
        return self.space.lowest()

    def candidates(self) -> tp.Dict[str, tp.Tuple[tp.List[int], tp.List[int]]]:
        """Per layer, its weight and input bit-width candidates (no input candidates: float input)."""
        return self.space.candidates()

    def sample_config(self) -> Config:
        """A random per-layer configuration avoiding frozen candidates (global torch RNG)."""
        return self.space.sample(self._frozen)

    def active_config(self) -> Config:
        """The configuration the model currently computes with (max-bit, or the searched one)."""
        return dict(self._config)

    def set_config(self, cfg: Config) -> None:
        """Activate ``cfg`` (layer -> (weight bits, act bits)); also switches the BN pairs."""
        self._config = self.space.check(cfg)
        modules = dict(self.model.named_modules())
        abits = self.act_bits or [0]
        for bn_name, owner in self._bn_owner.items():
            w, a = self._config[owner]
            modules[bn_name].key = pair_key(w, a if a else abits[-1])

    def size_bits(self, cfg: Config) -> float:
        """Storage bits of the quantized weights under ``cfg`` (levels only)."""
        return float(sum(cfg[self._layer_of[qp.name]][0] * qp.param.numel() for qp in self.qparams))

    def quantized_numel(self) -> int:
        return sum(qp.param.numel() for qp in self.qparams)

    def bitops(self, cfg: Config) -> float:
        """Σ b_w·b_a·MACs per sample (float inputs count 32 bits); MACs from the first forward."""
        if not self.macs:
            raise QuantizerError("BitOPs need the layers' MACs: run one forward on a sample first")
        return float(sum(cfg[n][0] * (cfg[n][1] or 32) * self.macs.get(n, 0.0) for n in self.layers))

    def cost(self, cfg: Config) -> float:
        """``cfg``'s cost in the unit of ``budget_kind``."""
        return COSTS[self.budget_kind](self, cfg)

    def _count_macs(self, module: nn.Module, inputs: tp.Any, out: tp.Any) -> None:
        name = self._names.get(id(module))
        if name in self.macs or not inputs or not torch.is_tensor(inputs[0]):
            return
        weights = [qp.param for qp in self.qparams if qp.module is module]
        self.macs[name] = float(layer_macs(module, inputs[0], out, weights))

    # ----------------------------------------------------------------------- quantization
    def _wbits(self, qp: QParam) -> int:
        return self._config[self._layer_of[qp.name]][0]

    def _step(self, qp: QParam, bits: int) -> nn.Parameter:
        return self._wsteps[f"{self._index[qp.name]}_{bits}"]

    def _train_value(self, qp: QParam) -> torch.Tensor:
        bits = self._wbits(qp)
        return lsq_quantize(qp.param, self._step(qp, bits), bits, signed=True).to(qp.param.dtype)

    def _eval_value(self, qp: QParam) -> torch.Tensor:
        bits = self._wbits(qp)
        return lsq_eval(qp.param, self._step(qp, bits), bits, True).to(qp.param.dtype)

    def _eval_key(self, qp: QParam) -> tp.Any:
        # The eval weight only changes with the layer's bits or that step (the search switches
        # configurations thousands of times: unchanged layers reuse their quantized weights).
        bits = self._wbits(qp)
        step = self._step(qp, bits)
        return bits, step._version, step.data_ptr()

    def _export_param(self, qp: QParam) -> tp.Dict[str, tp.Any]:
        bits = self._wbits(qp)
        return export.pack_weight(qp.param, self._step(qp, bits), bits)

    @classmethod
    def _restore_param(cls, entry: tp.Dict[str, tp.Any], like: torch.Tensor) -> torch.Tensor:
        return export.unpack_weight(entry, like)

    def _param_bits(self, qp: QParam) -> torch.Tensor:
        return torch.tensor(float(self._wbits(qp) * qp.param.numel() + 32))

    def _act_forward(self, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if name not in self._act_signed:  # step sizes initialised from the first batch
            signed = bool(sync_init((x.detach() < 0).any().float(), "max"))
            with torch.no_grad():
                for b in self.act_bits:
                    self._asteps[f"{self._akey(name)}_{b}"].fill_(lsq_init_step(x, b, signed))
            self._act_signed[name] = signed
        bits = self._config[name][1]
        step = self._asteps[f"{self._akey(name)}_{bits}"]
        signed = self._act_signed[name]
        if module.training:
            return lsq_quantize(x, step, bits, signed, numel=x[0].numel()).to(x.dtype)
        return lsq_eval(x, step, bits, signed).to(x.dtype)

    # ----------------------------------------------------------------- export / restore
    def export(self) -> tp.Dict[str, tp.Any]:
        acts = {}
        for name in self._act_modules:
            if name not in self._act_signed:  # no forward reached it yet: its input is not quantized
                continue
            bits = self._config[name][1]
            step = float(self._asteps[f"{self._akey(name)}_{bits}"].detach().float().clamp_min(1e-8))
            acts[name] = {"kind": "lsq", "bits": bits, "signed": self._act_signed[name], "step": step}
        return export.add_configuration(super().export(), self.model, self._bn_owner, self.float16,
                                        acts, self._config)

    @classmethod
    def restore_model(cls, model: nn.Module, state: tp.Dict[str, tp.Any]) -> nn.Module:
        super().restore_model(model, state)
        return export.restore_configuration(model, state)

    def model_size(self) -> torch.Tensor:
        bits = sum(float(self._param_bits(qp)) for qp in self.qparams)
        prefixes = tuple(f"{name}." for name in self._bn_owner)
        floats = sum(p.numel() for n, p in self._float_params if not n.startswith(prefixes))
        floats += sum(v.numel() for v in bnpairs.active_entries(self.model)[0].values())
        bits += floats * (16 if self.float16 else 32)
        return torch.tensor(bits / 8 / MB)

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> tp.Dict[str, tp.Any]:
        state = super().state_dict()
        state.update({"act_signed": dict(self._act_signed),
                      "frozen": {k: list(v) for k, v in self._frozen.items()},
                      "steps_done": self._steps_done, "searched": self._searched, "macs": dict(self.macs),
                      "config": {n: list(p) for n, p in self._config.items()}})
        return state

    def load_state_dict(self, state: tp.Dict[str, tp.Any]) -> None:
        super().load_state_dict(state)
        unknown = set(state.get("act_signed", {})) - set(self._act_modules)
        if unknown:
            raise QuantizerError(f"quantizer state has activation quantizers {sorted(unknown)} the model lacks")
        self._act_signed = {k: bool(v) for k, v in state.get("act_signed", {}).items()}
        self._frozen = {k: [int(b) for b in v] for k, v in state.get("frozen", {}).items()}
        self._steps_done = int(state.get("steps_done", 0))
        self._searched = bool(state.get("searched", False))
        self.macs = {k: float(v) for k, v in state.get("macs", {}).items()}
        self.set_config({n: tuple(p) for n, p in state.get("config", self.max_config()).items()})

    # ---------------------------------------------------------------------- training step
    def train_step(self, task: tp.Any, model: nn.Module, batch: tp.Any
                   ) -> tp.Tuple[torch.Tensor, tp.Dict[str, float]]:
        """Max-bit forward, then ``subnets`` sampled sub-networks distilled from it (summed loss,
        :func:`~.distill.supernet_step`); every ``sched_every`` steps, the scheduler runs."""
        loss, metrics = supernet_step(self, task, model, batch)
        self._steps_done += 1
        if self.sched_every and self._steps_done % self.sched_every == 0:
            self.schedule()
        return loss, metrics

    def turbulence(self, layer: str, bits: int) -> float:
        """Share of the layer's weights within ``turbulence_eps`` steps of a rounding boundary."""
        qps = [qp for qp in self.qparams if self._layer_of[qp.name] == layer]
        return schedule.turbulence([qp.param for qp in qps], [self._step(qp, bits) for qp in qps],
                                   self.turbulence_eps)

    def schedule(self) -> None:
        """Bit-width scheduler: freeze the lowest candidate of the most turbulent layers."""
        self._frozen = {}
        if len(self.bits) < 2 or self.sched_frac <= 0:
            return
        scores = {n: self.turbulence(n, self.bits[0]) for n in self.layers}
        for name in schedule.most_turbulent(scores, self.sched_frac):
            self._frozen[name] = [self.bits[0]]

    # ------------------------------------------------------------------- search (stage 2)
    def recalibrate(self, task: tp.Any, batches: tp.Sequence[tp.Any]) -> None:
        """Re-estimate the active BN pairs' statistics on ``batches`` (quantized eval forwards)."""
        bnpairs.recalibrate(self.model, lambda batch: task.step(self.model, batch), batches)

    def search(self, evaluate: tp.Callable[[nn.Module], float], budget: tp.Optional[float] = None,
               recalibrate: tp.Optional[tp.Callable[[], None]] = None, max_moves: int = 10000,
               lazy: bool = True) -> Config:
        """Greedy retraining-free search of a configuration with ``cost <= budget``
        (:func:`~diffq_bench.quant.oneshot.search.search_config`); the chosen configuration stays
        active (it is the one :meth:`export` packs); its error is ``self.search_error`` and the
        search's counters ``self.search_stats``.
        """
        cfg, self.search_error, self.search_stats = search_config(
            self, evaluate, self.budget if budget is None else float(budget), recalibrate,
            max_moves, lazy)
        self._searched = True
        return cfg

    def finalize(self, calibration: tp.Optional[Calibration] = None) -> bool:
        """Run the search on the loop's calibration batches (mean task loss as the error)."""
        if calibration is None:
            raise QuantizerError("oneshot_mpq needs calibration batches after training: the loop must "
                                 "call finalize(Calibration(task, batches)) (docs/INTERFACES.md)")
        task, batches = calibration.task, list(calibration.batches)
        if not batches:
            raise QuantizerError("oneshot_mpq got an empty calibration set")

        def evaluate(model: nn.Module) -> float:
            return sum(float(task.step(model, b)[0]) for b in batches) / len(batches)

        self.search(evaluate, recalibrate=lambda: self.recalibrate(task, batches))
        return False

    @property
    def phase(self) -> str:
        return "searched" if self._searched else "supernet"

    def detach(self) -> None:
        super().detach()
        for handle in self._act_handles:
            handle.remove()
        self._act_handles.clear()

    def quantizer_parameters(self) -> tp.List[nn.Parameter]:
        return list(self._wsteps.values()) + list(self._asteps.values())
