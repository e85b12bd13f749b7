"""The sparse kernels against plain references (float64), and a bf16 forward + backward."""

import copy

import pytest
import torch

import dictionary_learning.sparse_ops as sparse_ops
from dictionary_learning.connections import compile_connections
from tests.scae_fixtures import random_batch, random_connections, random_suite


def _pattern(F=9, U=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(F, U, generator=g) < 0.3
    keep[2] = False  # a row without connections
    rows, cols = keep.nonzero(as_tuple=True)
    crow = torch.zeros(F + 1, dtype=torch.long)
    crow[1:] = keep.sum(1).cumsum(0)
    order = torch.argsort(cols, stable=True)
    tcrow = torch.zeros(U + 1, dtype=torch.long)
    tcrow[1:] = keep.sum(0).cumsum(0)
    return rows, cols, (crow, cols, tcrow, rows[order], order)


def test_csr_virtual_weights_match_sampled_dot_and_gradcheck():
    rows, cols, pat = _pattern()
    W = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    dec = torch.randn(5, 13, dtype=torch.float64, requires_grad=True)
    got = sparse_ops.csr_virtual_weights(W, dec, *pat)
    want = sparse_ops.sampled_dot_plain(W, dec.T, rows, cols)
    torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(
        lambda a, b: sparse_ops.csr_virtual_weights(a, b, *pat), (W, dec)
    )


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("block_rows", [3, 1000])  # many table blocks, one
def test_blocked_c_kernel_matches_plain_reference(threads, block_rows, monkeypatch):
    """csrc/sparse_rows.c (fp32 on the CPU) against float64 references: the virtual weights
    (`csr_virtual_weights`: a row without connections, tables read in blocks of 3 rows or in
    one) and the x0 term at candidates (`dot_at_candidates`, candidates repeated within a token,
    x's gradient through the unsorted side); values and the gradients of both inputs, with
    gradients that are exactly 0 for most entries (skipped by the kernel); the kernel is checked
    to have run."""
    if sparse_ops.native.load("sparse_rows") is None:
        pytest.skip("no C compiler builds dictionary_learning/csrc/sparse_rows.c here")
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(sparse_ops, "TABLE_BLOCK_BYTES", block_rows * 37 * 4)
    calls = []
    real = sparse_ops._rows_call
    monkeypatch.setattr(sparse_ops, "_rows_call", lambda *a: calls.append(a[0]) or real(*a))
    g = torch.Generator().manual_seed(threads)
    rows, cols, pat = _pattern(F=21, U=40, seed=threads)
    W = torch.randn(21, 37, generator=g)
    dec = torch.randn(40, 37, generator=g).T  # feature-major, as a dictionary's decoder
    g_P = torch.randn(rows.shape[0], generator=g) * (torch.rand(rows.shape[0], generator=g) < 0.3)
    W32, dec32 = W.clone().requires_grad_(True), dec.T.clone().T.requires_grad_(True)
    W64, dec64 = W.double().requires_grad_(True), dec.double().requires_grad_(True)
    got = sparse_ops.csr_virtual_weights(W32, dec32, *pat)
    want = sparse_ops.sampled_dot_plain(W64, dec64.T, rows, cols)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got, (W32, dec32), g_P),
                    torch.autograd.grad(want, (W64, dec64), g_P.double()), strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)

    B, F, N = 13, 400, 9
    x = torch.randn(B, 37, generator=g)
    Wf = torch.randn(F, 37, generator=g)
    cand = torch.randint(0, F, (B, N), generator=g)
    cand[:, -1] = cand[:, 0]  # repeated candidates
    g_BN = torch.randn(B, N, generator=g) * (torch.rand(B, N, generator=g) < 0.3)
    x32, W32 = x.clone().requires_grad_(True), Wf.clone().requires_grad_(True)
    x64, W64 = x.double().requires_grad_(True), Wf.double().requires_grad_(True)
    want = (x64 @ W64.T).gather(1, cand)
    want_grads = torch.autograd.grad(want, (x64, W64), g_BN.double())
    # sampled forward (F > 16 N), then the dense product's forward: both with the sampled backward
    for ratio in (16, F):
        monkeypatch.setattr(sparse_ops, "SAMPLED_MIN_RATIO", ratio)
        got = sparse_ops.dot_at_candidates(x32, W32, cand)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        for a, b in zip(torch.autograd.grad(got, (x32, W32), g_BN), want_grads, strict=True):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    assert calls.count("rows_dot") == 2 and calls.count("rows_axpy") == 6


