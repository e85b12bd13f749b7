"""export.py: each format, read back by a plain re-implementation of its library's documented
loading formula, reproduces the suite's features and reconstructions; sparsify (pinned) also
loads them itself, and SAELens does where it is installed. SAELens and PyPI dictionary-learning
are checked in their own venvs by benchmarks/verify_exports.py (README, "Export")."""

import json

import pytest
import torch
from safetensors.torch import load_file

import export
from dictionary_learning.dictionary import AutoEncoderTopK, TopKTranscoder
from dictionary_learning.suite_io import save_suite
from tests.helpers import randomized

D, F, K, N_LAYERS, B = 16, 64, 4, 2, 200


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory):
    dicts = {}
    for layer in range(N_LAYERS):
        dicts[f"attn_{layer}"] = randomized(AutoEncoderTopK(D, F, K), 10 * layer)
        dicts[f"mlp_{layer}"] = randomized(TopKTranscoder(D, D, F, K), 10 * layer + 1)
    path = tmp_path_factory.mktemp("suite") / "suite"
    save_suite(path, dicts, {"model_name": "tiny-gpt2", "buffer": {"ctx_len": 32}})
    return path, dicts


def _inputs(seed):
    return torch.randn(B, D, generator=torch.Generator().manual_seed(seed))


def _ours(d, x):
    recon, feats = d(x, output_features=True)
    return feats.dense(d.dict_size), recon


def _topk_relu_dense(pre_BF, k):
    vals, idx = pre_BF.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre_BF).scatter(-1, idx, vals.relu())


def _close(a, b):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_saelens_format_formula(suite_dir, tmp_path):
    path, dicts = suite_dir
    res = export.main(["--suite", str(path), "--format", "saelens", "--out", str(tmp_path / "sl")])
    assert set(res.written) == {f"attn_{layer}" for layer in range(N_LAYERS)}
    assert set(res.skipped) == {f"mlp_{layer}" for layer in range(N_LAYERS)}
    assert all("sparsify" in why for why in res.skipped.values())
    manifest = json.loads((tmp_path / "sl" / "export.json").read_text())
    assert manifest["skipped"] == res.skipped
    for layer in range(N_LAYERS):
        folder = tmp_path / "sl" / f"blocks.{layer}.hook_attn_out"
        cfg = json.loads((folder / "cfg.json").read_text())
        assert cfg["architecture"] == "topk" and cfg["k"] == K
        assert (cfg["d_in"], cfg["d_sae"]) == (D, F)
        assert cfg["metadata"]["hook_name"] == f"blocks.{layer}.hook_attn_out"
        assert cfg["metadata"]["model_name"] == "tiny-gpt2"
        assert cfg["metadata"]["context_size"] == 32
        w = load_file(str(folder / "sae_weights.safetensors"))
        assert w["W_enc"].shape == (D, F) and w["W_dec"].shape == (F, D)
        # TopKSAE.encode: TopK(relu((x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc))
        x = _inputs(layer)
        acts = _topk_relu_dense((x - w["b_dec"] * cfg["apply_b_dec_to_input"]) @ w["W_enc"]
                                + w["b_enc"], cfg["k"])
        f_ours, r_ours = _ours(dicts[f"attn_{layer}"], x)
        _close(acts, f_ours)
        _close(acts @ w["W_dec"] + w["b_dec"], r_ours)  # TopKSAE.decode


def test_saelens_library_loads_it(suite_dir, tmp_path):
    """With SAELens installed (not pinned here: README, "Export"), its own loader agrees."""
    sae_lens = pytest.importorskip("sae_lens")
    path, dicts = suite_dir
    res = export.export_suite(path, tmp_path / "sl", "saelens")
    for name, folder in res.written.items():
        sae = sae_lens.SAE.load_from_disk(str(folder))
        assert sae.cfg.architecture() == "topk"
        assert sae.cfg.metadata.hook_name == folder.name
        x = _inputs(4)
        f_lib = sae.encode(x)
        f_ours, r_ours = _ours(dicts[name], x)
        _close(f_lib, f_ours)
        _close(sae.decode(f_lib), r_ours)


def _sparsify_formula(cfg, w, x):
    """SparseCoder.encode/decode: relu(W_enc (x - b_dec if not transcode) + b), top k, W_dec."""
    x_in = x if cfg["transcode"] else x - w["b_dec"]
    acts = _topk_relu_dense(torch.relu(x_in @ w["encoder.weight"].T + w["encoder.bias"]), cfg["k"])
    return acts, acts @ w["W_dec"] + w["b_dec"]


