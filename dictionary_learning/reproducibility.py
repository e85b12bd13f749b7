"""Bit-for-bit reproducible runs: the determinism settings, and digests to compare runs with.

Two runs of the pipeline at the same settings give bitwise-identical artifacts on CPU when they
use the same number of intra-op threads: torch splits a CPU reduction over all elements of a
tensor of 2^16 elements or more (e.g. the FVU of a [1024, 128] batch) into one chunk per thread,
so it rounds differently with 1 and 2 threads. `configure_determinism` therefore fixes that number.
Library code also avoids kernels that add in a varying order on a multi-threaded CPU: the backward
of advanced indexing with repeated indices (`x[idx]`, i.e. `index_put_` with accumulation) is one;
`index_select`, `gather` and `index_add_` add in a fixed order.

On CUDA, some kernels the pipeline uses add in a scheduling-dependent order (`index_add_`,
`scatter_add_`, the backward of `gather` and `index_select`): their results can change in the last
bits from run to run. `deterministic=True` switches torch to its deterministic implementations
(`torch.use_deterministic_algorithms`), slower, and torch raises where none exists.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

DEFAULT_THREADS = 2
"""Intra-op threads of a pipeline run unless set: results depend on this number, not on the
machine's core count, so runs on different machines can agree."""


def configure_determinism(
    threads: int | None = DEFAULT_THREADS, deterministic: bool = False
) -> None:
    """Fix the sources of run-to-run variation that are process settings, not seeds.

    Call it before any computation (CUBLAS_WORKSPACE_CONFIG is read at cuBLAS's first use).

    threads: intra-op threads (torch.set_num_threads); None keeps torch's default (the core count,
        or $OMP_NUM_THREADS), which makes CPU results depend on the machine and the environment.
    deterministic: torch.use_deterministic_algorithms(True) and deterministic cuDNN/cuBLAS; needed
        for bitwise-identical CUDA runs (CPU runs are reproducible without it).
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads={threads} must be a positive number of intra-op threads")
        torch.set_num_threads(threads)
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; it must be set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True)


def _bytes(t: Tensor) -> Tensor:
    """The raw bytes of a tensor (any dtype and shape, 0-d included) as a flat uint8 tensor."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def tensor_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes and bytes), independent of dict order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_bytes(t).numpy().tobytes())
    return h.hexdigest()


def suite_digest(suite) -> str:
    """Digest of every dictionary's parameters (not the connections: see connections_digest)."""
    return tensor_digest({f"{n}.{k}": t for n, d in suite.dicts.items()
                          for k, t in d.state_dict().items()})


def connections_digest(conns: Mapping[str, Mapping[str, Tensor]]) -> str:
    """Digest of connections in the exchange format ({down: {up: LongTensor[F, C]}})."""
    return tensor_digest({f"{d}/{u}": idx for d, ups in conns.items() for u, idx in ups.items()})


RUN_LOCAL_FIELDS = ("timings_s", "artifacts", "stages", "inputs")
"""Report fields that legitimately differ between two runs of the same settings: wall-clock
timings, and where the run put its files (artifact paths, cache folders, and the stage keys and
input hashes, which cover the suite folder's metadata and so its cache path)."""


def report_digest(report: Mapping) -> str:
    """Digest of a report's figures, without the fields that legitimately differ between runs
    (RUN_LOCAL_FIELDS)."""
    body = {k: v for k, v in report.items() if k not in RUN_LOCAL_FIELDS}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def first_difference(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> str | None:
    """None if the named tensors are bitwise equal, else a sentence naming the first difference."""
    if sorted(a) != sorted(b):
        return f"different tensor names: {sorted(set(a) ^ set(b))}"
    for name in sorted(a):
        x, y = a[name].detach().cpu(), b[name].detach().cpu()
        if x.dtype != y.dtype or x.shape != y.shape:
            return f"{name}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}"
        if not torch.equal(_bytes(x), _bytes(y)):
            diff = (x.double() - y.double()).abs()
            return (f"{name}: {int((diff > 0).sum())} of {x.numel()} elements differ "
                    f"(max |difference| {float(diff.max()):.3g})")
    return None


def load_tensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a stage artifact: a suite folder (model.safetensors) or a connections file."""
    path = Path(path)
    if path.is_dir():
        from safetensors.torch import load_file

        return load_file(str(path / "model.safetensors"))
    from dictionary_learning.connections import load_connections

    conns = load_connections(path)
    return {f"{d}/{u}": idx for d, ups in conns.items() for u, idx in ups.items()}
