"""DSQ: Differentiable Soft Quantization (Gong et al., ICCV 2019), weights and activations.

Each quantized tensor (weights per parameter, activations per layer input) has a learnable
clipping range ``[lower, upper]`` and a learnable characteristic variable ``α`` bounded in
(0, 0.5) (:func:`~diffq_bench.quant.actquant.dsq_alpha`). The training forward sees the *hard*
quantized value at the requested bit width, the backward the derivative of the tanh soft step
(:func:`~diffq_bench.quant.actquant.dsq_quantize`). Weight ranges start at the tensor's min/max;
activation ranges at the min/max of the first batch that reaches the layer (train or eval), and
are then learned (the clipping really happens: out-of-range inputs map to the bounds).

The first and last quantized layers may keep a higher precision (``first_last_bits``), for weights
and inputs alike, as in the paper. Export: packed levels at the exact bit width + the two bounds
per tensor, and the activation ranges, which :meth:`DSQQuantizer.restore_model` re-installs.
"""
from __future__ import annotations

import typing as tp

import torch
from torch import nn

from ..distributed import sync_init
from .actquant import (
    act_layers,
    dsq_alpha,
    dsq_dequantize,
    dsq_levels,
    dsq_quantize,
    dsq_rho,
    install_input_hooks,
    install_restored_activations,
)
from .base import BaseQuantizer, Display, QParam
from .errors import QuantizerError, check_range
from .pack import pack_uint
from .state import unpack_entry


def _check_bits(name: str, value: tp.Any, allow_none: bool = False) -> tp.Optional[int]:
    if value is None and allow_none:
        return None
    check_range(name, value, 1, 16, integer=True)
    return int(value)