def test_sparsify_format_formula_and_library(suite_dir, tmp_path):
    path, dicts = suite_dir
    res = export.export_suite(path, tmp_path / "sp", "sparsify")
    assert res.skipped == {}
    folders = {f"h.{layer}.{kind}" for layer in range(N_LAYERS) for kind in ("attn", "mlp")}
    assert {p.name for p in (tmp_path / "sp").iterdir() if p.is_dir()} == folders
    for name, d in dicts.items():
        folder = res.written[name]
        cfg = json.loads((folder / "cfg.json").read_text())
        assert cfg["transcode"] is d.is_transcoder and cfg["activation"] == "topk"
        assert (cfg["d_in"], cfg["num_latents"], cfg["k"]) == (D, F, K)
        w = load_file(str(folder / "sae.safetensors"))
        x = _inputs(1)
        acts, recon = _sparsify_formula(cfg, w, x)
        f_ours, r_ours = _ours(d, x)
        _close(acts, f_ours)
        _close(recon, r_ours)

    sparsify = pytest.importorskip("sparsify")
    loaded = sparsify.SparseCoder.load_many(str(tmp_path / "sp"), local=True)
    assert set(loaded) == folders
    for name, d in dicts.items():
        sc = loaded[res.written[name].name]
        assert sc.cfg.transcode is d.is_transcoder
        x = _inputs(2)
        enc = sc.encode(x)
        f_lib = torch.zeros(B, F).scatter(-1, enc.top_indices, enc.top_acts)
        f_ours, r_ours = _ours(d, x)
        _close(f_lib, f_ours)
        _close(sc.decode(enc.top_acts, enc.top_indices), r_ours)
        one = sparsify.SparseCoder.load_from_disk(res.written[name])
        assert torch.equal(one.W_dec, sc.W_dec)


def test_dictionary_learning_format_formula(suite_dir, tmp_path):
    path, dicts = suite_dir
    res = export.export_suite(path, tmp_path / "dl", "dictionary_learning", model_name="m")
    assert set(res.written) == set(dicts) and res.skipped == {}
    for name, d in dicts.items():
        cfg = json.loads((res.written[name] / "config.json").read_text())
        assert cfg["trainer"]["dict_class"] == "AutoEncoderTopK"
        assert cfg["trainer"]["lm_name"] == "m"
        assert cfg["trainer"]["transcoder"] is d.is_transcoder
        assert cfg["buffer"]["io"] == ("in_and_out" if d.is_transcoder else "out")
        sd = torch.load(res.written[name] / "ae.pt", weights_only=True)
        # AutoEncoderTopK.encode / decode of dictionary_learning
        x = _inputs(3)
        acts = _topk_relu_dense(torch.relu((x - sd["b_dec"]) @ sd["encoder.weight"].T
                                           + sd["encoder.bias"]), int(sd["k"]))
        f_ours, r_ours = _ours(d, x)
        _close(acts, f_ours)
        _close(acts @ sd["decoder.weight"].T + sd["b_dec"], r_ours)


def test_export_errors(suite_dir, tmp_path):
    path, dicts = suite_dir
    with pytest.raises(ValueError, match="unknown export format"):
        export.export_suite(path, tmp_path / "x", "onnx")
    with pytest.raises(ValueError, match="model_name"):
        export.export_suite(type("S", (), {"dicts": dicts, "meta": {}})(), tmp_path / "x",
                            "sparsify")
    assert not (tmp_path / "x").exists()
    wide = {"mlp_0": randomized(TopKTranscoder(D, 2 * D, F, K), 5)}
    res = export.export_suite(type("S", (), {"dicts": wide, "meta": {"model_name": "m"}})(),
                              tmp_path / "w", "sparsify")
    assert res.written == {} and "d_in=16 != d_out=32" in res.skipped["mlp_0"]


@pytest.mark.parametrize("family, attn, mlp, prefix", [
    ("gpt_neox", "attention", "mlp", "gpt_neox"),
    ("llama", "self_attn", "mlp", "model"),
    ("gemma2", "post_attention_layernorm", None, "model"),
])
def test_other_families_name_their_own_modules(suite_dir, tmp_path, family, attn, mlp, prefix):
    """A suite records its model's family; the exports name that family's modules. Gemma-2's
    transcoders (MLP input -> post-feedforward norm output) have no sparsify hookpoint."""
    path, dicts = suite_dir
    save_suite(tmp_path / "s", dicts, {"model_name": "m", "architecture": {
        "family": family, "parallel": family == "gpt_neox", "centred": family == "gpt_neox"}})
    res = export.export_suite(tmp_path / "s", tmp_path / "sp", "sparsify")
    assert res.written["attn_1"].name == f"layers.1.{attn}"
    if mlp is None:
        assert set(res.skipped) == {"mlp_0", "mlp_1"}
        assert "post_feedforward_layernorm" in res.skipped["mlp_1"]
    else:
        assert res.written["mlp_1"].name == f"layers.1.{mlp}" and not res.skipped
    res = export.export_suite(tmp_path / "s", tmp_path / "dl", "dictionary_learning")
    cfg = json.loads((res.written["mlp_1"] / "config.json").read_text())
    mlp_out = mlp or "post_feedforward_layernorm"
    assert cfg["trainer"]["submodule_name"] == f"{prefix}.layers.1.{mlp_out}"
