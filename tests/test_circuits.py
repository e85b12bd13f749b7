"""Attribution graphs of a tiny float64 model and suite: exact identities, brute-force effects,
influence against its closed form, pruning, and the files in the field's format."""

from __future__ import annotations

import json

import pytest
import torch

import circuits as C
from dictionary_learning.graph_format import check_graph, check_graph_metadata
from dictionary_learning.arch import architecture
from dictionary_learning.model import hf_model
from tests.helpers import FAMILIES, tiny_model
from tests.scae_fixtures import random_connections, random_suite

PROMPT = "To be, or not to be: that is"


def build(family):
    model, tok = tiny_model(family, n_layer=2, d_model=32)
    hf_model(model).double()
    suite = random_suite(n_layers=2, d=32, F=40, k=5, seed=0)
    suite.arch = architecture(model).suite_arch
    suite.set_connections(random_connections(suite, C=12))
    graph = C.build_graph(model, suite, PROMPT)
    return model, suite, graph


@pytest.fixture(scope="module", params=FAMILIES)
def family_setup(request):
    """The exactness checks run on every family (docs/identities.md §10)."""
    return build(request.param)


@pytest.fixture(scope="module")
def setup():
    return build("gpt2")


def test_incoming_edges_plus_constants_equal_values(family_setup):
    model, suite, g = family_setup
    has_in = (g.kind_X == C.FEATURE) | (g.kind_X == C.LOGIT)
    lhs = g.adjacency_XX.sum(1) + g.constant_X
    torch.testing.assert_close(lhs[has_in], g.activation_X[has_in], rtol=0, atol=1e-10)
    # sources have no incoming edges; every edge goes forward in the node order's layers
    src_only = (g.kind_X == C.ERROR) | (g.kind_X == C.EMBEDDING)
    assert not g.adjacency_XX[src_only].any()
    assert g.info["identity_error"] < 1e-10


def test_feature_values_are_the_suites_passes(family_setup):
    model, suite, g = family_setup
    run = C.run_prompt(model, suite, C.tokenize_prompt(model.tokenizer, PROMPT), torch.float64)
    for m_i, name in enumerate(g.modules):
        out = run.pruned[name] if name.startswith("mlp_") else run.vanilla[name]
        sel = (g.kind_X == C.FEATURE) & (g.module_X == m_i)
        dense = out.feats.dense(suite.dicts[name].dict_size)
        assert int(sel.sum()) == int((dense > 0).sum())
        assert torch.equal(dense[g.pos_X[sel], g.index_X[sel]], g.activation_X[sel])


def test_logit_edges_equal_the_models_logits(family_setup):
    """The logit nodes are the model's logits before any final soft-capping (Gemma-2's), to 1e-10
    for GPT-2. The other families' own float64 runs round to float32 in places (RMSNorm computes
    in float32; eager attention, which gives the graph its patterns, takes a float32 softmax), so
    their logits, and the graph's recomputed attention outputs, are the model's to 1e-5."""
    model, suite, g = family_setup
    hf = hf_model(model)
    arch = architecture(model)
    toks = C.tokenize_prompt(model.tokenizer, PROMPT)
    logits_V = hf(input_ids=toks[None]).logits[0, -1].detach()
    is_logit = g.kind_X == C.LOGIT
    ids = g.index_X[is_logit]
    atol = 1e-10 if arch.family == "gpt2" else 1e-5
    capped = arch.softcap(hf, g.activation_X[is_logit])
    torch.testing.assert_close(capped, logits_V[ids], rtol=0, atol=atol)
    lhs = g.adjacency_XX[is_logit].sum(1) + g.constant_X[is_logit]
    torch.testing.assert_close(lhs, g.activation_X[is_logit], rtol=0, atol=1e-10)
    assert int(ids[0]) == int(logits_V.argmax())  # default target: the top token
    torch.testing.assert_close(g.logit_probs, logits_V.softmax(-1)[ids], rtol=0, atol=atol)
    assert g.info["attn_recompute_error"] < atol


