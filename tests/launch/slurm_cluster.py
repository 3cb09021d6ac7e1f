"""Helpers to run tests against a real one-node SLURM cluster.

The project's own script, ``scripts/slurm_test_cluster.sh``, installs the Debian packages and starts
the cluster (idempotent; a cluster that is already up is used as it is; needs root).
:func:`start_cluster` runs it and returns a :class:`Cluster`, or raises :class:`ClusterUnavailable`
with the reason (not root, not Debian, a daemon that does not start...), which the test module turns
into a visible skip. A cluster this module started is stopped by :meth:`Cluster.stop`; one that
was already up is left running.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import typing as tp
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


class ClusterUnavailable(RuntimeError):
    """The SLURM scripts are missing or could not start the cluster (message says why)."""


#: the project's script that installs, starts and stops the test cluster
SCRIPT = REPO_ROOT / "scripts" / "slurm_test_cluster.sh"


def _cluster_up() -> bool:
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "UP" in out.stdout


class Cluster:
    """A started cluster: job helpers plus :meth:`stop` (only if :func:`start_cluster` started it)."""

    def __init__(self, started_here: bool):
        self.started_here = started_here
        self._bumper: tp.Optional[subprocess.Popen] = None

    def stop(self) -> None:
        """Stop the bumper and, when this session started the cluster, the cluster."""
        self.stop_bumper()
        if self.started_here:
            subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, text=True, timeout=180)

    def start_bumper(self) -> None:
        """Run the script's ``bump`` in the background: requeued jobs restart after ~2 s, not 120 s."""
        if self._bumper is None:
            self._bumper = subprocess.Popen(
                ["bash", str(SCRIPT), "bump"], stdout=subprocess.DEVNULL,
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


def start_cluster(timeout: float = 300.0) -> Cluster:
    """Start (or reuse) the one-node cluster; :class:`ClusterUnavailable` says why it cannot run.

    Args:
        timeout: seconds allowed for the script (a fresh install downloads packages).
    """
    if os.geteuid() != 0 and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode:
        raise ClusterUnavailable(f"{SCRIPT.name} needs root (or password-less sudo) to install and "
                                 "start SLURM")
    if not shutil.which("apt-get") and not shutil.which("slurmctld") and not _cluster_up():
        raise ClusterUnavailable("SLURM is not installed and this machine has no apt-get (the script "
                                 "installs Debian packages)")
    was_up = _cluster_up()
    try:
        proc = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ClusterUnavailable(f"{SCRIPT.name} start did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        raise ClusterUnavailable(f"{SCRIPT.name} start exited {proc.returncode}: {tail}")
    return Cluster(started_here=not was_up)


def wait_for(predicate: tp.Callable[[], bool], timeout: float, what: str, every: float = 0.5) -> None:
    """Poll ``predicate`` until it is true; AssertionError naming ``what`` after ``timeout`` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
