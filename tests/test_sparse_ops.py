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


def test_compiled_csr_layout_matches_the_slots():
    suite = random_suite(n_layers=3, F=11)
    conns = random_connections(suite, C=6)
    for m, ups in conns.items():
        comp = compile_connections(m, ups, suite.dict_sizes)
        C = comp.J_FC.shape[1]
        for j, u in enumerate(comp.ups):
            rows = torch.repeat_interleave(torch.arange(comp.J_FC.shape[0]), comp.crow[j].diff())
            assert torch.equal(rows, comp.pos[j] // C)
            trows = torch.repeat_interleave(torch.arange(suite.dict_sizes[u]), comp.tcrow[j].diff())
            assert torch.equal(trows, comp.cols[j][comp.tperm[j]])
            assert torch.equal(comp.tcol[j], rows[comp.tperm[j]])


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
