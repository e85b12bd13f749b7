"""The exact identities of docs/method.md §1-§3 and §6 on every supported family
(docs/identities.md §10): tiny random GPT-2, GPT-NeoX (parallel and sequential), Llama, Mistral,
Qwen2 and Gemma-2 models with random norm weights, checked against plain forward hooks named
here, not through the architecture descriptions under test."""

from __future__ import annotations

import copy

import pytest
import torch

import evaluate as ev
from buffer import AllActivationBuffer
from dictionary_learning.arch import SuiteArch, architecture
from dictionary_learning.batch import ActivationBatch
from dictionary_learning.dictionary import AutoEncoderTopK, Features, TopKTranscoder
from dictionary_learning.model import hf_model, load_model, model_info
from dictionary_learning.suite import SCAESuite
from tests.helpers import FAMILIES, random_contexts, tiny_hf_model, tiny_model, tiny_tokenizer

D, L, CTX = 32, 3, 12

# Written out per family, independently of dictionary_learning/arch.py: the blocks, the module
# whose output is attn_out, the MLP-input norm, the MLP, the module whose output is mlp_out, the
# final norm; whether the MLP-input norm centres; whether the blocks are parallel.
PLAIN = {
    "gpt2": ("transformer.h", "attn", "ln_2", "mlp", "mlp", "transformer.ln_f", True, False),
    "neox_parallel": ("gpt_neox.layers", "attention", "post_attention_layernorm", "mlp", "mlp",
                      "gpt_neox.final_layer_norm", True, True),
    "neox_sequential": ("gpt_neox.layers", "attention", "post_attention_layernorm", "mlp", "mlp",
                        "gpt_neox.final_layer_norm", True, False),
    "llama": ("model.layers", "self_attn", "post_attention_layernorm", "mlp", "mlp", "model.norm",
              False, False),
    "gemma2": ("model.layers", "post_attention_layernorm", "pre_feedforward_layernorm", "mlp",
               "post_feedforward_layernorm", "model.norm", False, False),
}
PLAIN["mistral"] = PLAIN["qwen2"] = PLAIN["llama"]

# Absolute tolerances in fp32, the same for every family (docs/identities.md §10); the errors
# measured are about 1e-6.
ATOL = {f: 1e-5 for f in FAMILIES}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model(family):
    return tiny_model(family, n_layer=L, d_model=D, n_ctx=32)[0]


@pytest.fixture(scope="module")
def toks():
    return torch.stack(random_contexts(4, CTX, seed=3))


def plain_hooks(family, hf, toks_ST):
    """x0, attn_out, the MLP-input norm's input and output, the MLP's input, mlp_out and the final
    norm's input, captured with plain PyTorch hooks, [S, T, D] each."""
    blocks_path, attn_out, mlp_norm, mlp, mlp_out, final, _, _ = PLAIN[family]
    blocks = hf.get_submodule(blocks_path)
    got, handles = {}, []

    def keep(key, i=0):
        def hook(m, args, kwargs, out=None):
            value = out if out is not None else (args[0] if args else
                                                  next(iter(kwargs.values())))
            got[key] = value[0] if isinstance(value, tuple) else value
        return hook

    handles.append(blocks[0].register_forward_pre_hook(keep("x0"), with_kwargs=True))
    for l, b in enumerate(blocks):
        handles += [
            b.get_submodule(attn_out).register_forward_hook(keep(f"attn_{l}"), with_kwargs=True),
            b.get_submodule(mlp_norm).register_forward_pre_hook(keep(f"resid_{l}"),
                                                                 with_kwargs=True),
            b.get_submodule(mlp_norm).register_forward_hook(keep(f"normed_{l}"),
                                                             with_kwargs=True),
            b.get_submodule(mlp).register_forward_pre_hook(keep(f"mlp_in_{l}"), with_kwargs=True),
            b.get_submodule(mlp_out).register_forward_hook(keep(f"mlp_out_{l}"),
                                                            with_kwargs=True),
        ]
    handles.append(hf.get_submodule(final).register_forward_pre_hook(keep("final"),
                                                                      with_kwargs=True))
    with torch.no_grad():
        logits = hf(input_ids=toks_ST, use_cache=False).logits
    for h in handles:
        h.remove()
    return got, logits


