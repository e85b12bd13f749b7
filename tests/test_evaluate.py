"""evaluate.py: metric functions against plain formulas, CE identities, splice, chunking, report."""

import copy
import json
import math

import pytest
import torch

import evaluate as ev
from dictionary_learning.batch import trace_activations
from dictionary_learning.dictionary import Features
from dictionary_learning.model import hf_model
from tests.helpers import random_contexts, tiny_gpt2
from tests.scae_fixtures import exact_sae, random_connections, random_suite

D, L, CTX = 32, 2, 12


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2(n_layer=L, d_model=D, n_ctx=32)[0]


@pytest.fixture(scope="module")
def toks():
    return torch.stack(random_contexts(4, CTX, seed=3))


def connected_suite(seed=0):
    suite = random_suite(n_layers=L, d=D, F=48, k=4, seed=seed, dtype=torch.float32)
    suite.set_connections(random_connections(suite, C=8, seed=seed))
    return suite


def plain_ce(logits_STV, toks_ST):
    """Mean CE of the predictions from positions 1..T-2 of tokens 2..T-1, as a plain loop."""
    losses = []
    for s in range(toks_ST.shape[0]):
        for t in range(1, toks_ST.shape[1] - 1):
            lp = logits_STV[s, t].double().log_softmax(-1)
            losses.append(-lp[toks_ST[s, t + 1]])
    return float(torch.stack(losses).mean())


# ------------------------------------------------------------------ metric functions


def test_metric_functions_match_plain_formulas():
    g = torch.Generator().manual_seed(0)
    y, yhat = torch.randn(20, 5, generator=g), torch.randn(20, 5, generator=g)
    ref = ((y - yhat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    torch.testing.assert_close(ev.fvu(y, yhat), ref)

    vals = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0], [3.0, 1.0, 0.5]])
    idx = torch.tensor([[0, 1, 2], [3, 4, 5], [2, 6, 7]])
    van = Features(vals, idx)
    assert float(ev.l0(van)) == pytest.approx((2 + 0 + 3) / 3)

    fired = ev.fired_features(van, 10)
    assert fired.tolist() == [i in (0, 2, 6, 7) for i in range(10)]
    assert ev.dead_fraction(fired) == pytest.approx(6 / 10)

    pr = Features(torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 0.0, 1.0]]),
                  torch.tensor([[2, 9, 1], [3, 4, 5], [6, 7, 8]]))
    # token 0: A_v = {0, 2}, A_p = {2, 9, 1} -> 1/2; token 1: A_v empty -> left out;
    # token 2: A_v = {2, 6, 7}, A_p = {6, 8} -> 1/3
    per_tok = ev.agreement_per_token(van, pr)
    assert per_tok[0] == pytest.approx(0.5) and math.isnan(per_tok[1])
    assert per_tok[2] == pytest.approx(1 / 3)
    assert float(ev.agreement(van, pr)) == pytest.approx((0.5 + 1 / 3) / 2)
    assert float(ev.agreement(van, van)) == pytest.approx(1.0)

    assert ev.ce_recovered(5.0, 3.0, 1.0) == pytest.approx(0.5)
    assert ev.ce_recovered(5.0, 1.0, 1.0) == pytest.approx(1.0)
    assert math.isnan(ev.ce_recovered(1.0, 1.0, 1.0))

    logits = torch.randn(2, 6, 11, generator=g)
    t = torch.randint(0, 11, (2, 6), generator=g)
    assert float(ev.next_token_ce(logits, t)) == pytest.approx(plain_ce(logits, t), rel=1e-5)
    with pytest.raises(ValueError, match="ctx_len >= 3"):
        ev.next_token_ce(logits[:, :2], t[:, :2])


def test_fvu_accumulator_equals_one_shot():
    g = torch.Generator().manual_seed(1)
    y, yhat = 3 + torch.randn(50, 7, generator=g), torch.randn(50, 7, generator=g)
    acc = ev.FVUAccumulator()
    for lo, hi in [(0, 1), (1, 13), (13, 14), (14, 50)]:
        acc.update(y[lo:hi], yhat[lo:hi])
    assert acc.value() == pytest.approx(float(ev.fvu(y, yhat)), rel=1e-6)


