"""Feature pages: the streaming pass against a one-shot dense reference on a tiny model."""

from __future__ import annotations

import pytest
import torch

import feature_pages as FP
from dictionary_learning.batch import trace_activations
from circuits import connection_terms, feature_id
from dictionary_learning.graph_format import check_feature
from dictionary_learning.arch import architecture
from dictionary_learning.model import hf_model
from tests.helpers import random_contexts, tiny_model
from tests.scae_fixtures import random_connections, random_suite
from dictionary_learning.batch import ActivationBatch

N_CTX, CTX_LEN = 12, 17


@pytest.fixture(scope="module", params=["gpt2", "neox_parallel", "gemma2"])
def setup(request):
    """GPT-2; parallel blocks (mlp_0 has no upstream dictionary); RMSNorm with 1 + w and
    post-norms."""
    model, tok = tiny_model(request.param, n_layer=2, d_model=32)
    suite = random_suite(n_layers=2, d=32, F=40, k=5, seed=0, dtype=torch.float32)
    suite.arch = architecture(model).suite_arch
    suite.set_connections(random_connections(suite, C=12))
    ctxs = random_contexts(N_CTX, CTX_LEN, seed=3)
    cfg = FP.PageConfig(n_tokens=10**6, ctx_len=CTX_LEN, batch_contexts=5, n_top=4, n_sample=8,
                        window_before=3, window_after=2)
    pages = FP.compute_pages(model, suite, cfg, contexts=ctxs)
    return model, suite, ctxs, cfg, pages


def dense_reference(model, suite, ctxs):
    """Every dictionary's activations [N_CTX, T, F] in one shot, and the pruned batch."""
    toks = torch.stack(ctxs)
    acts = trace_activations(model, toks)
    flat = {k: v[:, 1:].reshape(-1, *v.shape[2:]) for k, v in acts.items()}
    batch = ActivationBatch.from_trace(flat, suite.n_layers)
    van = suite.vanilla_forward(batch)
    pr = suite.pruned_forward(batch, van)
    T = toks.shape[1] - 1
    dense = {n: (pr[n] if n in pr else van[n]).feats.dense(suite.dicts[n].dict_size)
             .view(len(ctxs), T, -1) for n in suite.names}
    vdense = {n: van[n].feats.dense(suite.dicts[n].dict_size).view(len(ctxs), T, -1)
              for n in suite.names}
    return dense, vdense, batch, van, pr


def test_streaming_matches_one_shot(setup):
    model, suite, ctxs, cfg, pages = setup
    dense, vdense, *_ = dense_reference(model, suite, ctxs)
    assert pages.state["n_tokens"] == N_CTX * (CTX_LEN - 1)
    for n in suite.names:
        d = pages.state["dicts"][n]
        acts = dense[n]
        on = acts > 0
        assert torch.equal(d["count"], on.sum((0, 1)))
        assert torch.equal(d["hist"].sum(1), d["count"])
        torch.testing.assert_close(d["act_max"], acts.amax((0, 1)))
        # top contexts: the largest per-context maxima, with the window around the max token
        per_ctx = acts.amax(1).T  # [F, N_CTX]
        ref = per_ctx.topk(cfg.n_top, dim=1).values
        top = d["top_pruned"] if n.startswith("mlp_") else d["top_vanilla"]
        got = top["value"].where(top["kept"], 0.0).sort(dim=1, descending=True).values
        torch.testing.assert_close(got, ref.clamp_min(0))
        f = int(acts.amax((0, 1)).argmax())
        c, p = int(top["ctx"][f, 0]), int(top["pos"][f, 0])
        win = acts[c, max(0, p - 3): p + 3, f]
        assert torch.equal(top["acts"][f, 0][top["toks"][f, 0] >= 0], win)
        assert torch.equal(top["toks"][f, 0][top["toks"][f, 0] >= 0],
                           ctxs[c][1:][max(0, p - 3): p + 3])
        if n.startswith("mlp_"):
            vtop = d["top_vanilla"]["value"].where(d["top_vanilla"]["kept"], 0.0)
            vref = vdense[n].amax(1).T.topk(cfg.n_top, dim=1).values.clamp_min(0)
            torch.testing.assert_close(vtop.sort(dim=1, descending=True).values, vref)
        # the sample holds only contexts where the feature fires, at most once each
        s = d["sample"]
        for f in range(acts.shape[2]):
            kept = s["ctx"][f][s["kept"][f]]
            assert len(set(kept.tolist())) == len(kept)
            assert len(kept) == min(cfg.n_sample, int(on[:, :, f].any(1).sum()))
            assert (acts[kept, :, f].amax(1) > 0).all()