@pytest.mark.parametrize("threads", [1, 2])
def test_rows_sum_backward_by_c_kernel_matches_float64_embedding_bag(threads, monkeypatch):
    """The sparse decode's weighted row sums (`rows_sum`): forward and both gradients against
    embedding_bag in float64, with repeated features (in a token and across tokens), zero values
    (their table rows skipped in the C backward), a feature no token uses (its gradient row 0)
    and indices taken as a strided view; the C backward is checked to have run."""
    if sparse_ops.native.load("sparse_rows") is None:
        pytest.skip("no C compiler builds dictionary_learning/csrc/sparse_rows.c here")
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    calls = []
    real = sparse_ops._rows_call
    monkeypatch.setattr(sparse_ops, "_rows_call", lambda *a: calls.append(a[0]) or real(*a))
    g = torch.Generator().manual_seed(threads)
    B, K, F, D = 23, 5, 40, 19
    idx = torch.randint(0, F - 1, (B, 2 * K), generator=g)[:, ::2]  # feature F - 1 unused
    idx[:, 3] = idx[:, 0]
    vals = torch.randn(B, K, generator=g).relu()
    table = torch.randn(F, D, generator=g)
    g_out = torch.randn(B, D, generator=g)
    t32, v32 = table.clone().requires_grad_(True), vals.clone().requires_grad_(True)
    t64, v64 = table.double().requires_grad_(True), vals.double().requires_grad_(True)
    got = sparse_ops.rows_sum(idx, t32, v32)
    want = torch.nn.functional.embedding_bag(idx, t64, per_sample_weights=v64, mode="sum")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    got_g = torch.autograd.grad(got, (t32, v32), g_out)
    want_g = torch.autograd.grad(want, (t64, v64), g_out.double())
    for a, b in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_g[0][F - 1], torch.zeros(D))
    assert calls == ["rows_axpy", "rows_dot"]


