"""Sparse kernels of the pruned pass (docs/method.md §3), each with a plain reference beside it.

The pruned pre-activation of downstream feature i sums, over its connections c,

    f_up[b, J[i, c]] * V[i, c],        V[i, c] = (P w_i) . d_{J[i, c]}

where J [F, C] holds global upstream indices (all upstream dictionaries side by side; the value
`n_up` marks padding) and V are the "virtual weights". Nothing here builds a dense F x F matrix, a
[B, K, C, A] tensor or, in the all-features mode, a [B, F, C] tensor. The fused kernels work in
token chunks and recompute in backward, so their memory does not grow with the batch.
"""

from __future__ import annotations

import ctypes
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F_
from torch import Tensor

from . import native

# Elements per temporary buffer of the chunked kernels; bounds their memory.
CHUNK_ELEMENTS = 1 << 22
# The candidate kernel's chunks hold at most CANDIDATE_MAX_TOKENS tokens. Its work per token is
# element-wise gathers, which gain nothing from long chunks, while the chunk's temporaries are
# most of the pruned step's memory on small suites: the default suite's whole chunk of 606 tokens
# gave its training step 7x the vanilla step's memory (benchmarks/RESULTS.md). Wide suites chunk
# at 113-180 tokens per CHUNK_ELEMENTS (F 12288); chunks of ~7 tokens there measured ~10% slower
# (more, smaller kernel calls). At the default suite's size 64 tokens took the step's peak from
# ~96 to ~87 MB and its time from 0.27 to 0.25 s against 128; 32 tokens took 0.37 s.
CANDIDATE_MAX_TOKENS = 64
# `dot_at_candidates` computes the dense product when the features are at most this many times
# the candidates: a GEMM does ~20x more multiply-adds per second than the sampled kernel on the
# CPU of benchmarks/RESULTS.md, and the sampled kernel also sorts the candidates.
SAMPLED_MIN_RATIO = 16
# Bytes of the table blocks of csrc/sparse_rows.c: a quarter of the L3 cache (32 MiB) of the CPU
# of benchmarks/RESULTS.md. The g12k-4k training step (four runs each, taking turns) took a
# median 4.92 / 4.53 / 4.44 / 4.71 s with 2 / 4 / 8 / 12 MiB blocks.
TABLE_BLOCK_BYTES = 8 << 20


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision inputs (embedding_bag sums in its weights' dtype), else unchanged."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


@functools.cache
def kernel_available(kernel: str, device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch's `kernel` ("csr": sampled_addmm over a CSR pattern, with its embedding_bag
    backward; "embedding_bag": embedding_bag with per-sample weights) runs correctly for this
    device type and dtype. Probed once on a tiny input against the plain reference; False
    selects the fallback (gather kernels, with a warning), so an unsupported backend or dtype
    costs speed, not a crash."""
    if kernel not in ("csr", "embedding_bag"):
        raise ValueError(f"unknown kernel {kernel!r}; use 'csr' or 'embedding_bag'")
    try:
        # grad mode on even when the first caller runs under no_grad or inference_mode
        with torch.inference_mode(False), torch.enable_grad():
            ok = _probe(kernel, torch.device(device_type), dtype)
    except (RuntimeError, NotImplementedError, TypeError) as e:
        ok, why = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    else:
        why = "wrong results"
    if not ok:
        warnings.warn(
            f"torch's {kernel} kernel is unavailable for {device_type}/{dtype} ({why}); the "
            f"pruned pass uses the slower gather fallback", RuntimeWarning, stacklevel=2,
        )
    return ok


def _probe(kernel: str, device: torch.device, dtype: torch.dtype) -> bool:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 4, generator=g, dtype=torch.float64).to(device, dtype)
    dec = torch.randn(4, 5, generator=g, dtype=torch.float64).to(device, dtype)
    if kernel == "csr":
        rows = torch.tensor([0, 0, 2, 2, 2], device=device)
        cols = torch.tensor([1, 4, 0, 1, 3], device=device)
        crow = torch.tensor([0, 2, 2, 5], device=device)
        tperm = torch.argsort(cols, stable=True)
        tcrow = torch.tensor([0, 1, 3, 3, 4, 5], device=device)
        W.requires_grad_(True)
        dec.requires_grad_(True)
        got = _CSRVirtualWeights.apply(W, dec, crow, cols, tcrow, rows[tperm], tperm)
        want = sampled_dot_plain(W, dec.T, rows, cols)
        g_got = torch.autograd.grad(got.sum(), (W, dec))
        g_want = torch.autograd.grad(want.sum(), (W, dec))
        pairs = [(got, want), *zip(g_got, g_want, strict=True)]
    else:
        J = torch.tensor([[0, 2], [1, 5], [5, 5]], device=device)
        table = torch.cat([dec.T, dec.new_zeros(1, 4)])  # [6, 4], last row = padding
        got = F_.embedding_bag(J, table, per_sample_weights=W[:, :2].contiguous(), mode="sum")
        want = (table[J] * W[:, :2, None]).sum(1)
        pairs = [(got, want)]
    return all(torch.allclose(a.double(), b.double(), rtol=1e-2, atol=1e-2) for a, b in pairs)


def csr_pointers(rows: Tensor, n_rows: int) -> Tensor:
    """CSR row pointers [n_rows + 1] from the row index of each entry (in any order: only the
    counts per row matter)."""
    out = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    out[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    return out


def take_rows(T: Tensor, idx: Tensor) -> Tensor:
    """T[idx] along dim 0, shaped [*idx.shape, *T.shape[1:]], by index_select: on CPU several
    times faster than advanced indexing for row gathers, and its backward (index_add_) adds
    repeated indices in a fixed order, where advanced indexing's (index_put_) varies with the
    threads (runs would differ in the last bits)."""
    return T.index_select(0, idx.flatten()).view(*idx.shape, *T.shape[1:])


def rows_sum(idx_BK: Tensor, table_FD: Tensor, vals_BK: Tensor) -> Tensor:
    """out[b] = sum over k of vals[b, k] table[idx[b, k]], [B, D]: embedding_bag's weighted sum
    (the sparse decode). On the CPU in fp32, its backward is csrc/sparse_rows.c's instead of
    embedding_bag's (which sorts the indices by comparisons: 1.6 against ~0.4 ms for 1024 tokens
    of 16 features, D 128): the table's gradient by feature over a counting sort of the indices
    (entries with a zero value, the features the ReLU cut, skipped), the values' as row dots."""
    if _blocked_kernel(table_FD, vals_BK) is not None and idx_BK.dtype == torch.int64:
        return _RowsSum.apply(idx_BK, table_FD, vals_BK)
    return F_.embedding_bag(idx_BK, table_FD, per_sample_weights=vals_BK, mode="sum")