def plain_sigma(family, x):
    centred = PLAIN[family][6]
    if centred:
        return (x.var(-1, unbiased=False) + 1e-5).sqrt(), x - x.mean(-1, keepdim=True)
    return (x.pow(2).mean(-1) + 1e-6).sqrt(), x


def upstream_rule(family, L_):
    """(attention layers, MLP layers) upstream of mlp_L: with parallel blocks attn_L is not."""
    parallel = PLAIN[family][7]
    return list(range(L_ if parallel else L_ + 1)), list(range(L_))


# ------------------------------------------------------------------ loading and folding


def test_folded_logits_equal_unfolded_logits(family, toks):
    hf = tiny_hf_model(family, n_layer=L, d_model=D)
    norm = hf.get_submodule(PLAIN[family][0])[0].get_submodule(PLAIN[family][2])
    identity = 0.0 if family == "gemma2" else 1.0
    assert not torch.allclose(norm.weight, torch.full_like(norm.weight, identity))
    with torch.no_grad():
        before = hf(toks).logits
    model = load_model(hf, tokenizer=tiny_tokenizer())
    with torch.no_grad():
        after = hf_model(model)(toks).logits
    torch.testing.assert_close(after, before, atol=ATOL[family], rtol=0)
    for b in hf.get_submodule(PLAIN[family][0]):
        n = b.get_submodule(PLAIN[family][2])
        assert torch.equal(n.weight, torch.full_like(n.weight, identity))
        if getattr(n, "bias", None) is not None:
            assert torch.equal(n.bias, torch.zeros_like(n.bias))
    state = copy.deepcopy(hf.state_dict())
    architecture(hf).fold(hf)  # folding a folded model changes nothing
    for k, v in hf.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_model_info_and_architecture(family, model):
    info = model_info(model)
    assert (info.n_layers, info.d_model, info.n_ctx, info.vocab_size) == (L, D, 32, 64)
    arch = architecture(model)
    assert arch.parallel == PLAIN[family][7]
    assert arch.suite_arch.centred == PLAIN[family][6]
    assert info.parallel == arch.parallel


# ------------------------------------------------------------------ the trace and sigma


