"""Argument checks the scripts run before any work, each naming the argument and the fix."""

from __future__ import annotations

import os
from pathlib import Path

import torch

MIN_CTX_LEN = 3
"""BOS + 2 tokens: the shortest context with one scored next-token prediction (evaluate.py)."""


def check_out_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """`path` is a folder or can become one (created here); else NotADirectoryError."""
    p = Path(path).expanduser()
    for q in (p, *p.parents):
        if q.exists() and not q.is_dir():
            raise NotADirectoryError(
                f"{what} {str(p)!r}: {str(q)!r} is a regular file, not a folder; pass a folder "
                f"path (it is created if missing)"
            )
        if q.exists():
            break
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(exc.errno, f"{what} {str(p)!r} cannot be created ({exc.strerror}); pass a "
                                 "writable folder") from None
    return p


def check_cache_root() -> Path:
    """The SCAE cache folder ($SCAE_CACHE, default ~/.cache/scae), created; never a file."""
    from .embedded import cache_root

    where = "SCAE_CACHE" if os.environ.get("SCAE_CACHE") else "the SCAE cache (~/.cache/scae)"
    return check_out_dir(cache_root(), where)


def check_device(device: str | torch.device, what: str = "--device") -> torch.device:
    """A device that exists and is available here; else ValueError saying which ones are."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{what} {device!r} is not a device name ({exc}); use cpu, cuda or "
                         "cuda:<index>") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{what} {device!r}: CUDA is not available on this machine (no GPU, or a CPU-only "
                "torch build); use --device cpu"
            )
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(
                f"{what} {device!r}: this machine has {n} CUDA device(s), cuda:0 .. cuda:{n - 1}"
            )
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{what} {device!r}: MPS is not available here; use --device cpu")
        return dev
    raise ValueError(
        f"{what} {device!r}: device type {dev.type!r} is not supported; use cpu or cuda"
    )


def check_ctx_len(ctx_len: int, n_positions: int | None = None, what: str = "--ctx-len") -> None:
    """A context length every stage can use: >= MIN_CTX_LEN, and <= the model's positions."""
    if ctx_len < MIN_CTX_LEN:
        raise ValueError(
            f"{what} {ctx_len} is too short: evaluation scores next-token predictions after BOS, "
            f"which needs BOS + 2 tokens; use {what} >= {MIN_CTX_LEN}"
        )
    if n_positions is not None and ctx_len > n_positions:
        raise ValueError(
            f"{what} {ctx_len} exceeds the model's n_positions={n_positions}; use "
            f"{what} <= {n_positions}"
        )
