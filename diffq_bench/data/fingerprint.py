"""A fingerprint of the data a run read, so a result is never reported for other data.

A run's identity is its config (what the user asked for); the data it was trained and tested on
is recorded next to it (``data.json`` in the run folder) as a fingerprint: per group of files (a
split, a class folder, a corpus file) their count, bytes and a SHA-256 of their contents. A
finished or interrupted run whose data no longer matches refuses to be reused or resumed, and
says which groups changed.

File digests are cached under ``<paths.cache>/fingerprints/`` by (path, size, mtime), so only
new or modified files are read again. Files above :data:`FULL_HASH_BYTES` are digested on their
first and last :data:`EDGE_BYTES` and their size (a truncated or appended file changes both).
A folder of more than :data:`MAX_CONTENT_FILES` files (ImageNet's 1.3 M images) is fingerprinted
by names and sizes only: reading 150 GB before every run is not worth it, and a replaced, added,
removed or resized image is still seen.
"""
from __future__ import annotations

import hashlib
import os
import typing as tp
from pathlib import Path

from .. import io

FULL_HASH_BYTES = 64 << 20
EDGE_BYTES = 4 << 20
MAX_CONTENT_FILES = 50_000


def _digest(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        else:
            digest.update(handle.read(EDGE_BYTES))
            handle.seek(size - EDGE_BYTES)
            digest.update(handle.read(EDGE_BYTES))
            digest.update(str(size).encode())
    return digest.hexdigest()


def fingerprint(root: Path, files: tp.Iterable[Path], cache_dir: Path, depth: int = 1,
                extra: tp.Optional[tp.Mapping[str, tp.Any]] = None) -> tp.Dict[str, tp.Any]:
    """The fingerprint of ``files`` (under ``root``), grouped by their first ``depth`` path parts.

    Args:
        root: the dataset folder (names are relative to it; the folder itself is not recorded).
        files: the files the task reads.
        cache_dir: where file digests are cached.
        depth: path components naming a group (1: ``train`` or ``wiki.train.tokens``; 2:
            ``train/<class>``).
        extra: other facts the task wants in it (an embedded set's source and options).
    """
    root = Path(root)
    cache_path = Path(cache_dir) / "fingerprints" / (
        hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16] + ".json")
    try:
        cache = io.read_json(cache_path, "fingerprint cache")
    except (FileNotFoundError, io.LoadError):
        cache = {}  # a missing or broken cache is rebuilt
    groups: tp.Dict[str, tp.Any] = {}
    fresh = {}
    paths = sorted(Path(f) for f in files)
    by_content = len(paths) <= MAX_CONTENT_FILES
    for path in paths:
        rel = path.relative_to(root).as_posix()
        stat = os.stat(path)
        known = cache.get(rel)
        if not by_content:
            digest = f"size:{stat.st_size}"
        elif isinstance(known, list) and known[:2] == [stat.st_size, stat.st_mtime_ns]:
            digest = known[2]
        else:
            digest = _digest(path, stat.st_size)
        if by_content:
            fresh[rel] = [stat.st_size, stat.st_mtime_ns, digest]
        group = "/".join(rel.split("/")[:depth])
        entry = groups.setdefault(group, {"files": 0, "bytes": 0, "sha256": hashlib.sha256()})
        entry["files"] += 1
        entry["bytes"] += stat.st_size
        entry["sha256"].update(f"{rel}\0{digest}\0".encode())
    if by_content and fresh != cache:
        try:
            io.write_json(cache_path, fresh, indent=None)
        except OSError:
            pass  # a read-only cache only costs time
    out: tp.Dict[str, tp.Any] = {"groups": {g: {**e, "sha256": e["sha256"].hexdigest()}
                                            for g, e in groups.items()}}
    if not by_content:
        out["content"] = "names and sizes"
    if extra:
        out["extra"] = dict(extra)
    total = hashlib.sha256(repr(sorted((g, e["sha256"]) for g, e in out["groups"].items())).encode())
    total.update(repr(sorted((out.get("extra") or {}).items())).encode())
    out["sha256"] = total.hexdigest()
    return out


def differences(old: tp.Mapping[str, tp.Any], new: tp.Mapping[str, tp.Any], limit: int = 4) -> str:
    """What changed between two fingerprints, in words (empty when they match)."""
    if old.get("sha256") == new.get("sha256"):
        return ""
    a, b = old.get("groups", {}), new.get("groups", {})
    parts = [f"{g} removed" for g in sorted(set(a) - set(b))]
    parts += [f"{g} added" for g in sorted(set(b) - set(a))]
    for g in sorted(set(a) & set(b)):
        if a[g] != b[g]:
            parts.append(f"{g} changed ({a[g]['files']} -> {b[g]['files']} files, "
                         f"{a[g]['bytes']} -> {b[g]['bytes']} bytes)")
    if old.get("extra") != new.get("extra"):
        parts.append(f"source {old.get('extra')} -> {new.get('extra')}")
    more = f" and {len(parts) - limit} more" if len(parts) > limit else ""
    return "; ".join(parts[:limit]) + more
