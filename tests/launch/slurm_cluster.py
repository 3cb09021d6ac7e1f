"""Helpers to run tests against the real one-node SLURM cluster of ``../shared/slurm``.

The scripts live next to the repository (``<repo>/../shared/slurm``; ``DIFFQ_BENCH_SLURM_SCRIPTS``
points elsewhere). :func:`start_cluster` runs ``start-slurm.sh`` (idempotent, ~10 s fresh, needs
root) and returns a :class:`Cluster`, or raises :class:`ClusterUnavailable` with the reason, which
the test module turns into a visible skip. A cluster this module started is stopped by
:meth:`Cluster.stop`; one that was already up is left running.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
import typing as tp
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


class ClusterUnavailable(RuntimeError):
    """The SLURM scripts are missing or could not start the cluster (message says why)."""


def scripts_dir() -> Path:
    """Where ``start-slurm.sh`` & co. live (``../shared/slurm`` relative to the repository root)."""
    env = os.environ.get("DIFFQ_BENCH_SLURM_SCRIPTS")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "slurm"


def _cluster_up() -> bool:
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "UP" in out.stdout


class Cluster:
    """A started cluster: job helpers plus :meth:`stop` (only if :func:`start_cluster` started it)."""

    def __init__(self, scripts: Path, started_here: bool):
        self.scripts = scripts
        self.started_here = started_here
        self._bumper: tp.Optional[subprocess.Popen] = None

    def stop(self) -> None:
        """Stop the bumper and, when this session started the cluster, the cluster."""
        self.stop_bumper()
        if self.started_here:
            subprocess.run(["bash", str(self.scripts / "stop-slurm.sh")], capture_output=True,
                           text=True, timeout=180)

    def start_bumper(self) -> None:
        """Run ``bump_requeued.sh`` in the background: requeued jobs restart after ~2 s, not 120 s."""
        if self._bumper is None:
            self._bumper = subprocess.Popen(
                ["bash", str(self.scripts / "bump_requeued.sh")], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True)

    def stop_bumper(self) -> None:
        """Kill the bumper started by :meth:`start_bumper` (its own process group, by pid)."""
        if self._bumper is not None:
            try:
                os.killpg(self._bumper.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self._bumper.wait(timeout=10)
            self._bumper = None


def start_cluster(timeout: float = 240.0) -> Cluster:
    """Start (or reuse) the one-node cluster; :class:`ClusterUnavailable` says why it cannot run.

    Args:
        timeout: seconds allowed for ``start-slurm.sh`` (a fresh install takes ~15 s).
    """
    scripts = scripts_dir()
    start = scripts / "start-slurm.sh"
    if not start.is_file():
        raise ClusterUnavailable(f"SLURM scripts not found: {start} is missing "
                                 "(set DIFFQ_BENCH_SLURM_SCRIPTS to their folder)")
    if os.geteuid() != 0 and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode:
        raise ClusterUnavailable("start-slurm.sh needs root (or password-less sudo)")
    was_up = _cluster_up()
    try:
        proc = subprocess.run(["bash", str(start)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ClusterUnavailable(f"start-slurm.sh did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        raise ClusterUnavailable(f"start-slurm.sh exited {proc.returncode}: {tail}")
    return Cluster(scripts, started_here=not was_up)


def wait_for(predicate: tp.Callable[[], bool], timeout: float, what: str, every: float = 0.5) -> None:
    """Poll ``predicate`` until it is true; AssertionError naming ``what`` after ``timeout`` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
