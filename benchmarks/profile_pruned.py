"""Where the time of one pruned training step goes: torch.profiler over one step of a
`pruned_forward.py` case, after a warm-up step.

Prints two tables: the phases of the step (record_function labels put around the library's
functions by this script, so the library itself carries no profiling code; forward and backward
of the custom autograd kernels appear under their own names) and the top aten operators by self
time. With --json, one JSON line per row instead.

Usage: python benchmarks/profile_pruned.py [--case g12k-4k] [--mode candidates] [--rows 15]
       [--device cpu] [--which pruned|vanilla]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dictionary_learning.dictionary as dictionary  # noqa: E402
import dictionary_learning.suite as suite_mod  # noqa: E402
import trainers.scae as scae  # noqa: E402
import trainers.top_k as top_k  # noqa: E402
from benchmarks.pruned_forward import CASES, DTYPES, build, make_step, sync  # noqa: E402

# (module, attribute, label): the phases of a step
PHASES = [
    (suite_mod.SCAESuite, "vanilla_one", "vanilla pass (encode, TopK, decode)"),
    (suite_mod.SCAESuite, "candidates", "candidate selection"),
    (suite_mod.SCAESuite, "_pruned_pre", "pruned pre-activations (all of it)"),
    (suite_mod, "virtual_weights", "  virtual weights"),
    (suite_mod, "connection_contrib_candidates", "  connection term, candidates"),
    (suite_mod, "connection_contrib_all", "  connection term, all features"),
    (scae, "auxk_loss", "AuxK loss"),
    (top_k, "auxk_loss", "AuxK loss"),
    (dictionary, "top_indices", "TopK's choice (top_indices)"),
    (suite_mod, "top_indices", "TopK's choice (top_indices)"),
    (dictionary, "sparse_decode", "sparse decode (rows_sum)"),
]


def label_phases() -> None:
    """Wrap each phase's function in a record_function label (this process only)."""
    for owner, name, label in PHASES:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def wrapped(*args, _fn=fn, _label=label, **kwargs):
            with record_function(_label):
                return _fn(*args, **kwargs)

        setattr(owner, name, wrapped)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default="g12k-4k", choices=list(CASES))
    p.add_argument("--mode", default="candidates", choices=["candidates", "all"])
    p.add_argument("--which", default="pruned", choices=["pruned", "vanilla"])
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--json", action="store_true", help="JSON lines instead of tables")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    label_phases()
    suite, batch = build(args.case, device, dtype)
    step = make_step(args.which, args.mode, suite, batch, device, dtype)
    step()  # warm-up
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        with record_function("step"):
            step()
        sync(device)
    events = prof.key_averages()
    total = next(e for e in events if e.key == "step").cpu_time_total
    labels = {label for _, _, label in PHASES}
    backward = sorted((e for e in events
                       if e.key.startswith("autograd::engine::evaluate_function")),
                      key=lambda e: -e.cpu_time_total)[:8]
    phases = sorted([e for e in events if e.key in labels] + backward,
                    key=lambda e: -e.cpu_time_total)
    ops = sorted((e for e in events if e.key.startswith("aten::")),
                 key=lambda e: -e.self_cpu_time_total)
    head = {"case": args.case, "mode": args.mode, "which": args.which, "device": str(device),
            "dtype": args.dtype, "step_s": round(total / 1e6, 3)}
    if args.json:
        print(json.dumps(head))
        tables = (("phase", phases, "cpu_time_total"),
                  ("op", ops[: args.rows], "self_cpu_time_total"))
        for kind, rows, attr in tables:
            for e in rows:
                t = getattr(e, attr)
                name = e.key.replace("autograd::engine::evaluate_function: ", "backward: ").strip()
                print(json.dumps({"kind": kind, "name": name, "s": round(t / 1e6, 3),
                                  "share": round(t / total, 3), "calls": e.count}))
        return
    print(f"# {json.dumps(head)}")
    print("| phase (inclusive time) | s | share of step | calls |\n|---|---|---|---|")
    for e in phases:
        name = e.key.replace("autograd::engine::evaluate_function: ", "backward: ").strip()
        t = e.cpu_time_total
        print(f"| {name} | {t / 1e6:.3f} | {t / total:.1%} | {e.count} |")
    print("\n| aten operator (self time) | s | share of step | calls |\n|---|---|---|---|")
    for e in ops[: args.rows]:
        t = e.self_cpu_time_total
        print(f"| `{e.key}` | {t / 1e6:.3f} | {t / total:.1%} | {e.count} |")


if __name__ == "__main__":
    main()
