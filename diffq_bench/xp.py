"""Run identity and run folders (``<paths.root>/xps/<sig>/``); file schemas in docs/INTERFACES.md.

The signature is a hash of the *semantic* config: the resolved values that change a result (task,
quant, optim, train, seed, the lambda/group_size aliases), canonicalised so that ``10`` and
``10.0`` are the same run and key order is irrelevant. Where things live and how a run executes
(paths, device, workers, runtime, launcher, grid membership) are excluded.
"""
from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import logging
import math
import os
import socket
import time
import typing as tp
from pathlib import Path

from omegaconf import OmegaConf

from . import init, io
from .config import compose, to_container

logger = logging.getLogger(__name__)

#: top-level keys that never enter the signature (``finish``: how the export is checked, which
#: changes no trained weight and no test metric; result.json records the check that ran).
EXCLUDED = ("paths", "device", "num_workers", "dist", "runtime", "finish", "grid", "hydra", "launcher")
#: top-level aliases -> the quant key they feed by interpolation (conf/quant/*.yaml). They are not
#: hashed themselves (their effect is in quant.*), so `quant=none lambda=5` is the same run as
#: `quant=none lambda=1`; tables show them when the quantizer uses them.
ALIASES = {"lambda": "penalty", "group_size": "group_size"}
SIG_VERSION = 1
SIG_LENGTH = 12
#: run states in status.json; INTERRUPTED (a signal) and CANCELLED (by the scheduler) resume
STATES = ("QUEUED", "RUNNING", "DONE", "FAILED", "INTERRUPTED", "CANCELLED")
#: keys every result.json has (a file without them is not a diffq-bench result)
RESULT_KEYS = ("sig", "task", "quant", "metric", "metrics")


def semantic_config(cfg: tp.Any) -> tp.Dict[str, tp.Any]:
    """The resolved config minus :data:`EXCLUDED` keys, as plain containers.

    ``init`` enters by content (:func:`init_identity`), never by path.
    """
    plain = to_container(cfg)
    if not isinstance(plain, dict):
        raise TypeError(f"expected a mapping config, got {type(plain).__name__}")
    sem = {k: v for k, v in plain.items() if k not in EXCLUDED and k not in ALIASES}
    if sem.get("init") is not None:
        sem["init"] = init_identity(plain)
    return sem


def parent_config(plain: tp.Mapping[str, tp.Any], spec: init.InitSpec) -> tp.Any:
    """The composed config of the parent run of ``init=run:...``, in the child's run store."""
    paths = plain.get("paths", {})
    context = [f"paths.{key}={paths[key]}" for key in ("root", "data", "cache") if key in paths]
    try:
        return compose(list(spec.overrides) + context)
    except Exception as exc:  # noqa: BLE001 - Hydra's composition errors become one clear line
        raise init.InitError(f"init=run:{' '.join(spec.overrides)} does not compose "
                             f"({str(exc).splitlines()[0]})") from None


def init_identity(plain: tp.Mapping[str, tp.Any]) -> tp.Dict[str, str]:
    """What a run's ``init`` contributes to its identity: the weights file's SHA-256, or the
    parent run's signature (its weights are a function of it)."""
    spec = init.parse(plain.get("init"))
    assert spec is not None
    if spec.is_run:
        return {"run": signature(parent_config(plain, spec))}
    return {"sha256": init.file_digest(spec.path)}


def _canonical(value: tp.Any) -> tp.Any:
    # Numbers hash by value (10 == 10.0) but stay distinct from bools and strings.
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        value = float(value)
        if math.isnan(value) or math.isinf(value):
            return {"__float__": repr(value)}
        return value
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    raise TypeError(f"config value {value!r} of type {type(value).__name__} cannot be hashed")


