"""Issue 11: every pipeline stage's cache key covers everything its output depends on (contents,
not paths), report.json records each stage's key and whether it came from the cache, and a stage
is computed once under a lock when two runs share a cache."""

import functools
import json
import shutil
import threading
import time
from dataclasses import replace

import pytest
import torch

import evaluate
import run_finetuning
from dictionary_learning import logger
from dictionary_learning.cache import content_hash, run_stage, stage_lock, tensors_hash
from dictionary_learning.connections import load_connections, save_connections
from tests.helpers import random_texts, tiny_hf_gpt2, tiny_tokenizer

STAGES = ("pretrain", "connections", "finetune_top", "finetune_random")


def test_content_hash_follows_content_not_path(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "x.txt").write_text("hello")
    (a / ".x.txt.tmp123").write_text("a temp file is not content")
    shutil.copytree(a, b)
    assert content_hash(a) == content_hash(b)
    (b / "x.txt").write_text("hellO")
    assert content_hash(a) != content_hash(b)
    t = {"m": {"u": torch.arange(6).view(2, 3)}}
    assert tensors_hash(t) == tensors_hash({"m": {"u": torch.arange(6).view(2, 3)}})
    assert tensors_hash(t) != tensors_hash({"m": {"u": torch.arange(6).view(3, 2)}})