def test_buffer_equals_plain_hooks_and_the_residual_identities(family, model, toks):
    """Buffer rows = plain hooks (BOS dropped, same shuffle); sigma is what the model's own norm
    divides P r by; mlp_in = P r / sigma; r_L = x0 + its upstream outputs (1.1); x0 is the family's
    embedding; x0 + every block output = the final norm's input."""
    hf = hf_model(model)
    ctxs = list(toks)
    n = len(ctxs) * (CTX - 1)
    buf = AllActivationBuffer(model, iter(ctxs), n_tokens=n, out_batch_size=n, seed=5)
    got = next(buf)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(5))
    ref, _ = plain_hooks(family, hf, toks)
    rows = {k: v[:, 1:].reshape(-1, D)[perm] for k, v in ref.items()}
    atol = ATOL[family]
    torch.testing.assert_close(got.initial, rows["x0"], atol=1e-6, rtol=0)
    torch.testing.assert_close(architecture(hf).x0(hf, toks), ref["x0"], atol=1e-6, rtol=0)
    for l in range(L):
        torch.testing.assert_close(got.src[f"attn_{l}"], rows[f"attn_{l}"], atol=1e-6, rtol=0)
        torch.testing.assert_close(got.tgt[f"attn_{l}"], rows[f"attn_{l}"], atol=1e-6, rtol=0)
        torch.testing.assert_close(got.src[f"mlp_{l}"], rows[f"mlp_in_{l}"], atol=1e-6, rtol=0)
        torch.testing.assert_close(got.tgt[f"mlp_{l}"], rows[f"mlp_out_{l}"], atol=1e-6, rtol=0)
        x = rows[f"resid_{l}"]
        sigma = got.layernorm_scale[f"mlp_{l}"]
        sigma_plain, P_x = plain_sigma(family, x)
        torch.testing.assert_close(sigma, sigma_plain, atol=1e-5, rtol=1e-5)
        # the model's own folded norm divides P x by sigma
        sigma_model = (P_x / rows[f"normed_{l}"]).median(dim=-1).values
        torch.testing.assert_close(sigma, sigma_model, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.src[f"mlp_{l}"], P_x / sigma[:, None], atol=1e-5, rtol=0)
        attn_layers, mlp_layers = upstream_rule(family, l)
        r = got.initial + sum((got.tgt[f"attn_{j}"] for j in attn_layers),
                              torch.zeros_like(x))
        r = r + sum((got.tgt[f"mlp_{j}"] for j in mlp_layers), torch.zeros_like(x))
        torch.testing.assert_close(r, x, atol=10 * atol, rtol=0)
    final = got.initial + sum(got.tgt[f"attn_{l}"] + got.tgt[f"mlp_{l}"] for l in range(L))
    torch.testing.assert_close(final, rows["final"], atol=10 * atol, rtol=0)


# ------------------------------------------------------------------ the pruned pass


def suite_on(family, model, seed=0) -> SCAESuite:
    """Random encoders; every decoder [I, -I] (F = 2D) with a random b_dec, so that a dictionary's
    output can be set exactly to any vector (`exact_features`)."""
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(D, dtype=torch.float64)
    F = 2 * D
    dicts = {}
    for l in range(L):
        dicts[f"attn_{l}"] = AutoEncoderTopK(D, F, D)
        dicts[f"mlp_{l}"] = TopKTranscoder(D, D, F, D)
    with torch.no_grad():
        for ae in dicts.values():
            ae.double()
            ae.encoder.weight.copy_(torch.randn(F, D, generator=g, dtype=torch.float64) * 0.3)
            ae.encoder.bias.copy_(torch.randn(F, generator=g, dtype=torch.float64) * 0.1)
            ae.decoder.weight.copy_(torch.cat([eye, -eye], dim=1))
            ae.b_dec.copy_(torch.randn(D, generator=g, dtype=torch.float64) * 0.1)
    return SCAESuite(dicts, arch=architecture(model).suite_arch)


def exact_features(suite, name, y_BD) -> Features:
    """Features whose decoding by `name` is exactly y: [relu(y - b), relu(b - y)] over [I, -I]."""
    e_BD = y_BD - suite.dicts[name].b_dec
    vals = torch.cat([e_BD.relu(), (-e_BD).relu()], dim=1)
    return Features(vals, torch.arange(2 * D).expand_as(vals).contiguous())


def full_connections(suite):
    F = suite.dict_sizes
    return {m: {u: torch.arange(F[u]).expand(F[m], F[u]).clone()
                for u in suite.upstream_names(m)} for m in suite.transcoder_names}


def real_batch(model, toks) -> ActivationBatch:
    buf = AllActivationBuffer(model, iter(list(toks)), n_tokens=len(toks) * (CTX - 1),
                              out_batch_size=len(toks) * (CTX - 1), seed=0)
    return next(buf).to(dtype=torch.float64)


