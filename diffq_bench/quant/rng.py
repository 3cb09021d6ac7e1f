"""Reproducible noise fills for DiffQ's pseudo quantization noise, parallel on CPU.

torch's CPU generator (MT19937) is sequential: one ``normal_`` call uses one core, and drawing the
noise is the largest cost DiffQ adds to a CPU train step. :func:`fill_noise` cuts a large buffer
into fixed chunks of :data:`CHUNK` entries; each chunk gets its own generator, seeded from the
global torch RNG (so ``torch.manual_seed`` and checkpointed RNG states still decide the noise), and
the chunks are filled by ``torch.get_num_threads()`` threads: torch's own OpenMP threads through a
small compiled op (:mod:`diffq_bench.quant.native`, built once per machine) or, where it cannot
be built, Python worker threads (torch releases the GIL) with the same values.
Chunk boundaries and seeds do not depend on the number of threads: the same seed gives the same
noise on 1 or 16 threads. Buffers under two chunks, and every buffer on an accelerator (whose
generator is already parallel), are filled directly from the global generator.
"""
from __future__ import annotations

import threading
import typing as tp
from concurrent.futures import ThreadPoolExecutor

import torch

from . import native

#: entries per independently seeded chunk (~0.5 ms of MT19937 work on one core): DiffQ draws one
#: buffer for all its tensors, under a million entries on small models, which still needs chunks
#: to use a second thread; a chunk's seeding costs ~10 us
CHUNK = 1 << 17
_SEED_HIGH = 1 << 62

_lock = threading.Lock()
_executor: tp.Optional[ThreadPoolExecutor] = None
_executor_size = 0


def _workers(threads: int) -> ThreadPoolExecutor:
    global _executor, _executor_size
    with _lock:
        if _executor is None or _executor_size != threads:
            if _executor is not None:
                _executor.shutdown(wait=False)
            _executor = ThreadPoolExecutor(threads, thread_name_prefix="diffq-noise")
            _executor_size = threads
        return _executor


#: the distributions: name -> (low, high) of a uniform draw, None for N(0, 1)
KINDS: tp.Dict[str, tp.Optional[tp.Tuple[float, float]]] = {
    "gaussian": None,  # DiffQ's default pseudo quantization noise
    "uniform": (-0.5, 0.5),  # DiffQ's uniform noise
    "unit": (0.0, 1.0),  # U[0, 1), as torch.rand: Quant-Noise's masks (u < p)
}


def _bounds(kind: str) -> tp.Optional[tp.Tuple[float, float]]:
    """``KINDS[kind]``, or an error naming the valid kinds."""
    if kind not in KINDS:
        raise ValueError(f"unknown noise {kind!r}; valid: {', '.join(KINDS)}")
    return KINDS[kind]


def _fill(part: torch.Tensor, kind: str, generator: tp.Optional[torch.Generator]) -> None:
    bounds = _bounds(kind)
    if bounds is None:
        part.normal_(generator=generator)
    else:
        part.uniform_(*bounds, generator=generator)


def _fill_chunk(part: torch.Tensor, kind: str, seed: int) -> None:
    _fill(part, kind, torch.Generator(device="cpu").manual_seed(seed))


def prepare(device: tp.Optional[torch.device]) -> None:
    """Build or load the compiled fill now where :func:`fill_noise` will use it (CPU, several
    threads): the first build takes ~20 s and says so, better before a run's progress bar starts
    than inside its first step. Quantizers that draw noise call it when they are built."""
    if device is not None and torch.device(device).type == "cpu" and torch.get_num_threads() > 1:
        native.load()


def fill_noise(buffer: torch.Tensor, kind: str) -> torch.Tensor:
    """Fill a contiguous 1-D ``buffer`` in place with N(0, 1) (``gaussian``), U(-½, ½)
    (``uniform``) or U[0, 1) (``unit``) draws and return it."""
    n = buffer.numel()
    if buffer.device.type != "cpu" or n < 2 * CHUNK:
        _fill(buffer, kind, None)
        return buffer
    bounds = _bounds(kind)
    starts = range(0, n, CHUNK)
    seeds = torch.randint(0, _SEED_HIGH, (len(starts),), dtype=torch.int64)
    threads = min(torch.get_num_threads(), len(starts))
    compiled = native.fill_noise_chunks() if threads > 1 and buffer.is_contiguous() else None
    if compiled is not None:  # the same chunks and generator calls, on torch's OpenMP threads
        low, high = bounds or (0.0, 0.0)
        return compiled(buffer, seeds, CHUNK, bounds is None, low, high)
    jobs = [(buffer[s:s + CHUNK], seed) for s, seed in zip(starts, seeds.tolist())]
    if threads <= 1:
        for part, seed in jobs:
            _fill_chunk(part, kind, seed)
    else:
        pool = _workers(threads)
        for future in [pool.submit(_fill_chunk, part, kind, seed) for part, seed in jobs]:
            future.result()
    return buffer
