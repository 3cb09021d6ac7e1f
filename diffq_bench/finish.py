"""After training: best state -> finalize -> true-quantized test -> export -> restore check.

The reported test metric is measured with true quantization (the quantizer's eval weights), then
the exported ``quantized.th`` is restored into a freshly built model, which must reproduce the
evaluated one (``finish.restore_check`` in conf/config.yaml):

- always: every weight and buffer of the restored model equals, bit for bit, what the evaluated
  model used (:meth:`~diffq_bench.quant.BaseQuantizer.eval_weights`, its buffers); a difference
  ends the run FAILED, naming the tensor;
- ``subset`` (default): both models are evaluated on the first ``finish.restore_subset`` items of
  the test set (``task.eval_subset``'s unit) and must agree (``test_<metric>_subset`` and
  ``test_<metric>_subset_restored``); a second full test pass doubled test time at paper scale;
- ``full``: the restored model is evaluated on the whole test set (``test_<metric>_restored``).

``restore_exact`` is 1.0 when the metrics compared agree exactly; ``restore_check`` says which
check ran.
"""
from __future__ import annotations

import contextlib
import logging
import typing as tp
import zlib

import torch
from torch import nn

from . import checkpoint as ckpt
from . import distributed, io
from .quant import Calibration, deserialize, restore, serialize
from .train import Trainer, check_finite_metrics, unique_params

logger = logging.getLogger(__name__)
MB = 2 ** 20


def calibration(trainer: Trainer) -> tp.Optional[Calibration]:
    """The first ``quantizer.calibration_batches`` training batches (None when it wants none).

    Built under ``torch.random.fork_rng`` so the run's RNG stays untouched.
    """
    n = int(trainer.quantizer.calibration_batches)
    if n <= 0:
        return None
    with torch.random.fork_rng(devices=[]):
        batches = []
        for batch in trainer.task.train_batches(int(trainer.train_cfg["epochs"])):
            if len(batches) >= n:
                break
            batches.append(batch)
    return Calibration(task=trainer.task, batches=batches)


def best_state(trainer: Trainer) -> tp.Dict[str, tp.Any]:
    """best.th, or, when it is missing, unreadable or malformed, a rebuilt one: best.th is derived
    state, so a run never fails (or asks to be restarted) for it. The final weights are validated
    again and become the best state; when the lost best epoch was not the last one, the change is
    logged (the result's ``best_epoch`` shows the epoch actually used)."""
    xp = trainer.xp
    try:
        best = ckpt.load(xp.best_path)
        if isinstance(best.get("model"), dict) and isinstance(best.get("quantizer"), dict):
            return best
        problem = "has no model or quantizer state"
    except (FileNotFoundError, io.LoadError) as exc:
        problem = str(exc)
    lost = int(trainer.best["epoch"])
    averaged = trainer.ema.swapped() if trainer.ema is not None else contextlib.nullcontext()
    with averaged:  # the weights validation selects (train.ema_decay)
        trainer.model.eval()
        with torch.no_grad():
            valid = trainer.evaluate(trainer.model, "valid")
        check_finite_metrics(valid, "valid (rebuilding best.th)")
        trainer.best = {"value": float(valid[trainer.task.metric]), "epoch": int(trainer.epoch)}
        best = {"model": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                "quantizer": trainer.quantizer.state_dict(), **trainer.best}
    if trainer.dist.is_main:
        ckpt.save(best, xp.best_path)
    message = f"best.th rebuilt from the final weights (epoch {trainer.epoch}): {problem}"
    if lost != trainer.epoch:
        message += f"; the weights of the best epoch {lost} were lost, epoch {trainer.epoch} is used instead"
    logger.warning(message)
    if trainer.dist.is_main:
        xp.log(f"warning: {message}")
    return best


RESTORE_CHECKS = ("subset", "full")


class RestoreMismatch(RuntimeError):
    """The exported file does not reproduce the evaluated model."""


def check_restored(fresh: nn.Module, weights: tp.Mapping[str, torch.Tensor],
                   buffers: tp.Mapping[str, torch.Tensor]) -> int:
    """Every parameter and buffer of ``fresh`` (the restored model) equals, bit for bit, the one of
    the same name the evaluated model used: ``weights`` (its quantizer's eval weights) and
    ``buffers``. A tensor of ``fresh`` with no counterpart of that name is the restore's own (the
    plain BatchNorm one-shot MPQ fills from the chosen bit-width pair): the metric check covers it.

    Returns:
        the number of tensors compared.
    Raises:
        RestoreMismatch: the first tensor that differs, named.
    """
    compared = 0
    for kind, named, reference in (("weight", fresh.named_parameters(remove_duplicate=False), weights),
                                   ("buffer", fresh.named_buffers(), buffers)):
        for name, value in named:
            want = reference.get(name)
            if want is None:
                continue
            value = value.detach()
            if want.shape != value.shape or want.dtype != value.dtype or \
                    not torch.equal(value, want.detach().to(value.device)):
                diff = "shape/dtype differs" if want.shape != value.shape or want.dtype != value.dtype else \
                    f"{int((value != want.to(value.device)).sum())} of {value.numel()} entries differ"
                raise RestoreMismatch(f"the exported quantized.th does not reproduce the evaluated model: "
                                      f"restored {kind} {name!r}: {diff} (an export/restore bug of the "
                                      "quantizer; the run's test metric is still the evaluated model's)")
            compared += 1
    return compared