def test_pruned_pass_with_exact_upstream_reproduces_vanilla_pre(family, model, toks):
    """Every upstream dictionary reproducing its true output, full connectivity: the pruned
    pre-activation of every transcoder equals its vanilla pre-activation (method.md §3,
    identity 2). With parallel blocks the upstream set has no attn_L; giving attn_L's exact output
    anyway would break the identity, which the last check shows."""
    suite = suite_on(family, model)
    suite.set_connections(full_connections(suite))
    batch = real_batch(model, toks)
    up = {n: exact_features(suite, n, batch.tgt[n]) for n in suite.names}
    for l in range(L):
        name = f"mlp_{l}"
        pruned = suite._pruned_pre(name, batch, up, None)
        vanilla = suite.vanilla_one(name, batch).pre_BF
        torch.testing.assert_close(pruned, vanilla, atol=ATOL[family], rtol=1e-5)
    attn_layers, _ = upstream_rule(family, 1)
    assert suite.upstream_names("mlp_1") == (
        ["attn_0", "mlp_0"] + (["attn_1"] if 1 in attn_layers else []))


def test_full_connectivity_encodes_the_rebuilt_residual(family, model, toks):
    """With every upstream feature connected, pre^pr = W_enc (P r_L / sigma_L) + b_enc with
    r_L = x0 + the upstream reconstructions (method.md §3, identity 1), P and the upstream set as
    the family has them."""
    suite = suite_on(family, model, seed=1)
    g = torch.Generator().manual_seed(2)
    for ae in suite.dicts.values():
        ae.k = 6
        with torch.no_grad():
            W = torch.randn(D, 2 * D, generator=g, dtype=torch.float64)
            ae.decoder.weight.copy_(W / W.norm(dim=0))
    suite.set_connections(full_connections(suite))
    batch = real_batch(model, toks)
    vanilla = suite.vanilla_forward(batch)
    pruned = suite.pruned_forward(batch, vanilla, mode="all")
    for l in range(L):
        attn_layers, mlp_layers = upstream_rule(family, l)
        r = batch.initial.clone()
        r = r + sum(vanilla[f"attn_{j}"].recon_BD for j in attn_layers)
        r = r + sum((pruned[f"mlp_{j}"].recon_BD for j in mlp_layers), torch.zeros_like(r))
        sigma = batch.layernorm_scale[f"mlp_{l}"]
        _, P_r = plain_sigma(family, r)
        ae = suite.dicts[f"mlp_{l}"]
        expected = (P_r / sigma[:, None]) @ ae.encoder.weight.T + ae.encoder.bias
        torch.testing.assert_close(pruned[f"mlp_{l}"].pre_BF, expected, rtol=1e-10, atol=1e-10)


def test_connection_search_and_finetuning_respect_the_upstream_sets(family, model, toks):
    """The top-C search, the random baseline and a finetuning step (candidates mode) on a real
    buffer: every transcoder's connections lie in its family's upstream set."""
    from find_top_connections import collect_activations, random_connections, top_connections
    from trainers.scae import SCAETrainerConfig, TrainerSCAESuite

    suite = suite_on(family, model).float()
    for ae in suite.dicts.values():
        ae.k = 4
    n = len(toks) * (CTX - 1)
    buf = AllActivationBuffer(model, iter(list(toks)), n_tokens=n, out_batch_size=n, seed=0)
    acts = collect_activations(suite, buf, n)
    conns = top_connections(suite, acts, C=6)
    for l in range(L):
        attn_layers, mlp_layers = upstream_rule(family, l)
        allowed = {f"attn_{j}" for j in attn_layers} | {f"mlp_{j}" for j in mlp_layers}
        assert set(conns[f"mlp_{l}"]) == allowed
        assert all(((idx >= 0).sum(1) <= 6).all() for idx in conns[f"mlp_{l}"].values())
    rnd = random_connections(suite, conns, seed=1)
    assert {m: set(u) for m, u in rnd.items()} == {m: set(u) for m, u in conns.items()}
    suite.set_connections(conns)
    from dictionary_learning.unembed import Unembed

    # the default loss, KL term included: each family's own head (final norm, soft-capping)
    tr = TrainerSCAESuite(suite, SCAETrainerConfig(total_steps=2, n_threshold=4, n_random=2,
                                                   random_coeff=0.1, warmup_steps=1),
                          unembed=Unembed.from_model(model))
    batch = next(AllActivationBuffer(model, iter(list(toks)), n_tokens=n, out_batch_size=n))
    logs = tr.update(0, batch)
    assert "kl" in logs and all(torch.isfinite(torch.tensor(v)) for v in logs.values())


