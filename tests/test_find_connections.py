"""The connection finder against a plain loop, and recovery of planted connections."""

import pytest
import torch

from dictionary_learning.arch import SuiteArch
from dictionary_learning.connections import load_connections, save_connections, upstream_names
from dictionary_learning.dictionary import AutoEncoderTopK, TopKTranscoder
import find_top_connections as ftc
from find_top_connections import (
    SparseActivations,
    _topk_rows,
    collect_activations,
    importance,
    importance_blocks,
    plan_method,
    random_connections,
    search_route,
    top_connections,
)
from tests.scae_fixtures import Batch, random_batch, random_suite
from dictionary_learning.suite import SCAESuite


@pytest.mark.parametrize("method", ["dense", "coactive"])
def test_importance_equals_plain_loop_over_tokens(method):
    suite = random_suite(n_layers=2, d=5, F=6, k=2)
    batches = [random_batch(n_layers=2, d=5, B=7, seed=s) for s in range(3)]
    acts = collect_activations(suite, batches, n_tokens=18)
    for down in suite.transcoder_names:
        imp_FG = importance(suite, acts, down, "active", method=method)
        imp_all_FG = importance(suite, acts, down, "all")
        ups = upstream_names(down)
        tc = suite.dicts[down]
        Wc = tc.encoder.weight - tc.encoder.weight.mean(1, keepdim=True)
        with torch.no_grad():
            dense = {
                n: torch.cat([suite.vanilla_forward(b)[n].feats.dense(6) for b in batches])[:18]
                for n in suite.names
            }
        sigma = torch.cat([b.layernorm_scale[down] for b in batches])[:18]
        for i in range(tc.dict_size):
            col = 0
            for u in ups:
                for j in range(suite.dicts[u].dict_size):
                    v = float((Wc[i] @ suite.dicts[u].decoder.weight[:, j]).detach())
                    tot, n_active, tot_all = 0.0, 0, 0.0
                    for t in range(18):
                        c = float(dense[u][t, j]) * v / float(sigma[t])
                        tot_all += c
                        if dense[down][t, i] > 0:
                            tot += c
                            n_active += 1
                    want = tot / n_active if n_active else 0.0
                    assert abs(float(imp_FG[i, col]) - want) < 1e-9, (down, i, u, j)
                    assert abs(float(imp_all_FG[i, col]) - tot_all / 18) < 1e-9
                    col += 1


def _suite_of(arch: SuiteArch, n_layers=3, d=24, F=40, k=4, seed=0) -> SCAESuite:
    """random_suite's dictionaries (fp32) with the given block wiring and norm."""
    base = random_suite(n_layers=n_layers, d=d, F=F, k=k, seed=seed, dtype=torch.float32)
    return SCAESuite(dict(base.dicts.items()), arch=arch)


@pytest.mark.parametrize("arch", [SuiteArch(), SuiteArch("gpt_neox", parallel=True),
                                  SuiteArch("llama", centred=False)], ids=lambda a: a.family)
def test_coactive_route_gives_the_dense_routes_importance_and_connections(arch):
    """V only at the co-active pairs (super blocks of features, token batches sorted by their
    rows) against the dense GEMM of whole blocks: the same importance up to the GEMM's rounding
    (each V is the same dot product; the GEMM's last bits depend on its block), the same top-C
    choice, at budgets that split the features into one, several and one-row super blocks."""
    suite = _suite_of(arch)
    batches = [random_batch(3, 24, B=64, seed=s, dtype=torch.float32) for s in range(3)]
    acts = collect_activations(suite, batches, 160)
    want = top_connections(suite, acts, 9, method="dense")
    for budget in (1 << 30, 60_000, 2_000):
        got = top_connections(suite, acts, 9, method="coactive", memory_budget_bytes=budget)
        assert got.keys() == want.keys()
        for down in want:
            assert got[down].keys() == want[down].keys()
            for u in want[down]:
                assert torch.equal(got[down][u], want[down][u]), (budget, down, u)
            if not suite.upstream_names(down):
                continue
            dense = importance(suite, acts, down, method="dense")
            sparse = importance(suite, acts, down, method="coactive", memory_budget_bytes=budget)
            assert (dense != 0).sum() > 0.2 * dense.numel()  # a real test: many co-active pairs
            torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
            # exact zeros where no token has both features active
            assert not sparse[dense == 0].any()


@pytest.mark.parametrize("G, c", [(5000, 7), (4000, 100), (1003, 40), (1000, 40), (64, 2),
                                  (100, 3), (30, 30), (50, 0)])
