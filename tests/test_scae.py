"""The pruned forward pass against plain references and the identities of docs/method.md §3."""

import pytest
import torch

import dictionary_learning.sparse_ops as sparse_ops
from dictionary_learning.connections import compile_connections, to_exchange
from dictionary_learning.dictionary import TopKTranscoder
from tests.scae_fixtures import (
    exact_sae,
    full_connections,
    layer_norm_scale,
    random_batch,
    random_connections,
    random_suite,
)
from dictionary_learning.suite import SCAESuite


def topk_dense(pre_BF, k):
    vals, idx = pre_BF.topk(k, dim=1)
    return torch.zeros_like(pre_BF).scatter(1, idx, vals.relu())


def reference_pruned(suite, batch, conns):
    """docs/method.md §3 written as plainly as possible: loops over features and their
    connections."""
    feats, pres = {}, {}
    for layer in range(suite.n_layers):
        a, m = f"attn_{layer}", f"mlp_{layer}"
        sae = suite.dicts[a]
        feats[a] = topk_dense(batch.src[a] @ sae.encoder.weight.T + sae.encoder.bias, sae.k)
        tc = suite.dicts[m]
        W = tc.encoder.weight
        Wc = W - W.mean(1, keepdim=True)
        ups = [u for u in feats]
        x = batch.initial + sum(suite.dicts[u].b_dec for u in ups)
        pre = torch.zeros(x.shape[0], tc.dict_size, dtype=x.dtype)
        for i in range(tc.dict_size):
            pre[:, i] = x @ Wc[i]
            for u, idx in conns[m].items():
                for j in idx[i].tolist():
                    if j >= 0:
                        pre[:, i] += feats[u][:, j] * (Wc[i] @ suite.dicts[u].decoder.weight[:, j])
        pre = pre / batch.layernorm_scale[m][:, None] + tc.encoder.bias
        pres[m] = pre
        feats[m] = topk_dense(pre, tc.k)
    return pres, feats


