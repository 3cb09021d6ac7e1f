"""The one generic training loop: task + quantizer + optimizer, with exact resume.

The loop never branches on a task or quantizer name: it calls ``task.step/evaluate`` and the
quantizer's hooks (``penalty_term``, ``setup_optimizer``, ``on_epoch_end``, ``finalize``,
``state_dict``, ``export``...). A run resumed from any checkpoint (epoch end, every N steps or
seconds, or on preemption) reproduces the uninterrupted run exactly on CPU: the checkpoint holds
model, optimizers, quantizer state, scaler, RNG states (also the one at the start of the epoch, to
rebuild the same batch order), step counters, running train metrics, history and best state.
"""
from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import typing as tp

import torch
from torch import nn

from . import checkpoint as ckpt
from . import distributed, init
from .ema import WeightEMA
from .optim import OPTIMIZERS, Schedule
from .quant import BaseQuantizer, get_quantizer
from .tasks import Task
from .xp import Xp, parent_config

logger = logging.getLogger(__name__)

#: Set (e.g. by a SLURM signal handler) to checkpoint at the next step boundary and stop.
PREEMPT = threading.Event()
#: seconds between heartbeats of a training run (status.json; diffq-bench-status shows STALE after
#: ten missed ones)
HEARTBEAT_S = 60.0