def test_top_c_per_row_breaks_ties_by_the_lower_column(G, c):
    """_topk_rows (segment maxima, then candidates) against sorting each row by (-value, column):
    few distinct values, so ties everywhere, also at the cut and across segments; rows of zeros
    (ties at 0 are left as they come: zero scores are not connections)."""
    g = torch.Generator().manual_seed(G + c)
    x = torch.randint(0, 6, (9, G), generator=g).float() * (torch.rand(9, G, generator=g) < 0.3)
    x[0] = 0
    x[1, -5:] = 9.0  # the largest values in the last (maybe short) segment
    x[2] = torch.rand(G, generator=g)  # no ties
    top, col = _topk_rows(x, c)
    assert top.shape == col.shape == (9, c)
    for r, row in enumerate(x.tolist()):
        want = sorted(range(G), key=lambda j: (-row[j], j))[:c]
        assert top[r].tolist() == [row[j] for j in want]
        positive = [j for j in want if row[j] > 0]
        assert col[r, : len(positive)].tolist() == positive
        assert torch.equal(x[r, col[r]], top[r])


def test_coactive_route_with_a_transcoder_never_active():
    suite = random_suite(n_layers=2, d=8, F=16, k=2, dtype=torch.float32)
    with torch.no_grad():
        suite.dicts["mlp_1"].encoder.bias.fill_(-1e6)
    acts = collect_activations(suite, [random_batch(2, 8, B=32, dtype=torch.float32)], 32)
    assert not (acts.vals["mlp_1"] > 0).any()
    assert not importance(suite, acts, "mlp_1", method="coactive").any()
    conns = top_connections(suite, acts, 4, method="coactive")
    assert all(not (idx >= 0).any() for idx in conns["mlp_1"].values())


def test_auto_route_follows_the_work_and_the_budget():
    suite = _suite_of(SuiteArch("gpt_neox", parallel=True), n_layers=2, d=8, F=64, k=2)
    few = collect_activations(suite, [random_batch(2, 8, B=40, dtype=torch.float32)], 40)
    many = collect_activations(
        suite, [random_batch(2, 8, B=512, seed=s, dtype=torch.float32) for s in range(4)], 2048
    )
    # mlp_1 reads attn_0 and mlp_0: 4 upstream features a token against 128 upstream features
    assert plan_method(suite, few, "mlp_1", "active", 1 << 30) == "coactive"
    assert plan_method(suite, many, "mlp_1", "active", 1 << 30) == "dense"
    assert plan_method(suite, few, "mlp_1", "active", 64) == "dense"  # weights over the budget
    assert plan_method(suite, few, "mlp_1", "all", 1 << 30) == "dense"
    assert plan_method(suite, few, "mlp_0", "active", 1 << 30) == "dense"  # nothing upstream
    with pytest.raises(ValueError, match="method must be 'auto', 'dense' or 'coactive'"):
        importance(suite, few, "mlp_1", method="sparse")
    with pytest.raises(ValueError, match="'coactive' needs variant 'active'"):
        importance(suite, few, "mlp_1", "all", method="coactive")


def _torch_route_top(suite, acts, down, c, budget):
    """The reference: the torch route's blocks (importance_blocks) and _topk_rows."""
    tops, cols = [], []
    for _, _, imp in importance_blocks(suite, acts, down, method="coactive",
                                       memory_budget_bytes=budget):
        top, col = _topk_rows(imp.abs_(), c)
        tops.append(top)
        cols.append(col)
    return torch.cat(tops), torch.cat(cols)


def _need_kernel():
    if ftc._kernel() is None:
        pytest.skip("no C compiler builds dictionary_learning/csrc/coactive_top.c here")


def _equal_tops(got, want):
    """Equal non-zero scores and their columns, bit for bit, and the same number per row."""
    (top, col), (top_ref, col_ref) = got, want
    assert top.shape == top_ref.shape and col.shape == col_ref.shape
    keep = top_ref > 0
    assert torch.equal(top > 0, keep)
    assert torch.equal(top[keep], top_ref[keep]) and torch.equal(col[keep], col_ref[keep])
    assert (col[~keep] == -1).all() and not top[~keep].any()


@pytest.mark.parametrize("arch", [SuiteArch(), SuiteArch("gpt_neox", parallel=True),
                                  SuiteArch("llama", centred=False)], ids=lambda a: a.family)
