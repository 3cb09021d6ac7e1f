"""Quantizer library: one registry, one contract (see :mod:`diffq_bench.quant.base`).

Public API::

    from diffq_bench.quant import QUANTIZERS, get_quantizer, restore
    quantizer = get_quantizer("diffq", model, group_size=16, penalty=1.0)
    state = quantizer.export()          # packed, safe to torch.load(weights_only=True)
    restore(model, state)               # model now computes exactly the quantized eval outputs
"""
import typing as tp

from torch import nn

from .base import BaseQuantizer, Calibration, NoQuantizer
from .diffq import DiffQuantizer
from .dsq import DSQQuantizer
from .errors import QuantizerError
from .ipq import QuantNoiseIPQQuantizer
from .lsq import LSQQuantizer
from .oneshot import OneShotMPQQuantizer
from .quant_noise import QuantNoiseQuantizer
from .state import FORMAT_NAME, FORMAT_VERSION, deserialize, serialize
from .uniform import UniformQuantizer

#: name -> class, in the order tables list the methods (each class carries its ``display``).
QUANTIZERS: tp.Dict[str, tp.Type[BaseQuantizer]] = {
    cls.name: cls for cls in (NoQuantizer, UniformQuantizer, LSQQuantizer, QuantNoiseQuantizer,
                              QuantNoiseIPQQuantizer, DSQQuantizer, OneShotMPQQuantizer, DiffQuantizer)
}


def get_quantizer(name: str, model: nn.Module, **kwargs: tp.Any) -> BaseQuantizer:
    """Build the quantizer registered as ``name`` on ``model``.

    Args:
        name: a key of :data:`QUANTIZERS`.
        model: the model to quantize.
        kwargs: the method's arguments (``group_size``, ``min_size``, ``bits``, ``penalty``...).
    Raises:
        QuantizerError: unknown name (the message lists the valid ones) or bad argument.
    """
    if name not in QUANTIZERS:
        raise QuantizerError(f"unknown quantizer {name!r}; valid: {', '.join(sorted(QUANTIZERS))}")
    cls = QUANTIZERS[name]
    try:
        return cls(model, **kwargs)
    except TypeError as exc:  # unexpected keyword: say which ones exist
        import inspect
        valid = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "model")]
        raise QuantizerError(f"bad arguments for quantizer {name!r} ({exc}); valid: {valid}") from exc


def restore(model: nn.Module, state: tp.Union[dict, bytes]) -> nn.Module:
    """Load an exported quantized state into ``model`` (in place) and return it.

    Dispatches on ``state["method"]``; the method's ``restore_model`` rebuilds dequantized weights
    and installs whatever eval-time behaviour the method needs (activation quantizers...).
    """
    if isinstance(state, (bytes, bytearray)):
        state = deserialize(bytes(state))
    elif not isinstance(state, dict) or state.get("format") != FORMAT_NAME:
        raise QuantizerError("not a diffq-bench quantized state (missing format marker)")
    elif state.get("version", 0) > FORMAT_VERSION:
        raise QuantizerError(f"quantized state has format version {state.get('version')}, "
                             f"this diffq-bench reads up to {FORMAT_VERSION}: upgrade it")
    method = state.get("method") if isinstance(state, dict) else None
    if method not in QUANTIZERS:
        raise QuantizerError(f"quantized state names unknown method {method!r}; "
                             f"valid: {', '.join(sorted(QUANTIZERS))}")
    return QUANTIZERS[method].restore_model(model, state)


__all__ = ["QUANTIZERS", "get_quantizer", "restore", "BaseQuantizer", "Calibration",
           "QuantizerError", "serialize", "deserialize", "FORMAT_NAME", "FORMAT_VERSION", "NoQuantizer",
           "DiffQuantizer", "UniformQuantizer", "LSQQuantizer", "DSQQuantizer", "OneShotMPQQuantizer",
           "QuantNoiseQuantizer", "QuantNoiseIPQQuantizer"]