class Preempted(RuntimeError):
    """Raised after the checkpoint was written because :data:`PREEMPT` was set."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def unique_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() skips tied duplicates


def check_finite_metrics(metrics: tp.Mapping[str, tp.Any], where: str) -> None:
    """FloatingPointError naming the first NaN/inf metric of an evaluation (never a DONE with NaN)."""
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise FloatingPointError(f"{where}: {key} is {value}: the model diverged (lower the lr "
                                     "or enable train.clip_grad)")


class Trainer:
    """Train, validate, select the best epoch, test with true quantization, export.

    Args:
        cfg: the resolved config as plain containers (``task``, ``quant``, ``optim``, ``train``, ...).
        task: the task, already ``setup()``.
        xp: the run folder (checkpoint, best state, history, export).
        device: where the model runs.
        runtime: ``progress``, ``checkpoint_every_steps``, ``checkpoint_every_s``.
    """

    def __init__(self, cfg: tp.Dict[str, tp.Any], task: Task, xp: Xp, device: torch.device,
                 runtime: tp.Optional[tp.Dict[str, tp.Any]] = None):
        self.cfg, self.task, self.xp, self.device = cfg, task, xp, device
        self.train_cfg = cfg["train"]
        self.dist = distributed.current()  # this process's place (rank 0 of 1 without torchrun/SLURM tasks)
        self.grad_accum = int((cfg.get("dist") or {}).get("grad_accum", 1))
        self.seed = int(cfg.get("seed", 0))
        self.runtime = {"progress": True, "checkpoint_every_steps": 0, "checkpoint_every_s": 0,
                        **(runtime or {})}
        self.model = task.build_model()
        if not xp.checkpoint_path.exists():  # a resumed run gets everything from its checkpoint
            self._load_initial_weights()
        self.model.to(device)
        if self.dist.active and (cfg.get("dist") or {}).get("sync_bn"):
            self.model = distributed.sync_batchnorm(self.model, device)
        quant_kw = {k: v for k, v in cfg["quant"].items() if k != "name"}
        self.quantizer: BaseQuantizer = get_quantizer(cfg["quant"]["name"], self.model, **quant_kw)
        self.amp = bool(self.train_cfg["amp"]) and device.type == "cuda"
        self.amp_dtype = getattr(torch, self.train_cfg["amp_dtype"])
        self.scaler = torch.amp.GradScaler("cuda") if self.amp and self.amp_dtype == torch.float16 else None
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.history: tp.List[tp.Dict[str, tp.Any]] = []
        self.best: tp.Dict[str, tp.Any] = {"value": None, "epoch": -1}
        self.wall_time = 0.0
        self.sums: tp.Dict[str, float] = {}
        self.count = 0
        self.epoch_rng: tp.Optional[tp.Dict[str, tp.Any]] = None
        self.optimizers: tp.List[torch.optim.Optimizer] = []
        self.schedule = Schedule("constant", 1)  # the run's, once fit() knows its length
        self.ema: tp.Optional[WeightEMA] = None

    def _load_initial_weights(self) -> None:
        """``init``: the weights of a file or of a finished parent run (:mod:`diffq_bench.init`)."""
        spec = init.parse(self.cfg.get("init"))
        if spec is None:
            return
        path = spec.path
        if spec.is_run:
            parent = Xp(self.xp.folder.parent.parent, parent_config(self.cfg, spec))
            state = (parent.read_status() or {}).get("state", "NEW")
            if not parent.is_done():
                raise init.InitError(
                    f"init run {parent.sig} ({' '.join(spec.overrides)}) is {state}, not DONE: run it "
                    "first (a grid that lists it runs it before this one)")
            path = parent.best_path
        init.load_into(self.model, init.read_state_dict(path), init.describe(spec))
        logger.info("initial weights from %s", init.describe(spec))
        if self.dist.is_main:
            self.xp.log(f"initial weights from {init.describe(spec)}")

    # ------------------------------------------------------------------------- optimizers
    def _build_optimizers(self) -> None:
        optim = self.cfg["optim"]
        params = [p for p in self.model.parameters() if p.requires_grad]
        main = OPTIMIZERS[optim["name"]](params, optim)
        extra = self.quantizer.setup_optimizer(main, lr=optim.get("quant_lr"),
                                               separate_adam=bool(optim.get("quant_separate_adam")))
        for group in main.param_groups:  # the schedule scales each group from its own peak lr
            group.setdefault("initial_lr", group["lr"])
        self.optimizers = [main] + list(extra)
        decay = float(self.train_cfg.get("ema_decay", 0.0))
        averaged = list(self.model.parameters()) + self.quantizer.quantizer_parameters()
        if decay > 0 and (self.ema is None or not self.ema.matches(averaged)):
            self.ema = WeightEMA(averaged, decay)

    def _averaged(self) -> tp.ContextManager[None]:
        """The EMA weights in place (``train.ema_decay``) for evaluation and the best state."""
        return self.ema.swapped() if self.ema is not None else contextlib.nullcontext()

    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: one per (global) batch, capped by ``train.steps_per_epoch``.

        The batch count comes from ``len(task.train_batches(0))`` or, for tasks that yield batches
        from a generator, from the optional ``task.num_train_batches()``.
        """
        cap = self.train_cfg.get("steps_per_epoch")
        n_batches = self.task.num_train_batches()
        if n_batches is None:
            batches = self.task.train_batches(0)
            if not hasattr(batches, "__len__"):
                if cap is None:
                    raise ValueError(f"task {self.task.name!r} yields training batches without a length "
                                     "and has no num_train_batches(); set train.steps_per_epoch")
                return int(cap)
            n_batches = len(batches)  # type: ignore[arg-type]
        n = int(n_batches)
        if n == 0:
            raise ValueError(f"task {self.task.name!r} has no training batch")
        return min(n, int(cap)) if cap is not None else n

    # ------------------------------------------------------------------------- checkpoints
    def _state(self) -> tp.Dict[str, tp.Any]:
        return {"sig": self.xp.sig, "model": self.model.state_dict(),
                "quantizer": self.quantizer.state_dict(),
                "optimizers": [opt.state_dict() for opt in self.optimizers],
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": ckpt.rng_state(), "epoch_rng": self.epoch_rng, "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "history": self.history, "best": self.best, "wall_time": self.wall_seconds(),
                "sums": self.sums, "count": self.count,
                "ema": self.ema.state_dict() if self.ema is not None else None}

    def save_checkpoint(self) -> None:
        if self.dist.is_main:  # every rank holds the same state; one writes it
            ckpt.save(self._state(), self.xp.checkpoint_path)
        self._last_save = time.monotonic()

    def _load_checkpoint(self) -> tp.Optional[tp.Dict[str, tp.Any]]:
        if not self.xp.checkpoint_path.exists():
            return None
        state = ckpt.load(self.xp.checkpoint_path)
        if state.get("sig") != self.xp.sig:
            raise ckpt.CheckpointError(f"{self.xp.checkpoint_path} belongs to run {state.get('sig')}, "
                                       f"not {self.xp.sig}; {ckpt.restart_advice(self.xp.checkpoint_path)}")
        ckpt.check_trainer_state(state, self.xp.checkpoint_path)
        self.model.load_state_dict(state["model"])
        self.quantizer.load_state_dict(state["quantizer"])
        self._build_optimizers()
        if len(state["optimizers"]) != len(self.optimizers):
            raise ckpt.CheckpointError(f"{self.xp.checkpoint_path} holds {len(state['optimizers'])} "
                                       f"optimizer state(s), the run builds {len(self.optimizers)}; "
                                       f"{ckpt.restart_advice(self.xp.checkpoint_path)}")
        for opt, opt_state in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(opt_state)
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        for key in ("epoch", "step_in_epoch", "global_step", "history", "best", "sums", "count",
                    "epoch_rng"):
            setattr(self, key, state[key])
        self.wall_time = float(state["wall_time"])
        return state

    def wall_seconds(self) -> float:
        """Training wall time of the run so far, over all its attempts."""
        return self.wall_time + time.monotonic() - self._t0

    # ------------------------------------------------------------------------- the loop
    def _micro_step(self, batch: tp.Any, accum: int, micro: int = 0) -> None:
        own_rng = self.dist.active and self.quantizer.independent_noise
        forked = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [],
                                       enabled=own_rng)
        with forked, distributed.training_step():
            if own_rng:  # this rank's noise: independent of the others, the same on resume
                torch.manual_seed(distributed.step_seed(self.seed, self.global_step, micro, self.dist.rank))
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
                loss, metrics = self.quantizer.train_step(self.task, self.model, batch)
        penalty = self.task.penalty_scale * self.quantizer.penalty_term()
        total = loss.float() + penalty
        if not bool(torch.isfinite(total.detach())):
            raise FloatingPointError(f"non-finite loss {float(total):.4g} at epoch {self.epoch + 1}, "
                                     f"step {self.step_in_epoch + 1}: lower the lr or enable train.clip_grad")
        total = total / accum
        (self.scaler.scale(total) if self.scaler is not None else total).backward()
        values = {"loss": float(loss.detach()), "penalty": float(penalty.detach()), **metrics}
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.count += 1

    def _optimizer_step(self, total_steps: int) -> None:
        tcfg = self.train_cfg
        factor = self.schedule.factor(self.global_step)
        for group in self.optimizers[0].param_groups:
            group["lr"] = group["initial_lr"] * factor
        if self.dist.active:  # every trainable tensor, the quantizer's included
            distributed.average_gradients(self.trainable())
        if self.scaler is not None:
            for opt in self.optimizers:
                self.scaler.unscale_(opt)
        if tcfg["clip_grad"] > 0:
            torch.nn.utils.clip_grad_norm_(self.clipped_parameters(), tcfg["clip_grad"])
        if tcfg.get("clip_grad_value", 0) > 0:
            torch.nn.utils.clip_grad_value_(self.clipped_parameters(), tcfg["clip_grad_value"])
        for opt in self.optimizers:
            if self.scaler is not None:
                self.scaler.step(opt)
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.update()
        if self.dist.active:  # BatchNorm statistics: rank 0's, as DistributedDataParallel
            distributed.broadcast_tensors(list(self.model.buffers()))
        if self.ema is not None:
            self.ema.update()
        self.global_step += 1
        self.step_in_epoch += 1

    def _check_finite_weights(self) -> None:
        """A diverged run fails here (before it is validated, selected or exported as DONE)."""
        named = list(self.model.named_parameters()) + [
            (f"quantizer parameter #{i}", p) for i, p in enumerate(self.quantizer.quantizer_parameters())]
        norms = torch._foreach_norm([p.detach() for _, p in named]) if named else []
        for (name, _), norm in zip(named, norms):
            if not bool(torch.isfinite(norm)):
                raise FloatingPointError(
                    f"non-finite weights ({name}) after epoch {self.epoch + 1}: the run diverged; "
                    "lower the lr (optim.lr) or enable train.clip_grad")

    def trainable(self) -> tp.List[torch.Tensor]:
        """The model's and the quantizer's parameters, each once (what data parallelism reduces)."""
        seen: tp.Set[int] = set()
        out = []
        for p in list(self.model.parameters()) + self.quantizer.quantizer_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def clipped_parameters(self) -> tp.List[torch.Tensor]:
        """What ``train.clip_grad`` clips together, by one global norm: the model's parameters and,
        with ``train.clip_quantizer_params`` (default), the quantizer's learnable parameters (DiffQ
        bit logits, LSQ/DSQ steps and bounds, one-shot MPQ steps), as the official diffq package
        does by registering them on the model (its CIFAR recipe clips ``model.parameters()``)."""
        params = list(self.model.parameters())
        if self.train_cfg.get("clip_quantizer_params", True):
            params += self.quantizer.quantizer_parameters()
        return params

    def _next_batch(self, iterator: tp.Iterator[tp.Any], steps: int) -> tp.Any:
        try:
            return next(iterator)
        except StopIteration:
            raise RuntimeError(
                f"task {self.task.name!r} ran out of training batches in epoch {self.epoch + 1} "
                f"after {self.step_in_epoch} optimizer steps; expected {steps} batches "
                "(its batch count must not vary between epochs)") from None

    def _train_epoch(self, steps: int, total_steps: int) -> tp.Dict[str, float]:
        from tqdm import tqdm
        accum = self.grad_accum
        pieces = accum * self.dist.world  # this rank's micro-batch k is piece k * world + rank
        resumed = self.step_in_epoch > 0
        if resumed:  # same batch order: rebuild the iterator from the epoch's starting RNG
            rng_now = ckpt.rng_state()
            ckpt.set_rng_state(self.epoch_rng)
        else:
            self.epoch_rng = ckpt.rng_state()
            self.sums, self.count = {}, 0
        self.model.train()
        own = self.dist.active and self.task.loads_own_shard()  # the task reads only this rank's part
        self.task.train_shard = (self.dist.rank, self.dist.world, accum) if own else (0, 1, 1)
        iterator = iter(self.task.train_batches(self.epoch))
        for _ in range(self.step_in_epoch):
            self._next_batch(iterator, steps)
        if resumed:
            ckpt.set_rng_state(rng_now)
        every_steps = int(self.runtime["checkpoint_every_steps"])
        every_s = float(self.runtime["checkpoint_every_s"])
        bar = tqdm(total=steps, initial=self.step_in_epoch, leave=False, dynamic_ncols=True,
                   desc=f"epoch {self.epoch + 1}/{self.train_cfg['epochs']}",
                   disable=not (self.runtime["progress"] and self.dist.is_main))
        shown = -math.inf
        try:
            while self.step_in_epoch < steps:
                batch = self._next_batch(iterator, steps)
                for k in range(accum):
                    piece = (distributed.shard_batch(batch, k, accum) if own
                             else distributed.shard_batch(batch, k * self.dist.world + self.dist.rank, pieces))
                    self._micro_step(piece, accum, k)
                self._optimizer_step(total_steps)
                bar.update(1)
                if not bar.disable and time.monotonic() - shown >= 5.0:
                    # the size costs a pass over every bit logit: refresh it every few seconds only
                    shown = time.monotonic()
                    bar.set_postfix(loss=f"{self.sums['loss'] / self.count:.4g}",
                                    bits=f"{self.quantizer.bits_per_weight() if self.quantizer.qparams else 32.0:.2f}",
                                    size=f"{self.quantizer.true_model_size():.3g}MiB", refresh=False)
                if self._stop_requested():
                    self.save_checkpoint()
                    raise Preempted(f"preempted at epoch {self.epoch + 1} step {self.step_in_epoch}; "
                                    "checkpoint saved")
                if (every_steps and self.global_step % every_steps == 0) or (
                        every_s and time.monotonic() - self._last_save >= every_s):
                    self.save_checkpoint()
                if self.dist.is_main and time.monotonic() - self._last_beat >= HEARTBEAT_S:  # liveness
                    self._last_beat = time.monotonic()
                    self.xp.heartbeat()
        finally:
            bar.close()
            self.task.train_shard = (0, 1, 1)  # other readers (calibration) get whole batches
        if self.dist.active:  # the epoch's train metrics over every rank's micro-batches
            sums = distributed.sum_floats({**self.sums, "__count__": float(self.count)})
            count = sums.pop("__count__")
            return {k: v / max(1.0, count) for k, v in sums.items()}
        return {k: v / max(1, self.count) for k, v in self.sums.items()}

    def _stop_requested(self) -> bool:
        """PREEMPT on any rank stops every rank at the same step (one consistent checkpoint)."""
        if not self.dist.active:
            return PREEMPT.is_set()
        return distributed.sum_floats({"stop": float(PREEMPT.is_set())})["stop"] > 0

    def evaluate(self, model: nn.Module, split: str) -> tp.Dict[str, float]:
        """``task.evaluate`` on ``split``; under data parallelism sharded over the ranks when the
        task gives per-batch parts (the result equals the single-process one exactly), else run on
        rank 0 and shared."""
        if not self.dist.active:
            return self.task.evaluate(model, split)
        self.task.eval_shard = (self.dist.rank, self.dist.world)
        try:
            parts = self.task.evaluate_parts(model, split)
        finally:
            self.task.eval_shard = (0, 1)
        if parts is not None:
            return self.task.combine_parts(distributed.gather_parts(parts))
        metrics = self.task.evaluate(model, split) if self.dist.is_main else None
        return distributed.broadcast_object(metrics)

    def _validate(self, entry: tp.Dict[str, tp.Any], metric: str) -> None:
        """Validate (the EMA weights, if any), record it in ``entry`` and keep the best state."""
        with self._averaged():
            self.model.eval()
            with torch.no_grad():
                valid = self.evaluate(self.model, "valid")
            check_finite_metrics(valid, f"valid (epoch {self.epoch + 1})")
            entry["valid"] = valid
            entry["true_size_mb"] = self.quantizer.true_model_size()
            target = self.train_cfg.get("best_max_size_mb")
            small = target is None or entry["true_size_mb"] <= target
            if small and self.task.is_better(float(valid[metric]), self.best["value"]):
                self.best = {"value": float(valid[metric]), "epoch": self.epoch + 1}
                if self.dist.is_main:
                    ckpt.save({"model": self.model.state_dict(), "quantizer": self.quantizer.state_dict(),
                               **self.best}, self.xp.best_path)

    def fit(self) -> None:
        """Train all epochs (resuming from the checkpoint if there is one)."""
        self._t0 = self._last_save = self._last_beat = time.monotonic()
        with ckpt.restoring(self.xp.checkpoint_path):  # a checkpoint that does not fit: one clear error
            state = self._load_checkpoint()
        if state is None:
            self._build_optimizers()
        epochs = int(self.train_cfg["epochs"])
        pieces = self.grad_accum * self.dist.world
        batch = getattr(self.task, "batch_size", None)
        if isinstance(batch, int) and batch % pieces:
            raise ValueError(f"task.batch_size={batch} (the global batch) does not split into {pieces} equal "
                             f"micro-batches ({self.dist.world} processes x dist.grad_accum={self.grad_accum}); "
                             "choose a batch size that is a multiple of processes x dist.grad_accum")
        steps = self.steps_per_epoch()
        if state is not None:  # after steps_per_epoch(), which may draw from the global RNG
            ckpt.set_rng_state(state["rng"])
            logger.info("resuming run %s at epoch %d step %d", self.xp.sig, self.epoch + 1,
                        self.step_in_epoch)
            if self.dist.is_main:
                self.xp.log(f"resumed at epoch {self.epoch + 1} step {self.step_in_epoch}")
        total_steps = steps * epochs
        self.schedule = Schedule.from_config(self.train_cfg, total_steps, steps)
        metric = self.task.metric
        while self.epoch < epochs:
            start = time.monotonic()
            train_metrics = self._train_epoch(steps, total_steps)
            self._check_finite_weights()
            if self.quantizer.on_epoch_end(self.epoch, epochs):
                if self.dist.active:  # one k-means / phase decision for all ranks: rank 0's
                    distributed.broadcast_tensors(self.trainable() + list(self.model.buffers()))
                self._build_optimizers()  # new trainable set: momentum restarts, as in iPQ
            entry: tp.Dict[str, tp.Any] = {"epoch": self.epoch + 1, "train": train_metrics,
                                           "phase": self.quantizer.phase}
            last = self.epoch + 1 == epochs
            if last or (self.epoch + 1) % self.train_cfg["eval_every"] == 0:
                self._validate(entry, metric)
            entry["time"] = time.monotonic() - start
            self.history.append(entry)
            self.epoch += 1
            self.step_in_epoch = 0
            if self.dist.is_main:
                self.xp.write_history(self.history)
            self.save_checkpoint()
            if self.dist.is_main:
                self.xp.write_status("RUNNING", epoch=self.epoch)
            summary = f"epoch {self.epoch}/{epochs} train loss {train_metrics.get('loss', math.nan):.4f}"
            if "valid" in entry:
                summary += f" | valid {metric} {entry['valid'][metric]:.4f} | size {entry['true_size_mb']:.3f} MiB"
            logger.info(summary)
            if self.dist.is_main:
                self.xp.log(summary)


__all__ = ["PREEMPT", "Preempted", "Trainer", "resolve_device", "unique_params"]