# ------------------------------------------------------------------ evaluation


def test_true_outputs_rebuild_the_model_logits_and_exact_splices_are_clean(family, model, toks):
    from dictionary_learning.batch import trace_activations

    hf = hf_model(model)
    acts = trace_activations(model, toks)
    r = ev.final_residual(acts["initial"], [acts[f"{k}_{l}"] for l in range(L)
                                           for k in ("attn", "mlp_out")])
    clean = ev.clean_logits(model, toks)
    torch.testing.assert_close(ev.unembed(model, r), clean, atol=10 * ATOL[family], rtol=0)
    ce = ev.next_token_ce(clean, toks)
    assert float(ev.next_token_ce(ev.unembed(model, r), toks)) == pytest.approx(float(ce),
                                                                               abs=1e-5)
    # splicing the identity into attn_1, or the MLP (with its post-norm) into mlp_1, is clean
    block = hf.get_submodule(PLAIN[family][0])[1]
    mlp, post = (copy.deepcopy(block.get_submodule(PLAIN[family][i])) for i in (3, 4))

    def mlp_copy(x):
        return post(mlp(x)) if PLAIN[family][4] != "mlp" else mlp(x)

    for name, fn in (("attn_1", lambda x: x.clone()), ("mlp_1", mlp_copy)):
        spliced = ev.splice_logits(model, toks, name, fn)
        torch.testing.assert_close(spliced, clean, atol=1e-5, rtol=0)
    # a wrong transcoder (zero output) changes the logits: the hook is on the right module
    zero = ev.splice_logits(model, toks, "mlp_1", lambda x: torch.zeros_like(x))
    assert (zero - clean).abs().max() > 1e-3
    assert torch.equal(ev.clean_logits(model, toks), clean)  # hooks removed


def test_evaluate_suite_runs_and_exact_attention_saes_are_perfect(family, model, toks):
    from tests.scae_fixtures import exact_sae

    suite = suite_on(family, model).float()
    for l in range(L):
        suite.dicts[f"attn_{l}"] = exact_sae(D)
    suite.set_connections(full_connections(suite))
    out = ev.evaluate_suite(suite, model, list(toks), batch_size=2, progress=False)
    for l in range(L):
        assert out.modules[f"attn_{l}"].fvu_vanilla == pytest.approx(0.0, abs=1e-8)
        assert out.ce.splice[f"attn_{l}"] == pytest.approx(out.ce.clean, abs=1e-5)


# ------------------------------------------------------------------ suites and errors


def test_suite_records_its_architecture(family, model, tmp_path):
    suite = suite_on(family, model)
    suite.set_connections(full_connections(suite))
    suite.save_pretrained(tmp_path / "s")
    back = SCAESuite.from_pretrained(tmp_path / "s", dtype=torch.float64)
    assert back.arch == architecture(model).suite_arch
    assert back.connections.keys() == suite.connections.keys()
    for m in suite.transcoder_names:
        assert sorted(back.connections[m]) == sorted(suite.upstream_names(m))


def test_a_suite_of_another_wiring_or_norm_is_refused(model):
    arch = architecture(model).suite_arch
    other = SuiteArch("x", not arch.parallel, arch.centred)
    suite = SCAESuite({n: d for n, d in suite_on("gpt2", model).dicts.items()}, arch=other)
    with pytest.raises(ValueError, match="upstream sets or its centring P differ"):
        ev.evaluate_suite(suite, model, [torch.zeros(CTX, dtype=torch.long)], progress=False)