class DSQQuantizer(BaseQuantizer):
    """DSQ on weights (and layer inputs when ``act_bits > 0``).

    Args:
        model: the model to quantize.
        bits: weight bit width (1..16), really used at export.
        act_bits: input activation bit width (1..16) of the quantized Linear/Conv/RNN layers;
            0 keeps activations in float.
        first_last_bits: bit width of the first and last quantized layers (weights and inputs);
            None gives them ``bits``/``act_bits`` like the others.
        alpha_init: initial characteristic variable, in (0, 0.5) (paper: 0.2).
        min_size, float16, exclude: see :class:`~diffq_bench.quant.base.BaseQuantizer`.
    """
    name = "dsq"
    display = Display("DSQ", color="tab:cyan", axes=(("quant.bits", "{} bits"), ("quant.act_bits", "A{}")),
                      point=("quant.bits", "{}b"))
    config_keys = ("bits", "act_bits", "first_last_bits", "alpha_init", "min_size", "float16",
                   "exclude")
    default_lr = 1e-3

    def __init__(self, model: nn.Module, bits: int = 4, act_bits: int = 4,
                 first_last_bits: tp.Optional[int] = 8, alpha_init: float = 0.2,
                 min_size: float = 0.01, float16: bool = False, exclude: tp.Sequence[str] = ()):
        self.bits = _check_bits("bits", bits)
        check_range("act_bits", act_bits, 0, 16, integer=True)
        self.act_bits = int(act_bits)
        self.first_last_bits = _check_bits("first_last_bits", first_last_bits, allow_none=True)
        check_range("alpha_init", alpha_init, 0.0, 0.5)
        self.alpha_init = float(alpha_init)
        rho0 = dsq_rho(self.alpha_init)
        super().__init__(model, min_size=min_size, float16=float16, exclude=exclude)
        qps = self.qparams
        self._wbits: tp.Dict[str, int] = {}
        self._wstate = nn.ParameterDict()  # "<i>_lower|upper|rho" for qparam i
        for i, qp in enumerate(qps):
            edge = self.first_last_bits is not None and i in (0, len(qps) - 1)
            self._wbits[qp.name] = self.first_last_bits if edge else self.bits
            flat = qp.param.detach().reshape(-1).float()
            self._wstate[f"{i}_lower"] = nn.Parameter(flat.min().reshape(()).clone())
            self._wstate[f"{i}_upper"] = nn.Parameter(flat.max().reshape(()).clone())
            self._wstate[f"{i}_rho"] = nn.Parameter(torch.tensor(rho0))
        self._index = {qp.name: i for i, qp in enumerate(qps)}
        self._wstate.to(qps[0].param.device if qps else "cpu")
        # Activation quantizers: one per quantized layer taking an activation input.
        self._act_modules: tp.Dict[str, nn.Module] = {}
        self._abits: tp.Dict[str, int] = {}
        self._astate = nn.ParameterDict()
        self._act_init: tp.Dict[str, bool] = {}
        self._act_handles: tp.List[tp.Any] = []
        if self.act_bits > 0:
            owners = {}
            for mod_name, module in model.named_modules():
                if any(qp.module is module for qp in self._qparams):
                    owners[mod_name] = module
            self._act_modules = act_layers(model, owners)
            names = list(self._act_modules)
            for j, name in enumerate(names):
                edge = self.first_last_bits is not None and j in (0, len(names) - 1)
                self._abits[name] = self.first_last_bits if edge else self.act_bits
                key = self._akey(name)
                device = next(self._act_modules[name].parameters()).device
                self._astate[f"{key}_lower"] = nn.Parameter(torch.zeros((), device=device))
                self._astate[f"{key}_upper"] = nn.Parameter(torch.ones((), device=device))
                self._astate[f"{key}_rho"] = nn.Parameter(torch.tensor(rho0, device=device))
                self._act_init[name] = False
            self._act_handles = install_input_hooks(self._act_modules, self._act_forward)

    @staticmethod
    def _akey(name: str) -> str:
        return "a_" + name.replace(".", "__")  # ParameterDict keys cannot hold dots

    # --------------------------------------------------------------------------- weights
    def _wparams(self, qp: QParam) -> tp.Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        i = self._index[qp.name]
        return (self._wstate[f"{i}_lower"], self._wstate[f"{i}_upper"],
                dsq_alpha(self._wstate[f"{i}_rho"]), self._wbits[qp.name])

    def _train_value(self, qp: QParam) -> torch.Tensor:
        lower, upper, alpha, bits = self._wparams(qp)
        return dsq_quantize(qp.param, lower, upper, alpha, bits).to(qp.param.dtype)

    def _eval_value(self, qp: QParam) -> torch.Tensor:
        lower, upper, _, bits = self._wparams(qp)
        levels = dsq_levels(qp.param, lower, upper, bits)
        return dsq_dequantize(levels, lower, upper, bits).to(qp.param.dtype)

    def _export_param(self, qp: QParam) -> tp.Dict[str, tp.Any]:
        lower, upper, _, bits = self._wparams(qp)
        levels = dsq_levels(qp.param, lower, upper, bits)
        # Bounds as Python floats (exact float32 values): a 0-d tensor costs ~10x more bytes in
        # the serialized state than its 4 bytes of data.
        return {"bits": bits, "numel": qp.param.numel(), "packed": pack_uint(levels.cpu(), bits),
                "lower": float(lower.detach().float()), "upper": float(upper.detach().float())}

    @classmethod
    def _restore_param(cls, entry: tp.Dict[str, tp.Any], like: torch.Tensor) -> torch.Tensor:
        levels = unpack_entry(entry, like)
        lower, upper = (torch.as_tensor(entry[k], dtype=torch.float32) for k in ("lower", "upper"))
        return dsq_dequantize(levels, lower, upper, entry["bits"]).reshape(like.shape)

    def _param_bits(self, qp: QParam) -> torch.Tensor:
        return torch.tensor(float(self._wbits[qp.name] * qp.param.numel() + 2 * 32))

    # ------------------------------------------------------------------------ activations
    def _aparams(self, name: str):
        key = self._akey(name)
        return (self._astate[f"{key}_lower"], self._astate[f"{key}_upper"],
                dsq_alpha(self._astate[f"{key}_rho"]), self._abits[name])

    def _act_forward(self, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        lower, upper, alpha, bits = self._aparams(name)
        if not self._act_init[name]:  # initialised from data: the first batch's range
            with torch.no_grad():
                low, high = torch.aminmax(x.detach().float())
                low, high = sync_init(low, "min"), sync_init(high, "max")  # the global batch's range
                lower.copy_(low)
                upper.copy_(torch.maximum(high, low + 1e-6))
            self._act_init[name] = True
        if module.training:
            return dsq_quantize(x, lower, upper, alpha, bits).to(x.dtype)
        return dsq_dequantize(dsq_levels(x, lower, upper, bits), lower, upper, bits).to(x.dtype)

    # ------------------------------------------------------------------------ public API
    def quantizer_parameters(self) -> tp.List[nn.Parameter]:
        return list(self._wstate.values()) + list(self._astate.values())

    def bit_widths(self) -> tp.Dict[str, int]:
        """Weight bit width per quantized parameter name."""
        return dict(self._wbits)

    def detach(self) -> None:
        super().detach()
        for handle in self._act_handles:
            handle.remove()
        self._act_handles.clear()

    def state_dict(self) -> tp.Dict[str, tp.Any]:
        state = super().state_dict()
        state["act_init"] = [self._act_init[name] for name in self._act_modules]
        return state

    def load_state_dict(self, state: tp.Dict[str, tp.Any]) -> None:
        super().load_state_dict(state)
        flags = state.get("act_init", [])
        if len(flags) != len(self._act_modules):
            raise QuantizerError(f"quantizer state holds {len(flags)} activation range flag(s), "
                                 f"dsq expects {len(self._act_modules)}")
        self._act_init = {name: bool(f) for name, f in zip(self._act_modules, flags)}

    def export(self) -> tp.Dict[str, tp.Any]:
        state = super().export()
        acts = {}
        for name in self._act_modules:
            if not self._act_init[name]:  # no forward reached it yet: its input is not quantized
                continue
            lower, upper, _, bits = self._aparams(name)
            acts[name] = {"kind": "dsq", "bits": bits, "lower": float(lower.detach().float()),
                          "upper": float(upper.detach().float())}
        state["activations"] = acts
        return state

    @classmethod
    def restore_model(cls, model: nn.Module, state: tp.Dict[str, tp.Any]) -> nn.Module:
        super().restore_model(model, state)
        install_restored_activations(model, state.get("activations", {}))
        return model
