"""The one place where diffq-bench writes files atomically and loads untrusted ones safely.

Writing: :func:`write_bytes` / :func:`write_text` / :func:`write_json` / :func:`save_torch` and
:func:`atomic_dir` write into a temporary sibling (``.<name>.tmp<pid>``), flush and ``fsync`` it,
then ``os.replace`` it over the target: a reader sees the old file or the new one, never half of
one. On any error the temporary file is removed before the error propagates, so a failed or
interrupted write never leaves a partial file behind (a writer killed by SIGKILL leaves its
``.tmp<pid>`` file, which :func:`remove_stale_temps` deletes once that pid is dead). A full disk
is always reported as an ``OSError(ENOSPC)`` naming the target and saying the disk is full, also
when torch's C++ writer hides it behind an ``enforce fail ... unexpected pos`` message.

Loading: :func:`load_torch` reads ``torch.save`` files with ``weights_only=True`` (no code is ever
unpickled), checks an optional format marker and version, and raises :class:`LoadError`, whose
message always names the file and what to do. :func:`read_json` does the same for JSON.
"""
from __future__ import annotations

import contextlib
import errno
import io as _pyio
import json
import os
import re
import shutil
import typing as tp
from pathlib import Path

import torch

PathLike = tp.Union[str, os.PathLike]
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>\d+)$")


class LoadError(ValueError):
    """A file could not be loaded: unreadable, corrupt, unsafe or of another format/version.

    The message names the file, says what was wrong and what to do.
    """


def temp_path(path: PathLike) -> Path:
    """The temporary sibling a writer of ``path`` in this process uses: ``.<name>.tmp<pid>``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _disk_error(exc: OSError, path: Path) -> OSError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OSError(exc.errno, f"cannot write {path}: the disk is full (free some space or "
                                  "point paths.root / paths.cache elsewhere)")
    return exc


class _Recorder:
    """A binary file that remembers the OSError of a failed write: torch's C++ writer reports a
    full disk as ``[enforce fail at inline_container.cc] unexpected pos``, hiding the cause."""

    def __init__(self, fout: tp.BinaryIO):
        self.fout = fout
        self.error: tp.Optional[OSError] = None

    def write(self, data: tp.Any) -> int:
        try:
            return self.fout.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fout.flush()


def _write(path: PathLike, write: tp.Callable[[tp.BinaryIO], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    recorder: tp.Optional[_Recorder] = None
    try:
        with open(tmp, "wb") as fout:
            recorder = _Recorder(fout)
            write(tp.cast(tp.BinaryIO, recorder))
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _disk_error(exc, path) from exc
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if recorder is not None and recorder.error is not None and isinstance(exc, Exception):
            raise _disk_error(recorder.error, path) from exc  # the cause, not the C++ symptom
        _raise_if_full(exc, path)
        raise


def _raise_if_full(exc: BaseException, path: Path) -> None:
    """Raise the disk-full OSError for ``path`` when ``exc`` is a writer's failure (a C++ enforce
    message from torch/numpy) on a file system with (almost) no room left."""
    if not isinstance(exc, (RuntimeError, ValueError)):
        return
    try:
        stats = os.statvfs(path.parent if path.parent.exists() else path.parent.parent)
    except OSError:
        return
    if stats.f_bavail * stats.f_frsize < _FULL_BYTES:
        raise _disk_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), path) from exc


#: a file system with less room than this is full for a failed writer (torch writes in blocks)
_FULL_BYTES = 1 << 20


def write_bytes(path: PathLike, data: bytes) -> None:
    """Atomically replace ``path`` with ``data`` (see the module docstring)."""
    _write(path, lambda fout: fout.write(data))


def write_text(path: PathLike, text: str) -> None:
    """Atomically replace ``path`` with ``text`` encoded as UTF-8."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, data: tp.Any, indent: tp.Optional[int] = 2) -> None:
    """Atomically write ``data`` as strict JSON (sorted keys, trailing newline; NaN/inf refused:
    a ValueError naming the file, the file left as it was)."""
    write_text(path, _strict_json(path, data, indent) + "\n")


def write_lines(path: PathLike, records: tp.Iterable[tp.Any]) -> None:
    """Atomically write one strict JSON object per line (JSON Lines), rewriting the file whole."""
    write_text(path, "".join(_strict_json(path, r, None) + "\n" for r in records))


def _strict_json(path: PathLike, data: tp.Any, indent: tp.Optional[int]) -> str:
    try:
        return json.dumps(data, indent=indent, sort_keys=True, allow_nan=False)
    except ValueError as exc:
        raise ValueError(f"refusing to write {path}: a value is NaN or infinite ({exc}); "
                         "the run diverged") from None