@contextlib.contextmanager
def subset_of_test(task: tp.Any, items: int) -> tp.Iterator[int]:
    """Evaluate only the first ``items`` test items (``task.eval_subset``, in its unit; a debug
    run's smaller subset stays) for the duration of the block; yields the subset used."""
    before = int(task.eval_subset)
    task.eval_subset = min(before, items) if before else items
    try:
        yield task.eval_subset
    finally:
        task.eval_subset = before


def finish(trainer: Trainer) -> tp.Dict[str, tp.Any]:
    """Test, export and check the best state of a fitted :class:`~diffq_bench.train.Trainer`.

    Returns:
        the run's metrics (``result.json``'s ``metrics``; schema in docs/INTERFACES.md).
    """
    task, model, quantizer, xp = trainer.task, trainer.model, trainer.quantizer, trainer.xp
    if trainer.best["value"] is None:
        raise RuntimeError(f"no validated epoch was small enough to be the best: train.best_max_size_mb="
                           f"{trainer.train_cfg.get('best_max_size_mb')} MiB; smallest seen "
                           f"{min(h['true_size_mb'] for h in trainer.history if 'true_size_mb' in h):.4g} "
                           "MiB (raise lambda or the target)")
    distributed.barrier()  # rank 0 wrote best.th
    best = best_state(trainer)
    model.load_state_dict(best["model"])
    quantizer.load_state_dict(best["quantizer"])
    quantizer.finalize(calibration(trainer))
    metric = task.metric
    model.eval()
    with torch.no_grad():
        test = trainer.evaluate(model, "test")
    check_finite_metrics(test, "test")
    packed = serialize(quantizer.export())
    if trainer.dist.is_main:
        io.write_bytes(xp.quantized_path, packed)
    distributed.barrier()
    finish_cfg = trainer.cfg.get("finish") or {}
    check = str(finish_cfg.get("restore_check", "subset"))
    if check not in RESTORE_CHECKS:
        raise ValueError(f"finish.restore_check must be one of {', '.join(RESTORE_CHECKS)}, got {check!r}")
    if check == "subset" and not hasattr(task, "eval_subset"):
        logger.info("task %s has no eval_subset: the restore check evaluates the whole test set", task.name)
        check = "full"
    # A fresh model rebuilt only from the exported file must be the evaluated model: a user of
    # quantized.th gets the reported metric. Buffers (BatchNorm statistics) are not weights and
    # are carried over from the trained model.
    fresh = task.build_model().to(trainer.device)
    # The float reference is the task's architecture as built, not the trained model: some
    # quantizers add parameters to it (one-shot MPQ's BatchNorm per bit-width pair).
    float_params = unique_params(fresh)
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    with torch.no_grad():
        for name, buf in fresh.named_buffers():
            if name in buffers:
                buf.copy_(buffers[name])
    restore(fresh, deserialize(xp.quantized_path.read_bytes()))
    check_restored(fresh, quantizer.eval_weights(), buffers)
    fresh.eval()
    if check == "full":
        with torch.no_grad():
            restored = trainer.evaluate(fresh, "test")
        check_finite_metrics(restored, "test of the restored quantized.th")
        compared = {f"test_{metric}_restored": float(restored[metric])}
        exact = restored[metric] == test[metric]
    else:
        with subset_of_test(task, int(finish_cfg.get("restore_subset", 8))) as items, torch.no_grad():
            live = trainer.evaluate(model, "test")
            restored = trainer.evaluate(fresh, "test")
        check_finite_metrics(restored, "test subset of the restored quantized.th")
        compared = {f"test_{metric}_subset": float(live[metric]),
                    f"test_{metric}_subset_restored": float(restored[metric]), "restore_subset": items}
        exact = restored[metric] == live[metric]
    true_bytes = len(packed)
    float_mb = float_params * 4 / MB
    metrics: tp.Dict[str, tp.Any] = {f"test_{k}": float(v) for k, v in test.items()}
    metrics.update({
        f"valid_{metric}": float(trainer.best["value"]),
        **compared, "restore_check": check, "restore_exact": float(exact),
        "true_size_mb": true_bytes / MB, "float_size_mb": float_mb,
        "compressed_size_mb": len(zlib.compress(packed)) / MB,
        # the float run is the reference itself: 1 (its file's few header bytes are not a compression)
        "compression": float_mb / (true_bytes / MB) if quantizer.qparams else 1.0,
        # nothing quantized (the float run): its weights are stored as float32
        "bits_per_weight": quantizer.bits_per_weight() if quantizer.qparams else 32.0,
        "analytic_size_mb": quantizer.true_model_size(),
        "params": float_params, "best_epoch": int(trainer.best["epoch"]),
        "steps": trainer.global_step, "wall_time_s": trainer.wall_seconds(),
    })
    # unreadable files left out on request (task.skip_bad_files): recorded only when some were
    metrics.update({f"skipped_files_{split}": int(n) for split, n in task.skipped_files().items() if n})
    if not exact:
        logger.warning("restored model gives test %s %.6g, live model %.6g (%s check): export is not exact",
                       metric, restored[metric], test[metric] if check == "full" else live[metric], check)
    return metrics
