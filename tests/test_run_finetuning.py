"""The main job end to end on the gpt2 preset's code path, with local stand-ins for the Hub:
a saved GPT-2-shaped model, a suite in the original SCAE fork's layout, and local text files."""

import json

import pytest
import torch

from tests.helpers import random_texts, tiny_hf_gpt2, tiny_hf_model, tiny_tokenizer

D, F, K, N_LAYERS = 32, 64, 4, 2


def write_fork_suite(folder):
    """A suite as the original fork saved it on the Hub: config.json + checkpoint.pt."""
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    state, cfg = {}, {}
    for layer in range(N_LAYERS):
        for n in (f"attn_{layer}", f"mlp_{layer}"):
            W_dec = torch.randn(D, F, generator=g)
            state[f"aes.{n}.decoder.weight"] = W_dec / W_dec.norm(dim=0)
            state[f"aes.{n}.encoder.weight"] = (W_dec / W_dec.norm(dim=0)).T.clone()
            state[f"aes.{n}.encoder.bias"] = torch.zeros(F)
            state[f"aes.{n}.b_dec"] = torch.zeros(D)
            cfg[n] = {"activation_dim": D, "dict_size": F, "k": K}
    (folder / "config.json").write_text(json.dumps({"submodule_configs": cfg}))
    torch.save({"suite_state": state}, folder / "checkpoint.pt")


def test_gpt2_preset_code_path_with_local_stand_ins(tmp_path, monkeypatch):
    monkeypatch.setenv("SCAE_CACHE", str(tmp_path / "cache"))
    model_dir = tmp_path / "gpt2-local"
    tiny_hf_gpt2(n_layer=N_LAYERS, d_model=D, n_ctx=32).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    write_fork_suite(tmp_path / "suite")
    train_texts = random_texts(800, seed=1, min_len=20, max_len=60)
    (tmp_path / "train.txt").write_text("\n".join(train_texts))
    (tmp_path / "eval.txt").write_text("\n".join(random_texts(100, seed=2, min_len=20, max_len=60)))

    import run_finetuning

    argv = ["--preset", "gpt2", "--quick", "--out", str(tmp_path / "out"),
            "--model", str(model_dir), "--suite", str(tmp_path / "suite"),
            "--data", str(tmp_path / "train.txt"),
            "--eval-data", str(tmp_path / "eval.txt"), "--ctx-len", "32", "--steps", "6"]
    run_finetuning.main(argv)
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(rep["modules"]) == {
        f"{k}_{layer}" for layer in range(N_LAYERS) for k in ("attn", "mlp")
    }
    for m in rep["modules"].values():
        assert {"fvu_vanilla", "fvu_pruned", "l0", "dead_frac"} <= set(m)
    ce_keys = {"clean", "ablated", "vanilla", "pruned", "recovered_vanilla", "recovered_pruned"}
    assert ce_keys <= set(rep["ce"])
    assert set(rep["before_finetuning"]) == {"modules", "ce"}
    assert set(rep["random_connections"]) == {"modules", "ce"}
    assert rep["config"]["model"] == str(model_dir) and rep["config"]["C"] == 16
    stages = {"model", "pretrain", "connections", "finetune", "finetune_random", "evaluate"}
    assert stages <= set(rep["timings_s"])
    # the products: the finetuned suite, feature pages and circuits, all named in report.json
    art = rep["artifacts"]
    for k in ("suite", "feature_pages", "circuits", "viewer", "report", "finetuned",
              "before_finetuning", "random_connections", "finetune_cache"):
        assert (tmp_path / "out").joinpath(art[k]).exists(), k
    from pathlib import Path

    from dictionary_learning.suite import SCAESuite

    # each training stage's curves (loss, FVU, dead fraction) are copied next to the report
    assert set(art["training_curves"]) == {"finetune_top", "finetune_random"}
    for png in art["training_curves"].values():
        assert Path(png).parent == tmp_path / "out" / "training_curves"
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out_suite = SCAESuite.from_pretrained(art["suite"])
    assert out_suite.has_connections and Path(out_suite.meta["model_name"]) == model_dir
    assert Path(art["viewer"]) == tmp_path / "out" / "circuits" / "index.html"
    index = json.loads((tmp_path / "out" / "circuits" / "graph-metadata.json").read_text())
    assert len(index["graphs"]) == 2
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "pipeline").iterdir())
    assert cached == ["connections", "finetune", "finetune"]  # no pretraining: the suite was given
    computed = {"connections", "finetune_top", "finetune_random"}
    assert set(rep["stages"]) == computed and not any(r["cached"] for r in rep["stages"].values())
    # finetuning through the pruned pass lowered the transcoders' pruned FVU
    mlp = [n for n in rep["modules"] if n.startswith("mlp_")]
    before = sum(rep["before_finetuning"]["modules"][n]["fvu_pruned"] for n in mlp) / len(mlp)
    after = sum(rep["modules"][n]["fvu_pruned"] for n in mlp) / len(mlp)
    assert after < before, (before, after)

    run_finetuning.main(argv)  # a second run reuses every cached stage
    rep2 = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(rep2["stages"]) == computed and all(r["cached"] for r in rep2["stages"].values())
    assert rep2["modules"] == rep["modules"]