def test_parallel_suites_refuse_attn_L_upstream_of_mlp_L():
    dicts = {}
    for l in range(2):
        dicts[f"attn_{l}"] = AutoEncoderTopK(4, 8, 2)
        dicts[f"mlp_{l}"] = TopKTranscoder(4, 4, 8, 2)
    suite = SCAESuite(dicts, arch=SuiteArch("gpt_neox", parallel=True, centred=True))
    bad = {"mlp_0": {}, "mlp_1": {"attn_1": torch.zeros(8, 1, dtype=torch.long)}}
    with pytest.raises(ValueError, match=r"'attn_1' is not upstream of 'mlp_1'.*parallel"):
        suite.set_connections(bad)
    suite.set_connections({"mlp_0": {}, "mlp_1": {"attn_0": torch.zeros(8, 1, dtype=torch.long)}})
    assert suite.upstream_names("mlp_0") == [] and suite.upstream_names("mlp_1") == [
        "attn_0", "mlp_0"]


def test_unsupported_family_and_missing_module_errors():
    import transformers as tf

    opt = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                         ffn_dim=32, num_attention_heads=2,
                                         word_embed_proj_dim=16))
    with pytest.raises(TypeError, match=r"OPTForCausalLM \(config.model_type 'opt'\) is not a "
                                        r"supported family; supported: gpt2.*gpt_neox.*llama.*"
                                        r"qwen2.*gemma2"):
        load_model(opt, tokenizer=tiny_tokenizer())
    llama = tiny_hf_model("llama", n_layer=2)
    del llama.model.layers[1].mlp.up_proj
    with pytest.raises(TypeError, match=r"model.layers.1 has no module 'mlp.up_proj'"):
        load_model(llama, tokenizer=tiny_tokenizer())
    with pytest.raises(TypeError, match="not a supported family"):
        architecture(torch.nn.Linear(2, 2))


def test_embedded_llama_builds_on_first_use_and_is_the_tiny_llama_presets_model(tmp_path,
                                                                                monkeypatch):
    """The embedded Llama's own config is a supported Llama (GQA); a miniature of it goes through
    the same build (tokenizer, packed contexts, training loop) into $SCAE_CACHE on first use of its
    name, and is reused afterwards."""
    from dataclasses import replace

    import run_finetuning
    from dictionary_learning import embedded

    name = embedded.EMBEDDED_LLAMA
    cfg = embedded.EMBEDDED_CONFIGS[name]
    arch = architecture(embedded.new_model(cfg, 4096, 0))
    assert arch.family == "llama"
    assert run_finetuning.make_config("tiny-llama").model == name
    assert embedded.embedded_model_path("not-embedded") is None
    small = replace(cfg, vocab_size=300, n_layer=1, n_embd=16, n_head=2, n_kv_head=1, d_mlp=24,
                    n_positions=32, train_steps=2, batch_size=2, max_val_contexts=4)
    monkeypatch.setitem(embedded.EMBEDDED_CONFIGS, name, small)
    # the validation plays and two training plays: the same code on less text
    plays = embedded.play_paths()
    keep = list(embedded.VALIDATION_PLAYS) + [p for p in plays if p not in
                                              embedded.VALIDATION_PLAYS][:2]
    monkeypatch.setattr(embedded, "play_paths", lambda: {p: plays[p] for p in keep})
    monkeypatch.setenv("SCAE_CACHE", str(tmp_path))
    model = load_model(name)
    assert architecture(model).family == "llama" and model_info(model).n_layers == 1
    assert (tmp_path / name / "metrics.json").is_file()
    stamp = (tmp_path / name / "metrics.json").stat().st_mtime_ns
    load_model(name)
    assert (tmp_path / name / "metrics.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    with pytest.raises(ValueError, match="unknown embedded model"):
        embedded.ensure_embedded_model(name="nope")
