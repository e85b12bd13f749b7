"""C kernels for the CPU (`csrc/*.c`), compiled on first use and loaded with ctypes.

Plain C, no Python or torch headers: a build takes a fraction of a second with the system's C
compiler ($CC, else cc, gcc or clang). The shared library lands in the SCAE cache
($SCAE_CACHE/native, default ~/.cache/scae/native) under a key of the source, the compiler and
the flags, written to a temporary file and renamed (never half-written), so later runs load it
(only a file of this user's that others cannot write: loading runs its code).
Without a compiler, when the build fails, or with SCAE_NATIVE=0, `load` returns None (with one
warning, except for SCAE_NATIVE=0) and callers take their torch route (the same results: bit for
bit for the connection search's kernel, to fp32 rounding for the candidate kernel's sums).
ctypes releases the GIL during a call, so callers run one call per thread (`parallel`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = Path(__file__).parent / "csrc"
# Portable code (no -march=native: a cache shared by machines of one cluster stays valid); no
# -ffast-math and no contraction into fused multiply-adds, so each operation rounds as torch's.
FLAGS = ["-O3", "-std=c11", "-shared", "-fPIC", "-ffp-contract=off"]


def enabled() -> bool:
    """False when SCAE_NATIVE=0 (the torch routes everywhere, e.g. to compare them)."""
    return os.environ.get("SCAE_NATIVE", "1") != "0"


def compiler() -> str | None:
    """The C compiler: $CC, else the first of cc, gcc, clang on the PATH."""
    cc = os.environ.get("CC")
    if cc:
        return cc
    return next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def load(name: str) -> ctypes.CDLL | None:
    """The kernel library `csrc/<name>.c`, built if needed; None where it cannot be."""
    if not enabled():
        return None
    cc = compiler()
    return _load(name, cc, os.environ.get("SCAE_CACHE", ""))


@functools.cache
def _load(name: str, cc: str | None, _cache_env: str) -> ctypes.CDLL | None:
    # (the cache folder is a key too: tests point SCAE_CACHE elsewhere)
    from .embedded import cache_root

    src = SOURCES / f"{name}.c"
    if cc is None:
        logger.warning("no C compiler found (set CC): the %s kernel is off, and its caller takes "
                       "the slower torch route", name)
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("the C compiler %r does not run (%s): the %s kernel is off, and its caller "
                       "takes the slower torch route; set CC to a working compiler", cc, exc, name)
        return None
    key = hashlib.sha256(
        "\0".join([src.read_text(), cc, version, *FLAGS, platform.machine(), platform.system()])
        .encode()
    ).hexdigest()[:16]
    folder = cache_root() / "native"
    lib = folder / f"{name}-{key}.so"
    if not lib.exists():
        tmp = folder / f".{lib.name}.tmp{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            out = subprocess.run([cc, *FLAGS, "-o", str(tmp), str(src)], capture_output=True,
                                 text=True, timeout=300)
            if out.returncode != 0:
                raise OSError(f"{cc} exited with {out.returncode}: {out.stderr.strip()[-2000:]}")
            os.chmod(tmp, 0o755)  # (whatever the umask: the load below refuses shared writes)
            os.replace(tmp, lib)
        except (OSError, subprocess.SubprocessError) as exc:
            tmp.unlink(missing_ok=True)
            logger.warning("building the %s kernel into %s failed (%s): its caller takes the "
                           "slower torch route", name, folder, exc)
            return None
        logger.info("built the %s kernel: %s", name, lib)
    # loading a library runs its code: only one this user wrote and nobody else can change
    st = lib.stat()
    if (hasattr(os, "getuid") and st.st_uid != os.getuid()) or st.st_mode & 0o022:
        logger.warning("%s is not this user's own file, or others can write to it: the %s kernel "
                       "is off (the torch route); delete it to rebuild it", lib, name)
        return None
    try:
        return ctypes.CDLL(str(lib))
    except OSError as exc:
        logger.warning("loading %s failed (%s): the %s kernel is off; delete the file to rebuild "
                       "it", lib, exc, name)
        return None


@functools.cache
def _pool(workers: int, _pid: int) -> ThreadPoolExecutor:
    # (one per process: a forked child has none of its parent's threads)
    return ThreadPoolExecutor(workers, thread_name_prefix="scae-native")


def workers() -> int:
    """Threads for kernel calls: torch's intra-op thread count."""
    return max(1, torch.get_num_threads())


def ranges(n: int) -> list[tuple[int, int, int]]:
    """(first, end, thread) of about equal ranges of n rows, one per kernel thread."""
    w = max(1, min(n, workers()))
    cuts = [n * i // w for i in range(w + 1)]
    return [(cuts[i], cuts[i + 1], i) for i in range(w) if cuts[i] < cuts[i + 1]]


def parallel(fn: Callable[..., None], args: Sequence[tuple]) -> None:
    """fn(*a) for each a, on `workers()` threads (a kernel call each: ctypes releases the GIL);
    returns when all are done, and raises the first error."""
    if len(args) == 1:
        fn(*args[0])
        return
    for future in [_pool(workers(), os.getpid()).submit(fn, *a) for a in args]:
        future.result()