# ------------------------------------------------------------------ CE identities


def test_true_outputs_rebuild_the_model_logits(model, toks):
    acts = trace_activations(model, toks)
    outs = [acts[f"{k}_{l}"] for l in range(L) for k in ("attn", "mlp_out")]
    logits = ev.unembed(model, ev.final_residual(acts["initial"], outs))
    with torch.no_grad():
        clean = ev.clean_logits(model, toks)
        torch.testing.assert_close(logits, clean, atol=1e-4, rtol=0)
        assert float(ev.next_token_ce(logits, toks)) == pytest.approx(
            float(ev.next_token_ce(clean, toks)), abs=1e-5)


def test_splice_with_exact_dictionary_equals_clean(model, toks):
    hf = hf_model(model)
    with torch.no_grad():
        clean_logits = ev.clean_logits(model, toks)
        clean = float(ev.next_token_ce(clean_logits, toks))
        sae = exact_sae(D)
        logits = ev.splice_logits(model, toks, "attn_1", sae)
        torch.testing.assert_close(logits, clean_logits, atol=1e-4, rtol=0)
        assert float(ev.next_token_ce(logits, toks)) == pytest.approx(clean, abs=1e-6)
        # an "exact transcoder": a copy of the model's own MLP applied to the mlp input of the run
        mlp_copy = copy.deepcopy(hf.transformer.h[0].mlp)
        logits = ev.splice_logits(model, toks, "mlp_0", mlp_copy)
        torch.testing.assert_close(logits, clean_logits, atol=1e-4, rtol=0)
        # a wrong reconstruction changes the logits, and the hook is removed afterwards
        zero = ev.splice_logits(model, toks, "mlp_0", torch.zeros_like)
        assert (zero[:, 1:] - clean_logits[:, 1:]).abs().max() > 1e-3
        torch.testing.assert_close(ev.clean_logits(model, toks), clean_logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="attn_<l>"):
        ev.splice_logits(model, toks, "mlp_7", torch.zeros_like)


def test_splice_keeps_bos_true(model, toks):
    """Only positions 1.. are replaced: the BOS position's logits stay the clean ones."""
    with torch.no_grad():
        clean = ev.clean_logits(model, toks)
        zero = ev.splice_logits(model, toks, "attn_0", torch.zeros_like)
    torch.testing.assert_close(zero[:, 0], clean[:, 0])
    assert not torch.allclose(zero[:, 1:], clean[:, 1:])


def test_evaluate_suite_with_exact_attn_saes(model, toks):
    """Through evaluate_suite: exact attn SAEs have FVU 0 and splice CE equal to the clean CE."""
    suite = random_suite(n_layers=L, d=D, F=48, k=4, dtype=torch.float32)
    for l in range(L):
        suite.dicts[f"attn_{l}"] = exact_sae(D)
    rep = ev.evaluate_suite(suite, model, toks, n_contexts=2, progress=False, splice=True)
    for l in range(L):
        assert rep.modules[f"attn_{l}"].fvu_vanilla == pytest.approx(0.0, abs=1e-8)
        assert rep.ce.splice[f"attn_{l}"] == pytest.approx(rep.ce.clean, abs=1e-5)


# ------------------------------------------------------------------ evaluation


