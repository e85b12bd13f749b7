"""run_finetuning's C sweep (--sweep-C) and refinement rounds (--refine), on a tiny local model."""

import functools
import json

import pytest

import evaluate
import run_finetuning
from dictionary_learning import logger
from dictionary_learning.connections import load_connections
from tests.test_stage_cache import tiny_cfg, world  # noqa: F401  (world is a fixture)


@pytest.fixture
def quiet(world, monkeypatch):  # noqa: F811
    monkeypatch.setenv("SCAE_CACHE", str(world / "cache"))
    monkeypatch.setattr(run_finetuning, "report", functools.partial(evaluate.report, plots=False))
    monkeypatch.setattr(logger, "plot_curves", lambda *a: None)
    return world


def test_sweep_rows_match_the_pipeline_and_new_Cs_compute_only_themselves(quiet):
    root = quiet
    out = root / "sweep"
    res = run_finetuning.sweep(tiny_cfg(root), [4, 2], out)
    assert [r["C"] for r in res["rows"]] == [2, 4]
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["rows"] == res["rows"]
    assert (out / "sweep.png").stat().st_size > 0
    table = (out / "sweep.md").read_text()
    assert table.count("\n| 2 | ") == 2 and table.count("\n| 4 | ") == 2  # top and random rows

    # the sweep's C=4 row is the pipeline's own evaluation of the same cached stages
    rep = run_finetuning.run(tiny_cfg(root, C=4), root / "run")
    mlp = [m for n, m in rep["modules"].items() if n.startswith("mlp_")]
    row = res["rows"][1]
    assert row["top"]["after"]["mean_fvu_pruned"] == pytest.approx(
        sum(m["fvu_pruned"] for m in mlp) / len(mlp), rel=1e-12)
    assert row["top"]["after"]["ce_recovered_pruned"] == pytest.approx(
        rep["ce"]["recovered_pruned"], rel=1e-12)
    assert not any(rep["stages"][s]["cached"] is False for s in ("connections", "finetune_top"))

    # a longer list: the known Cs come from the cache, the new one is computed
    res = run_finetuning.sweep(tiny_cfg(root), [2, 3, 4], out)
    cached = {r["C"]: all(r["cached"].values()) for r in res["rows"]}
    assert cached == {2: True, 3: False, 4: True}

    # the finetuning-length sweep at the default length (2 steps, C 4) is the same cached stage
    steps = run_finetuning.sweep(tiny_cfg(root), [2], out, param="finetune_steps", random=False)
    assert steps["rows"][0]["cached"] == {"connections": True, "finetune_top": True}
    assert "random" not in steps["rows"][0]
    assert steps["rows"][0]["top"] == res["rows"][-1]["top"]
    assert (out / "sweep_steps.png").stat().st_size > 0

    with pytest.raises(ValueError, match="give positive values"):
        run_finetuning.sweep(tiny_cfg(root), [0, 8], out)
    with pytest.raises(ValueError, match="drop --connections"):
        run_finetuning.sweep(tiny_cfg(root, connections="conns.pt"), [8], out)
    with pytest.raises(ValueError, match="cannot sweep 'k'"):
        run_finetuning.sweep(tiny_cfg(root), [8], out, param="k")


def test_sweep_flag_parses_a_list():
    assert run_finetuning.int_list("8,16, 32") == [8, 16, 32]
    with pytest.raises(SystemExit):
        run_finetuning.main(["--sweep-C", "8,x"])


def test_refine_recomputes_connections_on_the_finetuned_suite(quiet):
    root = quiet
    rep = run_finetuning.run(tiny_cfg(root, refine=1), root / "refine")
    stages = rep["stages"]
    assert {"connections_refine1", "finetune_refine1"} <= set(stages)
    # the refined connections are the top-C of the round-0 finetuned suite: another suite, so
    # another cache entry than the pretrained suite's connections
    assert stages["connections_refine1"]["key"] != stages["connections"]["key"]
    refined = load_connections(stages["connections_refine1"]["dir"])
    for m, ups in refined.items():  # C = 4 slots per feature, over the transcoder's upstream
        per_feature = sum((J >= 0).sum(1) for J in ups.values())
        assert int(per_feature.max()) <= 4, m
    # the delivered suite is the refinement round's
    assert rep["artifacts"]["finetune_cache"] == stages["finetune_refine1"]["dir"]
    again = run_finetuning.run(tiny_cfg(root, refine=1), root / "refine")
    assert all(r["cached"] for r in again["stages"].values())
    assert again["digests"] == rep["digests"]
