"""Choose each transcoder feature's upstream connections (docs/method.md §4).

Importance of upstream feature (u, j) for downstream feature i of mlp_L:

    I(i; u, j) = mean over tokens t where i is active of  f_uj(t) (w_i . P d_uj) / sigma_L(t)

(P the centring of LayerNorm models, the identity for RMSNorm models; u runs over the upstream set
of mlp_L, which has no attn_L when the blocks are parallel: `SCAESuite.upstream_names`)

which factorises as V[i, (u, j)] * A[i, (u, j)] / n_i with the virtual weight V = (P w_i) . d_uj,
the co-activation sum A = sum_{t: i active} f_uj(t) / sigma_L(t) and n_i the number of tokens where
i is active. A is accumulated from sparse activations (K per dictionary and token), in blocks of
downstream features whose size is set by a memory budget, so memory never grows as
F_down x F_up x tokens. V is computed densely for a block, or only at the pairs co-active on some
token (where A is non-zero) when those are few (`importance_blocks`, `plan_method`; on the CPU
their top C in a C kernel, `search_route`). The "all" variant averages over all tokens instead:
A then no longer depends on i. Upstream activations are the vanilla ones (there are no
connections yet).

Usable as a module (`collect_activations`, `importance`, `top_connections`,
`random_connections`) and as a script: `python find_top_connections.py --help`.
"""

from __future__ import annotations

import argparse
import bisect
import ctypes
import itertools
import logging
from collections.abc import Iterable
from typing import Literal, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dictionary_learning.connections import (
    Connections,
    save_connections,
    validate_connections,
)
from dictionary_learning import native
from dictionary_learning.sparse_ops import take_rows
from dictionary_learning.suite import SCAESuite

logger = logging.getLogger(__name__)

Variant = Literal["active", "all"]
Method = Literal["auto", "dense", "coactive"]

# "auto" takes the co-active route where its products are at least this many times fewer than the
# dense route's. Per product it gathers rows and scatters the result where the GEMM streams: on the
# CPU of benchmarks/RESULTS.md the two routes cost the same at about 1/9 (one transcoder with 11
# upstream dictionaries, F 12288: 8.5 against 20.9 s at 1/18, 41.7 against 26.7 s at 1/4.5).
COACTIVE_COST = 8.0
# The co-active route re-gathers every token's upstream decoder rows once per super block.
MAX_SUPER_BLOCKS = 4
# The co-active route's share of memory_budget_bytes for its stored weights, the rest for its
# block: small blocks cost little (a 12-layer suite's last transcoder at 8,192 tokens, 1 GiB:
# 16.4 s with one super block and blocks of 56 features, 20.0 s with two super blocks)
WEIGHTS_SHARE = 0.875
# On the CPU, the co-active route's [f, G] block at most this size: its sums and writes land at
# random places in it, and stay in the cache (32 MiB L3 in benchmarks/RESULTS.md: a 12-layer
# suite's last transcoder at 8,192 tokens ~20% faster than with the budget's 64 MiB blocks, and
# slower again at 4 MiB, where the per-block overheads grow).
COACTIVE_BLOCK_BYTES = 8 << 20


class SparseActivations(NamedTuple):
    """Vanilla features of every dictionary over B token rows, and each transcoder's sigma."""

    vals: dict[str, Tensor]
    """{name: [B, K]} activation values."""
    idx: dict[str, Tensor]
    """{name: [B, K]} feature indices."""
    sigma: dict[str, Tensor]
    """{"mlp_<l>": [B]} LayerNorm scale of the clean run."""

    @property
    def n_tokens(self) -> int:
        return next(iter(self.vals.values())).shape[0]