class _RowsSum(torch.autograd.Function):
    """`rows_sum` with the backward of csrc/sparse_rows.c (`rows_dot`, `rows_axpy`)."""

    @staticmethod
    def forward(ctx, idx_BK: Tensor, table_FD: Tensor, vals_BK: Tensor) -> Tensor:
        ctx.save_for_backward(idx_BK, table_FD, vals_BK)
        return F_.embedding_bag(idx_BK, table_FD, per_sample_weights=vals_BK, mode="sum")

    @staticmethod
    def backward(ctx, g_BD: Tensor):
        idx_BK, table_FD, vals_BK = ctx.saved_tensors
        g_BD = g_BD.contiguous()
        (B, K), F = idx_BK.shape, table_FD.shape[0]
        g_table = g_vals = None
        if ctx.needs_input_grad[1]:
            # g_table[f] = sum over f's entries (b, k) of vals[b, k] g[b], tokens ascending
            p = _candidate_pattern(idx_BK, F, vals_BK)
            g_table = torch.empty_like(table_FD)
            _rows_call("rows_axpy", vals_BK.contiguous(), p.row_ptr, p.cols, p.out_pos, g_BD,
                       g_table, True)
        if ctx.needs_input_grad[2]:
            # g_vals[b, k] = g[b] . table[idx[b, k]]: row b of g against its K table rows
            g_vals = g_BD.new_empty(B * K)
            row_ptr = torch.arange(0, B * K + 1, K)
            _rows_call("rows_dot", g_BD, row_ptr, idx_BK.reshape(-1), None, table_FD, g_vals,
                       False)
            g_vals = g_vals.view(B, K)
        return None, g_table, g_vals


