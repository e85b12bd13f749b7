"""Cost per finetuning step of each loss option, on the default run's suite and batches.

Prints one JSON line per option set:
  {"options", "step_s", "ratio", "peak_mb", "steps", "tokens", "device"}
and a table. step_s is the median time of TrainerSCAESuite.update over --steps steps (after
--warmup), on the same batches for every option set, in one process; ratio is against the
first set (the pre-issue-15 step: pruned_top off, no KL). peak_mb is the CPU's resident-set
growth while the steps run (ru_maxrss, so it is only comparable when the sets run in order of
growing memory) or torch.cuda.max_memory_allocated.

It uses the default pipeline's pretrained suite and top-C connections from $SCAE_CACHE (they are
computed on first use, about 6 minutes on a 2-core CPU).
Usage: python benchmarks/finetune_options.py [--steps 20] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import resource
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import run_finetuning as rf  # noqa: E402
from dictionary_learning.unembed import Unembed  # noqa: E402
from benchmarks.pruned_forward import sync  # noqa: E402
from trainers.scae import TrainerSCAESuite  # noqa: E402

OPTION_SETS = [
    {"pruned_top": False},
    {"pruned_top": True},
    {"pruned_top": False, "kl_coeff": 1.0},
    {"pruned_top": True, "kl_coeff": 1.0},
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = rf.make_config("tiny", False, device=args.device)
    cache, model, hashes = rf.start(cfg)
    suite, suite_hash = rf.pretrained_suite(cfg, model, cache, hashes, {})
    suite.set_connections(rf.connections_for(cfg, suite, suite_hash, model, cache, hashes, {}))
    buf = rf.make_buffer(cfg, model, cfg.seed + 1)
    batches = [next(buf) for _ in range(args.steps + args.warmup)]
    head = Unembed.from_model(model)
    device = torch.device(cfg.device)
    rows = []
    for options in OPTION_SETS:
        tcfg = replace(cfg.finetune, total_steps=len(batches), **options)
        trainer = TrainerSCAESuite(copy.deepcopy(suite), tcfg, device=cfg.device,
                                   unembed=head if tcfg.kl_coeff > 0 else None)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        times = []
        for step, batch in enumerate(batches):
            sync(device)
            t = time.perf_counter()
            trainer.update(step, batch)
            sync(device)
            if step >= args.warmup:
                times.append(time.perf_counter() - t)
        peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
                else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024)
        row = {"options": options, "step_s": statistics.median(times), "peak_mb": round(peak, 1),
               "steps": len(times), "tokens": cfg.batch_tokens, "device": str(cfg.device)}
        row["ratio"] = row["step_s"] / rows[0]["step_s"] if rows else 1.0
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'options':<44} {'step (s)':>9} {'ratio':>6}")
    for r in rows:
        print(f"{json.dumps(r['options']):<44} {r['step_s']:9.3f} {r['ratio']:6.2f}")


if __name__ == "__main__":
    main()