@torch.no_grad()
def collect_activations(suite: SCAESuite, batches: Iterable, n_tokens: int) -> SparseActivations:
    """Run the vanilla pass over batches (ActivationBatch) until n_tokens tokens are collected.

    Storage is allocated once: per dictionary and token K values (the suite's dtype) and K indices
    (int16 when F fits, else int32), e.g. 4.7 GB for 24 dictionaries with K 32 over 1 M tokens.
    A buffer's model must fit the suite (depth, width, block wiring and norm).
    """
    if n_tokens <= 0:
        raise ValueError(f"n_tokens={n_tokens} must be positive")
    if getattr(batches, "suite_arch", None) is not None:
        suite.check_fits(batches.n_layers, batches.d_model, "the buffer's model",
                         batches.suite_arch)
    ref = suite.dicts[suite.names[0]].encoder.weight
    vals, idx = {}, {}
    for n in suite.names:
        ae = suite.dicts[n]
        idx_dtype = torch.int16 if ae.dict_size <= torch.iinfo(torch.int16).max else torch.int32
        vals[n] = ref.new_empty(n_tokens, ae.k)
        idx[n] = torch.empty(n_tokens, ae.k, dtype=idx_dtype, device=ref.device)
    sigma = {m: ref.new_empty(n_tokens) for m in suite.transcoder_names}
    seen = 0
    with tqdm(total=n_tokens, desc="collect activations", unit="tok", leave=False) as bar:
        for batch in batches:
            take = min(n_tokens - seen, batch.initial.shape[0])
            for n in suite.names:
                feats = suite.vanilla_one(n, batch).feats
                vals[n][seen : seen + take] = feats.vals_BK[:take]
                idx[n][seen : seen + take] = feats.idx_BK[:take]
            for m in suite.transcoder_names:
                sigma[m][seen : seen + take] = batch.layernorm_scale[m][:take]
            seen += take
            bar.update(take)
            if seen >= n_tokens:
                break
    if seen < n_tokens:
        raise ValueError(
            f"the data gave {seen} tokens but {n_tokens} were asked for; give more data or lower "
            "n_tokens"
        )
    return SparseActivations(vals, idx, sigma)


def _virtual_weights_block(
    suite: SCAESuite, down: str, lo: int, hi: int, dtype: torch.dtype
) -> Tensor:
    """V[i, j] = (P w_i) . d_j for downstream features lo..hi and every upstream feature (dense).

    Each upstream dictionary's product is written straight into its columns of the block (a
    column slice of a row-major matrix is a valid GEMM output), not concatenated afterwards."""
    Wc = suite.centre(suite.dicts[down].encoder.weight[lo:hi])
    ups = suite.upstream_names(down)
    V_fG = Wc.new_empty(hi - lo, sum(suite.dicts[u].dict_size for u in ups), dtype=dtype)
    off = 0
    for u in ups:
        F_u, dec = suite.dicts[u].dict_size, suite.dicts[u].decoder.weight
        if Wc.dtype == dtype:
            torch.mm(Wc, dec, out=V_fG[:, off : off + F_u])
        else:  # half-precision suites: the product in their dtype, the block in fp32
            V_fG[:, off : off + F_u] = Wc @ dec
        off += F_u
    return V_fG


def _upstream(acts: SparseActivations, suite: SCAESuite, down: str, rows, dtype: torch.dtype):
    """Upstream values divided by sigma, and their global indices, [b, A], for token rows `rows`
    (a slice or an index tensor)."""
    sig_b1 = acts.sigma[down][rows].to(dtype)[:, None]
    # zero-width starts: parallel blocks' mlp_0 has no upstream dictionary
    vals, idx, off = [sig_b1[:, :0]], [sig_b1[:, :0].long()], 0
    for u in suite.upstream_names(down):
        vals.append(acts.vals[u][rows].to(dtype) / sig_b1)
        idx.append(acts.idx[u][rows].long() + off)
        off += suite.dicts[u].dict_size
    return torch.cat(vals, 1), torch.cat(idx, 1)


class _Slots(NamedTuple):
    """The active slots of one transcoder, feature by feature."""

    pos_P: Tensor
    """[P] flat positions t K + k of the active slots (token t, its k-th feature), grouped by
    feature and in token order within a feature."""
    feat_P: Tensor
    """[P] the feature of each slot (ascending)."""
    start: list[int]
    """F + 1 offsets: feature i's slots are pos_P[start[i] : start[i + 1]]."""


def _slots_by_feature(acts: SparseActivations, down: str, F: int) -> _Slots:
    """Sort the active slots of `down` by feature, so that a block of features is one range of
    slots (int32 where they fit: 8 bytes a slot, 256 MB for K 32 over 1 M tokens)."""
    pos_P = (acts.vals[down] > 0).view(-1).nonzero().squeeze(1)
    if pos_P.numel() < torch.iinfo(torch.int32).max:
        pos_P = pos_P.int()
    # stable: each feature's tokens stay ascending, so every co-activation sum adds its tokens
    # in order whatever the block and chunk sizes
    feat_P, order_P = acts.idx[down].view(-1).index_select(0, pos_P).sort(stable=True)
    start = [0] + torch.bincount(feat_P.long(), minlength=F).cumsum(0).tolist()
    return _Slots(pos_P.index_select(0, order_P), feat_P, start)


