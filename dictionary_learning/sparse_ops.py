"""Sparse kernels of the pruned pass (docs/method.md §3), each with a plain reference beside it.

The pruned pre-activation of downstream feature i sums, over its connections c,

    f_up[b, J[i, c]] * V[i, c],        V[i, c] = (P w_i) . d_{J[i, c]}

where J [F, C] holds global upstream indices (all upstream dictionaries side by side; the value
`n_up` marks padding) and V are the "virtual weights". Nothing here builds a dense F x F matrix or
a [B, N, C] tensor: the connection kernel pushes each active upstream feature along its list of
connections, so its work is the number of connections reached, not candidates x C. It works in
token chunks and recomputes in backward, so its memory does not grow with the batch.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

# Elements per temporary buffer of the chunked kernels; bounds their memory.
CHUNK_ELEMENTS = 1 << 20
# `dot_at_candidates` computes the dense product when the features are at most this many times
# the candidates: a GEMM does ~20x more multiply-adds per second than the sampled kernel on the
# CPU of benchmarks/RESULTS.md, and the sampled kernel also sorts the candidates.
SAMPLED_MIN_RATIO = 16


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision inputs (sums of many products), else unchanged."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


@functools.cache
def kernel_available(kernel: str, device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch's `kernel` ("csr": sampled_addmm and CSR @ dense, forward and backward) runs
    correctly for this device type and dtype. Probed once on a tiny input against the plain
    reference; False selects the gather fallback (with a warning), so an unsupported backend or
    dtype costs speed, not a crash."""
    if kernel != "csr":
        raise ValueError(f"unknown kernel {kernel!r}; use 'csr'")
    try:
        # grad mode on even when the first caller runs under no_grad or inference_mode
        with torch.inference_mode(False), torch.enable_grad():
            ok = _probe_csr(torch.device(device_type), dtype)
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


def _probe_csr(device: torch.device, dtype: torch.dtype) -> bool:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 4, generator=g, dtype=torch.float64).to(device, dtype)
    dec = torch.randn(4, 5, generator=g, dtype=torch.float64).to(device, dtype)
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
    return all(torch.allclose(a.double(), b.double(), rtol=1e-2, atol=1e-2) for a, b in pairs)