def test_batching_does_not_change_pages(setup):
    model, suite, ctxs, cfg, pages = setup
    from dataclasses import replace

    other = FP.compute_pages(model, suite, replace(cfg, batch_contexts=3), contexts=ctxs)
    for n in suite.names:
        a, b = pages.state["dicts"][n], other.state["dicts"][n]
        assert torch.equal(a["count"], b["count"])
        # the model's own float32 bits may depend on the batch size (GPT-NeoX's do)
        torch.testing.assert_close(a["top_vanilla"]["value"].sort(1).values,
                                   b["top_vanilla"]["value"].sort(1).values)


def test_connection_statistics(setup):
    model, suite, ctxs, cfg, pages = setup
    _, _, batch, van, pr = dense_reference(model, suite, ctxs)
    up = {n: (pr[n] if n in pr else van[n]).feats for n in suite.names}
    for m in suite.transcoder_names:
        feats = pr[m].feats
        terms, _ = connection_terms(suite, m, up, batch.layernorm_scale[m], feats.idx_BK)
        on = feats.vals_BK > 0
        F = suite.dicts[m].dict_size
        ref = torch.zeros(F, terms.shape[2], dtype=torch.float64).index_add_(
            0, feats.idx_BK[on], terms[on].double())
        c = pages.state["dicts"][m]["conn"]
        torch.testing.assert_close(c["sum_contrib"], ref, rtol=1e-6, atol=1e-6)
        # the pruned pre-activation = connection terms + embedding/bias base: both sides summed
        ae = suite.dicts[m]
        comp = suite.compiled(m)
        Wc = suite.centre(ae.encoder.weight)
        b_D = sum((suite.dicts[u].b_dec for u in comp.ups), torch.zeros(32))
        base_BF = (batch.initial @ Wc.T + Wc @ b_D) / batch.layernorm_scale[m][:, None] \
            + ae.encoder.bias
        base_sum = torch.zeros(F, dtype=torch.float64).index_add_(
            0, feats.idx_BK[on], base_BF.gather(1, feats.idx_BK)[on].double())
        torch.testing.assert_close(c["sum_contrib"].sum(1) + base_sum, c["sum_pre"],
                                   rtol=1e-5, atol=1e-4)


def test_feature_file_and_downstream(setup, tmp_path):
    model, suite, ctxs, cfg, pages = setup
    conns = suite.connections
    for name in suite.names:
        for i in (0, 7):
            page = pages.feature_file(name, i)
            check_feature(page)
            assert page["feature"] == feature_id(name, i)
            assert page["examples_quantiles"][0]["quantile_name"].startswith("Top activations")
            if name.startswith("mlp_"):
                listed = {(r["module"], r["index"]) for r in page["connections"]}
                ref = {(u, int(j)) for u, idx in conns[name].items() for j in idx[i] if j >= 0}
                assert listed == ref
    # downstream: feature j of u lists (m, i) iff i's connections include j
    u, j = "attn_0", 3
    ref = {(m, i) for m in suite.transcoder_names if u in conns[m]
           for i in range(40) if (conns[m][u][i] == j).any()}
    got = {(r["module"], r["index"]) for r in pages.feature_file(u, j)["downstream"]}
    assert got == ref or len(got) == 50
    paths = pages.write_feature_files(tmp_path, [("mlp_1", 2)])
    assert paths[0].name == f"{feature_id('mlp_1', 2)}.json"
    path = pages.save(tmp_path / "pages.pt")
    again = FP.load_pages(path)
    assert again.feature_file("mlp_1", 2) == pages.feature_file("mlp_1", 2)
    with pytest.raises(IndexError):
        pages.feature_file("mlp_1", 40)
    with pytest.raises(FileNotFoundError, match="feature_pages.py"):
        FP.load_pages(tmp_path / "nope.pt")


def test_logit_effects_are_the_unembedding_of_the_final_norms_gain(setup):
    """W_U (gain_f * P d_j), with the final norm's gain (1 + w for Gemma-2) and P the centring for
    LayerNorm models only, written out per family here."""
    model, suite, *_ = setup
    hf = hf_model(model)
    family = architecture(model).family
    final = {"gpt2": hf.get_submodule("transformer.ln_f") if family == "gpt2" else None,
             "gpt_neox": getattr(getattr(hf, "gpt_neox", None), "final_layer_norm", None),
             "gemma2": getattr(getattr(hf, "model", None), "norm", None)}[family]
    gain = final.weight + 1 if family == "gemma2" else final.weight
    W_dec = suite.dicts["mlp_1"].decoder.weight.detach()
    d_FD = W_dec.T - W_dec.T.mean(1, keepdim=True) if family != "gemma2" else W_dec.T
    eff_VF = hf.lm_head.weight @ (gain[:, None] * d_FD.T)
    top, topv, bot, botv = FP.logit_effects(hf, W_dec, 5)
    torch.testing.assert_close(topv, eff_VF.topk(5, dim=0).values.T.detach())
    torch.testing.assert_close(botv, eff_VF.topk(5, dim=0, largest=False).values.T.detach())
