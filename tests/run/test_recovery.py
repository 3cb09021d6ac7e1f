"""Recovery from what breaks runs in practice: full disks, damaged checkpoints and best states,
dead processes. Each test is named after the failure it pins."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from diffq_bench import checkpoint as ckpt
from diffq_bench import cli, io, train
from diffq_bench.xp import Xp

from fixtures import stable_metrics


def _temps(folder: Path):
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


# ------------------------------------------------------------------ liveness
def test_training_refreshes_the_heartbeat(compose_toy, monkeypatch):
    """Without heartbeats a run on another host cannot be told from a dead one (STALE)."""
    beats = []
    monkeypatch.setattr(train, "HEARTBEAT_S", 0.0)
    monkeypatch.setattr(Xp, "heartbeat", lambda self: beats.append(self.sig))
    cfg = compose_toy("train.epochs=1")
    cli.run(cfg)
    assert len(beats) == 12  # one per optimizer step (192 samples / 16 per batch, 1 epoch)


# ------------------------------------------------------------------ full disk
def test_disk_full_on_checkpoint_write_records_failed_and_leaves_no_temp(compose_toy, monkeypatch):
    """Before, a full disk left the run RUNNING with no traceback and a partial .checkpoint.th.tmp<pid>.
    Here the checkpoint write fails half-way, and so does the first FAILED status write (the disk
    stays full until the run's reserve is released)."""
    real_save = torch.save

    def failing_save(obj, fout, *args, **kwargs):
        if Path(getattr(fout, "fout", fout).name).name.startswith(".checkpoint.th.tmp"):
            fout.write(b"x" * 4096)  # a partial file, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, fout, *args, **kwargs)
    monkeypatch.setattr(io.torch, "save", failing_save)
    real_write_json = io.write_json

    def full_until_reserve_released(path, data, *args, **kwargs):
        path = Path(path)
        if path.name == "status.json" and data.get("state") == "FAILED" and (path.parent / ".reserve").exists():
            raise OSError(errno.ENOSPC, f"cannot write {path}: the disk is full")
        return real_write_json(path, data, *args, **kwargs)
    monkeypatch.setattr(io, "write_json", full_until_reserve_released)
    cfg = compose_toy("train.epochs=1")
    xp = Xp(cfg.paths.root, cfg)
    with pytest.raises(OSError, match=r"cannot write .*checkpoint\.th: the disk is full") as info:
        cli.run(cfg)
    assert info.value.errno == errno.ENOSPC
    status = json.loads(xp.status_path.read_text())
    assert status["state"] == "FAILED", status
    assert "Traceback" in status["traceback"] and "the disk is full" in status["traceback"]
    assert _temps(xp.folder) == [] and not xp.checkpoint_path.exists()
    assert "FAILED" in xp.log_path.read_text()


def test_torch_enforce_message_on_full_disk_names_the_path(tmp_path, monkeypatch):
    """torch's C++ writer reports a full disk as `[enforce fail at inline_container.cc] unexpected
    pos`; the writer names the file and says the disk is full instead, and leaves no temp."""
    def write_then_fail(obj, fout, *args, **kwargs):
        try:
            fout.write(b"x" * 100)
            fout.write(b"y" * 100)
        except OSError:
            pass  # what the C++ writer does: it swallows the error and checks the position
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    class Full:
        def __init__(self, fout):
            self.fout, self.name = fout, fout.name

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    real_recorder = io._Recorder.__init__

    def recorder_on_full_file(self, fout):
        real_recorder(self, Full(fout))
    monkeypatch.setattr(io._Recorder, "__init__", recorder_on_full_file)
    monkeypatch.setattr(io.torch, "save", write_then_fail)
    with pytest.raises(OSError, match=r"cannot write .*state\.th: the disk is full"):
        io.save_torch(tmp_path / "state.th", {"a": torch.zeros(3)})
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (needs root and a kernel that lets this process mount)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root: the fault-injecting writer test covers the logic")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}): the fault-injecting writer "
                    "test covers the logic")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True, check=False)


