"""The quantizer contract shared by every method in :data:`diffq_bench.quant.QUANTIZERS`.

A quantizer is built on a model and changes how the model's weights are *seen* during a forward,
never what is stored: the float parameters stay the source of truth for the optimizer, and each
forward of the model (or of any submodule that owns a quantized weight) sees

- in train mode: :meth:`BaseQuantizer._train_value` (noisy weight for DiffQ, STE-quantized for QAT...);
- in eval mode: :meth:`BaseQuantizer._eval_value`, the truly quantized weight, bit for bit what
  :func:`diffq_bench.quant.restore` rebuilds from :meth:`BaseQuantizer.export`.

How the substitution works (why hooks on ancestors): the value is put in the owning module's
instance ``__dict__`` for the duration of the forward, shadowing the entry of ``_parameters`` (so
``state_dict`` order and parameter identity never change). Hooks are registered on every module
that owns a quantized parameter *and on all of its ancestors*; the outermost module entered installs
the values for its whole subtree once, the matching post-hook (``always_call``, so it also runs when
the forward raises) removes them. This covers modules whose weights are read without calling their
own ``forward`` (``MultiheadAttention.out_proj``), tied weights (one value per forward, shared by all
uses), and task code that calls a submodule directly.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import typing as tp

import torch
from torch import nn

from .errors import check_finite, check_range
from .state import load_tensors, load_weights, make_state, serialize

MB = 2 ** 20  # sizes are in MiB throughout, as in the DiffQ code and paper


@dataclasses.dataclass(eq=False)
class QParam:
    """One parameter handled by a quantizer.

    Attributes:
        name: full dotted name, as in ``model.named_parameters()`` (first occurrence for tied ones).
        module: the module that owns the parameter.
        attr: attribute name inside ``module`` (``weight``, ``in_proj_weight``, ``weight_hh_l0``...).
        param: the float parameter itself (never overwritten by the quantizer).
        other: for a tied parameter, the :class:`QParam` of its first occurrence, else None.
    """
    name: str
    module: nn.Module
    attr: str
    param: nn.Parameter
    other: tp.Optional["QParam"] = None


@dataclasses.dataclass(frozen=True)
class Display:
    """How tables and plots show a method (read from the quantizer class, never restated).

    Attributes:
        label: the method's name in tables and legends (``DiffQ``).
        color: its matplotlib colour.
        axes: the config axes that identify one configuration, in label order, each with the
            format of its part of the label (``("quant.bits", "{} bits")``, ``("lambda", "λ={}")``).
        inline: first part follows the name (``QAT 4 bits``) instead of all in parentheses
            (``DiffQ (λ=1, g=16)``).
        series_axis: plots draw one marker series per value of this axis (DiffQ: group size).
        point: plots annotate each point with this axis and format (``("lambda", "λ={:g}")``);
            only numeric values are shown.
    """
    label: str
    color: str = "tab:gray"
    axes: tp.Tuple[tp.Tuple[str, str], ...] = ()
    inline: bool = False
    series_axis: tp.Optional[str] = None
    point: tp.Optional[tp.Tuple[str, str]] = None


@dataclasses.dataclass
class Calibration:
    """Data the loop hands to :meth:`BaseQuantizer.finalize` (docs/INTERFACES.md).

    Attributes:
        task: the task; ``task.step(model, batch)`` gives the loss of a batch.
        batches: ``quantizer.calibration_batches`` training batches, fixed for the whole call.
    """
    task: tp.Any
    batches: tp.Sequence[tp.Any]


class BaseQuantizer:
    """Base class: finds the parameters to quantize, installs the forward hooks, accounts size.

    Subclasses implement :meth:`_train_value`, :meth:`_eval_value`, :meth:`_export_param`,
    :meth:`_restore_param` and :meth:`_param_bits`; they may add learnable parameters (returned by
    :meth:`quantizer_parameters`) and override :meth:`model_size` / :meth:`penalty_term`.

    Args:
        model: the model to quantize (modified only by registering hooks).
        min_size: parameters of at most this many MiB (as float32) are left in float.
        float16: store (and evaluate) the parameters left in float as float16.
        exclude: fnmatch patterns of parameters never quantized, matched against the full name and
            the attribute name (``"bias"`` excludes every bias, ``"head.*"`` one module).
    """
    name: str = "base"
    #: how tables and plots show the method
    display: Display = Display("base")
    #: keyword arguments (beyond model) that :meth:`config` records in exports, in order.
    config_keys: tp.Tuple[str, ...] = ("min_size", "float16", "exclude")

    def __init__(self, model: nn.Module, min_size: float = 0.01, float16: bool = False,
                 exclude: tp.Sequence[str] = ()):
        check_range("min_size", min_size, 0.0, float("inf"))
        if isinstance(exclude, str):
            exclude = [exclude]
        self.model = model
        self.min_size = float(min_size)
        self.float16 = bool(float16)
        self.exclude = list(exclude)
        self._qparams: tp.List[QParam] = []
        self._float_params: tp.List[tp.Tuple[str, nn.Parameter]] = []
        self._tied: tp.Dict[str, str] = {}
        self._handles: tp.List[tp.Any] = []
        self._active: tp.Optional[nn.Module] = None
        self._subtree: tp.Dict[nn.Module, tp.List[QParam]] = {}
        self._roots: tp.Dict[nn.Module, tp.List[QParam]] = {}  # first occurrences of each subtree
        self._float_subtree: tp.Dict[nn.Module, tp.List[tp.Tuple[nn.Module, str, nn.Parameter]]] = {}
        self._eval_cache: tp.Dict[tp.Any, tp.Tuple[tp.Any, torch.Tensor]] = {}
        self._find_params()

    # ----------------------------------------------------------------------------- discovery
    def _accepts(self, name: str, module: nn.Module, attr: str, param: nn.Parameter) -> bool:
        """Whether ``param`` is quantized: big enough and not excluded. Subclasses may narrow.

        As in the official ``diffq`` package, a pattern of ``exclude`` matches the full dotted name
        (``layers.0.fc1.bias``) or the bare attribute name (``bias``), so ``exclude=["bias"]``
        keeps every bias in float.
        """
        if param.numel() * 4 <= self.min_size * MB:
            return False
        return not any(fnmatch.fnmatch(name, pat) or fnmatch.fnmatch(attr, pat) for pat in self.exclude)

    def _find_params(self) -> None:
        seen: tp.Dict[int, tp.Union[QParam, str]] = {}
        for mod_name, module in self.model.named_modules():
            for attr, param in list(module._parameters.items()):
                if param is None:
                    continue
                name = f"{mod_name}.{attr}" if mod_name else attr
                first = seen.get(id(param))
                if first is not None:  # tied: counted once, but substituted in every owner
                    first_name = first.name if isinstance(first, QParam) else first
                    self._tied[name] = first_name
                    if isinstance(first, QParam):
                        self._qparams.append(QParam(name, module, attr, param, other=first))
                    continue
                if self._accepts(name, module, attr, param):
                    qp = QParam(name, module, attr, param)
                    self._qparams.append(qp)
                    seen[id(param)] = qp
                else:
                    self._float_params.append((name, param))
                    seen[id(param)] = name
        self._install_hooks()

    @property
    def qparams(self) -> tp.List[QParam]:
        """The quantized parameters, first occurrences only (tied copies excluded)."""
        return [qp for qp in self._qparams if qp.other is None]

    # --------------------------------------------------------------------------------- hooks
    def _install_hooks(self) -> None:
        self._roots.clear()
        owners: tp.Dict[nn.Module, tp.List[QParam]] = {}
        for qp in self._qparams:
            owners.setdefault(qp.module, []).append(qp)
        float_owners: tp.Dict[nn.Module, tp.List[tp.Tuple[nn.Module, str, nn.Parameter]]] = {}
        if self.float16:
            float_names = {name for name, _ in self._float_params}
            for mod_name, module in self.model.named_modules():
                for attr, param in module._parameters.items():
                    full = f"{mod_name}.{attr}" if mod_name else attr
                    if param is not None and self._tied.get(full, full) in float_names:
                        float_owners.setdefault(module, []).append((module, attr, param))
        # Every ancestor of an owner sees the qparams of its whole subtree.
        for module in self.model.modules():
            sub_q = [qp for m in module.modules() for qp in owners.get(m, [])]
            sub_f = [x for m in module.modules() for x in float_owners.get(m, [])]
            if sub_q or sub_f:
                self._subtree[module] = sub_q
                self._float_subtree[module] = sub_f
        for module in self._subtree:
            self._handles.append(module.register_forward_pre_hook(self._pre_forward))
            self._handles.append(module.register_forward_hook(self._post_forward, always_call=True))

    def detach(self) -> None:
        """Remove every hook: the model goes back to plain float behaviour."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @staticmethod
    def _shadow(module: nn.Module, attr: str, value: tp.Optional[torch.Tensor]) -> None:
        # Instance __dict__ wins over Module.__getattr__, so this hides the registered parameter.
        if value is None:
            module.__dict__.pop(attr, None)
            value = module._parameters[attr]
        else:
            module.__dict__[attr] = value
        # (from the instance dict: a missing attribute through Module.__getattr__ costs more than
        # the rest of this call, twice per quantized weight and forward)
        names = module.__dict__.get("_flat_weights_names")
        if names is not None and attr in names:  # RNNs read their weights from this list
            module._flat_weights[names.index(attr)] = value

    def _pre_forward(self, module: nn.Module, inputs: tp.Any) -> None:
        if self._active is not None:
            return
        self._active = module
        train = module.training
        if train and self._eval_cache:  # weights are about to change: free the eval copies
            self._eval_cache.clear()
        values: tp.Dict[int, torch.Tensor] = {}
        if train:  # all of the subtree's values in one call (DiffQ draws one noise for the set)
            roots = self._roots.get(module)
            if roots is None:
                roots = list({id(qp.other or qp): qp.other or qp for qp in self._subtree[module]}.values())
                self._roots[module] = roots
            values = dict(zip(map(id, roots), self._train_values(roots)))
        for qp in self._subtree[module]:
            root = qp.other or qp
            if id(root) not in values:
                values[id(root)] = self._cached_eval(root)
            self._shadow(qp.module, qp.attr, values[id(root)])
        if not train:
            for owner, attr, param in self._float_subtree[module]:
                self._shadow(owner, attr, self._cached(
                    ("f16", id(param)), param, (), lambda p=param: p.detach().half().to(p.dtype)))

    def _post_forward(self, module: nn.Module, inputs: tp.Any, output: tp.Any) -> None:
        if self._active is not module:
            return
        for qp in self._subtree[module]:
            self._shadow(qp.module, qp.attr, None)
        for owner, attr, _ in self._float_subtree[module]:
            self._shadow(owner, attr, None)
        self._active = None

    def _cached(self, slot: tp.Any, param: torch.Tensor, extra: tp.Any,
                compute: tp.Callable[[], torch.Tensor]) -> torch.Tensor:
        # Eval weights only change when the parameter (or the quantizer's own state) does: the
        # version counter moves on every in-place update (optimizer step, load_state_dict).
        key = (param.data_ptr(), param._version, param.device, param.dtype, extra)
        hit = self._eval_cache.get(slot)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = compute()
        self._eval_cache[slot] = (key, value)
        return value

    def _cached_eval(self, qp: QParam) -> torch.Tensor:
        extra = self._eval_key(qp)
        if extra is None:
            return self._eval_value(qp)
        with torch.no_grad():
            return self._cached(qp.name, qp.param, extra, lambda: self._eval_value(qp))

    def _eval_key(self, qp: QParam) -> tp.Any:
        """Hashable summary of the quantizer state that :meth:`_eval_value` depends on besides
        the parameter itself (e.g. versions of learnable step sizes), or None to disable caching."""
        return None

    # --------------------------------------------------------------------- to be implemented
    def _train_value(self, qp: QParam) -> torch.Tensor:
        """The weight seen by a train-mode forward (differentiable)."""
        raise NotImplementedError

    def _train_values(self, qps: tp.Sequence[QParam]) -> tp.List[torch.Tensor]:
        """The train-mode weights of ``qps`` (first occurrences, in the order the forward's subtree
        meets them), all needed by one forward. Default: :meth:`_train_value` of each, in order;
        methods that handle the set at once (DiffQ: one noise draw) override it."""
        return [self._train_value(qp) for qp in qps]

    def _eval_value(self, qp: QParam) -> torch.Tensor:
        """The truly quantized weight seen by an eval-mode forward."""
        raise NotImplementedError

    def _export_param(self, qp: QParam) -> tp.Dict[str, tp.Any]:
        """Packed state of one quantized parameter (tensors, ints, floats, strings only)."""
        raise NotImplementedError

    @classmethod
    def _restore_param(cls, entry: tp.Dict[str, tp.Any], like: torch.Tensor) -> torch.Tensor:
        """Rebuild the dequantized weight from :meth:`_export_param`'s entry."""
        raise NotImplementedError

    def _param_bits(self, qp: QParam) -> torch.Tensor:
        """Analytic storage of one quantized parameter in bits (a tensor; may carry grad)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------- public API
    def quantizer_parameters(self) -> tp.List[nn.Parameter]:
        """Learnable parameters owned by the quantizer (bit logits, step sizes...)."""
        return []

    def setup_optimizer(self, optimizer: torch.optim.Optimizer, lr: tp.Optional[float] = None,
                        separate_adam: bool = False, **kwargs: tp.Any
                        ) -> tp.List[torch.optim.Optimizer]:
        """Give the quantizer's own parameters to an optimizer.

        Args:
            optimizer: the main optimizer; a new parameter group is added to it (no weight decay).
            lr: learning rate of that group (method default when None).
            separate_adam: use a separate Adam for the quantizer's parameters instead (the DiffQ
                recipe when the main optimizer is SGD).
            kwargs: extra options of that group.
        Returns:
            the extra optimizers the training loop must step too (empty when none).
        """
        params = self.quantizer_parameters()
        if not params:
            return []
        if lr is None:  # method default, else the main optimizer's own learning rate
            lr = self.default_lr if self.default_lr is not None else optimizer.defaults["lr"]
        if separate_adam:
            return [torch.optim.Adam(params, lr=lr, **kwargs)]
        optimizer.add_param_group({"params": params, "lr": lr, "weight_decay": 0.0, **kwargs})
        return []

    #: learning rate of the quantizer's parameters when none is given (None: the main one).
    default_lr: tp.Optional[float] = 1e-3

    def model_size(self) -> torch.Tensor:
        """Size of the model in MiB, as a tensor (differentiable where the method allows)."""
        total = torch.zeros(())
        for qp in self.qparams:
            total = total + self._param_bits(qp).to(total.device).float()
            total = total.to(qp.param.device)
        float_bits = 16 if self.float16 else 32
        total = total + sum(p.numel() for _, p in self._float_params) * float_bits
        return total / 8 / MB

    def true_model_size(self) -> float:
        """Analytic size in MiB of the exported (quantized) model, as a float."""
        with torch.no_grad():
            return float(self.model_size())

    def penalty_term(self) -> torch.Tensor:
        """Term added to the loss: λ · model_size for DiffQ, 0 for methods without a penalty."""
        return torch.zeros(())

    def bits_per_weight(self) -> float:
        """Mean storage bits per quantized weight at export (0 if nothing is quantized)."""
        numel = sum(qp.param.numel() for qp in self.qparams)
        if numel == 0:
            return 0.0
        with torch.no_grad():
            return float(sum(float(self._param_bits(qp)) for qp in self.qparams)) / numel

    def config(self) -> tp.Dict[str, tp.Any]:
        """The constructor arguments (JSON-able), recorded in every export."""
        out = {}
        for key in self.config_keys:
            value = getattr(self, key)
            out[key] = list(value) if isinstance(value, (list, tuple)) else value
        return out

    def export(self) -> tp.Dict[str, tp.Any]:
        """Packed quantized state: loadable with ``torch.load(weights_only=True)``.

        Keys: ``format``, ``version``, ``method``, ``config``, ``quantized`` (name -> packed
        entry), ``float`` (name -> tensor, float16 if asked), ``tied`` (name -> first name).
        """
        quantized = {}
        for qp in self.qparams:
            check_finite(qp.name, qp.param.detach(), "weight")
            quantized[qp.name] = self._export_param(qp)
        dtype = torch.float16 if self.float16 else torch.float32
        floats = {name: p.detach().to("cpu", dtype).clone() for name, p in self._float_params}
        return make_state(self.name, self.config(), quantized, floats, dict(self._tied))

    def eval_weights(self) -> tp.Dict[str, torch.Tensor]:
        """The weight the eval forward uses for each parameter of the model, by name (tied copies
        included): a quantized one's quantized value, a float one as stored (rounded through
        float16 with ``float16``). :meth:`restore_model` of :meth:`export` gives exactly these
        (diffq_bench/finish.py checks it bit for bit at the end of every run)."""
        with torch.no_grad():
            out = {qp.name: self._cached_eval(qp.other or qp) for qp in self._qparams}
            for name, param in self._float_params:
                out[name] = param.detach().half().to(param.dtype) if self.float16 else param.detach()
            for name, first in self._tied.items():
                out.setdefault(name, out[first])
        return out

    @classmethod
    def restore_model(cls, model: nn.Module, state: tp.Dict[str, tp.Any]) -> nn.Module:
        """Write the dequantized weights of ``state`` into ``model`` (in place) and return it.

        Methods that quantize more than weights (activations) override this to install their
        eval-time behaviour too.
        """
        return load_weights(model, state, cls._restore_param)

    # -------------------------------------------------- multi-phase hooks (docs/INTERFACES.md)
    @property
    def phase(self) -> str:
        """Human-readable training phase (logged in history); single-phase methods say "train"."""
        return "train"

    def on_epoch_end(self, epoch: int, total_epochs: int) -> bool:
        """Called by the loop after each training epoch (0-based ``epoch``).

        Returns:
            True when the set of trainable tensors changed: the loop must rebuild its optimizer
            from the parameters with ``requires_grad`` and call :meth:`setup_optimizer` again.
        """
        return False

    #: under data parallelism: True when the random draws of a training step (pseudo quantization
    #: noise, Quant-Noise masks) should be independent per process; False keeps them identical on
    #: every process (one-shot MPQ's sampled sub-networks must agree). docs/cluster.md
    independent_noise: tp.ClassVar[bool] = False

    #: how many training batches the loop puts in the :class:`Calibration` given to
    #: :meth:`finalize` (0: the method needs none and gets ``None``).
    calibration_batches: int = 0

    def finalize(self, calibration: tp.Optional[Calibration] = None) -> bool:
        """Complete pending phases before the final evaluation/export; same return as above.

        Args:
            calibration: task + a few fixed training batches when :attr:`calibration_batches`
                is positive (search, BN recalibration), else None.
        """
        return False

    def train_step(self, task: tp.Any, model: nn.Module, batch: tp.Any
                   ) -> tp.Tuple[torch.Tensor, tp.Dict[str, float]]:
        """One training micro-step's loss, called by the loop instead of ``task.step``.

        Methods that need several forwards per step (one-shot supernets: max-bit path + sampled
        sub-networks with distillation) combine them into the returned loss; the loop adds
        :meth:`penalty_term` and runs the backward. Default: ``task.step(model, batch)``.
        """
        return task.step(model, batch)

    def state_dict(self) -> tp.Dict[str, tp.Any]:
        """Quantizer state for checkpoints (weights_only-safe): its learnable parameters."""
        return {"params": [p.detach().cpu().clone() for p in self.quantizer_parameters()]}

    def load_state_dict(self, state: tp.Dict[str, tp.Any]) -> None:
        """Inverse of :meth:`state_dict`, called on resume before the optimizer is built."""
        load_tensors(self.quantizer_parameters(), state.get("params", []), self.name)

    def true_size_bytes(self) -> int:
        """Length in bytes of the serialized packed state (what would be written to disk)."""
        return len(serialize(self.export()))


class NoQuantizer(BaseQuantizer):
    """The null object: float model, exported as float32 (or float16) tensors."""
    name = "none"
    display = Display("Float", color="tab:blue")

    def _accepts(self, name, module, attr, param) -> bool:
        return False