@pytest.mark.parametrize("chunk", [7, 1 << 22])
def test_pruned_pass_equals_plain_loop_reference(chunk, monkeypatch):
    monkeypatch.setattr(sparse_ops, "CHUNK_ELEMENTS", chunk)
    suite = random_suite(n_layers=3)
    conns = random_connections(suite, C=4)
    suite.set_connections(conns)
    batch = random_batch(n_layers=3)
    out = suite.pruned_forward(batch, mode="all")
    ref_pre, ref_feats = reference_pruned(suite, batch, conns)
    for m in suite.transcoder_names:
        torch.testing.assert_close(out[m].pre_BF, ref_pre[m], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out[m].feats.dense(suite.dicts[m].dict_size), ref_feats[m])
    # and every parameter's gradient of a loss of the pre-activations (the all-features pass
    # adds its connection term in place)
    g = torch.Generator().manual_seed(1)
    weights = {m: torch.randn(ref_pre[m].shape, generator=g, dtype=torch.float64)
               for m in suite.transcoder_names}
    params = list(suite.parameters())
    got = torch.autograd.grad(sum((out[m].pre_BF * w).sum() for m, w in weights.items()), params,
                              allow_unused=True)
    want = torch.autograd.grad(sum((ref_pre[m] * w).sum() for m, w in weights.items()), params,
                               allow_unused=True)
    for a, b in zip(got, want, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_full_connectivity_equals_encoding_of_rebuilt_residual():
    """conn(i) = everything: pre = encoding of P r_L / sigma_L, r_L = x0 + sum of upstream
    recons."""
    suite = random_suite(n_layers=3)
    suite.set_connections(full_connections(suite))
    batch = random_batch(n_layers=3)
    vanilla = suite.vanilla_forward(batch)
    pruned = suite.pruned_forward(batch, vanilla, mode="all")
    r = batch.initial.clone()
    for layer in range(suite.n_layers):
        a, m = f"attn_{layer}", f"mlp_{layer}"
        r = r + vanilla[a].recon_BD
        tc = suite.dicts[m]
        P_r = r - r.mean(-1, keepdim=True)
        expected = (P_r / batch.layernorm_scale[m][:, None]) @ tc.encoder.weight.T + tc.encoder.bias
        torch.testing.assert_close(pruned[m].pre_BF, expected, rtol=1e-10, atol=1e-10)
        r = r + pruned[m].recon_BD


def test_exact_upstream_gives_vanilla_pre_activations():
    """Exact SAEs upstream and a batch whose MLP *is* the transcoder: pruned pre == vanilla pre."""
    d, B, n_layers = 5, 6, 2
    dicts = {}
    for layer in range(n_layers):
        dicts[f"attn_{layer}"] = exact_sae(d)
        dicts[f"mlp_{layer}"] = TopKTranscoder(d, d, 2 * d, 2 * d)  # k = F: every feature active
    suite = SCAESuite(dicts).double()
    suite.set_connections(full_connections(suite))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(B, d, generator=g, dtype=torch.float64)
    resid = x0.clone()
    src, tgt, scale = {}, {}, {}
    for layer in range(n_layers):
        attn = torch.randn(B, d, generator=g, dtype=torch.float64)
        src[f"attn_{layer}"] = tgt[f"attn_{layer}"] = attn
        resid = resid + attn
        sigma = layer_norm_scale(resid)
        src[f"mlp_{layer}"] = (resid - resid.mean(-1, keepdim=True)) / sigma[:, None]
        scale[f"mlp_{layer}"] = sigma
        mlp_out = suite.dicts[f"mlp_{layer}"](src[f"mlp_{layer}"]).detach()
        tgt[f"mlp_{layer}"] = mlp_out
        resid = resid + mlp_out
    from tests.scae_fixtures import Batch

    batch = Batch(x0, src, tgt, scale)
    vanilla = suite.vanilla_forward(batch)
    pruned = suite.pruned_forward(batch, vanilla, mode="all")
    for layer in range(n_layers):
        m = f"mlp_{layer}"
        torch.testing.assert_close(pruned[m].pre_BF, vanilla[m].pre_BF, rtol=1e-9, atol=1e-9)


def test_candidates_mode_equals_all_mode_when_candidates_cover_everything():
    suite = random_suite(n_layers=3, F=10, k=3)
    suite.set_connections(random_connections(suite, C=5))
    batch = random_batch(n_layers=3)
    vanilla = suite.vanilla_forward(batch)
    all_out = suite.pruned_forward(batch, vanilla, mode="all")
    cand_out = suite.pruned_forward(batch, vanilla, mode="candidates", n_threshold=7)
    for m in suite.transcoder_names:
        F = suite.dicts[m].dict_size
        cand = cand_out[m].cand_BN
        torch.testing.assert_close(cand_out[m].pre_BN, all_out[m].pre_BF.gather(1, cand))
        torch.testing.assert_close(cand_out[m].feats.dense(F), all_out[m].feats.dense(F))
        torch.testing.assert_close(cand_out[m].recon_BD, all_out[m].recon_BD)


def test_pruned_pass_runs_only_the_vanilla_passes_it_needs(monkeypatch):
    """Without `vanilla`, the all-features mode encodes the attention SAEs only (the transcoders'
    vanilla pass is not part of the pruned model) and gives the outputs it gives with the full
    vanilla pass; the candidates mode needs each transcoder's vanilla pass and says so when
    `vanilla` lacks one."""
    suite = random_suite(n_layers=3, F=10, k=3)
    suite.set_connections(random_connections(suite, C=5))
    batch = random_batch(n_layers=3)
    want = suite.pruned_forward(batch, suite.vanilla_forward(batch), mode="all")
    encoded = []
    real = SCAESuite.vanilla_one
    monkeypatch.setattr(SCAESuite, "vanilla_one",
                        lambda self, n, b, *a: encoded.append(n) or real(self, n, b, *a))
    got = suite.pruned_forward(batch, mode="all")
    assert encoded == ["attn_0", "attn_1", "attn_2"]
    for m in suite.transcoder_names:
        torch.testing.assert_close(got[m].recon_BD, want[m].recon_BD, rtol=0, atol=0)
        torch.testing.assert_close(got[m].pre_BF, want[m].pre_BF, rtol=0, atol=0)
    attn_only = {n: real(suite, n, batch) for n in ("attn_0", "attn_1", "attn_2")}
    with pytest.raises(KeyError, match="no entry for 'mlp_0'.*vanilla_forward"):
        suite.pruned_forward(batch, attn_only, mode="candidates", n_threshold=2)


def test_encoder_rows_are_remade_in_the_backward_and_guarded_against_changes():
    """The rows P w_i are saved as a recipe (the parameter): the gradients equal those of a pass
    that keeps them (no hooks), and an encoder changed in place before the backward is an error,
    as autograd's own check would make it."""
    suite = random_suite(n_layers=2, F=40, k=3)
    suite.set_connections(random_connections(suite, C=5))
    batch = random_batch(n_layers=2, B=16)

    def grads(recipe: bool):
        for p in suite.parameters():
            p.grad = None
        vanilla = suite.vanilla_forward(batch)
        with pytest.MonkeyPatch.context() as mp:
            if not recipe:
                mp.setattr(SCAESuite, "_rows_recomputed_in_backward",
                           lambda self: __import__("contextlib").nullcontext())
            out = suite.pruned_forward(batch, vanilla, mode="candidates", n_threshold=5,
                                       n_random=3, generator=torch.Generator().manual_seed(0))
        sum(o.recon_BD.pow(2).sum() for o in out.values()).backward()
        return [p.grad.clone() for p in suite.parameters() if p.grad is not None]

    for a, b in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    out = suite.pruned_forward(batch, mode="candidates", n_threshold=5)
    with torch.no_grad():
        suite.dicts["mlp_1"].encoder.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place.*before the optimizer step"):
        out["mlp_1"].recon_BD.sum().backward()


def test_pruned_top_candidates_choose_the_features_of_the_all_features_pass():
    """With pruned_top, the candidates mode picks exactly the all-features pass's top K, even
    where the pruned top K lies outside the vanilla candidates; a feature in both sets counts
    once."""
    suite = random_suite(n_layers=3, F=40, k=3)
    suite.set_connections(random_connections(suite, C=5))
    batch = random_batch(n_layers=3, B=16)
    vanilla = suite.vanilla_forward(batch)
    all_out = suite.pruned_forward(batch, vanilla, mode="all")
    plain = suite.pruned_forward(batch, vanilla, mode="candidates", n_threshold=2, n_random=2,
                                 generator=torch.Generator().manual_seed(0))
    out = suite.pruned_forward(batch, vanilla, mode="candidates", n_threshold=2, n_random=2,
                               generator=torch.Generator().manual_seed(0), pruned_top=True)
    differs = False
    for m in suite.transcoder_names:
        F, k = suite.dicts[m].dict_size, suite.dicts[m].k
        dense = out[m].feats.dense(F)
        torch.testing.assert_close(dense, all_out[m].feats.dense(F))
        torch.testing.assert_close(out[m].recon_BD, all_out[m].recon_BD)
        # the layout: main and random candidates as without pruned_top, then the pruned top K
        assert out[m].cand_BN.shape[1] == plain[m].cand_BN.shape[1] + k
        torch.testing.assert_close(out[m].pre_BN[:, -k:].sort(1).values,
                                   all_out[m].pre_BF.topk(k, dim=1).values.sort(1).values)
        differs |= not torch.equal(plain[m].feats.dense(F), dense)
    assert differs  # the case this option exists for occurs in this batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # the C kernel, torch's topk
def test_vanilla_pass_with_candidates_takes_its_topk_from_them(dtype):
    """One selection gives a transcoder's TopK and its candidates: its features are the first K
    candidates, the plain vanilla pass's features (as a set, with their values), with the same
    reconstruction and encoder gradient; an attention SAE's pass is the plain one."""
    suite = random_suite(n_layers=2, F=40, k=3, dtype=dtype)
    batch = random_batch(n_layers=2, B=16, dtype=dtype)
    tol = dict(rtol=1e-6, atol=1e-6)
    for m in ("mlp_0", "mlp_1"):
        plain = suite.vanilla_one(m, batch)
        van = suite.vanilla_one(m, batch, 5, 4, torch.Generator().manual_seed(0))
        assert van.cand_BN.shape == (16, 3 + 5 + 4)
        assert torch.equal(van.feats.idx_BK, van.cand_BN[:, :3])
        order = plain.feats.idx_BK.sort(1)
        assert torch.equal(van.feats.idx_BK.sort(1).values, order.values)
        mine = van.feats.idx_BK.sort(1).indices
        torch.testing.assert_close(van.feats.vals_BK.gather(1, mine),
                                   plain.feats.vals_BK.gather(1, order.indices), **tol)
        torch.testing.assert_close(van.recon_BD, plain.recon_BD, **tol)
        w = suite.dicts[m].encoder.weight
        torch.testing.assert_close(torch.autograd.grad(van.recon_BD.pow(2).sum(), w)[0],
                                   torch.autograd.grad(plain.recon_BD.pow(2).sum(), w)[0], **tol)
    assert suite.vanilla_one("attn_1", batch, 5, 4).cand_BN is None


def test_candidates_are_vanilla_top_then_threshold_then_random():
    suite = random_suite(n_layers=1, F=40, k=3)
    suite.set_connections(random_connections(suite, C=4))
    batch = random_batch(n_layers=1, B=8)
    vanilla = suite.vanilla_forward(batch)
    g = torch.Generator().manual_seed(0)
    out = suite.pruned_forward(
        batch, vanilla, mode="candidates", n_threshold=5, n_random=6, generator=g
    )
    cand = out["mlp_0"].cand_BN
    assert cand.shape == (8, 3 + 5 + 6)
    order = vanilla["mlp_0"].pre_BF.topk(8, dim=1).indices
    for part in (slice(0, 3), slice(3, 8)):  # the top K, the next n_threshold: in no set order
        assert torch.equal(cand[:, part].sort(1).values, order[:, part].sort(1).values)
    for row in cand:
        assert len(set(row.tolist())) == row.numel(), "random candidates must be new features"
    pen = out["mlp_0"].penalty
    pre = out["mlp_0"].pre_BN
    expected = (pre[:, 8:] - pre[:, :8].min(1, keepdim=True).values).relu().sum(1).mean()
    torch.testing.assert_close(pen, expected)


# the draws sampler (9-bit fields, 112 of 512 values no feature), the random scores (F < 2 (n + M))
@pytest.mark.parametrize("F", [400, 25])
@pytest.mark.parametrize("native", ["1", "0"])  # the C kernel, the torch route
def test_random_candidates_are_a_uniform_subset_outside_the_top(F, native, monkeypatch):
    from dictionary_learning.candidates import random_others

    monkeypatch.setenv("SCAE_NATIVE", native)
    B, M, n = 10000, 10, 5
    g = torch.Generator().manual_seed(0)
    top = torch.stack([torch.randperm(F, generator=g)[:M] for _ in range(B)])
    got = random_others(top, F, n, g)
    assert got.shape == (B, n)
    both = torch.cat([top, got], 1).sort(1).values
    assert (both[:, 1:] != both[:, :-1]).all(), "random candidates repeat or meet the top set"
    # each feature outside a row's top is equally likely: counts against the expected count
    hits = torch.bincount(got.flatten(), minlength=F).double()
    chances = B - torch.bincount(top.flatten(), minlength=F).double()
    expected = chances * n / (F - M)
    assert ((hits - expected).abs() < 5 * expected.sqrt() + 1).all()


def test_candidate_kernel_takes_the_stable_sorts_top_and_the_torch_routes_random_others():
    """csrc/candidates.c: the top k of each row and the next M - k are, as sets, a stable
    descending sort's (ties: the lower feature first; NaN above every number; -0 as +0; rows of
    other scales than the row before, which the kernel's floor must survive), for the candidates
    and for a TopK; and the random others the torch route's, from the same draws (a row short of
    usable draws: None from both)."""
    from dictionary_learning import candidates

    if candidates.native.load("candidates") is None:
        pytest.skip("no C compiler builds dictionary_learning/csrc/candidates.c here")
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(64, 500, generator=g) * torch.logspace(-3, 3, 64)[:, None]
    pre[5] = 0.0
    pre[6, ::3] = float("nan")
    pre[7] = -torch.rand(500, generator=g)
    pre[8, ::2] = -0.0
    pre[9] = torch.randint(0, 3, (500,), generator=g).float()  # ties at the cut
    want = torch.sort(pre, dim=1, descending=True, stable=True).indices[:, :40]
    # the top k, then the next 40 - k, each part in no set order: the stable sort's; the cut bins
    # ranked by insertion (a few) or by the radix sort (row 5: all 500 equal)
    for k in (1, 7, 40):
        got = candidates.select_candidates(pre, k, 40 - k, 0)
        for part in (slice(0, k), slice(k, 40)):
            assert torch.equal(got[:, part].sort(1).values, want[:, part].sort(1).values), k
    # a TopK's choice, of rows in a wider tensor (a strided view)
    wide = torch.cat([pre, torch.full((64, 7), float("inf"))], 1)
    for k in (40, 3):
        top = candidates.top_indices(wide[:, :500], k)
        assert torch.equal(top.sort(1).values, want[:, :k].sort(1).values)

    top = got = candidates.select_candidates(pre, 10, 30, 0)
    words = torch.empty(64, 30, dtype=torch.int64).random_(generator=g)
    draws = candidates.draw_fields(words, 500)  # 9-bit fields: 7 a word, 500 .. 511 unusable
    assert draws.shape == (64, 30 * 7) and int(draws.max()) >= 500
    assert torch.equal(draws[:, 8], (words[:, 1] >> 9) & 511)
    lib = candidates._kernel(top, words)
    assert torch.equal(candidates._first_usable_c(lib, top, words, 500, 30),
                       candidates._first_usable(top, draws, 500, 30))
    few = words[:, :4]  # 28 draws cannot hold 30 usable ones (a strided view, too)
    assert candidates._first_usable_c(lib, top, few, 500, 30) is None
    assert candidates._first_usable(top, candidates.draw_fields(few, 500), 500, 30) is None
    # the whole selection: the same candidates with and without the kernel
    cand = candidates.select_candidates(pre[10:], 10, 30, 30, torch.Generator().manual_seed(1))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCAE_NATIVE", "0")
        plain = candidates.select_candidates(pre[10:], 10, 30, 30,
                                             torch.Generator().manual_seed(1))
    for part in (slice(0, 10), slice(10, 40), slice(40, 70)):
        assert torch.equal(cand[:, part].sort(1).values, plain[:, part].sort(1).values)
    assert torch.equal(cand[:, 40:], plain[:, 40:])  # the random others in draw order


def test_gradients_reach_every_dictionary_upstream_of_the_pruned_loss():
    suite = random_suite(n_layers=2, F=12, k=3)
    suite.set_connections(random_connections(suite, C=6, pad_frac=0.0))
    batch = random_batch(n_layers=2, B=16)
    out = suite.pruned_forward(batch, mode="candidates", n_threshold=3, n_random=2,
                               generator=torch.Generator().manual_seed(0))
    loss = ((out["mlp_1"].recon_BD - batch.tgt["mlp_1"]) ** 2).sum() + out["mlp_1"].penalty
    loss.backward()
    for name in ["attn_0", "mlp_0", "attn_1", "mlp_1"]:
        ae = suite.dicts[name]
        for pname in ["encoder.weight", "decoder.weight", "b_dec"]:
            grad = dict(ae.named_parameters())[pname].grad
            assert grad is not None and grad.abs().sum() > 0, f"no gradient reaches {name}.{pname}"


# tokens per chunk: 1, 3, all 9 (by the element budget), 2 (by the candidate kernel's cap)
@pytest.mark.parametrize("chunk, max_tokens", [(7, 128), (100, 128), (1 << 22, 128), (1 << 22, 2)])
def test_fused_candidate_kernel_gradients_match_plain_reference(chunk, max_tokens, monkeypatch):
    monkeypatch.setattr(sparse_ops, "CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(sparse_ops, "CANDIDATE_MAX_TOKENS", max_tokens)
    torch.manual_seed(0)
    B, K, n_up, F, C, N = 9, 4, 25, 11, 5, 6
    vals = torch.randn(B, K, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(n_up)[:K] for _ in range(B)])
    J = torch.randint(0, n_up + 1, (F, C))
    V = torch.randn(F, C, dtype=torch.float64, requires_grad=True)
    cand = torch.stack([torch.randperm(F)[:N] for _ in range(B)])
    g = torch.randn(B, N, dtype=torch.float64)
    fused = sparse_ops.connection_contrib_candidates(vals, idx, V, J, cand, n_up)
    gf = torch.autograd.grad(fused, (vals, V), g)
    plain = sparse_ops.connection_contrib_plain(vals, idx, V, J, cand, n_up)
    gp = torch.autograd.grad(plain, (vals, V), g)
    torch.testing.assert_close(fused, plain)
    for a, b in zip(gf, gp):
        torch.testing.assert_close(a, b)
    all_ = sparse_ops.connection_contrib_all(vals, idx, V, J, n_up)
    all_plain = sparse_ops.connection_contrib_plain(
        vals, idx, V, J, torch.arange(F).expand(B, F), n_up)
    torch.testing.assert_close(all_, all_plain)
    g_all = torch.randn(B, F, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(all_, (vals, V), g_all),
                    torch.autograd.grad(all_plain, (vals, V), g_all), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("threads", [1, 2])
def test_connection_c_kernels_match_plain_reference(threads, monkeypatch):
    """csrc/connection_term.c (fp32 on the CPU) against the plain reference in float64: the
    candidates' term and both its gradients, and the all-features term, with padding in J (where
    V is zero, as the virtual weights are) and in the upstream slots, upstream features that
    connect to nothing, candidates that repeat within a token, and gradients asked for one input
    at a time."""
    if sparse_ops.native.load("connection_term") is None:
        pytest.skip("no C compiler builds dictionary_learning/csrc/connection_term.c here")
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    calls = []
    for name in ("_candidates_c", "_candidates_backward_c", "_all_c"):
        real = getattr(sparse_ops, name)
        monkeypatch.setattr(sparse_ops, name,
                            lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    g = torch.Generator().manual_seed(threads)
    B, A, n_up, F, C, N = 37, 6, 50, 23, 11, 9
    vals = torch.rand(B, A, generator=g) + 0.1
    idx = torch.stack([torch.randperm(n_up, generator=g)[:A] for _ in range(B)])
    idx[:3, -1] = n_up  # an empty upstream slot (value 0) on the padding index
    vals[:3, -1] = 0
    J = torch.randint(0, n_up - 5, (F, C), generator=g)  # features n_up-5.. connect to nothing
    J[:, -2:] = n_up
    V = torch.randn(F, C, generator=g).masked_fill(J == n_up, 0.0)
    cand = torch.randint(0, F, (B, N), generator=g)  # repeats within a token
    g_BN = torch.randn(B, N, generator=g)
    for need in ((True, True), (True, False), (False, True)):
        v32, V32 = vals.clone().requires_grad_(need[0]), V.clone().requires_grad_(need[1])
        v64, V64 = vals.double().requires_grad_(need[0]), V.double().requires_grad_(need[1])
        got = sparse_ops.connection_contrib_candidates(v32, idx, V32, J, cand, n_up)
        want = sparse_ops.connection_contrib_plain(v64, idx, V64, J, cand, n_up)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        ins32 = [t for t in (v32, V32) if t.requires_grad]
        ins64 = [t for t in (v64, V64) if t.requires_grad]
        for a, b in zip(torch.autograd.grad(got, ins32, g_BN),
                        torch.autograd.grad(want, ins64, g_BN.double()), strict=True):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        got_all = sparse_ops.connection_contrib_all(vals, idx, V, J, n_up)
        want_all = sparse_ops.connection_contrib_plain(
            vals.double(), idx, V.double(), J, torch.arange(F).expand(B, F), n_up)
    torch.testing.assert_close(got_all.double(), want_all, rtol=1e-5, atol=1e-5)
    assert calls.count("_candidates_c") == 3 and calls.count("_candidates_backward_c") == 3
    assert calls.count("_all_c") == 1


@pytest.mark.parametrize("F", [17, 400])  # the dense product, the sampled kernel
def test_dot_at_candidates_matches_dense_product_and_gradients(F):
    torch.manual_seed(0)
    B, D, N = 13, 7, 5
    x = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    W = torch.randn(F, D, dtype=torch.float64, requires_grad=True)
    cand = torch.stack([torch.randperm(F)[:N] for _ in range(B)])
    cand = torch.cat([cand, cand[:, :2]], 1)  # repeated candidates accumulate their gradients
    g = torch.randn(cand.shape, dtype=torch.float64)
    got = sparse_ops.dot_at_candidates(x, W, cand)
    want = (x @ W.T).gather(1, cand)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (x, W), g), torch.autograd.grad(want, (x, W), g)):
        torch.testing.assert_close(a, b)


def test_sampled_dot_gradients():
    torch.manual_seed(0)
    F, n_up = 11, 25
    A = torch.randn(F, 7, dtype=torch.float64, requires_grad=True)
    Bm = torch.randn(n_up, 7, dtype=torch.float64, requires_grad=True)
    rows, cols = torch.randint(0, F, (30,)), torch.randint(0, n_up, (30,))
    assert torch.autograd.gradcheck(lambda a, b: sparse_ops.sampled_dot(a, b, rows, cols), (A, Bm))


def test_padding_and_features_without_connections():
    suite = random_suite(n_layers=2, F=8, k=2)
    conns = random_connections(suite, C=4)
    for idx in conns["mlp_1"].values():
        idx[0] = -1  # feature 0 of mlp_1 has no connection at all
    conns["mlp_0"] = {}
    suite.set_connections(conns)
    batch = random_batch(n_layers=2)
    out = suite.pruned_forward(batch, mode="all")
    ref_pre, _ = reference_pruned(suite, batch, conns)
    for m in suite.transcoder_names:
        torch.testing.assert_close(out[m].pre_BF, ref_pre[m])


def test_connections_round_trip_through_the_compiled_layout():
    suite = random_suite(n_layers=3, F=9)
    conns = random_connections(suite, C=6)
    sizes = suite.dict_sizes
    for m, ups in conns.items():
        back = to_exchange(compile_connections(m, ups, sizes), sizes)
        for u, idx in ups.items():
            want = [sorted(j for j in row.tolist() if j >= 0) for row in idx]
            got = [sorted(j for j in row.tolist() if j >= 0) for row in back[u]]
            assert got == want, (m, u)


def test_suite_moves_connections_with_dtype_and_device_changes():
    """fp64 -> fp32 (and to the GPU when there is one): the compiled connections follow the
    parameters, and the pruned pass gives the fp64 values within fp32 rounding (rel 1e-5)."""
    suite = random_suite(n_layers=2)
    suite.set_connections(random_connections(suite, C=4))
    batch = random_batch(n_layers=2)
    with torch.no_grad():
        ref = suite.pruned_forward(batch, mode="all")
    targets = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for dev in targets:
        moved = suite.to(device=dev, dtype=torch.float32)
        for c in moved._compiled.values():
            assert c.J_FC.device.type == dev.type and all(p.device.type == dev.type for p in c.pos)
        with torch.no_grad():
            out = moved.pruned_forward(batch.to(dev, torch.float32), mode="all")
        for m, o in out.items():
            assert o.recon_BD.dtype == torch.float32 and o.recon_BD.device.type == dev.type
            torch.testing.assert_close(o.recon_BD.double().cpu(), ref[m].recon_BD,
                                       rtol=1e-5, atol=1e-5)


def test_original_fork_imports_still_work():
    """`from trainers.scae import SCAESuite, TrainerSCAESuite` (the original fork's import) and
    `from buffer import ActivationBatch` give the base layer's own classes, not copies."""
    import buffer
    import dictionary_learning.batch
    import dictionary_learning.suite
    from trainers.scae import SCAESuite as FromTrainers, TrainerSCAESuite  # noqa: F401

    assert FromTrainers is dictionary_learning.suite.SCAESuite
    assert buffer.ActivationBatch is dictionary_learning.batch.ActivationBatch
    assert buffer.trace_activations is dictionary_learning.batch.trace_activations