def _tokens_per_feature(start: list[int], dtype: torch.dtype, device) -> Tensor:
    """[F] tokens where each feature is active, at least 1 (the mean over none is 0 anyway):
    the offsets differenced in integers (past 2^24 they are not exact in fp32)."""
    return torch.tensor(start, device=device).diff().clamp_min(1).to(dtype)


def _coactive_virtual_weights(
    suite: SCAESuite, acts: SparseActivations, down: str, slots: _Slots, lo: int, hi: int,
    dtype: torch.dtype, token_batch: int = 32,
) -> Tensor:
    """[n, A] V[i, g] = (P w_i) . d_g at every pair (i, g) active together on some token, i in
    lo..hi: row r is the slot slots.pos_P[start[lo] + r] of feature i, column a the token's a-th
    upstream slot in the order of `_upstream`.

    One small product per token: the rows P w_i of its active features in lo..hi (padded to the
    batch's widest token) times the decoder rows of its A active upstream features, gathered. The
    work is T K A multiply-adds of D instead of the dense route's F n_up, and each value is the
    same dot product as the dense GEMM's. Besides the [n, A] weights it holds one token batch of
    decoder rows, [A, token_batch, D], and of products, [token_batch, K, A]."""
    Wc_FD = suite.centre(suite.dicts[down].encoder.weight)
    ups = suite.upstream_names(down)
    # decoder rows d_g: contiguous [F_u, D] views of the feature-major decoders
    dec_rows = [suite.dicts[u].decoder.weight.T for u in ups]
    widths = [acts.idx[u].shape[1] for u in ups]
    A, D = sum(widths), Wc_FD.shape[1]
    T, K = acts.idx[down].shape
    s_lo, s_hi = slots.start[lo], slots.start[hi]
    n = s_hi - s_lo
    # one scratch row past the end takes the products of padding slots
    V_nA = Wc_FD.new_empty(n + 1, A, dtype=dtype)
    if n == 0:  # no feature of lo..hi is ever active
        return V_nA[:n]
    # each slot's row of V_nA (the scratch row n for the slots of other features)
    row_TK = torch.full((T * K,), n, dtype=torch.long, device=V_nA.device)
    row_TK[slots.pos_P[s_lo:s_hi].long()] = torch.arange(n, device=V_nA.device)
    row_TK = row_TK.view(T, K)
    mine_TK = row_TK != n  # the active slots of features lo..hi
    count_T = mine_TK.sum(1)
    # tokens in order of their number of active features in lo..hi, so that a batch's tokens
    # need (almost) the same number of rows and the product pads few
    order_T = count_T.argsort(stable=True)
    order_T = order_T[count_T.index_select(0, order_T) > 0]
    # upstream decoder rows of a token batch, slot-major ([A, b, D]): each dictionary's rows are
    # then one contiguous block that index_select writes in place
    dec_flat = Wc_FD.new_empty(A * token_batch * D)
    out_flat = Wc_FD.new_empty(token_batch * K * A)
    for tok_b in order_T.split(token_batch):
        b, k_max = tok_b.shape[0], int(count_T[tok_b[-1]])
        # each token's slots in lo..hi first (ascending k), cut to the widest token
        first_bk = (~mine_TK.index_select(0, tok_b)).to(torch.int8).argsort(dim=1, stable=True)
        first_bk = first_bk[:, :k_max]
        feat_bk = acts.idx[down].index_select(0, tok_b).long().gather(1, first_bk)
        dec_AbD = dec_flat[: A * b * D].view(A, b, D)
        off = 0
        for rows, u, w in zip(dec_rows, ups, widths, strict=True):
            idx_wb = acts.idx[u].index_select(0, tok_b).long().T
            torch.index_select(rows, 0, idx_wb.flatten(), out=dec_AbD[off : off + w].view(-1, D))
            off += w
        out_bkA = torch.bmm(take_rows(Wc_FD, feat_bk), dec_AbD.permute(1, 2, 0),
                            out=out_flat[: b * k_max * A].view(b, k_max, A))
        dest_bk = row_TK.index_select(0, tok_b).gather(1, first_bk)
        V_nA.index_copy_(0, dest_bk.flatten(), out_bkA.view(-1, A).to(dtype))
    return V_nA[:n]


