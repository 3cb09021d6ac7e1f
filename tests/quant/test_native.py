"""The compiled noise fill (diffq_bench/quant/native.py): the same values as the Python threads,
and a clear fallback when it cannot be built."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from diffq_bench.quant import native, rng


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def draw(n: int, kind: str, dtype: torch.dtype = torch.float32, seed: int = 7) -> torch.Tensor:
    torch.manual_seed(seed)
    return rng.fill_noise(torch.empty(n, dtype=dtype), kind)


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler on this machine")
@pytest.mark.parametrize("kind", ["gaussian", "uniform", "unit"])
def test_compiled_fill_equals_python_threads(kind, two_threads, monkeypatch):
    assert native.load(), f"the compiled noise fill did not build: {native.status()['error']}"
    for n, dtype in [(2 * rng.CHUNK, torch.float32), (3 * rng.CHUNK + 5, torch.float32),
                     (7 * rng.CHUNK - 1, torch.float32), (2 * rng.CHUNK + 1, torch.float64)]:
        compiled = draw(n, kind, dtype)
        monkeypatch.setenv("DIFFQ_BENCH_NATIVE", "0")
        assert native.fill_noise_chunks() is None
        python = draw(n, kind, dtype)
        monkeypatch.delenv("DIFFQ_BENCH_NATIVE")
        assert torch.equal(compiled, python), (n, dtype)
    compiled = draw(3 * rng.CHUNK + 5, kind)
    torch.set_num_threads(1)  # the serial loop over the same chunks and seeds (the fixture restores)
    assert torch.equal(compiled, draw(3 * rng.CHUNK + 5, kind))


def test_compiled_op_checks_its_arguments(two_threads):
    if not native.load():
        pytest.skip(f"the compiled noise fill is unavailable here: {native.status()['error']}")
    op = native.fill_noise_chunks()
    with pytest.raises(RuntimeError, match="one seed per chunk"):
        op(torch.empty(10), torch.zeros(3, dtype=torch.long), 4 * 4, True, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="contiguous 1-D CPU"):
        op(torch.empty(4, 4), torch.zeros(1, dtype=torch.long), 16, True, 0.0, 0.0)


def test_failed_build_falls_back_once_with_the_reason(tmp_path, monkeypatch, caplog, two_threads):
    """No compiler (or any build error): one warning naming the reason, then the Python threads
    draw the same noise; nothing is retried on every step."""
    monkeypatch.setattr(native, "_state", {"tried": False, "loaded": False, "error": None, "path": None})
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))

    def broken(target):
        raise RuntimeError("Error building extension:\nnoise_fill.cpp:1:1: error: no compiler here")

    monkeypatch.setattr(native, "_build", broken)
    with caplog.at_level(logging.WARNING, logger="diffq_bench.quant.native"):
        first = draw(3 * rng.CHUNK, "gaussian")
        again = draw(3 * rng.CHUNK, "gaussian")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unavailable" in warnings[0] and "no compiler here" in warnings[0]
    assert native.status()["error"] and not native.status()["loaded"]
    assert torch.equal(first, again)
    monkeypatch.setenv("DIFFQ_BENCH_NATIVE", "0")
    assert torch.equal(first, draw(3 * rng.CHUNK, "gaussian"))


def test_cache_path_follows_source_and_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    path = native.cache_path()
    assert path.parent.parent == tmp_path and path.name.endswith(".so")
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    assert native.cache_path() != path


def test_ninja_from_the_python_package_when_not_on_path(monkeypatch, tmp_path):
    """A venv's diffq-bench run without activating the venv: PATH lacks its bin, where the
    ``ninja`` package puts the launcher torch's builder calls."""
    ninja = pytest.importorskip("ninja")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert shutil.which("ninja") is None
    native._ninja_on_path()
    assert shutil.which("ninja") is not None and os.environ["PATH"].startswith(ninja.BIN_DIR)


def test_build_moves_its_result_into_place_and_clears_builds_killed_long_ago(tmp_path, monkeypatch):
    """Each build works in a folder of its own and moves the library into place; a folder left by
    a build killed over an hour ago is removed, a recent one (maybe a concurrent build) is not."""
    import time

    import torch.utils.cpp_extension as cpp

    def fake_load_inline(name, build_directory, **kwargs):
        (Path(build_directory) / f"{name}.so").write_bytes(b"library")

    monkeypatch.setattr(cpp, "load_inline", fake_load_inline)
    target = tmp_path / "key" / "lib.so"
    target.parent.mkdir()
    old, recent = target.parent / "build-old", target.parent / "build-recent"
    old.mkdir()
    recent.mkdir()
    hours_ago = time.time() - 7200
    os.utime(old, (hours_ago, hours_ago))
    monkeypatch.setattr(native, "_NAME", "lib")
    native._build(target)
    assert target.read_bytes() == b"library"
    assert sorted(p.name for p in target.parent.iterdir()) == ["build-recent", "lib.so"]
