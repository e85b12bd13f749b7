"""Atomic file and folder writes: a temp file (or folder) in the same folder, fsync, then
os.replace (never half-written). The one home of atomic replacement in the library.

A write that fails because the disk is full raises DiskFullError naming the target path (torch
itself reports a full disk as "unexpected pos ..."); the target is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import DiskFullError

_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` or an exception it was raised from is ENOSPC / EDQUOT (or says so)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return True
        if "No space left on device" in str(exc) or "os error 28" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def disk_full_errors(path: str | os.PathLike):
    """Turn a full-disk failure inside the block into DiskFullError naming `path`."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if not _is_disk_full(exc):
            raise
        where = Path(path).parent
        try:
            free = f"{shutil.disk_usage(where).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        raise DiskFullError(
            errno.ENOSPC,
            f"no space left on device while writing {str(path)!r} ({free} in {str(where)!r}); "
            "the previous file (if any) is unchanged. Free some space or point SCAE_CACHE / --out "
            "at a larger disk, then run again",
        ) from exc


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call `write(file_object)` on a temp file next to `path`, then rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with disk_full_errors(path), open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    text = json.dumps(obj, indent=2, default=str)
    return atomic_write(path, lambda fh: fh.write(text.encode()))


def replace_file(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Move the finished file `tmp` onto `path` (same filesystem) in one rename."""
    path = Path(path)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Move the finished folder `tmp` to `out`; an existing `out` is replaced, and put back if
    the rename fails."""
    tmp, out = Path(tmp), Path(out)
    if not out.exists():
        os.replace(tmp, out)
        return out
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old", dir=out.parent))
    os.replace(out, old / "x")
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old / "x", out)  # put the previous folder back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
    return out


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, names: str | os.PathLike | None = None):
    """Yield an empty temporary folder beside `out` to write into; when the block ends without an
    error it replaces `out` (replace_dir), otherwise it is removed and `out` stays as it was.
    A full disk inside the block raises DiskFullError naming `names` (default `out`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        with disk_full_errors(names or out):
            yield tmp
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
