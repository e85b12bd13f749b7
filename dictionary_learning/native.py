"""C kernels for the CPU (`csrc/*.c`), compiled on first use and loaded with ctypes.

Plain C, no Python or torch headers: a build takes a fraction of a second with the system's C
compiler ($CC, else cc, gcc or clang). The shared library lands in the SCAE cache
($SCAE_CACHE/native, default ~/.cache/scae/native) under a key of the source, the compiler and
the flags, written to a temporary file and renamed (never half-written), so later runs load it
(only a file of this user's that others cannot write: loading runs its code).
Without a compiler, when the build fails, or with SCAE_NATIVE=0, `load` returns None (with one
warning, except for SCAE_NATIVE=0) and callers take their torch route (the same results: bit for
bit for the connection search's kernel, to fp32 rounding for the candidate kernel's sums).

Threads. A kernel's work is cut into parts, one per torch thread (`run`). Where torch runs its
CPU threads on libgomp from its own folder (Linux wheels), the kernels are built with OpenMP
against that same library, and one call runs the parts on torch's own threads. A second pool of
threads would compete with torch's: after each of its parallel operators, libgomp's threads
spin for a while before they sleep, and on this project's 2-core machine a kernel run from
Python threads right after a torch operator took ~1.3-2x as long. Elsewhere (another OpenMP
runtime, no OpenMP support) the library is built without it and `run` calls it once per part from
a Python thread pool (ctypes releases the GIL during a call): the same parts, the same results.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import re
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
    return os.environ.get("CC") or _on_path(os.environ.get("PATH", ""))


@functools.cache
def _on_path(_path_env: str) -> str | None:
    # (cached per PATH: the kernels' callers ask on every call, and a PATH search takes ~50 us)
    return next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def load(name: str) -> ctypes.CDLL | None:
    """The kernel library `csrc/<name>.c`, built if needed; None where it cannot be. Its
    attribute `openmp` says whether it runs its parts on torch's OpenMP threads (see `run`)."""
    if not enabled():
        return None
    cc = compiler()
    return _load(name, cc, os.environ.get("SCAE_CACHE", ""))


@functools.cache
def torch_openmp() -> Path | None:
    """The OpenMP runtime torch runs its CPU threads on, where the kernels can share it: a
    libgomp this process loaded from torch's own folders (Linux). None elsewhere."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    site = Path(torch.__file__).resolve().parent.parent
    for path in re.findall(r"(/\S*/libgomp[^/\s]*\.so[^/\s]*)$", maps, re.MULTILINE):
        if Path(path).resolve().is_relative_to(site):
            return Path(path)
    return None


@functools.cache
def _load(name: str, cc: str | None, _cache_env: str) -> ctypes.CDLL | None:
    # (the cache folder is a key too: tests point SCAE_CACHE elsewhere)
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
    # with OpenMP on torch's own runtime where there is one; without it where that fails
    omp = torch_openmp()
    for runtime in ([omp] if omp is not None else []) + [None]:
        lib = _build(name, cc, version, runtime)
        if lib is None:
            continue
        # loading a library runs its code: only one this user wrote and nobody else can change
        st = lib.stat()
        if (hasattr(os, "getuid") and st.st_uid != os.getuid()) or st.st_mode & 0o022:
            logger.warning("%s is not this user's own file, or others can write to it: the %s "
                           "kernel is off (the torch route); delete it to rebuild it", lib, name)
            return None
        try:
            handle = ctypes.CDLL(str(lib))
        except OSError as exc:
            if runtime is not None:
                logger.debug("loading the OpenMP build %s failed (%s)", lib, exc)
                continue
            logger.warning("loading %s failed (%s): the %s kernel is off; delete the file to "
                           "rebuild it", lib, exc, name)
            return None
        # (csrc/parts.h's flag: kernels without parts have none)
        handle.openmp = hasattr(handle, "scae_openmp") and bool(handle.scae_openmp())
        return handle
    return None


def _build(name: str, cc: str, version: str, omp: Path | None) -> Path | None:
    """csrc/<name>.c built into the cache (with OpenMP, linked against `omp`, torch's libgomp,
    if given) unless there; None if the build fails (a warning, or for an OpenMP build a debug
    line: its caller then builds without OpenMP)."""
    from .embedded import cache_root

    src = SOURCES / f"{name}.c"
    key = hashlib.sha256("\0".join([
        src.read_text(), (SOURCES / "parts.h").read_text(), cc, version, *FLAGS,
        platform.machine(), platform.system(), str(omp or ""),
    ]).encode()).hexdigest()[:16]
    folder = cache_root() / "native"
    lib = folder / f"{name}-{key}.so"
    if lib.exists():
        return lib
    tmp = folder / f".{lib.name}.tmp{os.getpid()}"
    obj = tmp.with_suffix(".o")
    # OpenMP: compiled with it, linked against torch's runtime file itself (not -lgomp, which
    # could bring a second runtime with its own threads)
    steps = ([[cc, *FLAGS, "-fopenmp", "-c", "-o", str(obj), str(src)],
              [cc, "-shared", "-o", str(tmp), str(obj), str(omp)]] if omp is not None
             else [[cc, *FLAGS, "-o", str(tmp), str(src)]])
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for cmd in steps:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if out.returncode != 0:
                raise OSError(f"{cc} exited with {out.returncode}: {out.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)  # (whatever the umask: the load refuses shared writes)
        os.replace(tmp, lib)
    except (OSError, subprocess.SubprocessError) as exc:
        tmp.unlink(missing_ok=True)
        if omp is not None:
            logger.debug("building the %s kernel with OpenMP failed (%s)", name, exc)
        else:
            logger.warning("building the %s kernel into %s failed (%s): its caller takes the "
                           "slower torch route", name, folder, exc)
        return None
    finally:
        obj.unlink(missing_ok=True)
    logger.info("built the %s kernel: %s", name, lib)
    return lib


@functools.cache
def _pool(workers: int, _pid: int) -> ThreadPoolExecutor:
    # (one per process: a forked child has none of its parent's threads)
    return ThreadPoolExecutor(workers, thread_name_prefix="scae-native")


def workers() -> int:
    """Threads for kernel calls: torch's intra-op thread count."""
    return max(1, torch.get_num_threads())


def run(lib: ctypes.CDLL, kernel: str, n_parts: int, *args) -> None:
    """lib.kernel(part_lo, part_hi, n_parts, *args): parts 0 .. n_parts of the work (csrc/parts.h),
    in one call on torch's OpenMP threads where the library was built with them, else one call
    per part on `parallel`'s threads."""
    fn = getattr(lib, kernel)
    if lib.openmp or n_parts == 1:
        fn(0, n_parts, n_parts, *args)
    else:
        parallel(fn, [(p, p + 1, n_parts, *args) for p in range(n_parts)])


def parts(n: int) -> int:
    """How many parts to cut n rows of work into: one per torch thread, at most one per row."""
    return max(1, min(n, workers()))


def parallel(fn: Callable[..., None], args: Sequence[tuple]) -> None:
    """fn(*a) for each a, on `workers()` threads (a kernel call each: ctypes releases the GIL);
    returns when all are done, and raises the first error."""
    if len(args) == 1:
        fn(*args[0])
        return
    for future in [_pool(workers(), os.getpid()).submit(fn, *a) for a in args]:
        future.result()