def _chunks(n: int, per_item: int) -> tuple[range, int]:
    """Starts and length of chunks of n items, each chunk holding about CHUNK_ELEMENTS elements
    at per_item elements per item."""
    step = max(1, CHUNK_ELEMENTS // max(1, per_item))
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
    """V[p] = W[row p] . dec[:, col p] over a CSR pattern, with sampled_addmm forward and two
    sparse @ dense products backward (no gather of [nnz, D] rows, no index_add)."""

    @staticmethod
    def forward(ctx, W_FD, dec_DU, crow, col, tcrow, tcol, tperm):
        ctx.save_for_backward(W_FD, dec_DU, crow, col, tcrow, tcol, tperm)
        F, U = W_FD.shape[0], dec_DU.shape[1]
        S = _csr(crow, col, W_FD.new_zeros(col.shape[0]), (F, U))
        return torch.sparse.sampled_addmm(S, W_FD, dec_DU, beta=0.0).values()

    @staticmethod
    def backward(ctx, g_P):
        W_FD, dec_DU, crow, col, tcrow, tcol, tperm = ctx.saved_tensors
        F, U = W_FD.shape[0], dec_DU.shape[1]
        g_P = g_P.contiguous()
        gW = gdec = None
        if ctx.needs_input_grad[0]:
            gW = _csr(crow, col, g_P, (F, U)) @ dec_DU.T
        if ctx.needs_input_grad[1]:
            gdec = (_csr(tcrow, tcol, g_P[tperm], (U, F)) @ W_FD).T
        return gW, gdec, None, None, None, None, None


def csr_virtual_weights(
    W_FD: Tensor, dec_DU: Tensor, crow: Tensor, col: Tensor, tcrow: Tensor, tcol: Tensor,
    tperm: Tensor,
) -> Tensor:
    """Virtual weights W[i] . dec[:, j] for the pairs of a CSR pattern [F, U] (values in CSR order).

    tcrow/tcol/tperm describe the transposed pattern (see CompiledConnections). torch's sparse
    kernels take no half precision: bf16/fp16 inputs are computed in fp32 and cast back.
    Falls back to the gather kernel `sampled_dot` where the sparse kernels are unavailable
    (see `kernel_available`).
    """
    out_dtype, acc = W_FD.dtype, accumulation_dtype(W_FD.dtype)
    W_FD, dec_DU = W_FD.to(acc), dec_DU.to(acc)
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
    dense [B, F] product: the sampled kernel of `csr_virtual_weights` over the candidates'
    pattern. Otherwise the dense product is the cheaper.
    """
    B, N = cand_BN.shape
    if W_FD.shape[0] <= SAMPLED_MIN_RATIO * N:
        return (x_BD @ W_FD.T).gather(1, cand_BN)
    dev = cand_BN.device
    col = cand_BN.flatten()
    crow = torch.arange(0, B * N + 1, N, device=dev)
    # the transposed pattern [F, B], for the gradient of W
    tperm = torch.argsort(col, stable=True)
    tcrow = torch.zeros(W_FD.shape[0] + 1, dtype=torch.int64, device=dev)
    tcrow[1:] = torch.bincount(col, minlength=W_FD.shape[0]).cumsum(0)
    return csr_virtual_weights(x_BD, W_FD.T, crow, col, tcrow, tperm // N, tperm).view(B, N)


def dot_at_candidates_plain(x_BD: Tensor, W_FD: Tensor, cand_BN: Tensor) -> Tensor:
    return (W_FD[cand_BN] * x_BD[:, None, :]).sum(-1)


class ConnectionLists(NamedTuple):
    """The connections of one transcoder as lists per upstream feature (the transposed J):
    upstream feature g reaches the slots slot_E[ptr_G[g] : ptr_G[g + 1]] of J_FC.flatten(),
    whose downstream features are down_E (= slot // C). The padding index n_up has an empty list."""

    ptr_G: Tensor
    """[n_up + 2] start of each upstream feature's list."""
    slot_E: Tensor
    """[nnz] flat slot (i * C + c) in J_FC / V_FC, grouped by upstream feature."""
    down_E: Tensor
    """[nnz] downstream feature i of each slot."""
    n_features: int
    """F, the number of downstream features."""


def connection_lists(J_FC: Tensor, n_up: int) -> ConnectionLists:
    """The transposed lists of J_FC [F, C] (global upstream indices, n_up = padding)."""
    F, C = J_FC.shape
    flat = J_FC.flatten()
    slots = (flat < n_up).nonzero().squeeze(1)
    up = flat[slots]
    order = torch.argsort(up, stable=True)
    ptr = torch.zeros(n_up + 2, dtype=torch.int64, device=J_FC.device)
    ptr[1:] = torch.bincount(up, minlength=n_up + 1).cumsum(0)
    slot_E = slots[order]
    return ConnectionLists(ptr, slot_E, slot_E // max(C, 1), F)


def upstream_table(vals_BA: Tensor, idx_BA: Tensor, n_up: int) -> Tensor:
    """Dense upstream activations [B, n_up + 1]; the last column is the zero padding slot."""
    table_BG = vals_BA.new_zeros(vals_BA.shape[0], n_up + 1)
    return table_BG.scatter(1, idx_BA, vals_BA)


class _Entries(NamedTuple):
    """The connection entries a chunk of tokens reaches from its active upstream features."""

    owner_E: Tensor
    """Flat (token, active) position in the chunk's [b, A] inputs."""
    slot_E: Tensor
    """Flat slot in V_FC."""
    key_E: Tensor
    """Flat (token, downstream feature) position in the chunk's [b, F] output."""


def _entries(idx_bA: Tensor, lists: ConnectionLists, n_E: int) -> _Entries:
    b, A = idx_bA.shape
    first_X = lists.ptr_G[idx_bA.flatten()]
    len_X = lists.ptr_G[idx_bA.flatten() + 1] - first_X
    owner_E = torch.repeat_interleave(
        torch.arange(b * A, device=idx_bA.device), len_X, output_size=n_E
    )
    # position of each entry in the lists: its list's start plus its rank within the list
    shift_X = first_X - (len_X.cumsum(0) - len_X)
    pos_E = torch.arange(n_E, device=idx_bA.device) + shift_X.index_select(0, owner_E)
    slot_E = lists.slot_E.index_select(0, pos_E)
    key_E = (owner_E // A) * lists.n_features + lists.down_E.index_select(0, pos_E)
    return _Entries(owner_E, slot_E, key_E)


def _token_chunks(idx_BA: Tensor, lists: ConnectionLists) -> list[tuple[int, int, int]]:
    """(start, end, entries) of token chunks of about CHUNK_ELEMENTS elements each: a chunk's
    [b, F] output plus its entries (at least one token a chunk)."""
    len_BA = lists.ptr_G[idx_BA + 1] - lists.ptr_G[idx_BA]
    n_B = len_BA.sum(1).cpu()
    cost = (n_B + lists.n_features).cumsum(0).tolist()
    entries = n_B.cumsum(0).tolist()
    chunks, start, done, done_E = [], 0, 0, 0
    for t, c in enumerate(cost):
        if t > start and c - done > CHUNK_ELEMENTS:
            chunks.append((start, t, entries[t - 1] - done_E))
            start, done, done_E = t, cost[t - 1], entries[t - 1]
    if cost:
        chunks.append((start, len(cost), entries[-1] - done_E))
    return chunks


class _ConnectionContrib(torch.autograd.Function):
    """out[b, i] = sum over the active upstream features a of token b, and over the slots c with
    J[i, c] = idx[b, a], of vals[b, a] * V[i, c]; at the candidates cand[b, n] if given, else for
    every i. Computed from the upstream side (each active feature pushes along its connection
    list), in token chunks, recomputing the entries in backward."""

    @staticmethod
    def forward(ctx, vals_BA, idx_BA, V_FC, lists: ConnectionLists, cand_BN):
        ctx.save_for_backward(vals_BA, idx_BA, V_FC, cand_BN)
        ctx.lists = lists
        B, F = vals_BA.shape[0], lists.n_features
        V_X = V_FC.flatten()
        out = V_FC.new_empty(B, F if cand_BN is None else cand_BN.shape[1])
        for s, e, n_E in _token_chunks(idx_BA, lists):
            ent = _entries(idx_BA[s:e], lists, n_E)
            w_E = vals_BA[s:e].flatten().index_select(0, ent.owner_E) * V_X.index_select(
                0, ent.slot_E
            )
            acc_bF = V_FC.new_zeros((e - s) * F).index_add_(0, ent.key_E, w_E).view(e - s, F)
            out[s:e] = acc_bF if cand_BN is None else acc_bF.gather(1, cand_BN[s:e])
        return out

    @staticmethod
    def backward(ctx, g_out):
        vals_BA, idx_BA, V_FC, cand_BN = ctx.saved_tensors
        lists = ctx.lists
        F = lists.n_features
        V_X = V_FC.flatten()
        g_vals_BA = torch.zeros_like(vals_BA) if ctx.needs_input_grad[0] else None
        g_V_X = torch.zeros_like(V_X) if ctx.needs_input_grad[2] else None
        for s, e, n_E in _token_chunks(idx_BA, lists):
            ent = _entries(idx_BA[s:e], lists, n_E)
            g_bF = g_out[s:e]
            if cand_BN is not None:  # candidates may repeat (pruned_top): accumulate
                g_bF = g_out.new_zeros(e - s, F).scatter_add_(1, cand_BN[s:e], g_bF)
            g_E = g_bF.flatten().index_select(0, ent.key_E)
            if g_V_X is not None:
                v_E = vals_BA[s:e].flatten().index_select(0, ent.owner_E)
                g_V_X.index_add_(0, ent.slot_E, v_E * g_E)
            if g_vals_BA is not None:
                g_vals_BA[s:e].view(-1).index_add_(
                    0, ent.owner_E, V_X.index_select(0, ent.slot_E) * g_E
                )
        g_V_FC = g_V_X.view_as(V_FC) if g_V_X is not None else None
        return g_vals_BA, None, g_V_FC, None, None


def connection_contrib(
    vals_BA: Tensor, idx_BA: Tensor, V_FC: Tensor, lists: ConnectionLists,
    cand_BN: Tensor | None = None,
) -> Tensor:
    """Connection term of a transcoder's pruned pre-activations: [B, N] at the candidates cand_BN,
    or [B, F] for every downstream feature when cand_BN is None.

    vals_BA/idx_BA: every upstream dictionary's active features side by side, [B, A], idx in the
    global upstream index space [0, n_up). The work is one multiply-add per connection reached
    from an active upstream feature (about B A F C / n_up), not B N C or B F C: no [B, N, C] or
    dense upstream table is formed. Half-precision inputs are computed in fp32 (the sums over
    connections, and the gradient sums over tokens) and the result cast back.
    """
    acc = accumulation_dtype(V_FC.dtype)
    out = _ConnectionContrib.apply(vals_BA.to(acc), idx_BA, V_FC.to(acc), lists, cand_BN)
    return out.to(V_FC.dtype)


def connection_contrib_plain(
    vals_BA: Tensor, idx_BA: Tensor, V_FC: Tensor, J_FC: Tensor, cand_BN: Tensor, n_up: int
) -> Tensor:
    """Reference for both kernels: gathers the full [B, N, C] tensor."""
    table_BG = upstream_table(vals_BA, idx_BA, n_up)
    J_BNC = J_FC[cand_BN]
    up_BNC = table_BG.gather(1, J_BNC.flatten(1)).view_as(J_BNC)
    return (up_BNC * V_FC[cand_BN]).sum(-1)
