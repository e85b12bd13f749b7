"""Run-to-run spread across seeds: mean and spread of every figure of run_finetuning reports.

Produce one report per seed (cold or warm: a run reproduces bit for bit at the same settings),
then aggregate them:

    for s in 0 1 2; do python run_finetuning.py --seed $s --out runs/seed$s; done
    python benchmarks/seed_spread.py runs/seed0 runs/seed1 runs/seed2 --out runs/seed_spread.json

Prints a markdown table per suite (finetuned with top-C connections, before finetuning, finetuned
with random connections): per dictionary the mean, the sample standard deviation and the range
(max - min) of FVU vanilla, FVU pruned and the dead fraction, then the same for the CE figures.
A later change that moves a figure by less than this spread is not distinguishable from a reseed.
Reports whose settings differ in anything but the seed are refused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODULE_FIGURES = ("fvu_vanilla", "fvu_pruned", "dead_frac")
CE_FIGURES = ("clean", "vanilla", "pruned", "recovered_vanilla", "recovered_pruned")
SUITES = {"finetuned": None, "before_finetuning": "before_finetuning",
          "random_connections": "random_connections"}
"""Suite label -> key of its section in report.json (None: the top level)."""


def load_reports(paths: list[str]) -> list[dict]:
    """report.json files (or folders holding one); all with the same settings but the seed."""
    reports = []
    for p in map(Path, paths):
        f = p / "report.json" if p.is_dir() else p
        if not f.is_file():
            raise FileNotFoundError(f"{f} does not exist; pass report.json files or run folders")
        reports.append(json.loads(f.read_text()))
    if len(reports) < 2:
        raise ValueError("a spread needs at least two reports (seeds)")

    def settings(r: dict) -> dict:
        return {k: v for k, v in r.get("config", {}).items() if k not in ("seed",)}

    for p, r in zip(paths[1:], reports[1:]):
        diff = sorted(k for k in set(settings(r)) | set(settings(reports[0]))
                      if settings(r).get(k) != settings(reports[0]).get(k))
        if diff:
            raise ValueError(f"{p} differs from {paths[0]} in {diff}, not only in the seed; "
                             "compare runs at the same settings")
    return reports


def stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values),
            "range": max(values) - min(values), "values": values}


def spread(reports: list[dict]) -> dict:
    """{suite: {"modules": {dict: {figure: stats}}, "ce": {figure: stats}}}, seeds listed."""
    out: dict = {"seeds": [r.get("config", {}).get("seed") for r in reports]}
    for label, key in SUITES.items():
        sections = [r if key is None else r.get(key) for r in reports]
        if any(s is None for s in sections):
            continue
        names = list(sections[0]["modules"])
        out[label] = {
            "modules": {
                n: {f: stats([s["modules"][n][f] for s in sections]) for f in MODULE_FIGURES}
                for n in names
            },
            "ce": {f: stats([s["ce"][f] for s in sections]) for f in CE_FIGURES},
        }
    return out


def _cell(s: dict, scale: float = 1.0, digits: int = 4) -> str:
    return (f"{s['mean'] * scale:.{digits}f} ± {s['sd'] * scale:.{digits}f} "
            f"({s['range'] * scale:.{digits}f})")


def format_tables(result: dict) -> str:
    """Markdown tables: mean ± sample sd (range) over the seeds."""
    lines = [f"seeds {result['seeds']}; cells: mean ± sample sd (max - min)"]
    for label in SUITES:
        if label not in result:
            continue
        r = result[label]
        lines += ["", f"**{label}**", "",
                  "| dictionary | FVU vanilla | FVU pruned | dead % |", "|---|---|---|---|"]
        for n, m in r["modules"].items():
            lines.append(f"| {n} | {_cell(m['fvu_vanilla'])} | {_cell(m['fvu_pruned'])} | "
                         f"{_cell(m['dead_frac'], 100, 1)} |")
        lines += ["", "| CE | " + " | ".join(CE_FIGURES) + " |", "|---|" + "---|" * len(CE_FIGURES),
                  "| nats / fraction | " + " | ".join(_cell(r["ce"][f]) for f in CE_FIGURES) + " |"]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reports", nargs="+", help="report.json files or run folders (one per seed)")
    p.add_argument("--out", help="write the aggregate as JSON here")
    args = p.parse_args(argv)
    result = spread(load_reports(args.reports))
    print(format_tables(result))
    if args.out:
        from dictionary_learning.files import atomic_write_json

        atomic_write_json(args.out, result)
        print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