def test_coactive_kernel_gives_the_torch_routes_top_c_bit_for_bit(arch, monkeypatch):
    """The C kernel (sums, I = V a / n once per co-active pair, a heap of the c best) against the
    torch route it stands beside: the same scores and columns bit for bit, at budgets giving one,
    several and one-row super blocks, and top_connections picks it and gives the same
    connections as with SCAE_NATIVE=0."""
    _need_kernel()
    suite = _suite_of(arch)
    batches = [random_batch(3, 24, B=64, seed=s, dtype=torch.float32) for s in range(3)]
    acts = collect_activations(suite, batches, 160)
    for down in suite.transcoder_names[1:]:  # (mlp_0 of the parallel suite has no upstream)
        n_up = sum(suite.dicts[u].dict_size for u in suite.upstream_names(down))
        for budget, c in ((1 << 30, 9), (60_000, 9), (2_000, 9), (1 << 30, n_up)):
            got = ftc._coactive_top(suite, acts, down, c, budget)
            _equal_tops(got, _torch_route_top(suite, acts, down, c, budget))
    calls, real = [], ftc._coactive_top
    monkeypatch.setattr(ftc, "_coactive_top", lambda *a: calls.append(a[2]) or real(*a))
    got = top_connections(suite, acts, 9, method="coactive")
    with_ups = [d for d in suite.transcoder_names if suite.upstream_names(d)]
    assert calls == with_ups
    assert [search_route(suite, acts, d, method="coactive") for d in with_ups] == \
        ["coactive-kernel"] * len(with_ups)
    # the upstream table over an eighth of the budget: the torch route
    assert search_route(suite, acts, "mlp_1", method="coactive",
                        memory_budget_bytes=60_000) == "coactive"
    monkeypatch.setenv("SCAE_NATIVE", "0")
    want = top_connections(suite, acts, 9, method="coactive")
    assert all(torch.equal(got[d][u], want[d][u]) for d in want for u in want[d])


def test_coactive_kernel_breaks_ties_and_repeats_pairs_as_the_torch_route():
    """Integer weights, unit activations and sigma: I = V a / n takes few values, so ties
    everywhere, also at the cut; upstream slots of value 0; pairs co-active on several tokens."""
    _need_kernel()
    suite = _suite_of(SuiteArch("llama", centred=False), n_layers=2, d=8, F=30, k=3)
    g = torch.Generator().manual_seed(0)
    T, K, F = 50, 3, 30
    with torch.no_grad():
        for ae in suite.dicts.values():
            for w in (ae.encoder.weight, ae.decoder.weight):
                w.copy_(torch.randint(-2, 3, w.shape, generator=g).float())
    vals = {n: (torch.rand(T, K, generator=g) < 0.8).float() for n in suite.names}
    idx = {n: torch.rand(T, F, generator=g).argsort(1)[:, :K].short() for n in suite.names}
    acts = SparseActivations(vals, idx, {m: torch.ones(T) for m in suite.transcoder_names})
    imp = importance(suite, acts, "mlp_1", method="coactive").abs()
    for c in (1, 5, 17, 90):
        want = _torch_route_top(suite, acts, "mlp_1", c, 1 << 30)
        _equal_tops(ftc._coactive_top(suite, acts, "mlp_1", c, 1 << 30), want)
        if c == 5:  # a real test: rows with a tie at the cut
            cut = want[0][:, -1:]
            assert ((imp == cut).sum(1) > (want[0] == cut).sum(1))[cut[:, 0] > 0].any()


def planted_suite(d=64, F_up=48, F_down=40, true_c=3, seed=0):
    """One layer: a random attn SAE and a transcoder whose feature i reads the decoder directions of
    a known set S_i of attn features."""
    g = torch.Generator().manual_seed(seed)
    sae = AutoEncoderTopK(d, F_up, 5)
    tc = TopKTranscoder(d, d, F_down, 4)
    truth = torch.stack([torch.randperm(F_up, generator=g)[:true_c] for _ in range(F_down)])
    with torch.no_grad():
        dec = torch.randn(d, F_up, generator=g)
        dec -= dec.mean(0, keepdim=True)
        dec /= dec.norm(dim=0, keepdim=True)
        sae.decoder.weight.copy_(dec)
        sae.encoder.weight.copy_(dec.T)
        sae.encoder.bias.zero_()
        sae.b_dec.zero_()
        tc.encoder.weight.copy_(dec.T[truth].sum(1))
        tc.encoder.bias.fill_(-0.5)
    return SCAESuite({"attn_0": sae, "mlp_0": tc}), truth


