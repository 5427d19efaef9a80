"""A content-addressed stage cache shared between runs (e.g. the trials of ``edgepipe tune``).

Layout: ``<cache>/<key>/`` is a completed stage folder (with its ``.stage.json`` record), where ``key`` is
the runner's chain hash of the stage (model, calibration, profiles, every earlier stage's config, the stage's
own config and version). Entries are never modified after they appear.

Concurrent writers (several trial processes, or several machines on shared storage) are safe:
- a per-key ``flock`` on ``<cache>/.locks/<key>.lock`` makes a second run with the same key wait for the
  first instead of computing the same stage twice;
- an entry is published by copying the finished stage folder to a hidden temp folder inside the cache and
  renaming it to ``<key>`` in one ``rename`` (atomic on POSIX file systems); when the name already exists
  the rename fails and the newcomer is discarded, so a reader never sees a half-written entry.

``flock`` on network file systems depends on the server (NFSv4 supports it); without it the cache stays
correct (atomic publish) but two runs may compute the same stage once each.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["key_lock", "lookup", "materialize", "publish"]

RECORD = ".stage.json"


def _entry(cache_dir: Path, key: str) -> Path:
    if not key or not all(c in "0123456789abcdef" for c in key):
        raise ValueError(f"cache key must be a hex digest, got {key!r}")
    return Path(cache_dir) / key


@contextmanager
def key_lock(cache_dir: Path, key: str) -> Iterator[None]:
    """Hold an exclusive lock for ``key`` (blocking) while a stage with that key is looked up or computed."""
    locks = Path(cache_dir) / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    fh = open(_entry(locks, key).with_suffix(".lock"), "a")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield
    finally:
        fh.close()  # closing releases the lock (also when the process is killed)


def lookup(cache_dir: Path, key: str) -> dict[str, Any] | None:
    """The stage record of a complete entry for ``key``, or None."""
    rec_path = _entry(cache_dir, key) / RECORD
    if rec_path.is_symlink() or not rec_path.is_file():
        return None
    try:
        rec = json.loads(rec_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) and rec.get("key") == key else None


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy a folder, hard-linking files where possible (cache entries and stage outputs are never modified in
    place); symlinks are not followed or copied."""
    dst.mkdir(parents=True)
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        q = dst / rel
        if p.is_symlink():
            continue
        if p.is_dir():
            q.mkdir(parents=True, exist_ok=True)
            continue
        q.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(p, q)
        except OSError:
            shutil.copyfile(p, q)


def materialize(cache_dir: Path, key: str, tmp: Path) -> None:
    """Copy the entry for ``key`` into the (not yet existing) folder ``tmp``; the caller renames it into place."""
    _copy_tree(_entry(cache_dir, key), tmp)


def publish(cache_dir: Path, key: str, stage_dir: Path) -> bool:
    """Publish the completed ``stage_dir`` as the entry for ``key``. Returns False if an entry already existed."""
    final = _entry(cache_dir, key)
    if lookup(cache_dir, key) is not None:
        return False
    tmp = Path(cache_dir) / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _copy_tree(stage_dir, tmp)
    try:
        os.rename(tmp, final)  # atomic; fails if another writer published first
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    return True