def _super_blocks(start: list[int], A: int, budget_bytes: int, elem_bytes: int) -> list[int]:
    """Boundaries 0 = r_0 < r_1 < ... = F of row ranges whose co-active weights (a row of A
    values per active slot, slots of feature i: start[i]..start[i + 1]) fit budget_bytes each
    (a single feature may exceed it)."""
    per = max(1, budget_bytes // max(1, A * elem_bytes))
    F, bounds = len(start) - 1, [0]
    while bounds[-1] < F:
        end = bisect.bisect_right(start, start[bounds[-1]] + per, lo=bounds[-1] + 1) - 1
        bounds.append(max(end, bounds[-1] + 1))
    return bounds


def plan_method(suite: SCAESuite, acts: SparseActivations, down: str, variant: Variant,
                memory_budget_bytes: int) -> Literal["dense", "coactive"]:
    """The route "auto" takes for transcoder `down`: "coactive" where its products are fewer than
    the dense GEMM's by COACTIVE_COST and its weights fit their share of the memory budget in at
    most MAX_SUPER_BLOCKS super blocks, else "dense"."""
    ups = suite.upstream_names(down)
    if variant == "all" or not ups:
        return "dense"
    A = sum(acts.idx[u].shape[1] for u in ups)
    n_up = sum(suite.dicts[u].dict_size for u in ups)
    n_active = int((acts.vals[down] > 0).sum())
    pairs, dense = n_active * A, suite.dicts[down].dict_size * n_up
    fits = pairs * 4 <= MAX_SUPER_BLOCKS * _weights_budget(memory_budget_bytes)
    return "coactive" if fits and COACTIVE_COST * pairs <= dense else "dense"


@torch.no_grad()
def importance_blocks(
    suite: SCAESuite,
    acts: SparseActivations,
    down: str,
    variant: Variant = "active",
    *,
    memory_budget_bytes: int = 1 << 30,
    token_batch: int = 1024,
    method: Method = "auto",
):
    """Yield (lo, hi, I_fG) blocks of the importance matrix of transcoder `down`: f = hi - lo of
    its features, G = n_up.

    V comes by one of two routes, with the same values up to the GEMM's last bits (each V_ig is
    the same dot product; docs/method.md §4):
    - "dense": the GEMM of the block's rows P w_i with every upstream decoder (F n_up products);
    - "coactive" (variant "active" only): V only at the pairs active together on some token, one
      small product per token (`_coactive_virtual_weights`), T K A products: 18x fewer than F n_up
      at 8,192 tokens of a gpt2-small-sized suite, but growing with the tokens.
    "auto" chooses by `plan_method`. The co-activation sums A add each block's active slots
    (`_slots_by_feature`) in chunks, each pair's tokens in order, so every route, block and chunk
    size gives the same sums. `token_batch`: tokens per step of variant "all"'s sums.

    A yielded block is valid until the next one is asked for (the co-active route reuses its
    buffer): copy it to keep it.

    Memory, within memory_budget_bytes: the dense route's three [f, G] buffers; the co-active
    route's weights (WEIGHTS_SHARE of the budget, in super blocks of features if they need more)
    and one [f, G] buffer (on the CPU at most COACTIVE_BLOCK_BYTES) with the block's pair keys.
    Plus a chunk of pairs (a 256th of the budget, ~28 bytes a pair), the upstream activations of
    all tokens where they fit an eighth of the budget, and the sorted active slots (8 bytes
    each).
    """
    if variant not in ("active", "all"):
        raise ValueError(f"variant must be 'active' or 'all', got {variant!r}")
    if method not in ("auto", "dense", "coactive"):
        raise ValueError(f"method must be 'auto', 'dense' or 'coactive', got {method!r}")
    if method == "coactive" and variant == "all":
        raise ValueError("method 'coactive' needs variant 'active' (variant 'all' uses every pair)")
    if method == "auto" or not suite.upstream_names(down):  # nothing upstream: no V to compute
        method = plan_method(suite, acts, down, variant, memory_budget_bytes)
    n_up = sum(suite.dicts[u].dict_size for u in suite.upstream_names(down))
    F = suite.dicts[down].dict_size
    ref = acts.vals[down]
    dtype = torch.float32 if ref.dtype in (torch.bfloat16, torch.float16) else ref.dtype
    n_tokens = acts.n_tokens
    if variant == "all":
        a_G = torch.zeros(n_up, dtype=dtype, device=ref.device)
        for s in range(0, n_tokens, token_batch):
            up_vals, up_idx = _upstream(acts, suite, down, slice(s, s + token_batch), dtype)
            a_G.index_add_(0, up_idx.flatten(), up_vals.flatten())
        a_G /= n_tokens
        block = _block_rows(memory_budget_bytes, F, n_up, 3)
        for lo in range(0, F, block):
            hi = min(F, lo + block)
            yield lo, hi, _virtual_weights_block(suite, down, lo, hi, dtype).mul_(a_G)
        return
    A = sum(acts.idx[u].shape[1] for u in suite.upstream_names(down))
    K = acts.idx[down].shape[1]
    slots = _slots_by_feature(acts, down, F)
    start = slots.start
    n_F1 = _tokens_per_feature(start, dtype, ref.device)[:, None]
    if method == "dense":
        super_bounds = [0, F]
        block = _block_rows(memory_budget_bytes, F, n_up, 3)
    else:
        # the co-active weights' share of the budget, and the rest for the block: one [f, G]
        # buffer (it becomes I in place) and the block's pair keys and values (< one more)
        weights_budget = _weights_budget(memory_budget_bytes)
        super_bounds = _super_blocks(start, A, weights_budget, dtype.itemsize)
        block_budget = memory_budget_bytes - weights_budget
        if ref.device.type == "cpu":  # (on a GPU, larger blocks launch fewer kernels)
            block_budget = min(block_budget, 2 * COACTIVE_BLOCK_BYTES)
        block = _block_rows(block_budget, F, n_up, 2)
    # The upstream activations of every token, built once if they fit an eighth of the budget
    # (every block reads them), else per chunk for its tokens.
    up_all = None
    if n_tokens * A * 12 <= memory_budget_bytes // 8:
        up_all = _upstream(acts, suite, down, slice(None), dtype)
    chunk = max(1, memory_budget_bytes // (256 * max(1, A)))
    # One co-activation buffer, zeroed per block. The dense route keeps it; the co-active route
    # turns it into the block's I and yields it (valid until the next block is asked for).
    A_buf = torch.empty(block * n_up, dtype=dtype, device=ref.device)
    for s_lo, s_hi in itertools.pairwise(super_bounds):
        V_nA = None
        if method == "coactive":
            V_nA = _coactive_virtual_weights(suite, acts, down, slots, s_lo, s_hi, dtype)
        for lo in range(s_lo, s_hi, block):
            hi = min(s_hi, lo + block)
            A_fG = A_buf[: (hi - lo) * n_up].view(hi - lo, n_up).zero_()
            A_flat = A_fG.view(-1)
            n_f1 = n_F1[lo:hi]
            pairs = []  # (first slot, keys, i) per chunk, for the co-active route
            for c_lo in range(start[lo], start[hi], chunk):
                c_hi = min(start[hi], c_lo + chunk)
                t_n = slots.pos_P[c_lo:c_hi] // K
                if up_all is not None:
                    up_vals, up_idx = up_all[0].index_select(0, t_n), up_all[1].index_select(0, t_n)
                else:
                    up_vals, up_idx = _upstream(acts, suite, down, t_n, dtype)
                i = slots.feat_P[c_lo:c_hi].long() - lo
                keys = (i[:, None] * n_up + up_idx).view(-1)
                # scatter_add_ adds a 1-D index in order, as index_add_ does, ~1.5x faster here
                A_flat.scatter_add_(0, keys, up_vals.view(-1))
                if V_nA is not None:
                    pairs.append((c_lo - start[s_lo], keys, i))
            if V_nA is None:
                # V_fG is this block's own tensor: the products below are in place on it
                V_fG = _virtual_weights_block(suite, down, lo, hi, dtype)
                yield lo, hi, V_fG.mul_(A_fG).div_(n_f1)
                continue
            # I = V a / n at the co-active pairs (the dense route's operations), written over a:
            # every a is read before any is overwritten, and a repeated pair writes one value.
            # Elsewhere a, and so I, is zero. Each slot's row of V is used once: in place.
            a_parts = [A_flat.index_select(0, keys) for _, keys, _ in pairs]
            for (r_lo, keys, i), a_n in zip(pairs, a_parts, strict=True):
                I_nA = V_nA[r_lo : r_lo + i.shape[0]].mul_(a_n.view(i.shape[0], -1))
                A_flat.index_copy_(0, keys, I_nA.div_(n_f1.index_select(0, i)).view(-1))
            del pairs, a_parts
            yield lo, hi, A_fG


def _weights_budget(memory_budget_bytes: int) -> int:
    """The co-active route's share of the budget for its stored weights; the rest holds a block."""
    return int(memory_budget_bytes * WEIGHTS_SHARE)


def _block_rows(budget_bytes: int, F: int, n_up: int, buffers: int) -> int:
    """Downstream features per block: `buffers` [block, n_up] fp32 buffers within budget_bytes."""
    return max(1, min(F, budget_bytes // (4 * max(1, n_up) * buffers)))


def importance(
    suite: SCAESuite, acts: SparseActivations, down: str, variant: Variant = "active", **kwargs
) -> Tensor:
    """The dense importance matrix [F, G] of one transcoder (small suites and tests); kwargs go
    to `importance_blocks`."""
    blocks = importance_blocks(suite, acts, down, variant, **kwargs)
    return torch.cat([b.clone() for _, _, b in blocks])


def _topk_rows(x_fG: Tensor, c: int, seg: int = 32) -> tuple[Tensor, Tensor]:
    """The c largest values of each row of x_fG and their columns: larger values first and, among
    equal values, lower columns first, also at the cut (so a function of x alone, whatever the
    block sizes, route or device: torch.topk breaks ties as its algorithm happens to). Ties at
    the value 0 (no connection) are left as topk gives them. ~3x faster than topk here:

    each row's top c lie in its c segments (of `seg` columns) of largest maxima, as the c largest
    maxima are c values, so only the maxima and c seg candidates per row are ranked."""
    f, G = x_fG.shape
    n_full = G // seg
    if c == 0:
        return x_fG.topk(0, dim=1)
    if n_full <= c:
        top_fc, col_fc = x_fG.topk(c, dim=1)
        cut_f1 = top_fc[:, -1:]
        tie_f = (x_fG == cut_f1).sum(1) > (top_fc == cut_f1).sum(1)
    else:
        max_fS = x_fG[:, : n_full * seg].unflatten(1, (n_full, seg)).amax(2)
        if n_full * seg < G:  # the last, shorter segment
            max_fS = torch.cat([max_fS, x_fG[:, n_full * seg :].amax(1, keepdim=True)], 1)
        seg_fc = max_fS.topk(c, dim=1).indices
        cols_fN = (seg_fc[:, :, None] * seg + torch.arange(seg, device=x_fG.device)).view(f, -1)
        cand_fN = x_fG.gather(1, cols_fN.clamp_max(G - 1))
        cand_fN.masked_fill_(cols_fN >= G, float("-inf"))
        top_fc, at_fc = cand_fN.topk(c, dim=1)
        col_fc = cols_fN.gather(1, at_fc)
        # a value equal to the cut but left out is among the candidates or in a segment left
        # out, whose maximum then equals the cut
        cut_f1 = top_fc[:, -1:]
        tie_f = ((cand_fN == cut_f1).sum(1) > (top_fc == cut_f1).sum(1)) | (
            (max_fS == cut_f1).sum(1) > (max_fS.gather(1, seg_fc) == cut_f1).sum(1))
    # rows with a tie at the cut (rare): the lowest columns of the cut's value
    for r in (tie_f & (cut_f1[:, 0] != 0)).nonzero().squeeze(1).tolist():
        above = col_fc[r][top_fc[r] > cut_f1[r]]
        tied = (x_fG[r] == cut_f1[r]).nonzero().squeeze(1)[: c - above.shape[0]]
        col_fc[r] = torch.cat([above, tied])
        top_fc[r] = x_fG[r].index_select(0, col_fc[r])
    col_fc, order_fc = col_fc.sort(dim=1)
    top_fc, order_fc = top_fc.gather(1, order_fc).sort(dim=1, descending=True, stable=True)
    return top_fc, col_fc.gather(1, order_fc)


def search_route(suite: SCAESuite, acts: SparseActivations, down: str, variant: Variant = "active",
                 method: Method = "auto", memory_budget_bytes: int = 1 << 30) -> str:
    """The route top_connections takes for transcoder `down`: "dense" or "coactive" (`method`,
    or plan_method's choice for "auto"), or "coactive-kernel" where the co-active top C runs in
    the C kernel (`_coactive_top`): fp32 sums on the CPU, a [T, A] upstream table of 8 bytes an
    entry within an eighth of the budget, int32 columns, and a kernel that builds here."""
    route = method
    if method == "auto" or not suite.upstream_names(down):
        route = plan_method(suite, acts, down, variant, memory_budget_bytes)
    ups = suite.upstream_names(down)
    A = sum(acts.idx[u].shape[1] for u in ups)
    ref = acts.vals[down]
    if (route == "coactive" and variant == "active" and ref.device.type == "cpu"
            and ref.dtype != torch.float64
            and sum(suite.dicts[u].dict_size for u in ups) < 2**31
            and acts.n_tokens * A * 8 <= memory_budget_bytes // 8 and _kernel() is not None):
        return "coactive-kernel"
    return route


def _kernel() -> ctypes.CDLL | None:
    """dictionary_learning/csrc/coactive_top.c, loaded (None without a C compiler)."""
    lib = native.load("coactive_top")
    if lib is not None and lib.coactive_top.argtypes is None:
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.coactive_top.argtypes = [i64, i64, p, p, i64, p, i64, p, p, p, i64, p, p, p, p]
        lib.coactive_top.restype = None
    return lib


@torch.no_grad()
def _coactive_top(suite: SCAESuite, acts: SparseActivations, down: str, c: int,
                  memory_budget_bytes: int) -> tuple[Tensor, Tensor]:
    """[F, c] largest |I| of each feature of `down` and their global upstream columns (-1 past a
    row's non-zero values), by the C kernel (dictionary_learning/csrc/coactive_top.c): per
    feature its co-activation sums in a scratch row of G, then I = V a / n once per co-active
    pair into a heap of the c best. The same fp32 operations in the same order as the torch route
    (`importance_blocks`, then `_topk_rows`): the same values and columns bit for bit, without
    [f, G] blocks. Features in ranges of about equal work, about four a thread
    (`native.parallel`)."""
    lib = _kernel()
    ups = suite.upstream_names(down)
    F = suite.dicts[down].dict_size
    A = sum(acts.idx[u].shape[1] for u in ups)
    K = acts.idx[down].shape[1]
    slots = _slots_by_feature(acts, down, F)
    offsets = torch.tensor(slots.start)
    n_F = _tokens_per_feature(slots.start, torch.float32, offsets.device)
    tok_P = (slots.pos_P // K).long()
    up_val_BA, up_idx_BA = _upstream(acts, suite, down, slice(None), torch.float32)
    up_g_BA = up_idx_BA.int()
    del up_idx_BA
    score_FC = torch.zeros(F, c)
    col_FC = torch.full((F, c), -1, dtype=torch.long)
    n_up = sum(suite.dicts[u].dict_size for u in ups)

    def run(V_nA: Tensor, r0: int, lo: int, hi: int) -> None:
        sums_G = torch.zeros(n_up)
        heap = torch.empty(max(1, c), 2, dtype=torch.long)  # c (float, int64) entries
        lib.coactive_top(lo, hi, offsets.data_ptr(), tok_P.data_ptr(), r0, V_nA.data_ptr(), A,
                         up_val_BA.data_ptr(), up_g_BA.data_ptr(), n_F.data_ptr(), c,
                         sums_G.data_ptr(), heap.data_ptr(), score_FC[lo].data_ptr(),
                         col_FC[lo].data_ptr())

    bounds = _super_blocks(slots.start, A, _weights_budget(memory_budget_bytes), 4)
    for s_lo, s_hi in itertools.pairwise(bounds):
        V_nA = None  # the previous super block's weights freed first
        V_nA = _coactive_virtual_weights(suite, acts, down, slots, s_lo, s_hi, torch.float32)
        # about 4 ranges a thread, cut where the slots (the work) reach equal shares
        cuts = torch.linspace(slots.start[s_lo], slots.start[s_hi], 4 * native.workers() + 1)
        edges = sorted({s_lo, s_hi, *(bisect.bisect_left(slots.start, int(x), s_lo, s_hi)
                                      for x in cuts.tolist())})
        native.parallel(run, [(V_nA, slots.start[s_lo], lo, hi)
                              for lo, hi in itertools.pairwise(edges)])
    return score_FC, col_FC


def _split_global(
    down: str, suite: SCAESuite, top_FC: Tensor, keep_FC: Tensor
) -> dict[str, Tensor]:
    """Global upstream indices [F, C] (keep mask) -> exchange format {up: [F, C_up]}, -1 padded."""
    out, off = {}, 0
    for u in suite.upstream_names(down):
        F_u = suite.dicts[u].dict_size
        mine = keep_FC & (top_FC >= off) & (top_FC < off + F_u)
        local = torch.where(mine, top_FC - off, -1)
        width = int(mine.sum(1).max()) if mine.numel() else 0
        # Move this module's entries to the front of each row, then cut to the widest row.
        order = (~mine).to(torch.int8).argsort(dim=1, stable=True)
        out[u] = local.gather(1, order)[:, :width].cpu()
        off += F_u
    return out


@torch.no_grad()
def top_connections(
    suite: SCAESuite,
    acts: SparseActivations,
    C: int,
    variant: Variant = "active",
    *,
    memory_budget_bytes: int = 1 << 30,
    method: Method = "auto",
) -> Connections:
    """For each transcoder feature, the C upstream features of largest |importance|, one budget
    across all upstream dictionaries. Pairs of zero importance (never co-active) are not kept.
    Each transcoder takes `search_route`'s route: on the CPU the co-active route's top C runs in
    a C kernel (`_coactive_top`), elsewhere the torch blocks (`importance_blocks`, `_topk_rows`),
    with the same result."""
    if C <= 0:
        raise ValueError(f"C={C} must be a positive number of connections per feature")
    conns = {}
    for down in tqdm(suite.transcoder_names, desc="top connections", leave=False):
        route = search_route(suite, acts, down, variant, method, memory_budget_bytes)
        if route == "coactive-kernel":
            n_up = sum(suite.dicts[u].dict_size for u in suite.upstream_names(down))
            score_FC, top_FC = _coactive_top(suite, acts, down, min(C, n_up), memory_budget_bytes)
            conns[down] = _split_global(down, suite, top_FC, score_FC > 0)
            continue
        tops, keeps = [], []
        # (the route, not "auto": plan_method has run once for this transcoder)
        blocks = importance_blocks(
            suite, acts, down, variant, memory_budget_bytes=memory_budget_bytes, method=route
        )
        for _, _, imp_fG in blocks:
            score_fC, top_fC = _topk_rows(imp_fG.abs_(), min(C, imp_fG.shape[1]))
            tops.append(top_fC)
            keeps.append(score_fC > 0)
        conns[down] = _split_global(down, suite, torch.cat(tops), torch.cat(keeps))
    validate_connections(conns, suite.dict_sizes, suite.parallel)
    return conns


@torch.no_grad()
def random_connections(
    suite: SCAESuite, like: Connections, seed: int = 0, block: int = 4096
) -> Connections:
    """Uniformly random connections with the same number per feature and upstream module as `like`
    (the baseline)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for down, ups in like.items():
        out[down] = {}
        for u, idx in ups.items():
            F_u = suite.dicts[u].dict_size
            counts = (idx >= 0).sum(1)
            width = int(counts.max()) if counts.numel() else 0
            rows = []
            for lo in range(0, idx.shape[0], block):
                scores = torch.rand(min(block, idx.shape[0] - lo), F_u, generator=g)
                pick = scores.topk(width, dim=1).indices if width else scores[:, :0].long()
                slot = torch.arange(width)[None, :]
                rows.append(torch.where(slot < counts[lo : lo + block, None], pick, -1))
            out[down][u] = torch.cat(rows) if rows else idx.clone()
    validate_connections(out, suite.dict_sizes, suite.parallel)
    return out


def connection_stats(conns: Connections) -> dict[str, dict[str, float]]:
    """Mean number of connections per feature into each upstream module."""
    return {
        d: {u: float((idx >= 0).sum(1).float().mean()) for u, idx in ups.items()}
        for d, ups in conns.items()
    }


def main(argv=None) -> None:
    from buffer import AllActivationBuffer
    from dictionary_learning.data import contexts_from
    from dictionary_learning.model import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", required=True, help="suite folder or Hub id")
    p.add_argument("--model", default=None, help="model name or path (default: the suite's)")
    p.add_argument(
        "--data", default=None, help="'embedded', a text file or folder, or a datasets name"
    )
    p.add_argument("--tokens", type=int, default=200_000, help="tokens to average over")
    p.add_argument("--C", type=int, default=100, help="connections per downstream feature")
    p.add_argument("--variant", choices=["active", "all"], default="active")
    p.add_argument("--method", choices=["auto", "dense", "coactive"], default="auto",
                   help="how V is computed: dense blocks, only at co-active pairs, or chosen per "
                   "transcoder by the work (docs/method.md §4)")
    p.add_argument("--random", action="store_true", help="random connections with the same counts")
    p.add_argument("--out", required=True, help="output file (torch.save of the exchange format)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    suite = SCAESuite.from_pretrained(args.suite, device=args.device)
    buffer_meta = suite.meta.get("buffer", {})
    model_name = args.model or suite.meta.get("model_name")
    if model_name is None:
        p.error("the suite does not record its model: pass --model")
    model = load_model(model_name, device=args.device)
    contexts = contexts_from(args.data or buffer_meta.get("data", "embedded"), model.tokenizer,
                             int(buffer_meta.get("ctx_len", 128)), repeat=True)
    buf = AllActivationBuffer(model, contexts, n_tokens=min(args.tokens, 1 << 17),
                              out_batch_size=1024, device=args.device)
    acts = collect_activations(suite, buf, args.tokens)
    conns = top_connections(suite, acts, args.C, args.variant, method=args.method)
    if args.random:
        conns = random_connections(suite, conns)
    save_connections(conns, args.out)
    logger.info("saved connections of %d transcoders to %s: %s", len(conns), args.out,
                connection_stats(conns))


if __name__ == "__main__":
    main()