@pytest.mark.slow
def test_disk_full_on_a_real_small_tmpfs_records_failed(compose_toy, small_tmpfs, tmp_path):
    """A real full disk: the checkpoint (model + Adam state, ~2 MB) does not fit in 1 MiB."""
    cfg = compose_toy("train.epochs=1", "task.hidden=384", f"paths.root={small_tmpfs}",
                      f"paths.cache={tmp_path / 'cache'}")
    xp = Xp(cfg.paths.root, cfg)
    with pytest.raises(OSError, match="the disk is full") as info:
        cli.run(cfg)
    assert info.value.errno == errno.ENOSPC and "enforce fail" not in str(info.value)
    status = json.loads(xp.status_path.read_text())
    assert status["state"] == "FAILED" and "the disk is full" in status["traceback"]
    assert _temps(xp.folder) == []


# ------------------------------------------------------------------ damaged checkpoints
def _partial(compose_toy, *overrides):
    """A finished toy run made partial again (result.json removed): a rerun resumes its checkpoint."""
    cfg = compose_toy("train.epochs=2", *overrides)
    reference = cli.run(cfg)
    xp = Xp(cfg.paths.root, cfg)
    xp.result_path.unlink()
    return cfg, xp, reference


def _edit_checkpoint(path, edit):
    state = torch.load(path, weights_only=True)
    edit(state)
    io.save_torch(path, state)


@pytest.mark.parametrize("what,edit,message", [
    ("no model", lambda s: s.pop("model"), "has no 'model' entry"),
    ("no epoch_rng", lambda s: s.pop("epoch_rng"), "has no 'epoch_rng' entry"),
    ("short rng", lambda s: s["rng"].update(torch=s["rng"]["torch"][:100]), "malformed random generator state 'rng'"),
    ("other shapes", lambda s: s["model"].update({"0.weight": torch.zeros(3, 3)}), "does not fit this run"),
    ("other optimizer", lambda s: s["optimizers"][0]["param_groups"].append({"params": [99]}),
     "does not fit this run"),
])
def test_wrong_structure_checkpoint_is_one_error_and_deleting_it_works(compose_toy, capsys, what, edit, message):
    """Before: raw KeyError 'model' / 'epoch_rng' / an RNG size RuntimeError from deep inside."""
    cfg, xp, reference = _partial(compose_toy)
    _edit_checkpoint(xp.checkpoint_path, edit)
    with pytest.raises(ckpt.CheckpointError, match=message) as info:
        cli.run(cfg)
    assert str(xp.checkpoint_path) in str(info.value)
    assert f"delete {xp.checkpoint_path} to restart the run from scratch" in str(info.value)
    assert json.loads(xp.status_path.read_text())["state"] == "FAILED"
    with pytest.raises(SystemExit) as exit_info:  # the command line: one line, exit 1
        cli._hydra_task(cfg)
    assert exit_info.value.code == cli.EXIT_FAILED
    # (a logging handler left on a closed stream by an earlier test may add its own noise)
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith(("---", " ", "Call"))]
    mine = [line for line in err if line.startswith("diffq-bench:")]
    assert len(mine) == 1 and "delete" in mine[0] and "CheckpointError" not in "\n".join(err)
    xp.checkpoint_path.unlink()  # the advice
    assert stable_metrics(cli.run(cfg)) == stable_metrics(reference)  # trained again from scratch, same numbers


@pytest.mark.parametrize("damage", ["truncated", "deleted", "no model"])
def test_damaged_best_th_is_rebuilt_not_fatal(compose_toy, damage):
    """Before: a truncated best.th said "delete it to restart from scratch", and after deleting it
    the rerun failed with FileNotFoundError. best.th is derived state: the run rebuilds it."""
    cfg, xp, reference = _partial(compose_toy)
    if damage == "truncated":
        xp.best_path.write_bytes(xp.best_path.read_bytes()[:100])
    elif damage == "deleted":
        xp.best_path.unlink()
    else:
        _edit_checkpoint(xp.best_path, lambda s: s.pop("model"))
    result = cli.run(cfg)
    assert json.loads(xp.status_path.read_text())["state"] == "DONE"
    assert "best.th rebuilt from the final weights" in xp.log_path.read_text()
    assert result["metrics"]["best_epoch"] == 2
    if reference["metrics"]["best_epoch"] == 2:  # the lost best was the final state: same result
        assert stable_metrics(result) == stable_metrics(reference)
    else:
        assert "were lost, epoch 2 is used instead" in xp.log_path.read_text()
    assert ckpt.load(xp.best_path)["epoch"] == 2