def test_zeroing_a_node_changes_the_logit_by_its_total_effect(family_setup):
    model, suite, g = family_setup
    base = C.frozen_logits(model, suite, g)
    torch.testing.assert_close(base, g.activation_X[g.kind_X == C.LOGIT], rtol=0, atol=1e-10)
    effect = C.total_effect(g)
    # the strongest nodes of every kind, and a few random ones
    picks = set(torch.randperm(g.n_nodes - 5, generator=torch.Generator().manual_seed(0))[:3]
                .tolist())
    for kind in (C.FEATURE, C.ERROR, C.EMBEDDING):
        sel = (g.kind_X == kind).nonzero()[:, 0]
        picks |= set(sel[effect[sel].abs().topk(2).indices].tolist())
    hit = 0
    for n in sorted(picks):
        delta = float(base[0] - C.frozen_logits(model, suite, g, zero=n)[0])
        assert abs(delta - float(effect[n])) < 1e-10, g.node_label(n)
        hit += abs(delta) > 1e-6
    assert hit >= 5  # the check is not vacuous


def test_influence_matches_its_closed_form(setup):
    _, _, g = setup
    A = C.normalize_matrix(g.adjacency_XX)
    w = C.logit_weights(g)
    eye = torch.eye(g.n_nodes, dtype=A.dtype)
    closed = w @ (torch.linalg.inv(eye - A) - eye)
    torch.testing.assert_close(C.node_influence(g), closed, rtol=1e-9, atol=1e-12)


def test_pruning(setup):
    _, _, g = setup
    full = C.prune_graph(g, 1.0, 1.0)
    pr = C.prune_graph(g, 0.8, 0.98)
    always = (g.kind_X == C.EMBEDDING) | (g.kind_X == C.LOGIT)
    assert pr.node_mask[always].all()
    assert pr.node_mask.sum() < full.node_mask.sum() <= g.n_nodes
    kept_edges = pr.edge_mask.nonzero()
    assert pr.node_mask[kept_edges[:, 0]].all() and pr.node_mask[kept_edges[:, 1]].all()
    assert (g.adjacency_XX[pr.edge_mask] != 0).all()
    inner = (g.kind_X == C.FEATURE) | (g.kind_X == C.ERROR)
    assert pr.edge_mask[:, pr.node_mask & inner].any(0).all()  # kept nodes feed something
    feat = pr.node_mask & (g.kind_X == C.FEATURE)
    assert pr.edge_mask[feat].any(1).all()  # and kept features are fed
    with pytest.raises(ValueError, match="node_threshold"):
        C.prune_graph(g, 1.5)


def test_graph_files_follow_the_format(setup, tmp_path):
    _, _, g = setup
    files = C.write_graph_files(g, tmp_path, "to-be")
    data = json.loads(files.graph_path.read_text())
    check_graph(data)
    check_graph_metadata(json.loads((tmp_path / "graph-metadata.json").read_text()))
    feats = [n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"]
    rows = {n["module"]: n["layer"] for n in feats}
    assert len(set(rows.values())) == len(rows)  # attention and MLP rows differ
    assert all(n["feature"] == C.cantor(int(n["layer"]), n["index"]) for n in feats)
    assert len({(n["layer"], n["index"]) for n in feats}) == len({n["feature"] for n in feats})
    logits = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert sum(n["is_target_logit"] for n in logits) == 1 and all("(p=" in n["clerp"]
                                                                   for n in logits)
    # a second graph is added to the index; the same slug replaces its entry
    C.write_graph_files(g, tmp_path, "other")
    C.write_graph_files(g, tmp_path, "to-be")
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert sorted(m["slug"] for m in index["graphs"]) == ["other", "to-be"]
    bad = json.loads(files.graph_path.read_text())
    bad["links"][0]["source"] = "nope"
    with pytest.raises(ValueError, match="links"):
        check_graph(bad)
    bad = json.loads(files.graph_path.read_text())
    bad["nodes"][1]["node_id"] = bad["nodes"][0]["node_id"]
    with pytest.raises(ValueError, match="duplicate"):
        check_graph(bad)


def test_bad_input(setup):
    model, suite, _ = setup
    with pytest.raises(ValueError, match="empty"):
        C.build_graph(model, suite, "")
    with pytest.raises(ValueError, match="single token"):
        C.build_graph(model, suite, PROMPT, target="ab")
    with pytest.raises(TypeError, match="float32"):
        C.build_graph(model, suite.to(torch.float32), PROMPT)
    suite.to(torch.float64)
    bare = random_suite(n_layers=2, d=32, F=40, k=5, seed=0)
    with pytest.raises(ValueError, match="no connections"):
        C.build_graph(model, bare, PROMPT)
    with pytest.raises(ValueError, match="node_threshold"):
        C.GraphConfig(node_threshold=2.0)
