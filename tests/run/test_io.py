"""diffq_bench.io: the one atomic writer and the one guarded loader."""
import errno
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from diffq_bench import io


def test_save_load_state_atomic(tmp_path):
    path = tmp_path / "sub" / "state.th"
    state = {"a": torch.arange(5, dtype=torch.uint8), "b": {"c": 1.5, "d": "x"}}
    io.save_torch(path, state)
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.th"]  # no tmp left behind
    loaded = io.load_torch(path)
    assert torch.equal(loaded["a"], state["a"]) and loaded["b"] == state["b"]
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        io.load_torch(path)
    with pytest.raises(FileNotFoundError):
        io.load_torch(tmp_path / "missing.th")


def test_load_state_refuses_code(tmp_path):
    path = tmp_path / "evil.th"
    path.write_bytes(pickle.dumps({"f": print}, protocol=2))  # a pickled global must not be loaded
    with pytest.raises(ValueError):
        io.load_torch(path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_unsafe_file_names_the_refused_global_and_never_advises_unsafe_loading(tmp_path):
    path = tmp_path / "ckpt.th"
    path.write_bytes(pickle.dumps({"model": _Evil()}, protocol=2))
    with pytest.raises(io.LoadError) as err:
        io.load_torch(path, what="checkpoint")
    message = str(err.value)
    assert str(path) in message and "system" in message and "for safety" in message
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message
    assert not (tmp_path / "pwned").exists()


def test_marker_and_version_are_checked(tmp_path):
    path = tmp_path / "x.th"
    io.save_torch(path, {"format": "other", "version": 1})
    with pytest.raises(io.LoadError, match="not a diffq-bench checkpoint"):
        io.load_torch(path, what="checkpoint", marker="mine")
    io.save_torch(path, {"format": "mine", "version": 9})
    with pytest.raises(io.LoadError, match="version 9.*up to 1"):
        io.load_torch(path, what="checkpoint", marker="mine", version=1)


def test_failed_write_leaves_no_temp_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "status.json"
    io.write_json(path, {"state": "OLD"})

    class Boom:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")
    with pytest.raises(RuntimeError):
        io.save_torch(path, {"x": Boom()})
    assert json.loads(path.read_text()) == {"state": "OLD"}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_disk_full_names_the_path(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=r"cannot write .*big\.bin: the disk is full"):
        io.write_bytes(tmp_path / "big.bin", b"x" * 1000)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert list(tmp_path.iterdir()) == []


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = tmp_path / f".checkpoint.th.tmp{dead.stdout.strip()}"
    stale.write_bytes(b"partial")
    live = io.temp_path(tmp_path / "best.th")  # ours: this process is alive
    live.write_bytes(b"in progress")
    keep = tmp_path / "checkpoint.th"
    keep.write_bytes(b"ok")
    assert io.remove_stale_temps(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "checkpoint.th"])


def test_atomic_dir_publishes_whole_or_nothing(tmp_path):
    target = tmp_path / "set"
    with pytest.raises(RuntimeError):
        with io.atomic_dir(target, "DONE") as tmp:
            (tmp / "a").write_text("1")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with io.atomic_dir(target, "DONE") as tmp:
        (tmp / "a").write_text("1")
        (tmp / "DONE").write_text("")
    assert sorted(p.name for p in target.iterdir()) == ["DONE", "a"]


def test_read_json_names_the_file(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("{garbage")
    with pytest.raises(io.LoadError, match=r"result\.json is not valid JSON"):
        io.read_json(path, "result")
