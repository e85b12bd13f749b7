"""benchmarks/seed_spread.py: exact statistics over per-seed reports; mixed settings refused."""

import json

import pytest

from benchmarks.seed_spread import format_tables, load_reports, spread


def fake_report(seed: int, fvu: float, ce: float, **config) -> dict:
    mods = {"attn_0": {"fvu_vanilla": fvu, "fvu_pruned": fvu, "dead_frac": 0.1 * seed},
            "mlp_0": {"fvu_vanilla": 2 * fvu, "fvu_pruned": 3 * fvu, "dead_frac": 0.0}}
    ces = {"clean": 5.0, "vanilla": ce, "pruned": ce + 0.1, "recovered_vanilla": 0.9,
           "recovered_pruned": 0.8}
    return {"modules": mods, "ce": ces, "before_finetuning": {"modules": mods, "ce": ces},
            "config": {"seed": seed, "C": 32, **config}}


def write(tmp_path, reports):
    paths = []
    for i, r in enumerate(reports):
        (tmp_path / f"s{i}").mkdir()
        (tmp_path / f"s{i}" / "report.json").write_text(json.dumps(r))
        paths.append(str(tmp_path / f"s{i}"))
    return paths


def test_mean_sd_range(tmp_path):
    paths = write(tmp_path, [fake_report(0, 0.1, 5.5), fake_report(1, 0.3, 5.7),
                             fake_report(2, 0.2, 5.6)])
    out = spread(load_reports(paths))
    assert out["seeds"] == [0, 1, 2]
    s = out["finetuned"]["modules"]["mlp_0"]["fvu_pruned"]
    assert s["mean"] == pytest.approx(0.6) and s["sd"] == pytest.approx(0.3)
    assert s["range"] == pytest.approx(0.6)
    assert out["finetuned"]["ce"]["vanilla"]["mean"] == pytest.approx(5.6)
    assert "random_connections" not in out  # absent from the reports: skipped
    assert "| mlp_0 | 0.4000 ± 0.2000 (0.4000) |" in format_tables(out)


def test_refuses_reports_with_other_settings(tmp_path):
    paths = write(tmp_path, [fake_report(0, 0.1, 5.5), fake_report(1, 0.2, 5.6, C=16)])
    with pytest.raises(ValueError, match=r"\['C'\]"):
        load_reports(paths)
    with pytest.raises(ValueError, match="at least two"):
        load_reports(paths[:1])