@pytest.mark.parametrize("preset, family, arch", [
    ("pythia-70m", "neox_parallel", {"family": "gpt_neox", "parallel": True, "centred": True}),
    ("qwen2.5-0.5b", "qwen2", {"family": "qwen2", "parallel": False, "centred": False}),
])
def test_hub_family_presets_code_path_with_a_local_model(tmp_path, monkeypatch, preset, family,
                                                         arch):
    """The pythia-70m and qwen2.5-0.5b presets end to end (pretraining included) on a locally saved
    tiny model of the same family: the suite records the family, parallel blocks' connections
    leave attn_L out of mlp_L's upstream set, and finetuning lowers the pruned FVU."""
    monkeypatch.setenv("SCAE_CACHE", str(tmp_path / "cache"))
    model_dir = tmp_path / f"{family}-local"
    tiny_hf_model(family, n_layer=N_LAYERS, d_model=D, n_ctx=32).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    (tmp_path / "train.txt").write_text("\n".join(random_texts(800, seed=1, min_len=20,
                                                               max_len=60)))
    (tmp_path / "eval.txt").write_text("\n".join(random_texts(100, seed=2, min_len=20,
                                                              max_len=60)))

    import run_finetuning
    from dictionary_learning.suite import SCAESuite

    cfg = run_finetuning.make_config(preset)
    assert cfg.model == run_finetuning.HUB_PRESETS[preset][0] and cfg.data == "openwebtext"
    # smaller budgets through the file's constants, as a user would set them
    monkeypatch.setattr(run_finetuning, "PRETRAIN_STEPS", 12)
    monkeypatch.setattr(run_finetuning, "EVAL_TOKENS", 512)
    out = tmp_path / "out"
    run_finetuning.main(["--preset", preset, "--quick", "--out", str(out),
                         "--model", str(model_dir), "--data", str(tmp_path / "train.txt"),
                         "--eval-data", str(tmp_path / "eval.txt"), "--ctx-len", "32",
                         "--steps", "6"])
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["model"] == str(model_dir) and rep["config"]["dict_size"] == 256
    assert rep["config"]["pretrain_steps"] == 12
    assert {"pretrain", "connections", "finetune_top", "finetune_random"} == set(rep["stages"])
    suite = SCAESuite.from_pretrained(rep["artifacts"]["suite"])
    assert suite.arch.to_meta() == arch
    conns = suite.connections
    assert ("attn_1" in conns["mlp_1"]) is not arch["parallel"]
    assert conns["mlp_0"] == {} if arch["parallel"] else set(conns["mlp_0"]) == {"attn_0"}
    mlp = [n for n in rep["modules"] if n.startswith("mlp_")]
    before = sum(rep["before_finetuning"]["modules"][n]["fvu_pruned"] for n in mlp)
    assert sum(rep["modules"][n]["fvu_pruned"] for n in mlp) < before
    index = json.loads((out / "circuits" / "graph-metadata.json").read_text())
    assert len(index["graphs"]) == 2