def one_shot(suite, model, toks):
    """The per-module metrics and suite CE computed on all contexts at once, plainly."""
    acts = trace_activations(model, toks)
    B, T = toks.shape

    def flat(t):
        return t[:, 1:].reshape(B * (T - 1), *t.shape[2:])

    from dictionary_learning.batch import ActivationBatch

    src, tgt, scale = {}, {}, {}
    for l in range(L):
        src[f"attn_{l}"] = tgt[f"attn_{l}"] = flat(acts[f"attn_{l}"])
        src[f"mlp_{l}"], tgt[f"mlp_{l}"] = flat(acts[f"mlp_in_{l}"]), flat(acts[f"mlp_out_{l}"])
        scale[f"mlp_{l}"] = flat(acts[f"sigma_{l}"])
    batch = ActivationBatch(flat(acts["initial"]), src, tgt, scale)
    van = suite.vanilla_forward(batch)
    pr = suite.pruned_forward(batch, van, mode="all")
    out = {}
    for n in suite.names:
        p = pr.get(n, van[n])
        out[n] = dict(
            fvu_vanilla=float(ev.fvu(tgt[n], van[n].recon_BD)),
            fvu_pruned=float(ev.fvu(tgt[n], p.recon_BD)),
            l0=float(ev.l0(van[n].feats)),
            l0_pruned=float(ev.l0(p.feats)),
            dead_frac=ev.dead_fraction(ev.fired_features(van[n].feats, suite.dicts[n].dict_size)),
            agreement=float(ev.agreement(van[n].feats, p.feats)),
        )
    r = acts["initial"].clone()
    r[:, 1:] += sum(van[n].recon_BD.view(B, T - 1, D) for n in suite.names)
    ce_van = plain_ce(ev.unembed(model, r), toks)
    return out, ce_van


@torch.no_grad()
def test_chunked_equals_one_shot(model, toks):
    suite = connected_suite()
    ref_modules, ref_ce = one_shot(suite, model, toks)
    a = ev.evaluate_suite(suite, model, list(toks), batch_size=2, progress=False)
    b = ev.evaluate_suite(suite, model, toks, batch_size=100, progress=False)
    assert a.n_tokens == b.n_tokens == 4 * (CTX - 1)
    assert a.n_predictions == 4 * (CTX - 2)
    for n in suite.names:
        for key, val in ref_modules[n].items():
            assert getattr(a.modules[n], key) == pytest.approx(val, rel=1e-5, abs=1e-7), (n, key)
            assert getattr(b.modules[n], key) == pytest.approx(val, rel=1e-5, abs=1e-7), (n, key)
    assert a.ce.vanilla == pytest.approx(ref_ce, rel=1e-5)
    for key in ("clean", "ablated", "vanilla", "pruned", "recovered_vanilla", "recovered_pruned"):
        assert getattr(a.ce, key) == pytest.approx(getattr(b.ce, key), rel=1e-5, abs=1e-4), key
    for n in suite.names:
        assert a.ce.splice[n] == pytest.approx(b.ce.splice[n], rel=1e-5)
    # attn SAEs are leaves: their pruned figures are the vanilla ones
    assert a.modules["attn_0"].fvu_pruned == a.modules["attn_0"].fvu_vanilla
    assert a.modules["attn_0"].agreement == pytest.approx(1.0)


def test_limits_and_errors(model, toks):
    suite = connected_suite()
    e = ev.evaluate_suite(suite, model, iter(list(toks)), n_tokens=2 * (CTX - 1) + 1,
                          splice=False, progress=False)
    assert e.n_contexts == 3 and e.ce.splice == {}
    e2 = ev.evaluate_suite(suite, model, toks, n_contexts=2, splice=False, progress=False)
    assert e2.n_contexts == 2
    with pytest.raises(ValueError, match="no evaluation contexts"):
        ev.evaluate_suite(suite, model, [], progress=False)
    with pytest.raises(ValueError, match=r"ctx_len 2 is too short.*>= 3"):
        ev.evaluate_suite(suite, model, toks[:, :2], progress=False)
    wide = random_suite(n_layers=L, d=8, F=16, k=2, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"d_model=8 but the model has d_model=32; load the suite"):
        ev.evaluate_suite(wide, model, toks, progress=False)