def _chunks(n: int, per_item: int, max_step: int | None = None) -> tuple[range, int]:
    """Starts and length of chunks of n items, each chunk holding about CHUNK_ELEMENTS elements
    at per_item elements per item, and at most max_step items."""
    step = max(1, CHUNK_ELEMENTS // max(1, per_item))
    step = min(step, max_step) if max_step is not None else step
    return range(0, n, step), step


class _SampledDot(torch.autograd.Function):
    """out[p] = W[rows[p]] . dec[cols[p]], in chunks of pairs."""

    @staticmethod
    def forward(ctx, W_FD: Tensor, dec_UD: Tensor, rows_P: Tensor, cols_P: Tensor) -> Tensor:
        ctx.save_for_backward(W_FD, dec_UD, rows_P, cols_P)
        out_P = W_FD.new_empty(rows_P.shape[0])
        starts, step = _chunks(rows_P.shape[0], W_FD.shape[1])
        for s in starts:
            r, c = rows_P[s : s + step], cols_P[s : s + step]
            out_P[s : s + step] = (W_FD[r] * dec_UD[c]).sum(-1)
        return out_P

    @staticmethod
    def backward(ctx, g_P: Tensor):
        W_FD, dec_UD, rows_P, cols_P = ctx.saved_tensors
        g_W_FD = torch.zeros_like(W_FD) if ctx.needs_input_grad[0] else None
        g_dec_UD = torch.zeros_like(dec_UD) if ctx.needs_input_grad[1] else None
        starts, step = _chunks(rows_P.shape[0], W_FD.shape[1])
        for s in starts:
            r, c, g = rows_P[s : s + step], cols_P[s : s + step], g_P[s : s + step, None]
            if g_W_FD is not None:
                g_W_FD.index_add_(0, r, g * dec_UD[c])
            if g_dec_UD is not None:
                g_dec_UD.index_add_(0, c, g * W_FD[r])
        return g_W_FD, g_dec_UD, None, None


def sampled_dot(W_FD: Tensor, dec_UD: Tensor, rows_P: Tensor, cols_P: Tensor) -> Tensor:
    """Dot products W[rows[p]] . dec[cols[p]] for a list of pairs, without the dense W @ dec.T
    (encoder rows [F, D] and upstream decoder columns as rows [U, D])."""
    return _SampledDot.apply(W_FD, dec_UD, rows_P, cols_P)


def sampled_dot_plain(W_FD: Tensor, dec_UD: Tensor, rows_P: Tensor, cols_P: Tensor) -> Tensor:
    return (W_FD[rows_P] * dec_UD[cols_P]).sum(-1)


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    # torch warns on every CSR construction that the layout is in beta; silence only that
    # warning, only here, so the user's own warning filters stay as they set them.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class _CSRVirtualWeights(torch.autograd.Function):
    """V[p] = W[row p] . dec[:, col p] over a CSR pattern: sampled_addmm forward; backward, the
    two sums of rows weighted by the gradient as embedding_bag over the pattern and its
    transpose (no gather of [nnz, D] rows, no index_add). embedding_bag's vectorised row sums
    run ~3x faster than torch's CSR @ dense products on the CPU of benchmarks/RESULTS.md. Its
    table must be contiguous rows (a strided one is 13x slower): a dictionary's decoder is stored
    feature-major, so `dec_DU.T.contiguous()` takes no copy."""

    @staticmethod
    def forward(ctx, W_FD, dec_DU, crow, col, tcrow, tcol, tperm):
        ctx.save_for_backward(W_FD, dec_DU, crow, col, tcrow, tcol, tperm)
        F, U = W_FD.shape[0], dec_DU.shape[1]
        S = _csr(crow, col, W_FD.new_zeros(col.shape[0]), (F, U))
        return torch.sparse.sampled_addmm(S, W_FD, dec_DU, beta=0.0).values()

    @staticmethod
    def backward(ctx, g_P):
        W_FD, dec_DU, crow, col, tcrow, tcol, tperm = ctx.saved_tensors
        g_P = g_P.contiguous()
        gW = gdec = None
        if ctx.needs_input_grad[0]:
            # gW[i] = sum over row i's entries p of g[p] dec[:, col p]
            gW = F_.embedding_bag(col, dec_DU.T.contiguous(), crow[:-1], mode="sum",
                                  per_sample_weights=g_P)
        if ctx.needs_input_grad[1]:
            # gdec[:, j] = sum over column j's entries p of g[p] W[row p]
            gdec = F_.embedding_bag(tcol, W_FD.contiguous(), tcrow[:-1], mode="sum",
                                    per_sample_weights=g_P[tperm]).T
        return gW, gdec, None, None, None, None, None


def csr_virtual_weights(
    W_FD: Tensor, dec_DU: Tensor | Sequence[Tensor], crow: Tensor, col: Tensor, tcrow: Tensor,
    tcol: Tensor, tperm: Tensor,
) -> Tensor:
    """Virtual weights W[i] . dec[:, j] for the pairs of a CSR pattern [F, U] (values in CSR order).

    dec_DU: one table, or several whose columns follow one another (a group of upstream
    decoders). tcrow/tcol/tperm describe the transposed pattern (see CompiledConnections);
    columns ascend within the rows of both (as `compile_connections` makes them). On the CPU in
    fp32 by the blocked C kernel (`_BlockedDot`: the decoders, and for their gradient W, read in
    cache-sized blocks, each decoder where it is); else torch's sparse kernels on the decoders
    side by side, which take no half precision: bf16/fp16 inputs are computed in fp32 and cast
    back. Falls back to the gather kernel `sampled_dot` where the sparse kernels are unavailable
    (see `kernel_available`).
    """
    decs = [dec_DU] if isinstance(dec_DU, Tensor) else list(dec_DU)
    out_dtype, acc = W_FD.dtype, accumulation_dtype(W_FD.dtype)
    W_FD, decs = W_FD.to(acc), [d.to(acc) for d in decs]
    if _blocked_kernel(W_FD, *(d.T for d in decs)) is not None:
        pattern = BlockedPattern(crow, col, None, col.shape[0],
                                 TransposedPattern(tcrow, tcol, tperm, True))
        return _BlockedDot.apply(pattern, None, W_FD, *(d.T for d in decs)).to(out_dtype)
    dec_DU = decs[0] if len(decs) == 1 else torch.cat(decs, 1)
    if W_FD.layout != torch.strided or not kernel_available("csr", W_FD.device.type, acc):
        rows = torch.repeat_interleave(torch.arange(W_FD.shape[0], device=W_FD.device), crow.diff())
        V = sampled_dot(W_FD, dec_DU.T, rows, col)
    else:
        V = _CSRVirtualWeights.apply(W_FD, dec_DU, crow, col, tcrow, tcol, tperm)
    return V.to(out_dtype)


def dot_at_candidates(x_BD: Tensor, W_FD: Tensor, cand_BN: Tensor) -> Tensor:
    """out[b, n] = W[cand[b, n]] . x[b], [B, N]: the entries of x @ W.T at each token's
    candidates (which may repeat).

    Where the candidates are a small part of the features (F > SAMPLED_MIN_RATIO N), without the
    dense [B, F] product: a sampled product over the candidates' pattern, by the blocked C kernel
    feature by feature where it applies (each row of W read once, x's rows from the cache), else
    by `csr_virtual_weights` token by token. Otherwise the dense product is the cheaper forward;
    the C kernel's backward is still sampled, over the entries with a non-zero gradient (most of
    the candidates get none: TopK chose K of them).
    """
    B, N = cand_BN.shape
    F = W_FD.shape[0]
    dense = F <= SAMPLED_MIN_RATIO * N
    if _blocked_kernel(x_BD, W_FD) is not None:
        return _BlockedDot.apply(functools.partial(_candidate_pattern, cand_BN, F),
                                 cand_BN if dense else None, W_FD, x_BD).view(B, N)
    if dense:
        # (index_select on the flat product: its backward keeps the index, where gather's keeps
        # the whole [B, F] product until the backward)
        at_P = (cand_BN + F * torch.arange(B, device=cand_BN.device)[:, None]).flatten()
        return (x_BD @ W_FD.T).flatten().index_select(0, at_P).view(B, N)
    # token by token: the pattern's rows are x's side, its transpose the features'
    p = _candidate_pattern(cand_BN, F)
    t = p.transposed
    return csr_virtual_weights(x_BD, W_FD.T, t.row_ptr, t.cols, p.row_ptr, p.cols,
                               p.out_pos).view(B, N)


def _candidate_pattern(cand_BN: Tensor, F: int, g_BN: Tensor | None = None) -> BlockedPattern:
    """The candidates' pattern by feature ([F, B]: tokens ascend within a feature, a stable sort),
    for `_BlockedDot`; x's side (tokens by candidate, in no order) read in one block. With the
    output's gradient g_BN (in the backward), the pattern of its non-zero entries only: those
    the kernels would skip (on the CPU, most: the candidates that TopK did not choose) are not
    sorted."""
    B, N = cand_BN.shape
    col = cand_BN.flatten()
    crow = torch.arange(0, B * N + 1, N, device=col.device)
    transposed = TransposedPattern(crow, col, None, False)
    lib = _blocked_kernel(g_BN) if g_BN is not None else _sparse_rows()
    if lib is not None and col.device.type == "cpu" and col.dtype == torch.int64:
        # a counting sort in C (torch's argsort is a comparison sort: ~0.9 ms for 16k entries)
        row_ptr, cursor = torch.empty(F + 1, dtype=torch.int64), torch.empty(F, dtype=torch.int64)
        tok, pos = torch.empty(2, B * N, dtype=torch.int64)
        col, g_BN = col.contiguous(), g_BN.contiguous() if g_BN is not None else None
        n = lib.by_feature(B, N, F, col.data_ptr(), g_BN.data_ptr() if g_BN is not None else None,
                           row_ptr.data_ptr(), cursor.data_ptr(), tok.data_ptr(), pos.data_ptr())
        if n < 0:
            raise IndexError(f"candidate features must be in [0, {F}) (the dictionary's "
                             f"features); got {int(col.min())} .. {int(col.max())}")
        return BlockedPattern(row_ptr, tok[:n], pos[:n], B * N, transposed)
    pos = (g_BN.flatten() != 0).nonzero().flatten() if g_BN is not None else \
        torch.arange(B * N, device=col.device)
    pos = pos[torch.argsort(col[pos], stable=True)]
    return BlockedPattern(csr_pointers(col[pos], F), pos // N, pos, B * N, transposed)


def virtual_weights(
    W_FD: Tensor, dec_UDs: Sequence[Tensor], J_FC: Tensor, groups: Sequence[tuple[int, int]],
    pos: Sequence[Tensor], cols: Sequence[Tensor], crow: Sequence[Tensor],
    tcrow: Sequence[Tensor], tcol: Sequence[Tensor], tperm: Sequence[Tensor],
) -> Tensor:
    """V [F, C]: V[i, c] = W[i] . d_{J[i, c]}, zero at padding: the virtual weights of a
    transcoder's connections (docs/method.md (3.3)), from the encoder rows W and each upstream
    dictionary's decoder rows dec_u [F_u, D]; the per-group arguments are those of
    `CompiledConnections`.

    One `csr_virtual_weights` per group of upstream modules, scattered into [F, C]: one autograd
    node per group, so the backward holds one group's decoder gradients at a time (at gpt2-small
    widths a group is one module: 23 of them, 75 MB each, for the last transcoder at F 24576).
    """
    F, C = J_FC.shape
    V_flat = W_FD.new_zeros(F * C)
    for (first, stop), p, c, cr, tr, tc, tp in zip(groups, pos, cols, crow, tcrow, tcol, tperm,
                                                   strict=True):
        if p.numel():
            # in place at the compiled positions: the backward keeps them, no new index
            decs = [dec.T for dec in dec_UDs[first:stop]]
            V_flat.index_put_((p,), csr_virtual_weights(W_FD, decs, cr, c, tr, tc, tp))
    return V_flat.view(F, C)


class TransposedPattern(NamedTuple):
    """The table's side of a `BlockedPattern`: its rows' entries, for the table's gradient."""

    row_ptr: Tensor
    """CSR row pointers over the table's rows."""
    cols: Tensor
    """The row of A of each entry."""
    g_pos: Tensor | None
    """Where each entry's gradient is in the output (None: in order)."""
    ascending: bool
    """Whether `cols` ascend within each row (then A is read in blocks)."""


class BlockedPattern(NamedTuple):
    """The entries of out[p] = A[r] . T[cols[p]] for `_BlockedDot` (csrc/sparse_rows.c)."""

    row_ptr: Tensor
    """CSR row pointers [R + 1] over the rows of A."""
    cols: Tensor
    """The table row of each entry, ascending within a row of A."""
    out_pos: Tensor | None
    """Where each entry goes in the output (None: in order)."""
    n_out: int
    """Length of the output."""
    transposed: TransposedPattern
    """The entries by table row (for the table's gradient)."""


class _BlockedDot(torch.autograd.Function):
    """out[p] = A[r] . T[cols[p]] over a `BlockedPattern`, or a function making it from the
    output's gradient (None in the forward; made again in the backward instead of kept between
    the passes, and there over the entries with a non-zero gradient only). A_FD: encoder rows;
    the table T: one tensor (the tokens' x0) or several whose rows follow one another (a group's
    upstream decoders). Forward and both gradients are csrc/sparse_rows.c (`rows_dot`,
    `rows_axpy`), each output row written by one part in a fixed order; with `dense_cols` (a
    [R_T, N] index: the output is T's rows' N entries each), the forward is the dense product's
    entries there instead."""

    @staticmethod
    def forward(ctx, pattern: BlockedPattern | Callable[..., BlockedPattern],
                dense_cols: Tensor | None, A_FD: Tensor, *tables: Tensor) -> Tensor:
        # each input only for the other's gradient (A_FD may be made again to be read)
        tables_grad = any(ctx.needs_input_grad[3:])
        ctx.save_for_backward(A_FD if tables_grad else None,
                              *(tables if ctx.needs_input_grad[2] else ()))
        ctx.shapes = A_FD.shape, [t.shape for t in tables]
        ctx.pattern = pattern
        if dense_cols is not None:
            # the entries of the dense product T A^T there: a GEMM's many more multiply-adds a
            # second win where the entries are a large share of it
            (T_UD,) = tables
            return (T_UD @ A_FD.T).gather(1, dense_cols).flatten()
        pattern = pattern() if callable(pattern) else pattern
        out = A_FD.new_zeros(pattern.n_out)
        _rows_call("rows_dot", A_FD, pattern.row_ptr, pattern.cols, pattern.out_pos, tables, out,
                   True)
        return out

    @staticmethod
    def backward(ctx, g_P: Tensor):
        A_FD, *tables = ctx.saved_tensors
        g_P = g_P.contiguous()
        p: BlockedPattern = ctx.pattern(g_P) if callable(ctx.pattern) else ctx.pattern
        A_shape, table_shapes = ctx.shapes
        g_A, g_tables = None, [None] * len(table_shapes)
        if any(ctx.needs_input_grad[3:]):
            # the tables' gradients side by side, as they are numbered; each its own view
            t = p.transposed
            g_T = g_P.new_empty(sum(s[0] for s in table_shapes), A_shape[1])
            _rows_call("rows_axpy", g_P, t.row_ptr, t.cols, t.g_pos, A_FD, g_T, t.ascending)
            g_tables = g_T.split([s[0] for s in table_shapes])
        # A_FD (the encoder rows, made again for this backward) gone before g_A is made
        del A_FD
        if ctx.needs_input_grad[2]:
            g_A = g_P.new_empty(A_shape)
            _rows_call("rows_axpy", g_P, p.row_ptr, p.cols, p.out_pos, tables, g_A, True)
        return None, None, g_A, *g_tables


def _blocked_kernel(*tensors: Tensor) -> ctypes.CDLL | None:
    """csrc/sparse_rows.c where it applies (fp32, contiguous, on the CPU, and a C compiler)."""
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
               and t.layout == torch.strided for t in tensors):
        return None
    return _sparse_rows()


def _sparse_rows() -> ctypes.CDLL | None:
    """csrc/sparse_rows.c, loaded (None without a C compiler)."""
    lib = native.load("sparse_rows")
    if lib is not None and lib.rows_dot.argtypes is None:
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        for fn in (lib.rows_dot, lib.rows_axpy):
            fn.argtypes = [i64] * 5 + [p] * 6 + [i64] * 2 + [p] * 2
            fn.restype = None
        lib.by_feature.argtypes = [i64] * 3 + [p] * 6
        lib.by_feature.restype = i64
    return lib


def _rows_call(fn: str, X: Tensor, row_ptr: Tensor, cols: Tensor, pos: Tensor | None,
               T_UD: Tensor | Sequence[Tensor], out: Tensor, blocked: bool) -> None:
    """csrc/sparse_rows.c's `fn` over all rows, in parts of about equal entries (`native.run`).
    X: A [R, D] (rows_dot) or g (rows_axpy); T_UD: the table, or tables whose rows follow one
    another, read in TABLE_BLOCK_BYTES blocks if `blocked` (columns ascend within rows), else in
    one."""
    tables = [T_UD] if isinstance(T_UD, Tensor) else list(T_UD)
    lib = _blocked_kernel(X, out, *tables)
    row_ptr, cols = row_ptr.contiguous(), cols.contiguous()
    pos = pos.contiguous() if pos is not None else None
    D, R = tables[0].shape[1], row_ptr.shape[0] - 1
    T_lo = torch.tensor([0] + [t.shape[0] for t in tables]).cumsum(0)
    block = TABLE_BLOCK_BYTES // max(1, D * tables[0].element_size()) if blocked else T_lo[-1]
    pointers = (ctypes.c_void_p * len(tables))(*[t.data_ptr() for t in tables])
    cursor = torch.empty(R, dtype=torch.int64)
    native.run(lib, fn, native.parts(R), R, D, row_ptr.data_ptr(), cols.data_ptr(),
               pos.data_ptr() if pos is not None else None, X.data_ptr(), pointers,
               T_lo.data_ptr(), len(tables), max(1, int(block)), cursor.data_ptr(),
               out.data_ptr())


def upstream_table(vals_BA: Tensor, idx_BA: Tensor, n_up: int) -> Tensor:
    """Dense upstream activations [B, n_up + 1]; the last column is the zero padding slot."""
    return vals_BA.new_zeros(vals_BA.shape[0], n_up + 1).scatter_(1, idx_BA, vals_BA)


class _CandidateContrib(torch.autograd.Function):
    """out[b, n] = sum_c V[cand[b, n], c] * table[b, J[cand[b, n], c]]: by csrc/connection_term.c
    where it applies (fp32 on the CPU), else by torch operators, chunked over tokens.

    The torch route allocates its chunk buffers once (the upstream table, the gathered connection
    indices, upstream values and virtual weights) and reuses them for every chunk: fresh
    tensors of this size cost page faults on each chunk on CPU (benchmarks/RESULTS.md). The
    table is re-zeroed where it was written, at the chunk's A active features.
    """

    @staticmethod
    def forward(ctx, vals_BA, idx_BA, V_FC, J_FC, cand_BN, n_up: int,
                tc: TransposedConnections | None):
        ctx.save_for_backward(vals_BA, idx_BA, V_FC, J_FC, cand_BN)
        ctx.n_up = n_up
        # the route, decided here for both passes: the C kernels where they apply
        ctx.lib = _connection_kernel(vals_BA, idx_BA, V_FC, cand_BN)
        if ctx.lib is not None:
            ctx.tc = tc if tc is not None else transpose_connections(J_FC, n_up)
            return _candidates_c(ctx.lib, vals_BA, idx_BA, V_FC, cand_BN, n_up, ctx.tc)
        B, N = cand_BN.shape
        out_BN = V_FC.new_empty(B, N)
        buf = _ChunkBuffers(vals_BA, V_FC, J_FC, N, n_up)
        for sl in buf.slices:
            table_bG = buf.table(vals_BA[sl], idx_BA[sl])
            J_bNC = buf.rows(J_FC, cand_BN[sl], buf.J)
            up_bNC = buf.upstream(table_bG, J_bNC)
            torch.sum(up_bNC.mul_(buf.rows(V_FC, cand_BN[sl], buf.V)), -1, out=out_BN[sl])
            buf.clear(table_bG, idx_BA[sl])
        return out_BN

    @staticmethod
    def backward(ctx, g_BN):
        vals_BA, idx_BA, V_FC, J_FC, cand_BN = ctx.saved_tensors
        g_BN = g_BN.contiguous()
        if ctx.lib is not None:
            g_vals_BA, g_V_FC = _candidates_backward_c(
                ctx.lib, vals_BA, idx_BA, V_FC, cand_BN, g_BN, ctx.n_up, ctx.tc,
                ctx.needs_input_grad[0], ctx.needs_input_grad[2])
            return g_vals_BA, None, g_V_FC, None, None, None, None
        N = cand_BN.shape[1]
        g_vals_BA = torch.zeros_like(vals_BA) if ctx.needs_input_grad[0] else None
        g_V_FC = torch.zeros_like(V_FC) if ctx.needs_input_grad[2] else None
        buf = _ChunkBuffers(vals_BA, V_FC, J_FC, N, ctx.n_up)
        g_table_sG = vals_BA.new_empty(buf.table_sG.shape) if g_vals_BA is not None else None
        for sl in buf.slices:
            cand_bN, g_bN1 = cand_BN[sl], g_BN[sl, :, None]
            J_bNC = buf.rows(J_FC, cand_bN, buf.J)
            if g_V_FC is not None:
                table_bG = buf.table(vals_BA[sl], idx_BA[sl])
                g_up_bNC = buf.upstream(table_bG, J_bNC).mul_(g_bN1)
                g_V_FC.index_add_(0, cand_bN.flatten(), g_up_bNC.flatten(0, 1))
                buf.clear(table_bG, idx_BA[sl])
            if g_vals_BA is not None:
                g_table_bG = g_table_sG[: cand_bN.shape[0]].zero_()
                g_Vup_bNC = buf.rows(V_FC, cand_bN, buf.V).mul_(g_bN1)
                g_table_bG.scatter_add_(1, J_bNC.flatten(1), g_Vup_bNC.flatten(1))
                g_vals_BA[sl] = g_table_bG.gather(1, idx_BA[sl])
        return g_vals_BA, None, g_V_FC, None, None, None, None


class TransposedConnections(NamedTuple):
    """J's connections by upstream feature: the layout of csrc/connection_term.c."""

    tcrow: Tensor
    """CSR row pointers [n_up + 1]: upstream feature j's entries are tcrow[j] .. tcrow[j + 1]."""
    trow: Tensor
    """The downstream feature of each entry, int32."""
    tpos: Tensor
    """Its flat position in J [F, C] (entries of one j by ascending position)."""


def transpose_connections(J_FC: Tensor, n_up: int) -> TransposedConnections:
    """The connections of J [F, C] (padding n_up left out) by upstream feature."""
    flat = J_FC.flatten()
    keep = (flat >= 0) & (flat < n_up)
    tpos = torch.argsort(torch.where(keep, flat, n_up), stable=True)[: int(keep.sum())]
    C = max(1, J_FC.shape[1])
    return TransposedConnections(csr_pointers(flat[keep], n_up),
                                 (tpos // C).to(torch.int32), tpos)


def _connection_kernel(*tensors: Tensor) -> ctypes.CDLL | None:
    """csrc/connection_term.c where it applies (fp32 values, int64 indices, contiguous, on the
    CPU, and a C compiler: `native.load`), else None and the torch kernels."""
    if not all(t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        return None
    if any(t.dtype != (torch.float32 if t.is_floating_point() else torch.int64)
           for t in tensors):
        return None
    lib = native.load("connection_term")
    if lib is not None and lib.connection_all.argtypes is None:
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.connection_all.argtypes = [i64] * 7 + [p] * 6
        lib.connection_candidates.argtypes = [i64] * 8 + [p] * 8
        lib.connection_candidates_backward.argtypes = [i64] * 9 + [p] * 10
        for fn in (lib.connection_all, lib.connection_candidates,
                   lib.connection_candidates_backward):
            fn.restype = None
    return lib


def _candidates_c(lib, vals_BA, idx_BA, V_FC, cand_BN, n_up: int,
                  tc: TransposedConnections) -> Tensor:
    (B, N), A, F = cand_BN.shape, vals_BA.shape[1], V_FC.shape[0]
    out_BN = V_FC.new_empty(B, N)
    Vt_P = V_FC.flatten()[tc.tpos]
    n_parts = native.parts(B)
    rows = V_FC.new_zeros(n_parts, F)  # a scratch row per part, zeros between tokens
    native.run(lib, "connection_candidates", n_parts, B, A, N, F, n_up, vals_BA.data_ptr(),
               idx_BA.data_ptr(), tc.tcrow.data_ptr(), tc.trow.data_ptr(), Vt_P.data_ptr(),
               cand_BN.data_ptr(), rows.data_ptr(), out_BN.data_ptr())
    return out_BN


def _candidates_backward_c(lib, vals_BA, idx_BA, V_FC, cand_BN, g_BN, n_up: int,
                           tc: TransposedConnections, need_vals: bool,
                           need_V: bool) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of vals and V: each part sums g_V over its tokens in its own copy, added up
    after (so the result depends on the thread count in the last bits, not on timing)."""
    (B, N), A, F = cand_BN.shape, vals_BA.shape[1], V_FC.shape[0]
    Vt_P = V_FC.flatten()[tc.tpos]
    n_parts = native.parts(B)
    g_vals_BA = torch.empty_like(vals_BA) if need_vals else None
    g_Vt_parts = V_FC.new_zeros(n_parts, Vt_P.shape[0]) if need_V else None
    rows = V_FC.new_zeros(n_parts, F)
    native.run(lib, "connection_candidates_backward", n_parts, B, A, N, F, n_up, Vt_P.shape[0],
               vals_BA.data_ptr(), idx_BA.data_ptr(), tc.tcrow.data_ptr(), tc.trow.data_ptr(),
               Vt_P.data_ptr(), cand_BN.data_ptr(), g_BN.data_ptr(), rows.data_ptr(),
               g_Vt_parts.data_ptr() if need_V else None,
               g_vals_BA.data_ptr() if need_vals else None)
    g_V_FC = None
    if need_V:
        g_V_FC = V_FC.new_zeros(V_FC.numel()).index_put_((tc.tpos,), g_Vt_parts.sum(0))
        g_V_FC = g_V_FC.view_as(V_FC)
    return g_vals_BA, g_V_FC


def _all_c(lib, vals_BA, idx_BA, V_FC, n_up: int, tc: TransposedConnections) -> Tensor:
    B, A, F = vals_BA.shape[0], vals_BA.shape[1], V_FC.shape[0]
    out_BF = V_FC.new_empty(B, F)
    Vt_P = V_FC.flatten()[tc.tpos]
    native.run(lib, "connection_all", native.parts(B), B, A, F, n_up, vals_BA.data_ptr(),
               idx_BA.data_ptr(), tc.tcrow.data_ptr(), tc.trow.data_ptr(), Vt_P.data_ptr(),
               out_BF.data_ptr())
    return out_BF


class _ChunkBuffers:
    """The candidate kernel's per-chunk buffers, allocated once per call: the zero upstream table
    [step, n_up + 1] and the [step, N, C] gathers of J, V and the upstream values."""

    def __init__(self, vals_BA: Tensor, V_FC: Tensor, J_FC: Tensor, N: int, n_up: int):
        B, C = vals_BA.shape[0], J_FC.shape[1]
        starts, self.step = _chunks(B, max(N * C, n_up), CANDIDATE_MAX_TOKENS)
        self.slices = [slice(s, min(s + self.step, B)) for s in starts]
        self.table_sG = vals_BA.new_zeros(self.step, n_up + 1)
        self.J = J_FC.new_empty(self.step * N, C)
        self.V = V_FC.new_empty(self.step * N, C)
        self.up = V_FC.new_empty(self.step, N * C)

    def table(self, vals_bA: Tensor, idx_bA: Tensor) -> Tensor:
        return self.table_sG[: vals_bA.shape[0]].scatter_(1, idx_bA, vals_bA)

    @staticmethod
    def clear(table_bG: Tensor, idx_bA: Tensor) -> None:
        table_bG.scatter_(1, idx_bA, 0.0)

    @staticmethod
    def rows(T_FC: Tensor, cand_bN: Tensor, out: Tensor) -> Tensor:
        """T[cand] into the buffer `out`, [b, N, C]."""
        out = out[: cand_bN.numel()]
        return torch.index_select(T_FC, 0, cand_bN.flatten(), out=out).view(*cand_bN.shape, -1)

    def upstream(self, table_bG: Tensor, J_bNC: Tensor) -> Tensor:
        """table[b, J[b, n, c]] into the buffer, [b, N, C]."""
        b = J_bNC.shape[0]
        return torch.gather(table_bG, 1, J_bNC.flatten(1), out=self.up[:b]).view_as(J_bNC)


def connection_contrib_candidates(
    vals_BA: Tensor, idx_BA: Tensor, V_FC: Tensor, J_FC: Tensor, cand_BN: Tensor, n_up: int,
    transposed: TransposedConnections | None = None,
) -> Tensor:
    """Connection term for the candidate features of each token, [B, N].

    vals_BA/idx_BA: every upstream dictionary's active features side by side, [B, A], idx in the
    global upstream index space [0, n_up), each at most once per token. J_FC uses n_up as padding,
    where V_FC is zero. Half-precision inputs are computed in fp32 (the sums over connections,
    and the gradient sums over tokens) and the result cast back. On the CPU in fp32, by
    csrc/connection_term.c over `transposed` (`transpose_connections(J_FC, n_up)`, made here
    when not given).
    """
    acc = accumulation_dtype(V_FC.dtype)
    # (contiguous: the C kernel's layout; a no-op for the pruned pass's tensors)
    out_BN = _CandidateContrib.apply(vals_BA.to(acc).contiguous(), idx_BA.contiguous(),
                                     V_FC.to(acc).contiguous(), J_FC.contiguous(),
                                     cand_BN.contiguous(), n_up, transposed)
    return out_BN.to(V_FC.dtype)


def connection_contrib_all(
    vals_BA: Tensor, idx_BA: Tensor, V_FC: Tensor, J_FC: Tensor, n_up: int,
    transposed: TransposedConnections | None = None,
) -> Tensor:
    """Connection term for every downstream feature, [B, F] (inputs as
    `connection_contrib_candidates`).

    Without gradient on the CPU in fp32: csrc/connection_term.c, from each token's active
    upstream features over `transposed` (made here when not given). Else embedding_bag over
    token chunks: each downstream feature is one bag (its connections, weighted by V) over the
    table of upstream activations transposed to [n_up + 1, tokens]; no [B, F, C] tensor is
    formed.
    """
    B = vals_BA.shape[0]
    F = J_FC.shape[0]
    acc = accumulation_dtype(V_FC.dtype)
    if J_FC.shape[1] == 0:
        return V_FC.new_zeros(B, F) + 0 * vals_BA.sum()
    grad = torch.is_grad_enabled() and (vals_BA.requires_grad or V_FC.requires_grad)
    vals_acc, V_acc = vals_BA.to(acc).contiguous(), V_FC.to(acc).contiguous()
    lib = None if grad else _connection_kernel(vals_acc, idx_BA, V_acc)
    if lib is not None:
        tc = transposed if transposed is not None else transpose_connections(J_FC, n_up)
        return _all_c(lib, vals_acc, idx_BA, V_acc, n_up, tc).to(V_FC.dtype)
    if not kernel_available("embedding_bag", V_FC.device.type, acc):
        all_BF = torch.arange(F, device=J_FC.device).expand(B, F)
        return connection_contrib_candidates(vals_BA, idx_BA, V_FC, J_FC, all_BF, n_up)
    out_BF = V_acc.new_empty(B, F)
    starts, step = _chunks(B, n_up + F)
    for s in starts:
        vals_bA, idx_bA = vals_acc[s : s + step], idx_BA[s : s + step]
        # The table built transposed (scatter along dim 0), not transposed after: a transposed
        # copy of [tokens, n_up + 1] cost more than the table's own scatter.
        table_Gb = vals_bA.new_zeros(n_up + 1, vals_bA.shape[0]).scatter_(0, idx_bA.T, vals_bA.T)
        out_BF[s : s + step] = F_.embedding_bag(
            J_FC, table_Gb, per_sample_weights=V_acc, mode="sum"
        ).T
    return out_BF.to(V_FC.dtype)


def connection_contrib_plain(
    vals_BA: Tensor, idx_BA: Tensor, V_FC: Tensor, J_FC: Tensor, cand_BN: Tensor, n_up: int
) -> Tensor:
    """Reference for both kernels: gathers the full [B, N, C] tensor."""
    table_BG = upstream_table(vals_BA, idx_BA, n_up)
    J_BNC = J_FC[cand_BN]
    up_BNC = table_BG.gather(1, J_BNC.flatten(1)).view_as(J_BNC)
    return (up_BNC * V_FC[cand_BN]).sum(-1)