def signature(cfg: tp.Any) -> str:
    """Run identity: a short hex hash of the canonical semantic config.

    Args:
        cfg: the composed config (DictConfig or plain dict).
    """
    canon = {"v": SIG_VERSION, "cfg": _canonical(semantic_config(cfg))}
    text = json.dumps(canon, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()[:SIG_LENGTH]


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class RunLockedError(RuntimeError):
    """Another live process holds this run folder."""


class Xp:
    """One run folder: config, status, history, log, checkpoint, result, exported model.

    The only code that knows the files of a run folder (docs/INTERFACES.md); every other module
    reads and writes them through this class.

    Args:
        root: the run store root (``paths.root``); the folder is ``root/xps/<sig>``.
        cfg: the composed config (its semantic part decides the signature); None to open an
            existing folder by ``sig`` (readers: tables, status).
        sig: the signature, when ``cfg`` is None.
        folder: the folder itself, when it is not ``root/xps/<sig>`` (see :meth:`at`).
    """

    def __init__(self, root: tp.Union[str, Path], cfg: tp.Any = None, sig: tp.Optional[str] = None,
                 folder: tp.Optional[Path] = None):
        if (cfg is None) == (sig is None):
            raise TypeError("Xp needs exactly one of cfg (a new or known run) and sig (an existing folder)")
        self.cfg = cfg
        self.sig = signature(cfg) if cfg is not None else str(sig)
        self.folder = Path(folder) if folder is not None else Path(root) / "xps" / self.sig
        self._lock_fd: tp.Optional[int] = None

    @classmethod
    def at(cls, folder: tp.Union[str, Path]) -> "Xp":
        """An existing run folder (its name is the signature), for reading."""
        folder = Path(folder)
        return cls(folder.parent.parent, sig=folder.name, folder=folder)

    @staticmethod
    def all(root: tp.Union[str, Path]) -> tp.List["Xp"]:
        """Every run folder of the store under ``root``, by signature."""
        return [Xp.at(p) for p in sorted((Path(root) / "xps").glob("*")) if p.is_dir()]

    # paths ---------------------------------------------------------------------------------
    config_path = property(lambda self: self.folder / "config.yaml")
    status_path = property(lambda self: self.folder / "status.json")
    history_path = property(lambda self: self.folder / "history.jsonl")
    log_path = property(lambda self: self.folder / "log.txt")
    checkpoint_path = property(lambda self: self.folder / "checkpoint.th")
    best_path = property(lambda self: self.folder / "best.th")
    quantized_path = property(lambda self: self.folder / "quantized.th")
    result_path = property(lambda self: self.folder / "result.json")
    submissions_path = property(lambda self: self.folder / "submissions.jsonl")
    data_path = property(lambda self: self.folder / "data.json")

    def create(self) -> None:
        """Create the folder, remove what writers killed mid-write left there (``.X.tmp<pid>``
        of dead processes) and write the semantic config that was hashed (only when it changed)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for path in io.remove_stale_temps(self.folder):
            logger.warning("removed %s, left by a writer that died mid-write", path)
        text = OmegaConf.to_yaml(OmegaConf.create(semantic_config(self.cfg)))
        text = f"# run {self.sig}: the semantic config that was hashed\n{text}"
        if not self.config_path.is_file() or self.config_path.read_text() != text:
            io.write_text(self.config_path, text)

    # locking: two launches never share a folder by accident ---------------------------------
    def lock(self) -> None:
        """Take an exclusive advisory lock on the folder (released at process exit).

        Raises:
            RunLockedError: another live process is running this config.
        """
        fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            status = self.read_status() or {}
            raise RunLockedError(
                f"run {self.sig} is already running (host {status.get('host')}, pid {status.get('pid')}); "
                f"folder {self.folder}") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # status -------------------------------------------------------------------------------
    def read_status(self) -> tp.Optional[tp.Dict[str, tp.Any]]:
        """status.json (None when absent).

        Raises:
            diffq_bench.io.LoadError: the file is not valid JSON (the message names it).
        """
        try:
            return io.read_json(self.status_path, "run status")
        except FileNotFoundError:
            return None

    def write_status(self, state: str, **fields: tp.Any) -> tp.Dict[str, tp.Any]:
        """Update status.json: ``state`` plus any schema field (``attempt``, ``epoch``, ``traceback``...)."""
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {state!r}")
        status = self.read_status() or {"attempt": 0, "requeues": 0, "job_id": None,
                                         "started": now_iso(), "epoch": 0, "traceback": None,
                                         "grids": []}
        status.update(fields)
        status.update(state=state, host=socket.gethostname(), pid=os.getpid(), updated=now_iso(),
                      heartbeat=now_iso())
        io.write_json(self.status_path, status)
        return status

    def start_attempt(self, grids: tp.Sequence[str] = (), job_id: tp.Optional[str] = None,
                      env: tp.Optional[tp.Dict[str, tp.Any]] = None) -> tp.Dict[str, tp.Any]:
        """Mark the run RUNNING with attempt + 1, the grids it belongs to, its scheduler job and
        the execution environment of this attempt; reserve room for a FAILED status."""
        status = self.read_status() or {}
        known = list(status.get("grids") or [])
        known += [g for g in grids if g not in known]
        self._reserve()
        return self.write_status("RUNNING", attempt=int(status.get("attempt", 0)) + 1,
                                 started=now_iso(), traceback=None, reason=None, grids=known,
                                 job_id=job_id, env=env)

    reserve_path = property(lambda self: self.folder / ".reserve")

    def _reserve(self, size: int = 1 << 16) -> None:
        # A full disk must not keep the run from recording why it failed: this file holds room
        # for status.json and log.txt, released by release_reserve() when a write fails.
        if not self.reserve_path.exists():
            try:
                self.reserve_path.write_bytes(b"\0" * size)
            except OSError:
                self.reserve_path.unlink(missing_ok=True)

    def release_reserve(self) -> None:
        """Free the reserved room (the next small write succeeds on a full disk)."""
        self.reserve_path.unlink(missing_ok=True)

    # history / log / result -----------------------------------------------------------------
    def read_history(self) -> tp.List[tp.Dict[str, tp.Any]]:
        if not self.history_path.exists():
            return []
        return [json.loads(line) for line in self.history_path.read_text().splitlines() if line.strip()]

    def write_history(self, history: tp.Sequence[tp.Dict[str, tp.Any]]) -> None:
        """Rewrite history.jsonl whole (atomic), so a resumed run never duplicates epochs."""
        io.write_lines(self.history_path, history)

    def log(self, message: str) -> None:
        with open(self.log_path, "a") as fout:
            fout.write(f"{now_iso()} {message}\n")

    def read_result(self) -> tp.Optional[tp.Dict[str, tp.Any]]:
        """result.json (None when absent).

        Raises:
            diffq_bench.io.LoadError: the file is not valid JSON (the message names it).
        """
        try:
            result = io.read_json(self.result_path, "run result")
        except FileNotFoundError:
            return None
        if not isinstance(result, dict) or any(k not in result for k in RESULT_KEYS) or \
                not isinstance(result["metrics"], dict):
            raise io.LoadError(f"{self.result_path} is not a diffq-bench result (needs "
                               f"{', '.join(RESULT_KEYS)}); delete it and run again (or runtime.force=true)")
        return result

    def write_result(self, result: tp.Dict[str, tp.Any]) -> None:
        io.write_json(self.result_path, result)

    def is_done(self) -> bool:
        status = self.read_status() or {}
        return status.get("state") == "DONE" and self.result_path.exists()

    def heartbeat(self) -> None:
        """Record that the run is alive (status.json ``heartbeat``; the status view shows a
        RUNNING run without a recent heartbeat or a live process as STALE)."""
        status = self.read_status() or {}
        if status.get("state") == "RUNNING":
            status["heartbeat"] = now_iso()
            io.write_json(self.status_path, status)

    def read_data(self) -> tp.Optional[tp.Dict[str, tp.Any]]:
        """The fingerprint of the data the run read (data.json), None before its first start."""
        try:
            return io.read_json(self.data_path, "data fingerprint")
        except FileNotFoundError:
            return None

    def write_data(self, fingerprint: tp.Dict[str, tp.Any]) -> None:
        io.write_json(self.data_path, fingerprint)

    def read_config(self) -> tp.Optional[tp.Dict[str, tp.Any]]:
        """The semantic config written by :meth:`create` (None when not written yet)."""
        if not self.config_path.is_file():
            return None
        return OmegaConf.to_container(OmegaConf.load(self.config_path), resolve=False)

    def log_age(self, now: tp.Optional[float] = None) -> tp.Optional[float]:
        """Seconds since the last line of ``log.txt`` (its ISO timestamp, else the file's mtime)."""
        if not self.log_path.exists():
            return None
        now = time.time() if now is None else now
        lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        if lines:
            try:
                stamp = datetime.datetime.fromisoformat(lines[-1].split(" ", 1)[0])
                if stamp.tzinfo is not None:
                    return now - stamp.timestamp()
            except ValueError:
                pass
        return now - self.log_path.stat().st_mtime

    # scheduler submissions ------------------------------------------------------------------
    def read_submissions(self) -> tp.List[tp.Dict[str, tp.Any]]:
        """The run's submission records, oldest first (empty if never submitted by a launcher)."""
        if not self.submissions_path.exists():
            return []
        return [json.loads(line) for line in self.submissions_path.read_text().splitlines()
                if line.strip()]

    def record_submission(self, job_id: str, **fields: tp.Any) -> None:
        """Append ``{job_id, submitted, ...fields}`` to ``submissions.jsonl`` (rewritten whole,
        atomically; only the launching process writes it).

        Args:
            job_id: the scheduler's id (``"123_4"`` for array tasks).
            fields: extra JSON-able fields (``sweep_dir``, ``grid``, ``cluster``).
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        records = self.read_submissions()
        records.append({"job_id": str(job_id), "submitted": now_iso(), **fields})
        io.write_lines(self.submissions_path, records)

    def known_job_ids(self, status: tp.Optional[tp.Mapping[str, tp.Any]]) -> tp.List[str]:
        """Job ids that may still be working on this run: latest submission and status.json's job."""
        ids = []
        subs = self.read_submissions()
        if subs:
            ids.append(str(subs[-1]["job_id"]))
        if status and status.get("job_id"):
            ids.append(str(status["job_id"]))
        return list(dict.fromkeys(ids))


def axes(cfg: tp.Any) -> tp.Dict[str, tp.Any]:
    """Flat dotted semantic keys (``lambda``, ``quant.bits``, ``train.epochs``...) for result tables.

    Every scalar of the semantic config is recorded; the table keeps the ones that vary.
    """
    out: tp.Dict[str, tp.Any] = {}

    def walk(prefix: str, value: tp.Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list):
            out[prefix] = json.dumps(value)
        else:
            out[prefix] = value
    sem = semantic_config(cfg)
    quant = sem.get("quant", {})
    for alias, key in ALIASES.items():
        if isinstance(quant, dict) and key in quant:
            out[alias] = quant[key]
    walk("", sem)
    return out