def planted_batches(suite, n_batches=8, B=256, seed=1):
    g = torch.Generator().manual_seed(seed)
    d, F_up = suite.d_model, suite.dicts["attn_0"].dict_size
    dec = suite.dicts["attn_0"].decoder.weight
    for _ in range(n_batches):
        coef = torch.zeros(B, F_up)
        idx = torch.stack([torch.randperm(F_up, generator=g)[:5] for _ in range(B)])
        coef.scatter_(1, idx, torch.rand(B, 5, generator=g) + 0.5)
        attn = coef @ dec.T
        x0 = 0.1 * torch.randn(B, d, generator=g)
        resid = x0 + attn
        sigma = (resid.var(-1, unbiased=False) + 1e-5).sqrt()
        mlp_in = (resid - resid.mean(-1, keepdim=True)) / sigma[:, None]
        yield Batch(x0, {"attn_0": attn, "mlp_0": mlp_in},
                    {"attn_0": attn, "mlp_0": torch.zeros(B, d)}, {"mlp_0": sigma})


def test_finder_recovers_planted_connections():
    suite, truth = planted_suite()
    acts = collect_activations(suite, planted_batches(suite), n_tokens=2048)
    conns = top_connections(suite, acts, C=3)
    found = conns["mlp_0"]["attn_0"]
    tp = fp = fn = 0
    for i in range(truth.shape[0]):
        want, got = set(truth[i].tolist()), {j for j in found[i].tolist() if j >= 0}
        tp += len(want & got)
        fp += len(got - want)
        fn += len(want - got)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)


def test_budget_is_shared_across_upstream_modules_and_blocks_agree(tmp_path):
    suite = random_suite(n_layers=3, d=6, F=10, k=3, dtype=torch.float32)
    batches = [random_batch(3, 6, B=64, seed=s, dtype=torch.float32) for s in range(2)]
    acts = collect_activations(suite, batches, 128)
    C = 7
    conns = top_connections(suite, acts, C)
    small = top_connections(suite, acts, C, memory_budget_bytes=4 * 3 * 50 * 3)  # blocks of ~3 rows
    for down, ups in conns.items():
        per_feature = sum((idx >= 0).sum(1) for idx in ups.values())
        assert int(per_feature.max()) <= C
        imp_FG = importance(suite, acts, down)
        kth = imp_FG.abs().topk(C, dim=1).values[:, -1]
        off = 0
        for u in upstream_names(down):
            F_u = suite.dicts[u].dict_size
            for i, row in enumerate(ups.get(u, torch.empty(10, 0, dtype=torch.long))):
                for j in row.tolist():
                    if j >= 0:
                        assert imp_FG[i, off + j].abs() >= kth[i] - 1e-6
            off += F_u
        for u in ups:
            assert torch.equal(ups[u].sort(1).values, small[down][u].sort(1).values)
    save_connections(conns, tmp_path / "c.pt")
    back = load_connections(tmp_path / "c.pt", suite.dict_sizes)
    assert all(torch.equal(back[d][u], conns[d][u]) for d in conns for u in conns[d])


def test_random_connections_keep_per_module_counts():
    suite = random_suite(n_layers=3, d=6, F=10, k=3, dtype=torch.float32)
    acts = collect_activations(suite, [random_batch(3, 6, B=64, dtype=torch.float32)], 64)
    conns = top_connections(suite, acts, 6)
    rnd = random_connections(suite, conns, seed=1)
    same = free = 0
    for d, ups in conns.items():
        F = next(iter(ups.values())).shape[0]
        same_F = torch.ones(F, dtype=torch.bool)
        free_F = torch.zeros(F, dtype=torch.bool)  # rows where a random choice has an option
        for u, idx in ups.items():
            n_F = (idx >= 0).sum(1)
            assert torch.equal(n_F, (rnd[d][u] >= 0).sum(1))
            free_F |= (n_F > 0) & (n_F < suite.dict_sizes[u])
            same_F &= (idx.sort(1).values == rnd[d][u].sort(1).values).all(1)
        assert same_F[~free_F].all()  # no option: the same set
        same, free = same + int(same_F[free_F].sum()), free + int(free_F.sum())
    # A random row equals its top-C row by chance rarely (well under 1 in 10 here); a random
    # choice that copied the top-C one would match every row.
    assert free >= 20 and same <= 0.05 * free, (same, free)
