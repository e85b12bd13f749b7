"""Thin torch.distributed helpers, safe to call when distributed is not initialised."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if _active() else 1


def per_rank(tokens: int) -> int:
    """This rank's share of a global token count (at least 1): budgets such as batch_tokens are
    global, over all ranks, everywhere in the library."""
    return max(1, tokens // world_size())


def is_main() -> bool:
    """True on rank 0: the only rank that logs and saves."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if _active() and world_size() > 1:
        dist.barrier()


@torch.no_grad()
def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """All-reduce-average every gradient over ranks (no-op on one process).

    Gradients are flattened into one buffer per dtype so there is one collective per dtype.
    """
    n = world_size()
    if n <= 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for gs in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in gs])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= n
        offset = 0
        for g in gs:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


@torch.no_grad()
def broadcast_params(params: Iterable[torch.Tensor], src: int = 0) -> None:
    """Copy `src`'s values of every tensor to all ranks (no-op on one process)."""
    if world_size() <= 1:
        return
    for p in params:
        # collectives need contiguous tensors; the decoders are stored column-major
        buf = p.data.contiguous()
        dist.broadcast(buf, src=src)
        if buf.data_ptr() != p.data.data_ptr():
            p.data.copy_(buf)


@torch.no_grad()
def all_reduce_max_(t: torch.Tensor) -> torch.Tensor:
    """In-place elementwise max over ranks (no-op on one process)."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


@torch.no_grad()
def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op on one process)."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] on one process)."""
    if world_size() <= 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def init_distributed() -> bool:
    """Join the process group that torchrun describes in the environment (RANK, WORLD_SIZE, ...).

    nccl when CUDA is present (each rank on cuda:LOCAL_RANK), gloo on CPU. A plain single-process
    run (no WORLD_SIZE, or WORLD_SIZE=1) does nothing. Returns whether a group is active.
    """
    import os

    if _active():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def default_device() -> str:
    """cuda:LOCAL_RANK when CUDA is present, else cpu."""
    import os

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"
