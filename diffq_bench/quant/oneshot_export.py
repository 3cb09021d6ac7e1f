"""One-shot MPQ's active configuration as quantized values, packed export and checkpoint state.

:class:`~diffq_bench.quant.oneshot.OneShotMPQQuantizer` keeps the supernet (configurations, costs,
training step, scheduler, search); this mixin holds what depends only on the configuration that
is active: the LSQ weight and input values a forward sees, the packed state :meth:`export` writes
for it (same bits and step sizes as the eval forward, so a restored plain model computes the same
outputs), :meth:`restore_model`, the analytic size, and the quantizer's checkpoint state.
"""
from __future__ import annotations

import typing as tp

import torch
from torch import nn

from . import bnpairs
from .actquant import (install_restored_activations, lsq_dequantize, lsq_eval, lsq_init_step,
                       lsq_levels, lsq_quantize)
from .base import MB, QParam, QuantizerError
from .pack import pack_uint
from .state import unpack_entry


class PackedConfigMixin:
    """Quantization, export and state of the active configuration (mixed into the quantizer).

    Relies on what :class:`~diffq_bench.quant.oneshot.OneShotMPQQuantizer` sets up: ``_config``,
    ``_layer_of``, ``_index``, ``_wsteps``, ``_asteps``, ``_akey``, ``_act_modules``, ``_act_signed``,
    ``_bn_owner``, ``_frozen``, ``_steps_done``, ``_searched``, ``macs``, ``set_config``. Listed
    before :class:`~diffq_bench.quant.base.BaseQuantizer` in the bases, so its methods override
    the base's and its ``super()`` calls reach the base.
    """
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
        step = self._step(qp, bits)
        levels = lsq_levels(qp.param, step, bits, True)  # unsigned: signed level + 2**(bits-1)
        return {"bits": bits, "numel": qp.param.numel(), "packed": pack_uint(levels.cpu(), bits),
                "step": float(step.detach().float().clamp_min(1e-8))}  # exact float32 value

    @classmethod
    def _restore_param(cls, entry: tp.Dict[str, tp.Any], like: torch.Tensor) -> torch.Tensor:
        levels = unpack_entry(entry, like)
        step = torch.as_tensor(entry["step"], dtype=torch.float32)
        return lsq_dequantize(levels, step, entry["bits"], True).reshape(like.shape)

    def _param_bits(self, qp: QParam) -> torch.Tensor:
        return torch.tensor(float(self._wbits(qp) * qp.param.numel() + 32))

    def _act_forward(self, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if name not in self._act_signed:  # step sizes initialised from the first batch
            signed = bool((x.detach() < 0).any())
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
        state = super().export()
        prefixes = tuple(f"{name}." for name in self._bn_owner)
        floats = {k: v for k, v in state["float"].items() if not k.startswith(prefixes)}
        bn_params, bn_buffers = bnpairs.active_entries(self.model)
        dtype = torch.float16 if self.float16 else torch.float32
        floats.update({k: v.to(dtype) for k, v in bn_params.items()})
        state["float"] = floats
        # Running statistics of every BN (chosen pairs and plain ones), so that restoring into a
        # fresh plain model reproduces the eval outputs without copying buffers by hand.
        state["buffers"] = {**bnpairs.plain_buffers(self.model), **bn_buffers}
        acts = {}
        for name in self._act_modules:
            if name not in self._act_signed:  # no forward reached it yet: its input is not quantized
                continue
            bits = self._config[name][1]
            step = float(self._asteps[f"{self._akey(name)}_{bits}"].detach().float().clamp_min(1e-8))
            acts[name] = {"kind": "lsq", "bits": bits, "signed": self._act_signed[name], "step": step}
        state["activations"] = acts
        state["mpq_config"] = {n: list(pair) for n, pair in self._config.items()}
        return state

    @classmethod
    def restore_model(cls, model: nn.Module, state: tp.Dict[str, tp.Any]) -> nn.Module:
        super().restore_model(model, state)
        buffers = dict(model.named_buffers())
        for name, value in state.get("buffers", {}).items():
            if name not in buffers:
                raise QuantizerError(f"quantized state has buffer {name!r} that the model lacks")
            with torch.no_grad():
                buffers[name].copy_(value.to(buffers[name].dtype))
        install_restored_activations(model, state.get("activations", {}))
        return model

    def model_size(self) -> torch.Tensor:
        bits = sum(float(self._param_bits(qp)) for qp in self.qparams)
        prefixes = tuple(f"{name}." for name in self._bn_owner)
        floats = sum(p.numel() for n, p in self._float_params if not n.startswith(prefixes))
        floats += sum(v.numel() for v in bnpairs.active_entries(self.model)[0].values())
        bits += floats * (16 if self.float16 else 32)
        return torch.tensor(bits / 8 / MB)

    def float_numel(self) -> int:
        """Parameters of the plain model: one BatchNorm per layer, not one per bit pair."""
        return bnpairs.plain_numel(self.model)

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> tp.Dict[str, tp.Any]:
        state = super().state_dict()
        state.update({"act_signed": dict(self._act_signed), "frozen": {k: list(v) for k, v in self._frozen.items()},
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
