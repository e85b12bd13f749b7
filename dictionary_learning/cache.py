"""Stage cache of the pipeline: content-hash keys, per-stage file locks, and what each stage did.

A stage's key hashes everything its output depends on: the content (never the path) of its input
files, folders and tensors, every setting, and the version of the stage's output format. Its
output lives in `<cache>/<stage>-<key>/`; a finished stage is reused, an unfinished one is
(re)computed under an exclusive file lock, so two runs on one cache compute a stage once: the
second waits, then reuses the result.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from .distributed import all_gather_object, barrier, is_main

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


def _update_file(h, path: Path) -> None:
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)


def content_hash(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes, sorted).

    Hidden entries (temp files, locks: names starting with ".") are left out.
    """
    p = Path(path).expanduser()
    h = hashlib.sha256()
    if p.is_file():
        _update_file(h, p)
    elif p.is_dir():
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            rel = f.relative_to(p)
            if any(part.startswith(".") for part in rel.parts):
                continue
            h.update(f"\0{rel.as_posix()}\0".encode())
            _update_file(h, f)
    else:
        raise FileNotFoundError(f"cannot hash {str(p)!r}: it does not exist")
    return h.hexdigest()


def tensors_hash(obj) -> str:
    """sha256 of nested dicts/lists of tensors and plain values: keys, dtypes, shapes and bytes."""
    h = hashlib.sha256()

    def walk(x) -> None:
        if isinstance(x, Tensor):
            t = x.detach().to("cpu").contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, Mapping):
            h.update(b"{")
            for k in sorted(x, key=str):
                h.update(f"{k!s}:".encode())
                walk(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                walk(v)
            h.update(b"]")
        else:
            h.update(json.dumps(x, default=str).encode())

    walk(obj)
    return h.hexdigest()


def source_hash(spec: str | os.PathLike) -> str:
    """The content hash of a local file or folder; "name:<spec>" for a Hub or `datasets` name
    (those are versioned by their own hub). "embedded" (the text) hashes the embedded corpus."""
    if str(spec) == "embedded":
        from .embedded import play_paths

        h = hashlib.sha256()
        for name, path in play_paths().items():  # the raw play files the corpus is made of
            h.update(f"\0{name}\0".encode())
            _update_file(h, path)
        return h.hexdigest()
    p = Path(spec).expanduser()
    return content_hash(p) if p.exists() else f"name:{spec}"


def stage_key(stage: str, version: int, **inputs) -> str:
    """A short stable hash of a stage's name, format version and inputs (hashes and settings)."""
    blob = json.dumps({"stage": stage, "version": version, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class StageRecord(NamedTuple):
    """What a cached stage did, as report.json records it."""

    key: str
    """The stage's cache key (see `stage_key`)."""
    cached: bool
    """True when the output was reused from the cache, False when this run computed it."""
    dir: str
    """The stage's output folder or file."""


@contextlib.contextmanager
def stage_lock(path: str | os.PathLike):
    """An exclusive lock on `path` (a file, created if needed), held for the block.

    When another process holds it, logs who and waits: the other run is computing the same stage.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            logger.warning(
                "waiting for the lock %s: another process (pid %s) is computing this stage; this "
                "run will reuse its result (the lock is released when that process ends, even if "
                "it is killed)", path, holder,
            )
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def run_stage(
    out: Path, key: str, is_done: Callable[[], bool], compute: Callable[[], None], lock_dir: Path
) -> StageRecord:
    """Reuse the stage output `out` when `is_done()`, else `compute()` it while holding the lock
    `lock_dir/<out name>.lock` (so a second run on the same cache waits, then reuses it).

    On several processes (torchrun) rank 0 takes the lock and decides; every rank then computes
    together (compute may use collectives) or skips together.
    """
    lock = stage_lock(lock_dir / f"{out.name}.lock") if is_main() else contextlib.nullcontext()
    with lock:
        done = all_gather_object(is_done() if is_main() else None)[0]
        if not done:
            compute()
        barrier()
    return StageRecord(key, bool(done), str(out))