def test_report_writes_json_and_plots(model, toks, tmp_path):
    suite = connected_suite()
    rep = ev.report(
        suite, model, toks, n_contexts=3, batch_size=2, out_dir=tmp_path, progress=False
    )
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == rep
    assert set(rep["modules"]) == set(suite.names)
    for m in rep["modules"].values():
        assert {"fvu_vanilla", "fvu_pruned", "l0", "l0_pruned", "dead_frac", "agreement"} <= set(m)
    assert {"clean", "ablated", "vanilla", "pruned", "recovered_vanilla", "recovered_pruned",
            "splice"} <= set(rep["ce"])
    assert set(rep["ce"]["splice"]) == set(suite.names)
    assert rep["n_tokens"] == 3 * (CTX - 1) and rep["has_connections"]
    for name in ("fvu_per_layer.png", "ce.png", "splice_ce.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    table = ev.format_table(rep)
    assert "attn_0" in table and "mlp_1" in table and "recovered" in table


def test_report_without_connections(model, toks, tmp_path):
    suite = random_suite(n_layers=L, d=D, F=48, k=4, dtype=torch.float32)
    rep = ev.report(
        suite, model, toks, n_contexts=2, splice=False, out_dir=tmp_path, progress=False
    )
    assert rep["ce"]["pruned"] is None and rep["ce"]["recovered_pruned"] is None
    assert all(m["fvu_pruned"] is None and m["agreement"] is None for m in rep["modules"].values())
    assert rep["notes"] and "no connections" in rep["notes"][0]
    assert rep["ce"]["splice"] == {}
    assert (tmp_path / "ce.png").exists() and not (tmp_path / "splice_ce.png").exists()
    assert "note:" in ev.format_table(rep)


def test_cli(model, tmp_path, monkeypatch):
    """The CLI on a saved suite with a local model folder and a text file."""
    suite = connected_suite()
    suite.save_pretrained(tmp_path / "suite", meta={"model_name": str(tmp_path / "model")})
    hf = hf_model(model)
    hf.save_pretrained(tmp_path / "model")
    model.tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "text.txt").write_text("hello there, this is a small text. " * 20)
    rep = ev.main(["--suite", str(tmp_path / "suite"), "--data", str(tmp_path / "text.txt"),
                   "--tokens", "40", "--ctx-len", "12", "--batch-size", "2", "--device", "cpu",
                   "--no-splice",
                   "--out", str(tmp_path / "out")])
    assert rep["n_contexts"] == 4 and rep["has_connections"]
    assert (tmp_path / "out" / "report.json").exists()


def test_evaluate_dictionaries_equals_plain_formulas_on_the_concatenation():
    """Pretraining's held-out check: FVU, L0 and dead fraction over several ActivationBatches equal
    plain formulas on all their rows at once (float64 reference); no batch is a clear error."""
    from dictionary_learning.batch import ActivationBatch

    suite = random_suite(n_layers=1, d=6, F=10, k=3, seed=4, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(3):
        x = {n: torch.randn(7, 6, generator=g) for n in ("attn_0", "mlp_0")}
        y_mlp = torch.randn(7, 6, generator=g)
        batches.append(ActivationBatch(torch.zeros(7, 6), dict(x),
                                       {"attn_0": x["attn_0"], "mlp_0": y_mlp},
                                       {"mlp_0": torch.ones(7)}))
    dicts = dict(suite.dicts.items())
    got = ev.evaluate_dictionaries(dicts, iter(batches))
    for n, d in dicts.items():
        x = torch.cat([b.src[n] for b in batches])
        y = torch.cat([b.tgt[n] for b in batches]).double()
        with torch.no_grad():
            recon, feats = d(x, output_features=True)
        fvu_ref = float((y - recon.double()).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
        active = feats.vals_BK > 0
        hit_F = torch.zeros(d.dict_size, dtype=torch.bool)
        hit_F[feats.idx_BK[active]] = True
        assert got[n].fvu == pytest.approx(fvu_ref, rel=1e-6)
        assert got[n].l0 == pytest.approx(float(active.sum()) / 21)
        assert got[n].dead_frac == pytest.approx(1.0 - float(hit_F.float().mean()))
        assert got[n].n_tokens == 21
    with pytest.raises(ValueError, match="no evaluation batches"):
        ev.evaluate_dictionaries(dicts, iter([]))
