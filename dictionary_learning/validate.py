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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""The dtypes dictionaries and activations can run in, by name."""


def parse_dtype(name: str, what: str = "--dtype") -> torch.dtype:
    """The torch dtype called `name` ("float32" or "bfloat16"); else ValueError listing them."""
    dt = DTYPES.get(name)
    if dt is None:
        raise ValueError(f"{what} {name!r} is not supported; use one of {sorted(DTYPES)}")
    return dt


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


def check_context(ctx, i: int, ctx_len: int | None = None) -> torch.Tensor:
    """Context number `i` as a LongTensor [ctx_len]: 1-D integer token ids, of length `ctx_len`
    when given (all contexts share one length); else TypeError / ValueError naming it."""
    if not isinstance(ctx, torch.Tensor) or ctx.dim() != 1 or ctx.dtype.is_floating_point:
        got = f"{type(ctx).__name__} {getattr(ctx, 'dtype', '')} {tuple(getattr(ctx, 'shape', ()))}"
        raise TypeError(
            f"context {i} is not a 1-D LongTensor [ctx_len] of token ids (got {got}); build "
            "contexts with token_contexts()"
        )
    if ctx_len is not None and ctx.shape[0] != ctx_len:
        raise ValueError(
            f"context {i} has {ctx.shape[0]} tokens, expected {ctx_len}; all contexts must have "
            "one length (token_contexts packs them)"
        )
    return ctx.long()


def check_candidates(name: str, k: int, n_threshold: int, n_random: int, dict_size: int) -> None:
    """The candidate set of transcoder `name` (top k + n_threshold + n_random, docs/method.md §5)
    fits in its dict_size features; else ValueError saying which to lower."""
    if k + n_threshold + n_random > dict_size:
        raise ValueError(
            f"{name}: k + n_threshold + n_random = {k} + {n_threshold} + {n_random} exceeds "
            f"dict_size {dict_size}; lower n_threshold or n_random"
        )


def check_ctx_len(
    ctx_len: int, n_positions: int | None = None, what: str = "--ctx-len",
    minimum: int = MIN_CTX_LEN,
) -> None:
    """A context length the stages can use: >= `minimum` (default MIN_CTX_LEN, what evaluation
    needs; the buffer alone needs BOS + 1), and <= the model's positions."""
    if ctx_len < minimum:
        why = ("evaluation scores next-token predictions after BOS, which needs BOS + 2 tokens"
               if minimum == MIN_CTX_LEN else f"contexts need BOS + {minimum - 1} token(s)")
        raise ValueError(f"{what} {ctx_len} is too short: {why}; use {what} >= {minimum}")
    if n_positions is not None and ctx_len > n_positions:
        raise ValueError(
            f"{what} {ctx_len} exceeds the model's n_positions={n_positions}; use "
            f"{what} <= {n_positions}"
        )