def test_second_process_waits_for_the_lock_then_reuses(tmp_path, caplog):
    """A holder (another run) computes the stage; run_stage waits with a message, then reuses."""
    out, locks = tmp_path / "stage", tmp_path / "locks"
    held = threading.Event()

    def other_run():
        with stage_lock(locks / "stage.lock"):
            held.set()
            deadline = time.monotonic() + 30
            while not any("waiting for the lock" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            out.write_text("done")  # the other run finishes the stage, then releases

    t = threading.Thread(target=other_run)
    t.start()
    held.wait()
    computed = []
    with caplog.at_level("WARNING"):
        rec = run_stage(out, "k", out.is_file, lambda: computed.append(1), locks)
    t.join()
    assert rec.cached and not computed
    msg = next(r.getMessage() for r in caplog.records if "waiting" in r.getMessage())
    assert str(locks / "stage.lock") in msg and "another process (pid" in msg


# ---------------------------------------------------------------- the pipeline, input by input


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage_cache")
    model = root / "model"
    tiny_hf_gpt2(n_layer=1, d_model=16, n_head=2, n_ctx=32).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    (root / "train.txt").write_text("\n".join(random_texts(300, seed=1, min_len=20, max_len=40)))
    (root / "eval.txt").write_text("\n".join(random_texts(40, seed=2, min_len=20, max_len=40)))
    return root


def tiny_cfg(world, **kw):
    cfg = run_finetuning.make_config(
        "tiny", model=str(world / "model"), data=str(world / "train.txt"),
        eval_data=str(world / "eval.txt"), device="cpu", ctx_len=17, dict_size=16, k=2,
        pretrain_steps=2, C=4, connection_tokens=128, finetune_steps=2, batch_tokens=32,
        buffer_tokens=128, eval_tokens=64,
    )
    cfg = replace(cfg, finetune=replace(cfg.finetune, n_threshold=4, n_random=0), **kw)
    return cfg


def run(world, monkeypatch, **kw) -> dict:
    """Run the pipeline; return {stage: cached} as report.json records it."""
    monkeypatch.setenv("SCAE_CACHE", str(world / "cache"))
    # plots take most of a tiny run's time and are no stage's input
    monkeypatch.setattr(run_finetuning, "report", functools.partial(evaluate.report, plots=False))
    monkeypatch.setattr(logger, "plot_curves", lambda *a: None)
    out = world / "out"
    run_finetuning.run(tiny_cfg(world, **kw), out)
    rep = json.loads((out / "report.json").read_text())
    for r in rep["stages"].values():
        assert set(r) == {"key", "cached", "dir"} and len(r["key"]) == 16
    return {name: r["cached"] for name, r in rep["stages"].items()}


def recomputed(stages: dict) -> set:
    return {name for name, cached in stages.items() if not cached}


def test_each_input_recomputes_exactly_its_dependent_stages(world, monkeypatch):
    assert recomputed(run(world, monkeypatch)) == set(STAGES)
    assert recomputed(run(world, monkeypatch)) == set()  # warm: all from the cache

    # finetuning settings: only the finetune stages
    assert recomputed(run(world, monkeypatch, finetune_steps=3)) == {
        "finetune_top", "finetune_random"}
    # C and the connection variant: the search and what depends on it
    assert recomputed(run(world, monkeypatch, C=3)) == {
        "connections", "finetune_top", "finetune_random"}
    assert recomputed(run(world, monkeypatch, variant="all")) == {
        "connections", "finetune_top", "finetune_random"}
    # the context length, the data's content (same path) and the model's content: everything
    assert recomputed(run(world, monkeypatch, ctx_len=9)) == set(STAGES)
    with open(world / "train.txt", "a") as fh:
        fh.write("\none more document of training text")
    assert recomputed(run(world, monkeypatch)) == set(STAGES)
    tiny_hf_gpt2(n_layer=1, d_model=16, n_head=2, n_ctx=32, seed=5).save_pretrained(world / "model")
    assert recomputed(run(world, monkeypatch)) == set(STAGES)


def test_given_suite_and_connections_are_keyed_by_content(world, monkeypatch):
    monkeypatch.setenv("SCAE_CACHE", str(world / "cache"))
    run(world, monkeypatch)
    rep = json.loads((world / "out" / "report.json").read_text())
    pretrained = rep["stages"]["pretrain"]["dir"] + "/suite"

    # the same suite content at another path: nothing downstream recomputes
    suite = world / "my_suite"
    shutil.copytree(pretrained, suite, dirs_exist_ok=True)
    assert run(world, monkeypatch, suite=str(suite)) == {
        "connections": True, "finetune_top": True, "finetune_random": True}
    # the suite's content changes at the same path: its dependent stages recompute
    from safetensors.torch import load_file, save_file

    w = load_file(str(suite / "model.safetensors"))
    w["mlp_0.encoder.bias"] += 0.5
    save_file(w, str(suite / "model.safetensors"))
    assert recomputed(run(world, monkeypatch, suite=str(suite))) == {
        "connections", "finetune_top", "finetune_random"}

    # a connections file: the same content is a hit, a changed file at the same path is not
    conns_path = world / "conns.pt"
    shutil.copy(rep["stages"]["connections"]["dir"], conns_path)
    assert run(world, monkeypatch, connections=str(conns_path)) == {
        "pretrain": True, "finetune_top": True, "finetune_random": True}
    conns = load_connections(conns_path)
    conns["mlp_0"] = {u: torch.full_like(t, -1) for u, t in conns["mlp_0"].items()}  # none left
    save_connections(conns, conns_path)
    assert recomputed(run(world, monkeypatch, connections=str(conns_path))) == {
        "finetune_top", "finetune_random"}
    rep = json.loads((world / "out" / "report.json").read_text())
    assert rep["inputs"]["connections"] == tensors_hash(load_connections(conns_path))


def test_two_processes_compute_a_stage_once(tmp_path):
    """Two real processes race for one stage: one computes it, the other waits and reuses it."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    script = textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from dictionary_learning.cache import run_stage
        out, log = Path(sys.argv[1]), Path(sys.argv[2])
        def compute():
            with open(log, "a") as fh:
                fh.write("computed\\n")
            time.sleep(1.0)  # long enough for the other process to reach the lock
            out.write_text("result")
        rec = run_stage(out, "k", out.is_file, compute, out.parent / "locks")
        print("cached" if rec.cached else "computed")
    """)
    args = [sys.executable, "-c", script, str(tmp_path / "stage"), str(tmp_path / "log")]
    procs = [subprocess.Popen(args, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    assert sorted(o.strip() for o, _ in outs) == ["cached", "computed"]
    assert (tmp_path / "log").read_text() == "computed\n"
