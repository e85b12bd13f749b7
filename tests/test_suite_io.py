import json
import os

import pytest
import torch

from dictionary_learning.dictionary import AutoEncoderTopK, TopKTranscoder
from dictionary_learning.dl_format import export_dictionary_learning, load_dictionary_learning
from dictionary_learning.suite_io import load_suite, save_suite
from tests.helpers import randomized


def _suite(D=16, F=64, k=4, n_layers=2):
    dicts = {}
    for l in range(n_layers):
        dicts[f"attn_{l}"] = randomized(AutoEncoderTopK(D, F, k), 10 * l)
        dicts[f"mlp_{l}"] = randomized(TopKTranscoder(D, D, F, k), 10 * l + 1)
    return dicts


def test_save_load_bit_exact(tmp_path):
    dicts = _suite()
    conns = {"mlp_1": {"attn_0": torch.randint(-1, 64, (64, 3))}}
    out = tmp_path / "suite"
    save_suite(out, dicts, {"model_name": "tiny", "buffer": {"ctx_len": 32}}, connections=conns)
    save_suite(out, dicts, {"model_name": "tiny", "buffer": {"ctx_len": 32}}, connections=conns)
    assert sorted(os.listdir(tmp_path)) == ["suite"]  # no temp dirs left, replace works
    files = load_suite(out)
    assert set(files.dicts) == set(dicts)
    for n, d in dicts.items():
        e = files.dicts[n]
        assert type(e) is type(d)
        for (k1, a), (k2, b) in zip(d.state_dict().items(), e.state_dict().items()):
            assert k1 == k2 and torch.equal(a, b)
    assert files.meta["model_name"] == "tiny" and files.meta["buffer"]["ctx_len"] == 32
    assert "torch" in files.meta["versions"]
    assert torch.equal(files.connections["mlp_1"]["attn_0"], conns["mlp_1"]["attn_0"])


def test_save_load_bf16(tmp_path):
    dicts = {n: d.to(torch.bfloat16) for n, d in _suite(n_layers=1).items()}
    save_suite(tmp_path / "s", dicts, {})
    files = load_suite(tmp_path / "s", dtype=torch.bfloat16)
    for n, d in dicts.items():
        for a, b in zip(d.parameters(), files.dicts[n].parameters()):
            assert torch.equal(a, b)


def test_bad_names_rejected(tmp_path):
    with pytest.raises(ValueError, match="attn_<layer>"):
        save_suite(tmp_path / "s", {"resid_0": AutoEncoderTopK(4, 8, 2)}, {})
    with pytest.raises(TypeError, match="TopKTranscoder"):
        save_suite(tmp_path / "s", {"mlp_0": AutoEncoderTopK(4, 8, 2)}, {})


def test_missing_and_unexpected_keys_listed(tmp_path):
    from safetensors.torch import load_file, save_file

    save_suite(tmp_path / "s", _suite(n_layers=1), {})
    f = tmp_path / "s" / "model.safetensors"
    t = load_file(str(f))
    del t["mlp_0.b_dec"]
    t["attn_0.extra"] = torch.zeros(1)
    save_file(t, str(f))
    with pytest.raises(KeyError) as e:
        load_suite(tmp_path / "s")
    assert "mlp_0.b_dec" in str(e.value) and "attn_0.extra" in str(e.value)


