"""The compiled part of DiffQ's noise fill (csrc/noise_fill.cpp), built once per machine on first use.

:func:`diffq_bench.quant.rng.fill_noise` fills a big buffer in independently seeded chunks. From
Python the chunks go to worker threads; the compiled op hands the same chunks, with the same seeds
and the same torch generator calls (so the same values, bit for bit), to torch's intra-op OpenMP
threads. On a machine with as many threads as cores this matters: after each parallel operation
torch's OpenMP workers keep spinning for milliseconds, and Python threads started then share the
cores with them (on 2 cores a parallel fill took as long as a serial one), while the compiled op
runs on those workers (results/bench/quant.json, docs/quantizers.md).

It is built with torch's own extension builder (``torch.utils.cpp_extension.load_inline``: a C++
compiler and ninja, ~20 s) into ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``),
under a name that changes with the source and the torch/Python versions, and loaded from there
afterwards. Each build happens in a folder of its own and its result is moved into place
atomically: concurrent first runs build twice at worst, and a run killed while building leaves no
lock behind. When it cannot be built (no compiler, no OpenMP, a platform torch builds without it)
the reason is logged once and the Python threads are used: the same noise, slower.
``DIFFQ_BENCH_NATIVE=0`` turns it off.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import typing as tp
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "noise_fill.cpp"
_NAME = "diffq_bench_noise_fill"
_FLAGS = ["-O2", "-fopenmp"]

_lock = threading.Lock()
_state: tp.Dict[str, tp.Any] = {"tried": False, "loaded": False, "error": None, "path": None}


def enabled() -> bool:
    """False when ``DIFFQ_BENCH_NATIVE=0`` (or ``false``/``no``/``off``) is set."""
    return os.environ.get("DIFFQ_BENCH_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_path() -> Path:
    """Where the built library is kept: one file per source, torch and Python version."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    key = hashlib.sha256("\n".join([SOURCE.read_text(), torch.__version__, sys.version, platform.machine(),
                                    " ".join(_FLAGS)]).encode()).hexdigest()[:16]
    return root / f"{_NAME}_{key}" / f"{_NAME}.so"


def _ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; the ``ninja`` package's launcher sits in this
    Python's ``bin``, which is not on PATH when a venv's program is run without activating it."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def _build(target: Path) -> None:
    """Compile the source into ``target`` (atomically) and load it into this process."""
    _ninja_on_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob("build-*"):  # left by a build killed over an hour ago
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=target.parent))
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_log.level
    cpp_log.setLevel(logging.ERROR)  # its import warns about CUDA_HOME on machines without CUDA
    try:
        from torch.utils.cpp_extension import load_inline
        load_inline(_NAME, cpp_sources=[SOURCE.read_text()], build_directory=str(work),
                    extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
        os.replace(work / f"{_NAME}.so", target)
    finally:
        cpp_log.setLevel(level)
        shutil.rmtree(work, ignore_errors=True)


def _short(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line.lower()]  # the compiler's first error
    return f"{type(exc).__name__}: {(errors or lines or [''])[0][:200]}"


def load() -> bool:
    """Build (first time on this machine) or load the compiled op; False when it is turned off or
    cannot be built (the reason is logged once)."""
    if not enabled():
        return False
    if _state["tried"]:
        return _state["loaded"]
    with _lock:
        if _state["tried"]:
            return _state["loaded"]
        try:
            path = cache_path()
            if path.exists():
                try:
                    torch.ops.load_library(str(path))
                except OSError:  # unreadable or truncated by a crash elsewhere: build it again
                    path.unlink(missing_ok=True)
            if not path.exists():
                logger.info("building DiffQ's parallel noise fill (once per machine, ~20 s): %s", path)
                _build(path)
            _state["loaded"], _state["path"] = True, str(path)
        except Exception as exc:  # noqa: BLE001 - any failure means: use the Python threads
            _state["error"] = _short(exc)
            logger.warning("DiffQ: the compiled parallel noise fill is unavailable (%s); drawing the "
                           "noise from Python threads instead (the same values, slower)", _state["error"])
        _state["tried"] = True
        return _state["loaded"]


def fill_noise_chunks() -> tp.Optional[tp.Callable[..., torch.Tensor]]:
    """``(buffer, seeds, chunk, gaussian, low, high) -> buffer``: the chunked noise fill (N(0, 1),
    else U(low, high)) on torch's threads."""
    return torch.ops.diffq_bench.fill_noise_chunks if load() else None


def status() -> tp.Dict[str, tp.Any]:
    """Whether the compiled fill is in use in this process, where from, or why not."""
    return {"enabled": enabled(), "loaded": _state["loaded"], "path": _state["path"],
            "error": _state["error"]}
