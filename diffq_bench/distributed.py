"""Data parallelism on torch.distributed: one run, N processes (one per GPU, or gloo on CPU).

How a run is split (docs/cluster.md):

- ``task.batch_size`` is the *global* batch of one optimizer step, whatever the hardware. Each of
  the ``world`` processes takes its share of every global batch, in ``dist.grad_accum`` micro-
  batches: ``micro = batch_size / (world * grad_accum)``. A run on 8 processes with accumulation 3
  is the same run (same signature, same result up to float rounding) as one on 24 processes, as
  fairseq's ``--update-freq``.
- Every process builds the same global batch order (the data RNG is identical on all ranks) and
  keeps its slices (:func:`shard_batch`); a task may instead shard its own loading
  (``Task.shard``) when reading the whole global batch on each process would waste I/O.
- Gradients of every trainable tensor (model and quantizer: DiffQ bit logits, LSQ steps, iPQ
  centroids...) are averaged across processes once per optimizer step (:func:`average_gradients`,
  fairseq's ``legacy_ddp`` scheme: one all-reduce per flattened bucket after the backward passes).
  Identical averaged gradients and identical optimizer math keep the parameters bit-identical on all
  ranks; buffers (BatchNorm statistics) are broadcast from rank 0 after each step, as
  DistributedDataParallel does before each forward.
- Random draws inside a training step are per rank for quantizers whose noise should be
  independent (``independent_noise``: DiffQ's pseudo quantization noise, Quant-Noise masks) and
  identical on all ranks for the others (one-shot MPQ's sampled sub-networks).
- Only rank 0 writes the run folder.

Processes are started by ``torchrun`` (its environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) or by SLURM through submitit (one task per GPU; the job side exports the same
variables from SLURM's environment).
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import hashlib
import logging
import os
import typing as tp
from pathlib import Path

import torch
import torch.distributed as tdist

logger = logging.getLogger(__name__)

_SYNC_INIT = False  # set while the training step runs on every rank (see sync_init)


@dataclasses.dataclass(frozen=True)
class Dist:
    """Where this process stands in its run (a single process: rank 0 of 1)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


SINGLE = Dist()