def test_candidate_pattern_by_counting_sort_matches_the_stable_argsort(monkeypatch):
    """csrc/sparse_rows.c's `by_feature` gives the torch route's pattern exactly: features'
    entries by ascending token (repeats kept), all of them or those with a non-zero gradient;
    a feature outside [0, F) is an IndexError that names the range."""
    if sparse_ops.native.load("sparse_rows") is None:
        pytest.skip("no C compiler builds dictionary_learning/csrc/sparse_rows.c here")
    g = torch.Generator().manual_seed(0)
    B, N, F = 50, 7, 30
    cand = torch.randint(0, F, (B, N), generator=g)
    cand[:, 3] = cand[:, 1]
    g_BN = torch.randn(B, N, generator=g) * (torch.rand(B, N, generator=g) < 0.2)
    got = [sparse_ops._candidate_pattern(cand, F), sparse_ops._candidate_pattern(cand, F, g_BN)]
    with monkeypatch.context() as mp:
        mp.setattr(sparse_ops, "_sparse_rows", lambda: None)
        want = [sparse_ops._candidate_pattern(cand, F),
                sparse_ops._candidate_pattern(cand, F, g_BN)]
    for a, b in zip(got, want, strict=True):
        for field in ("row_ptr", "cols", "out_pos"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
        assert a.n_out == b.n_out == B * N
    assert got[1].cols.shape[0] == int((g_BN != 0).sum()) < B * N
    bad = cand.clone()
    bad[4, 2] = F
    with pytest.raises(IndexError, match=r"in \[0, 30\)"):
        sparse_ops._candidate_pattern(bad, F)


def test_virtual_weight_groups_are_consecutive_modules_within_the_budget(monkeypatch):
    from dictionary_learning import connections

    monkeypatch.setattr(connections, "VW_GROUP_FEATURES", 10)
    assert connections.virtual_weight_groups([5, 5, 20, 3, 3, 4, 1]) == ((0, 2), (2, 3), (3, 6),
                                                                         (6, 7))
    assert connections.virtual_weight_groups([]) == ()


@pytest.mark.parametrize("budget", [11, 25, 1 << 13])  # one module a group, two, all
def test_compiled_csr_layout_matches_the_slots(budget, monkeypatch):
    """Each group's CSR pattern and its transpose hold exactly the slots of J_FC that point into
    its modules, numbered one module after the other."""
    from dictionary_learning import connections

    monkeypatch.setattr(connections, "VW_GROUP_FEATURES", budget)
    suite = random_suite(n_layers=3, F=11)
    conns = random_connections(suite, C=6)
    for m, ups in conns.items():
        comp = compile_connections(m, ups, suite.dict_sizes)
        C = comp.J_FC.shape[1]
        flat = comp.J_FC.flatten()
        assert [a for g in comp.groups for a in range(*g)] == list(range(len(comp.ups)))
        assert len(comp.groups) == (len(comp.ups) if budget == 11 else
                                    -(-len(comp.ups) // 2) if budget == 25 else 1)
        for j, (first, stop) in enumerate(comp.groups):
            assert torch.equal(flat[comp.pos[j]], comp.cols[j] + comp.offsets[first])
            rows = torch.repeat_interleave(torch.arange(comp.J_FC.shape[0]), comp.crow[j].diff())
            assert torch.equal(rows, comp.pos[j] // C)
            F_g = sum(suite.dict_sizes[u] for u in comp.ups[first:stop])
            trows = torch.repeat_interleave(torch.arange(F_g), comp.tcrow[j].diff())
            assert torch.equal(trows, comp.cols[j][comp.tperm[j]])
            assert torch.equal(comp.tcol[j], rows[comp.tperm[j]])
        assert torch.equal(torch.cat(comp.pos).sort().values,
                           (flat < comp.n_up).nonzero().squeeze(1))


@pytest.mark.parametrize("budget", [11, 1 << 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # the C kernel, torch's
def test_virtual_weights_by_groups_match_the_dense_reference(budget, dtype, monkeypatch):
    """V[i, c] = P w_i . d_{J[i, c]} (0 at padding) and its gradients for the encoder and every
    upstream decoder, with modules one a group or all in one (their decoders side by side: one
    kernel call with several tables, or torch's sparse product on the concatenation)."""
    from dictionary_learning import connections

    monkeypatch.setattr(connections, "VW_GROUP_FEATURES", budget)
    suite = random_suite(n_layers=3, F=11, dtype=dtype)
    suite.set_connections(random_connections(suite, C=6))
    m = "mlp_2"
    comp = suite.compiled(m)
    assert len(comp.groups) == (5 if budget == 11 else 1)
    params = [suite.dicts[m].encoder.weight] + [suite.dicts[u].decoder.weight for u in comp.ups]
    g_V = torch.randn(comp.J_FC.shape, dtype=dtype)
    got = suite.virtual_weights(m)
    got_grads = torch.autograd.grad(got, params, g_V)
    Wc = suite.encoder_rows(m).double()
    table = torch.cat([suite.dicts[u].decoder.weight.T.double() for u in comp.ups]
                      + [torch.zeros(1, Wc.shape[1], dtype=torch.float64)])
    want = (Wc[:, None, :] * table[comp.J_FC]).sum(-1)
    want_grads = torch.autograd.grad(want, params, g_V.double(), allow_unused=True)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), want, **tol)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a.double(), b.double(), **tol)


def test_bf16_pruned_pass_forward_and_backward():
    suite = random_suite(n_layers=2, F=12, k=3, dtype=torch.bfloat16)
    suite.set_connections(random_connections(suite, C=6, pad_frac=0.0))
    batch = random_batch(n_layers=2, B=16, dtype=torch.bfloat16)
    out = suite.pruned_forward(batch, mode="candidates", n_threshold=3, n_random=2,
                               generator=torch.Generator().manual_seed(0))
    loss = sum(((o.recon_BD.float() - batch.tgt[m].float()) ** 2).sum() + o.penalty.float()
               for m, o in out.items())
    loss.backward()
    for ae in suite.dicts.values():
        for p in ae.parameters():
            assert p.grad is not None and p.grad.dtype == torch.bfloat16
            assert torch.isfinite(p.grad).all()
    with torch.no_grad():
        all_ = suite.pruned_forward(batch, mode="all")
        # The same parameters and inputs in fp32: only the arithmetic's precision differs.
        ref = copy.deepcopy(suite).float().pruned_forward(batch.to(dtype=torch.float32), mode="all")
    assert all(o.pre_BF.dtype == torch.bfloat16 for o in all_.values())
    # bf16 keeps 8 mantissa bits (rounding ~4e-3 relative per operation); measured 3e-3 and 6e-3
    # here. 2e-2 allows for accumulation, and fails on a wrong index or a dropped term.
    for m, o in all_.items():
        err = (o.recon_BD.float() - ref[m].recon_BD).norm() / ref[m].recon_BD.norm()
        assert err < 2e-2, (m, float(err))


def test_kernel_probe_selects_fallback_with_a_warning(monkeypatch):
    """The probe runs under no_grad too; a failing kernel selects the fallback, loudly."""
    sparse_ops.kernel_available.cache_clear()
    with torch.no_grad():
        assert sparse_ops.kernel_available("csr", "cpu", torch.float64)
        assert sparse_ops.kernel_available("embedding_bag", "cpu", torch.float64)

    def broken(*args):
        raise RuntimeError("not implemented for this dtype")

    monkeypatch.setattr(sparse_ops._CSRVirtualWeights, "apply", broken)
    sparse_ops.kernel_available.cache_clear()
    with pytest.warns(RuntimeWarning, match="csr kernel is unavailable"):
        assert not sparse_ops.kernel_available("csr", "cpu", torch.float64)
    # the fallback still gives the reference virtual weights
    rows, cols, pat = _pattern()
    W = torch.randn(9, 5, dtype=torch.float64)
    dec = torch.randn(5, 13, dtype=torch.float64)
    torch.testing.assert_close(sparse_ops.csr_virtual_weights(W, dec, *pat),
                               sparse_ops.sampled_dot_plain(W, dec.T, rows, cols))
    sparse_ops.kernel_available.cache_clear()
