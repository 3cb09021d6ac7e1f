"""Stage 1 of one-shot MPQ: the supernet's training step and its distillation targets.

A sampled sub-network learns from the max-bit one. Tasks declare ``distill_loss(student,
teacher)`` (:class:`~diffq_bench.tasks.base.Task`; None by default); without one,
:func:`output_mse` compares the floating tensor leaves of the two outputs (teacher detached with
:func:`detach_tree`).
"""
from __future__ import annotations

import typing as tp

import torch
from torch import nn

from ..errors import QuantizerError
from .bnpairs import SwitchableBN
from .space import Config


def _tensors(obj: tp.Any) -> tp.List[torch.Tensor]:
    if torch.is_tensor(obj):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    return []


def output_mse(student: tp.Any, teacher: tp.Any) -> torch.Tensor:
    """Generic distillation: mean squared error over the floating tensor leaves of the outputs."""
    pairs = list(zip(_tensors(student), _tensors(teacher)))
    if not pairs:
        raise QuantizerError("cannot distil: the model output holds no floating tensor; give the task "
                             "a distill_loss(student, teacher) method")
    return sum(nn.functional.mse_loss(s.float(), t.detach().float()) for s, t in pairs) / len(pairs)


def detach_tree(obj: tp.Any) -> tp.Any:
    """``obj`` with every tensor detached (tensors, dicts, lists, tuples, named tuples)."""
    if torch.is_tensor(obj):
        return obj.detach()
    if isinstance(obj, dict):
        return {k: detach_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if hasattr(obj, "_fields"):
            return type(obj)(*map(detach_tree, obj))
        return type(obj)(detach_tree(v) for v in obj)
    return obj


class Supernet(tp.Protocol):
    """What :func:`supernet_step` needs of a one-shot quantizer (its public API)."""
    subnets: int
    kd_weight: float
    bn_align: float

    def set_config(self, cfg: Config) -> None: ...
    def active_config(self) -> Config: ...
    def max_config(self) -> Config: ...
    def sample_config(self) -> Config: ...


def supernet_step(net: Supernet, task: tp.Any, model: nn.Module, batch: tp.Any
                  ) -> tp.Tuple[torch.Tensor, tp.Dict[str, float]]:
    """One micro-step's loss: the max-bit sub-network (task loss), then ``net.subnets`` sampled
    ones with ``(1 - kd_weight)·task + kd_weight·KD(max -> sub) + bn_align·MSE(BN outputs)``.

    The active configuration is restored afterwards. Extra metrics (``mpq_sub_loss``, ``mpq_kd``,
    ``mpq_bn_align``) are the means over the sampled sub-networks.
    """
    containers = [m for m in model.modules() if isinstance(m, SwitchableBN)]
    captured: tp.Dict[int, torch.Tensor] = {}

    def forward(cfg: Config):
        net.set_config(cfg)
        seen: tp.Dict[str, tp.Any] = {}
        handle = model.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))
        captured.clear()
        try:
            loss, metrics = task.step(model, batch)
        finally:
            handle.remove()
        if "out" not in seen:
            raise QuantizerError("task.step did not call the model's forward: one-shot MPQ distils "
                                 "the outputs of model(...)")
        return loss, metrics, seen["out"], dict(captured)

    for bn in containers:
        bn.capture = lambda module, out: captured.__setitem__(id(module), out)
    rest = net.active_config()
    try:
        loss, metrics, teacher, bn_teacher = forward(net.max_config())
        teacher = detach_tree(teacher)
        total = loss
        extra = {"mpq_sub_loss": 0.0, "mpq_kd": 0.0, "mpq_bn_align": 0.0}
        distill = task.distill_loss or output_mse
        for _ in range(net.subnets):
            sub_loss, _, out, bn_outs = forward(net.sample_config())
            kd = distill(out, teacher)
            align = torch.zeros((), device=sub_loss.device)
            if net.bn_align > 0 and bn_outs:
                align = sum(nn.functional.mse_loss(o, bn_teacher[k].detach())
                            for k, o in bn_outs.items() if k in bn_teacher) / len(bn_outs)
            total = total + (1 - net.kd_weight) * sub_loss + net.kd_weight * kd + net.bn_align * align
            for key, value in (("mpq_sub_loss", sub_loss), ("mpq_kd", kd), ("mpq_bn_align", align)):
                extra[key] += float(value.detach()) / net.subnets
    finally:
        for bn in containers:
            bn.capture = None
        net.set_config(rest)
    return total, {**metrics, **(extra if net.subnets else {})}