def env_world() -> Dist:
    """The process layout announced by torchrun (or exported from SLURM): a single process when
    ``WORLD_SIZE`` is unset or 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    return Dist(rank, world, local)


def setup(device: torch.device, backend: str = "auto", timeout_s: float = 1800.0) -> Dist:
    """Join the process group announced by the environment (idempotent); returns this process's
    place. ``backend``: ``auto`` (NCCL on CUDA, gloo on CPU), ``nccl`` or ``gloo``. Collectives
    that wait longer than ``timeout_s`` for a peer raise instead of hanging.
    """
    info = env_world()
    if not info.active:
        return info
    if not tdist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        tdist.init_process_group(backend, rank=info.rank, world_size=info.world,
                                 timeout=datetime.timedelta(seconds=float(timeout_s)))
        atexit.register(_leave_at_exit)
    return info


def current() -> Dist:
    """This process's place once :func:`setup` ran (a single process otherwise)."""
    if tdist.is_available() and tdist.is_initialized():
        return Dist(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return SINGLE


def local_device(device: torch.device) -> torch.device:
    """``cuda`` without an index becomes this process's GPU (``LOCAL_RANK``)."""
    if device.type == "cuda" and device.index is None and env_world().active:
        return torch.device("cuda", env_world().local_rank)
    return device


def shutdown(barrier_timeout_s: float = 300.0) -> None:
    """Leave the process group together: a barrier (every rank has finished its collectives), then
    ``destroy_process_group``. Without the barrier a rank that tore its gloo group down and exited
    first made a slower rank abort at exit under load ('terminate called without an active
    exception', SIGABRT: torchrun then reports the finished run as failed). A peer that never
    comes (gloo: ``barrier_timeout_s``) is logged and the group destroyed anyway."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return
    try:
        if tdist.get_backend() == "gloo":
            tdist.monitored_barrier(timeout=datetime.timedelta(seconds=barrier_timeout_s))
        else:
            tdist.barrier()
    except RuntimeError as exc:
        logger.warning("leaving the process group without the other ranks: %s", exc)
    tdist.destroy_process_group()


_done = False  # this process's last run ended normally (see _leave_at_exit)


def mark_done() -> None:
    """The run ended normally on this rank: leave the group with the others at exit."""
    global _done
    _done = True


def _leave_at_exit() -> None:
    """At interpreter exit, after a run that ended normally, :func:`shutdown`; after a failure
    nothing (a barrier could pair with a peer's pending collective)."""
    if _done:
        shutdown()


# ----------------------------------------------------------------------------- batches
def sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` with every BatchNorm computing its training statistics over all processes
    (``torch.nn.SyncBatchNorm``; same parameters, buffers and state-dict keys, so checkpoints and
    exports are unchanged). torch's SyncBatchNorm runs on CUDA only.

    Raises:
        ValueError: ``device`` is not a CUDA device.
    """
    check_sync_bn(device)
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def check_sync_bn(device: torch.device) -> None:
    """Raise ValueError (one line) when ``dist.sync_bn=true`` cannot run on ``device``."""
    if device.type != "cuda":
        raise ValueError(f"dist.sync_bn=true needs CUDA devices (torch's SyncBatchNorm does not run on "
                         f"{device.type}); set dist.sync_bn=false")


def shard_batch(batch: tp.Any, index: int, pieces: int) -> tp.Any:
    """Piece ``index`` of ``pieces`` equal slices of ``batch`` along its first dimension (tensors,
    recursively through tuples, lists and dicts; other values are kept whole)."""
    if pieces == 1:
        return batch
    if isinstance(batch, torch.Tensor):
        n = batch.shape[0]
        if n % pieces:
            raise ValueError(f"a batch of {n} does not split into {pieces} equal micro-batches "
                             "(task.batch_size must be a multiple of processes x dist.grad_accum)")
        size = n // pieces
        return batch[index * size:(index + 1) * size]
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard_batch(b, index, pieces) for b in batch)
    if isinstance(batch, dict):
        return {k: shard_batch(v, index, pieces) for k, v in batch.items()}
    return batch


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """A seed for the random draws of one micro-step on one rank (resume-stable)."""
    digest = hashlib.sha256(f"{seed}/{step}/{micro}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ----------------------------------------------------------------------------- collectives
def _buckets(tensors: tp.Sequence[torch.Tensor], limit: int = 1 << 24
             ) -> tp.Iterator[tp.List[torch.Tensor]]:
    bucket: tp.List[torch.Tensor] = []
    size = 0
    for t in tensors:
        if bucket and (t.dtype != bucket[0].dtype or t.device != bucket[0].device or size + t.numel() > limit):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


def _all_reduce_flat(tensors: tp.Sequence[torch.Tensor], op: tp.Any = None) -> None:
    for bucket in _buckets(tensors):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        tdist.all_reduce(flat, op=op or tdist.ReduceOp.SUM)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def average_gradients(params: tp.Sequence[torch.Tensor]) -> None:
    """Average ``.grad`` of ``params`` across the ranks; a tensor without a gradient on some rank
    counts as zeros there, and stays without one only if no rank has one (as a single process
    with the whole batch would see)."""
    info = current()
    if not info.active:
        return
    params = [p for p in params if p.requires_grad]
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
    if params and params[0].device.type == "cuda":
        has = has.to(params[0].device)
    tdist.all_reduce(has, op=tdist.ReduceOp.MAX)
    live = []
    for p, flag in zip(params, has.tolist()):
        if flag:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            live.append(p.grad)
    _all_reduce_flat(live)
    for g in live:
        g.div_(info.world)


def broadcast_tensors(tensors: tp.Sequence[torch.Tensor], src: int = 0) -> None:
    """Rank ``src``'s values of ``tensors`` on every rank (in place)."""
    if not current().active:
        return
    with torch.no_grad():
        for bucket in _buckets([t for t in tensors if t.numel()]):
            flat = torch.cat([t.detach().reshape(-1) for t in bucket])
            tdist.broadcast(flat, src)
            offset = 0
            for t in bucket:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def sum_floats(values: tp.Mapping[str, float]) -> tp.Dict[str, float]:
    """Sum of a dict of floats over the ranks (float64; every rank passes the same keys)."""
    if not current().active:
        return dict(values)
    keys = sorted(values)
    device = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else "cpu"
    flat = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    tdist.all_reduce(flat)
    return dict(zip(keys, flat.tolist()))


def broadcast_object(obj: tp.Any, src: int = 0) -> tp.Any:
    """Rank ``src``'s ``obj`` (small plain data: metrics, decisions) on every rank."""
    if not current().active:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src)
    return box[0]


def barrier() -> None:
    if current().active:
        tdist.barrier()


def same_on_all_ranks(tensors: tp.Sequence[torch.Tensor]) -> bool:
    """True when every rank holds bitwise the same ``tensors`` (a check for tests and debugging)."""
    if not current().active:
        return True
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                      if t.numel() else b"")
    mine = digest.hexdigest()
    everyone: tp.List[tp.Any] = [None] * current().world
    tdist.all_gather_object(everyone, mine)
    return all(d == mine for d in everyone)


# ----------------------------------------------------------------------------- data-based inits
@contextlib.contextmanager
def training_step() -> tp.Iterator[None]:
    """Mark a training micro-step, run by every rank in lockstep: inside it, :func:`sync_init`
    reduces data-based initialisations across the ranks."""
    global _SYNC_INIT
    before, _SYNC_INIT = _SYNC_INIT, True
    try:
        yield
    finally:
        _SYNC_INIT = before


def sync_init(value: torch.Tensor, how: str) -> torch.Tensor:
    """A statistic of this rank's batch made a statistic of the global batch (``how``: ``min``,
    ``max`` or ``mean``), so a quantizer initialised from the first batch starts identical on
    every rank (LSQ/DSQ/one-shot activation ranges). Outside a training step: unchanged."""
    if not (_SYNC_INIT and current().active):
        return value
    out = value.detach().clone()
    op = {"min": tdist.ReduceOp.MIN, "max": tdist.ReduceOp.MAX, "mean": tdist.ReduceOp.SUM}[how]
    tdist.all_reduce(out, op=op)
    if how == "mean":
        out /= current().world
    return out


def gather_parts(parts: tp.Mapping[str, tp.Sequence[float]]) -> tp.Dict[str, tp.List[float]]:
    """Every rank's per-batch evaluation parts, concatenated in rank order (sums over them are
    taken with ``math.fsum``, so their order does not change the result)."""
    if not current().active:
        return {k: list(v) for k, v in parts.items()}
    everyone: tp.List[tp.Any] = [None] * current().world
    tdist.all_gather_object(everyone, {k: list(v) for k, v in parts.items()})
    return {k: [x for rank_parts in everyone for x in rank_parts[k]] for k in parts}


# ----------------------------------------------------------------------------- start and failure
_start_shared = False


def new_run() -> None:
    """Forget the previous run's start (a process may run several runs, e.g. in tests)."""
    global _start_shared, _done
    _start_shared = False
    _done = False


def share_start(state: tp.Optional[str]) -> tp.Optional[str]:
    """Rank 0 tells the others how the run starts (``start``, ``done``, or why it could not);
    every rank calls it once (rank 0's later calls are no-ops); returns rank 0's word."""
    global _start_shared
    if not current().active:
        return state
    if current().is_main and _start_shared:
        return state
    _start_shared = True
    return broadcast_object(state)


def peer_failures(folder: tp.Any) -> str:
    """The tracebacks other ranks left in the run folder (``failure.rank<r>.txt``), to append
    to rank 0's FAILED status; empty for a single process."""
    text = ""
    for path in sorted(Path(folder).glob("failure.rank*.txt")):
        try:
            text += f"\n--- {path.stem.split('.')[-1]} failed:\n" + path.read_text(errors="replace")
        except OSError:
            continue
    return text