def _fork_state(D=16, F=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for n in ("attn_0", "mlp_0", "attn_1", "mlp_1"):
        W_dec = torch.randn(D, F, generator=g)
        state[f"aes.{n}.encoder.weight"] = torch.randn(F, D, generator=g)
        state[f"aes.{n}.encoder.bias"] = torch.randn(F, generator=g)
        state[f"aes.{n}.decoder.weight"] = W_dec / W_dec.norm(dim=0)
        state[f"aes.{n}.b_dec"] = torch.randn(D, generator=g)
    return state


@pytest.mark.parametrize("wrapped", [True, False])
def test_original_fork_layout(tmp_path, wrapped):
    D, F, k = 16, 64, 5
    state = _fork_state(D, F)
    cfg = {"submodule_configs": {n: {"activation_dim": D, "dict_size": F, "k": k}
                                 for n in ("attn_0", "mlp_0", "attn_1", "mlp_1")}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    torch.save({"suite_state": state, "step": 3} if wrapped else state, tmp_path / "checkpoint.pt")
    files = load_suite(tmp_path)
    assert isinstance(files.dicts["attn_0"], AutoEncoderTopK)
    assert isinstance(files.dicts["mlp_1"], TopKTranscoder)
    x = torch.randn(32, D, dtype=torch.float64).float()
    for n, d in files.dicts.items():
        W, b = state[f"aes.{n}.encoder.weight"], state[f"aes.{n}.encoder.bias"]
        b_dec, W_dec = state[f"aes.{n}.b_dec"], state[f"aes.{n}.decoder.weight"]
        pre = torch.relu((x - b_dec) @ W.T + b)  # the fork's formula
        vals, idx = pre.topk(k, dim=-1)
        recon_ref = torch.zeros(32, F).scatter(1, idx, vals) @ W_dec.T + b_dec
        recon, feats = d(x, output_features=True)
        ours = feats.dense(F)
        ref = torch.zeros(32, F).scatter(1, idx, vals)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(recon, recon_ref, atol=1e-4, rtol=1e-4)


def test_original_fork_missing_key(tmp_path):
    state = _fork_state()
    del state["aes.mlp_1.b_dec"]
    cfg = {"submodule_configs": {n: {"activation_dim": 16, "dict_size": 64, "k": 4}
                                 for n in ("attn_0", "mlp_0", "attn_1", "mlp_1")}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(KeyError, match="aes.mlp_1.b_dec"):
        load_suite(tmp_path)


def test_hub_id_without_network():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(ConnectionError, match=r"no network.*pass its local path"):
        load_suite("someone/some_suite")
    from trainers.scae import SCAESuite  # the suite class takes the same path

    with pytest.raises(ConnectionError, match=r"no network.*pass its local path"):
        SCAESuite.from_pretrained("jacobcd52/gpt2_suite_folded_ln")


def test_nonexistent_path():
    with pytest.raises(FileNotFoundError, match="not/a/valid/path/at/all"):
        load_suite("./not/a/valid/path/at/all")


# ---- dictionary_learning export ----


def test_dl_roundtrip_and_formula(tmp_path):
    D, F, k = 16, 64, 6
    ae = randomized(AutoEncoderTopK(D, F, k), 3)
    export_dictionary_learning(
        ae, tmp_path / "ae", layer=1, lm_name="tiny", submodule_name="attn_1", ctx_len=64
    )
    cfg = json.loads((tmp_path / "ae" / "config.json").read_text())
    assert cfg["trainer"]["dict_class"] == "AutoEncoderTopK" and cfg["trainer"]["k"] == k
    assert cfg["buffer"]["ctx_len"] == 64
    sd = torch.load(tmp_path / "ae" / "ae.pt", weights_only=True)
    assert set(sd) == {
        "encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"
    }
    assert sd["decoder.weight"].shape == (D, F) and sd["encoder.weight"].shape == (F, D)
    back = load_dictionary_learning(tmp_path / "ae")
    x = torch.randn(64, D)
    r0, f0 = ae(x, output_features=True)
    r1, f1 = back(x, output_features=True)
    torch.testing.assert_close(f0.dense(F), f1.dense(F), atol=1e-5, rtol=1e-5)
    assert torch.equal(f0.dense(F) > 0, f1.dense(F) > 0)
    # dictionary_learning's own formula on the raw tensors
    pre = torch.relu((x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
    vals, idx = pre.topk(int(sd["k"]), dim=-1, sorted=False)
    f_dl = torch.zeros(64, F).scatter(1, idx, vals)
    torch.testing.assert_close(f_dl, f0.dense(F), atol=1e-5, rtol=1e-5)
    recon_dl = f_dl @ sd["decoder.weight"].T + sd["b_dec"]
    torch.testing.assert_close(recon_dl, r0, atol=1e-5, rtol=1e-5)


def test_dl_transcoder_exact_and_wide_refused(tmp_path):
    D, F, k = 8, 16, 2
    tc = randomized(TopKTranscoder(D, D, F, k), 4)
    export_dictionary_learning(tc, tmp_path / "tc", layer=0, lm_name="m", submodule_name="mlp_0",
                               ctx_len=8)
    back = load_dictionary_learning(tmp_path / "tc", transcoder=True)
    assert isinstance(back, TopKTranscoder)
    x = torch.randn(32, D)
    r0, f0 = tc(x, output_features=True)
    r1, f1 = back(x, output_features=True)
    torch.testing.assert_close(f0.dense(F), f1.dense(F), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r0, r1, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="d_out=12"):
        export_dictionary_learning(
            TopKTranscoder(8, 12, 16, 2), tmp_path / "x", layer=0, lm_name="m",
            submodule_name="mlp_0", ctx_len=8,
        )
    assert not (tmp_path / "x").exists()


def test_replace_dir_replaces_and_restores_on_failure(tmp_path, monkeypatch):
    """files.replace_dir, the one atomic folder replace (suites, exports, the embedded model)."""
    from dictionary_learning.files import replace_dir

    out, new = tmp_path / "out", tmp_path / "new"
    out.mkdir()
    (out / "a").write_text("old")
    new.mkdir()
    (new / "a").write_text("new")
    replace_dir(new, out)
    assert (out / "a").read_text() == "new" and not new.exists()
    newer = tmp_path / "newer"
    newer.mkdir()
    real, calls = os.replace, []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the rename of the finished folder onto `out` fails
            raise OSError("simulated")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="simulated"):
        replace_dir(newer, out)
    assert (out / "a").read_text() == "new"  # the previous folder is back
    assert [p.name for p in tmp_path.iterdir() if ".old" in p.name] == []