def copy_file(source: tp.Union[PathLike, tp.BinaryIO], path: PathLike) -> None:
    """Atomically copy a file (a path or an open binary stream) to ``path``, in 4 MiB blocks."""
    if hasattr(source, "read"):
        _write(path, lambda fout: shutil.copyfileobj(source, fout, 1 << 22))
        return
    with open(source, "rb") as fin:
        _write(path, lambda fout: shutil.copyfileobj(fin, fout, 1 << 22))


def save_torch(path: PathLike, obj: tp.Any) -> None:
    """Atomically ``torch.save`` ``obj`` (plain tensors/containers) to ``path``."""
    _write(path, lambda fout: torch.save(obj, fout))


@contextlib.contextmanager
def atomic_dir(path: PathLike, marker: str) -> tp.Iterator[Path]:
    """Build a folder in a temporary sibling and rename it to ``path`` when the block succeeds.

    Args:
        path: the folder to publish.
        marker: a file the block writes last; a published folder holding it is complete. If
            another process published a complete ``path`` first, its copy is kept (same content
            by construction) and ours is discarded. On error the temporary folder is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.replace(tmp, path)
        except OSError:
            if not (path / marker).is_file():
                raise
    except OSError as exc:
        raise _disk_error(exc, path) from exc
    except Exception as exc:
        _raise_if_full(exc, path)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: PathLike) -> tp.List[Path]:
    """Delete the temporary files left in ``folder`` by writers of this host that died mid-write.

    Returns:
        the removed paths.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMP_RE.match(entry.name)
        if match and not _pid_alive(int(match["pid"])):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


# ------------------------------------------------------------------------------------- loading
def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


def _unsafe_reason(exc: BaseException) -> tp.Optional[str]:
    # torch's weights_only refusal names the refused global ("Unsupported global: GLOBAL x.y");
    # keep that, never its advice to turn the safe loader off.
    match = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return match.group(1) if match else None


def load_torch(source: tp.Union[PathLike, bytes], *, what: str = "file",
               marker: tp.Optional[str] = None, version: tp.Optional[int] = None,
               recover: str = "") -> tp.Dict[str, tp.Any]:
    """Load a ``torch.save`` file safely (``weights_only=True``, on CPU) and check its format.

    Args:
        source: a path, or the bytes of such a file.
        what: what the file is, for messages (``checkpoint``, ``quantized state``...).
        marker: expected value of the dict's ``"format"`` key (None: no check).
        version: highest ``"version"`` this code reads (None: no check).
        recover: what the user can do, appended to the messages of corrupt files.
    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
        LoadError: unreadable, unsafe, not a dict, wrong marker or newer version.
    """
    if isinstance(source, (bytes, bytearray)):
        name, handle = f"{what} (bytes)", _pyio.BytesIO(bytes(source))
    else:
        name = str(source)
        if not Path(source).is_file():
            raise FileNotFoundError(errno.ENOENT, f"no {what} at {name}", name)
        handle = source
    hint = f"; {recover}" if recover else ""
    try:
        state = torch.load(handle, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decoding failure becomes one clear error
        unsafe = _unsafe_reason(exc)
        if unsafe is not None:
            raise LoadError(f"{name} contains Python objects ({unsafe}) that the safe loader "
                            f"refuses; it was not loaded, for safety{hint}") from None
        detail = _first_line(exc)
        if "Weights only load failed" in str(exc):  # keep torch's cause, never its advice
            after = str(exc).split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
            detail = f"the safe loader refused it: {after[0][:200] if after else 'unknown reason'}"
        raise LoadError(f"{what} {name} is corrupt or unreadable ({type(exc).__name__}: "
                        f"{detail}){hint}") from None
    if not isinstance(state, dict) or (marker is not None and state.get("format") != marker):
        raise LoadError(f"{name} is not a diffq-bench {what} (missing format marker "
                        f"{marker!r}){hint}")
    if version is not None and state.get("version", 0) > version:
        raise LoadError(f"{name} has {what} format version {state.get('version')}, this "
                        f"diffq-bench reads up to {version}: upgrade diffq-bench")
    return state


def read_json(path: PathLike, what: str = "JSON file") -> tp.Any:
    """Parse a JSON file; :class:`LoadError` naming the file when it is not valid JSON.

    Raises:
        FileNotFoundError: the file does not exist.
        LoadError: invalid UTF-8 or JSON.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadError(f"{what} {path} is not valid JSON ({_first_line(exc)})") from None
