"""Choose each transcoder feature's upstream connections (docs/method.md §4).

Importance of upstream feature (u, j) for downstream feature i of mlp_L:

    I(i; u, j) = mean over tokens t where i is active of  f_uj(t) (w_i . P d_uj) / sigma_L(t)

(P the centring of LayerNorm models, the identity for RMSNorm models; u runs over the upstream set
of mlp_L, which has no attn_L when the blocks are parallel: `SCAESuite.upstream_names`)

which factorises as V[i, (u, j)] * A[i, (u, j)] / n_i with the virtual weight V = (P w_i) . d_uj,
the co-activation sum A = sum_{t: i active} f_uj(t) / sigma_L(t) and n_i the number of tokens where
i is active. A is accumulated from sparse activations (K per dictionary and token), in blocks of
downstream features whose size is set by a memory budget, so memory never grows as
F_down x F_up x tokens. The "all" variant averages over all tokens instead: A then no longer
depends on i. Upstream activations are the vanilla ones (there are no connections yet).

Usable as a module (`collect_activations`, `importance`, `top_connections`,
`random_connections`) and as a script: `python find_top_connections.py --help`.
"""

from __future__ import annotations

import argparse
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
from dictionary_learning.suite import SCAESuite

logger = logging.getLogger(__name__)

Variant = Literal["active", "all"]


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


def _upstream(acts: SparseActivations, suite: SCAESuite, down: str, sl: slice, dtype: torch.dtype):
    """Upstream values divided by sigma, and their global indices, [b, A], for tokens sl."""
    sig_b1 = acts.sigma[down][sl, None].to(dtype)
    # zero-width starts: parallel blocks' mlp_0 has no upstream dictionary
    vals, idx, off = [sig_b1[:, :0]], [sig_b1[:, :0].long()], 0
    for u in suite.upstream_names(down):
        vals.append(acts.vals[u][sl].to(dtype) / sig_b1)
        idx.append(acts.idx[u][sl].long() + off)
        off += suite.dicts[u].dict_size
    return torch.cat(vals, 1), torch.cat(idx, 1)


@torch.no_grad()
def importance_blocks(
    suite: SCAESuite,
    acts: SparseActivations,
    down: str,
    variant: Variant = "active",
    *,
    memory_budget_bytes: int = 1 << 30,
    token_batch: int = 1024,
):
    """Yield (lo, hi, I_fG) blocks of the importance matrix of transcoder `down`: f = hi - lo of
    its features, G = n_up.

    Memory: three [f, G] buffers (block set by memory_budget_bytes) plus one token batch of
    upstream activations; the stored activations are read a token batch at a time.
    """
    if variant not in ("active", "all"):
        raise ValueError(f"variant must be 'active' or 'all', got {variant!r}")
    n_up = sum(suite.dicts[u].dict_size for u in suite.upstream_names(down))
    F = suite.dicts[down].dict_size
    ref = acts.vals[down]
    dtype = torch.float32 if ref.dtype in (torch.bfloat16, torch.float16) else ref.dtype
    n_tokens = acts.n_tokens
    batches = [slice(s, min(n_tokens, s + token_batch)) for s in range(0, n_tokens, token_batch)]
    if variant == "all":
        a_G = torch.zeros(n_up, dtype=dtype, device=ref.device)
        for sl in batches:
            up_vals, up_idx = _upstream(acts, suite, down, sl, dtype)
            a_G.index_add_(0, up_idx.flatten(), up_vals.flatten())
        a_G /= n_tokens
    block = max(1, min(F, memory_budget_bytes // (4 * max(1, n_up) * 3)))
    # one co-activation buffer for all blocks (zeroed per block, never handed out)
    A_buf = torch.empty(0 if variant == "all" else block * n_up, dtype=dtype, device=ref.device)
    for lo in range(0, F, block):
        hi = min(F, lo + block)
        # V_fG is this block's own tensor: the products below are in place on it
        V_fG = _virtual_weights_block(suite, down, lo, hi, dtype)
        if variant == "all":
            yield lo, hi, V_fG.mul_(a_G)
            continue
        A_fG = A_buf[: (hi - lo) * n_up].view(hi - lo, n_up).zero_()
        count_f = torch.zeros(hi - lo, dtype=dtype, device=V_fG.device)
        for sl in batches:
            d_idx = acts.idx[down][sl].long()
            sel = (acts.vals[down][sl] > 0) & (d_idx >= lo) & (d_idx < hi)
            t, k = sel.nonzero(as_tuple=True)
            if t.numel() == 0:
                continue
            up_vals, up_idx = _upstream(acts, suite, down, sl, dtype)
            i = d_idx[t, k] - lo
            count_f.index_add_(0, i, torch.ones_like(i, dtype=dtype))
            A_fG.view(-1).index_add_(
                0, (i[:, None] * n_up + up_idx[t]).flatten(), up_vals[t].flatten()
            )
        yield lo, hi, V_fG.mul_(A_fG).div_(count_f.clamp_min(1)[:, None])


def importance(
    suite: SCAESuite, acts: SparseActivations, down: str, variant: Variant = "active"
) -> Tensor:
    """The dense importance matrix [F, G] of one transcoder (small suites and tests)."""
    return torch.cat([b for _, _, b in importance_blocks(suite, acts, down, variant)])


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
) -> Connections:
    """For each transcoder feature, the C upstream features of largest |importance|, one budget
    across all upstream dictionaries. Pairs of zero importance (never co-active) are not kept."""
    if C <= 0:
        raise ValueError(f"C={C} must be a positive number of connections per feature")
    conns = {}
    for down in tqdm(suite.transcoder_names, desc="top connections", leave=False):
        tops, keeps = [], []
        blocks = importance_blocks(
            suite, acts, down, variant, memory_budget_bytes=memory_budget_bytes
        )
        for _, _, imp_fG in blocks:
            c = min(C, imp_fG.shape[1])
            score_fC, top_fC = imp_fG.abs_().topk(c, dim=1)
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
    conns = top_connections(suite, acts, args.C, args.variant)
    if args.random:
        conns = random_connections(suite, conns)
    save_connections(conns, args.out)
    logger.info("saved connections of %d transcoders to %s: %s", len(conns), args.out,
                connection_stats(conns))


if __name__ == "__main__":
    main()
