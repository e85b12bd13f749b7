"""Cost of the pruned SCAE pass against the vanilla pass of the same suite and batch.

Prints one JSON line per (case, mode):
  {"case", "tokens", "F", "mode", "vanilla_s", "pruned_s", "ratio",
   "vanilla_peak_mb", "pruned_peak_mb", "mem_ratio", "device", "backward"}

mode "candidates" (training): one whole training step's loss and its backward.
  vanilla = TopKSuiteTrainer.losses(batch) summed, backward  (vanilla FVU + AuxK of every
            dictionary)
  pruned  = TrainerSCAESuite.losses(batch) summed, backward  (vanilla pass + pruned pass in
            candidates mode with n_threshold = n_random = 100, FVU_v + FVU_p + penalty)
mode "all" (evaluation, forward only, no_grad, "backward": false):
  vanilla = suite.vanilla_forward(batch)
  pruned  = suite.pruned_forward(batch, mode="all")  (vanilla pass + every feature of every
            transcoder)

Timings are the median of --repeats runs after one warm-up, in one process, the vanilla and
the pruned step taking turns. Peak memory is
measured on CPU in a fresh subprocess per (case, mode, pass), with glibc's mmap threshold fixed
(freed tensors leave RSS at once), whose kernel high-water mark VmHWM is reset
(/proc/self/clear_refs) after building the suite and the batch, the peak being VmHWM - VmRSS at
that point; on CUDA in this process after a warm-up run of the same pass,
torch.cuda.max_memory_allocated after reset_peak_memory_stats minus the allocation before.

Suites are random (weights, connections spread over the upstream modules like a top-C choice,
Gaussian activations, so TopK gives K active features per token). Cases:
  default      d 128, 4 layers, F 1024, K 16, C 32, 1024 tokens  (the embedded suite's size)
  g12k-1k      d 768, 2 layers, F 12288, K 32, C 100, 1024 tokens (gpt2-small widths)
  g12k-4k      same, 4096 tokens
  g24k-1k      F 24576, 1024 tokens
  g24k-4k      F 24576, 4096 tokens
Usage: python benchmarks/pruned_forward.py [--quick] [--cases default,g12k-4k] [--modes candidates]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dictionary_learning.batch import ActivationBatch  # noqa: E402
from dictionary_learning.connections import upstream_names  # noqa: E402
from dictionary_learning.dictionary import AutoEncoderTopK, TopKTranscoder  # noqa: E402
from dictionary_learning.suite import SCAESuite  # noqa: E402
from trainers.scae import SCAETrainerConfig, TrainerSCAESuite  # noqa: E402
from trainers.top_k import TopKSuiteTrainer, TopKTrainerConfig  # noqa: E402

CASES = {
    "default": dict(d=128, layers=4, F=1024, k=16, C=32, tokens=1024),
    "g12k-1k": dict(d=768, layers=2, F=12288, k=32, C=100, tokens=1024),
    "g12k-4k": dict(d=768, layers=2, F=12288, k=32, C=100, tokens=4096),
    "g24k-1k": dict(d=768, layers=2, F=24576, k=32, C=100, tokens=1024),
    "g24k-4k": dict(d=768, layers=2, F=24576, k=32, C=100, tokens=4096),
}
QUICK = ["default", "g12k-1k"]
N_THRESHOLD = N_RANDOM = 100


def random_connections(suite: SCAESuite, C: int, g: torch.Generator, block: int = 1024) -> dict:
    """C distinct upstream features per downstream feature, drawn uniformly from all upstream
    modules together (so the per-module counts vary per feature, like a shared top-C budget).
    The scores are drawn on the generator's device (a GPU draws the F x n_up scores in no time)."""
    sizes = suite.dict_sizes
    conns = {}
    for m in suite.transcoder_names:
        ups = upstream_names(m)
        n_up = sum(sizes[u] for u in ups)
        rows = []
        for lo in range(0, sizes[m], block):
            n = min(block, sizes[m] - lo)
            scores = torch.rand(n, n_up, generator=g, device=g.device)
            rows.append(scores.topk(min(C, n_up), dim=1).indices.cpu())
        glob = torch.cat(rows)
        conns[m], off = {}, 0
        for u in ups:
            mine = (glob >= off) & (glob < off + sizes[u])
            width = int(mine.sum(1).max())
            local = torch.where(mine, glob - off, -1)
            order = (~mine).to(torch.int8).argsort(dim=1, stable=True)
            conns[m][u] = local.gather(1, order)[:, :width]
            off += sizes[u]
    return conns


def build(case: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    c = CASES[case]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    d, L, F, k, B = c["d"], c["layers"], c["F"], c["k"], c["tokens"]
    dicts = {}
    for layer in range(L):
        dicts[f"attn_{layer}"] = AutoEncoderTopK(d, F, k)
        dicts[f"mlp_{layer}"] = TopKTranscoder(d, d, F, k)
    suite = SCAESuite(dicts)
    # connections from a generator on the device (the same draws as before on CPU)
    g_conn = g if device.type == "cpu" else torch.Generator(device=device).manual_seed(seed)
    suite.set_connections(random_connections(suite, c["C"], g_conn))
    suite = suite.to(device=device, dtype=dtype)
    src, tgt, scale = {}, {}, {}
    x0 = torch.randn(B, d, generator=g)
    for layer in range(L):
        a = torch.randn(B, d, generator=g)
        src[f"attn_{layer}"] = tgt[f"attn_{layer}"] = a
        src[f"mlp_{layer}"] = torch.randn(B, d, generator=g)
        tgt[f"mlp_{layer}"] = torch.randn(B, d, generator=g)
        scale[f"mlp_{layer}"] = 1.0 + torch.rand(B, generator=g)
    batch = ActivationBatch(x0, src, tgt, scale).to(device, dtype)
    return suite, batch


def make_step(which: str, mode: str, suite: SCAESuite, batch, device, dtype):
    """A closure running one measured pass."""
    if mode == "candidates":
        if which == "vanilla":
            tr = TopKSuiteTrainer(dict(suite.dicts.items()), TopKTrainerConfig(total_steps=10),
                                  device, dtype)
        else:
            cfg = SCAETrainerConfig(total_steps=10, n_threshold=N_THRESHOLD, n_random=N_RANDOM,
                                    pruned_top=False, kl_coeff=0.0)
            tr = TrainerSCAESuite(suite, cfg, device, dtype)
        params = [p for d in suite.dicts.values() for p in d.parameters()]

        def step():
            for p in params:
                p.grad = None
            losses, _, _ = tr.losses(batch)
            sum(losses.values()).backward()

        return step

    @torch.no_grad()
    def step():
        if which == "vanilla":
            suite.vanilla_forward(batch)
        else:
            suite.pruned_forward(batch, mode="all")

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(steps: dict, device, repeats: int) -> dict:
    """Median seconds of each step over `repeats` runs after one warm-up each, the steps taking
    turns (v, p, v, p, ...): this CPU's speed drifts by up to ±20 % over minutes, which runs of
    one step after all runs of the other would put into their ratio."""
    for step in steps.values():
        step()  # warm-up
        sync(device)
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def cuda_peak_mb(step, suite: SCAESuite, device: torch.device) -> float:
    """Peak extra CUDA memory of one pass (after a warm-up run). torch's allocator statistics
    count live tensors exactly, so this needs no fresh process."""
    step()
    for d in suite.dicts.values():
        for p in d.parameters():
            p.grad = None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def peak_mb_here(case: str, which: str, mode: str, device: torch.device, dtype) -> float:
    """Peak extra memory of one pass (after a warm-up run), in this process."""
    suite, batch = build(case, device, dtype)
    step = make_step(which, mode, suite, batch, device, dtype)
    if device.type == "cuda":
        return cuda_peak_mb(step, suite, device)
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    step()
    return (_status_kb("VmHWM") - before) / 1024


def peak_mb(case: str, which: str, mode: str, device, dtype_name: str) -> float:
    """Run peak_mb_here in a fresh subprocess (so earlier runs do not hide the peak)."""
    cmd = [sys.executable, __file__, "--_peak", f"{case}:{which}:{mode}", "--device", str(device),
           "--dtype", dtype_name]
    # glibc raises its mmap threshold each time a large block is freed, so later blocks come
    # from the heap and may stay in RSS after they are freed: peaks then moved ±20 % between
    # identical runs. A fixed threshold returns every freed tensor at once (RSS = live memory):
    # the same peak to 0.1 % run to run.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=None, help=f"comma-separated, from {list(CASES)}")
    p.add_argument("--modes", default="candidates,all")
    p.add_argument("--quick", action="store_true", help=f"cases {QUICK} only, 3 repeats")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--_peak", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args._peak:
        case, which, mode = args._peak.split(":")
        print(peak_mb_here(case, which, mode, device, dtype))
        return
    cases = args.cases.split(",") if args.cases else (QUICK if args.quick else list(CASES))
    for case in cases:
        if case not in CASES:
            raise SystemExit(f"unknown case {case!r}; choose from {list(CASES)}")
    for case in cases:
        suite, batch = build(case, device, dtype)
        for mode in args.modes.split(","):
            t = time_steps({w: make_step(w, mode, suite, batch, device, dtype)
                            for w in ("vanilla", "pruned")}, device, args.repeats)
            row = {
                "case": case, "tokens": CASES[case]["tokens"], "F": CASES[case]["F"], "mode": mode,
                "vanilla_s": round(t["vanilla"], 4), "pruned_s": round(t["pruned"], 4),
                "ratio": round(t["pruned"] / t["vanilla"], 2),
            }
            if not args.no_memory and device.type == "cuda":
                m = {w: cuda_peak_mb(make_step(w, mode, suite, batch, device, dtype), suite, device)
                     for w in ("vanilla", "pruned")}
            elif not args.no_memory:
                m = {w: peak_mb(case, w, mode, device, args.dtype) for w in ("vanilla", "pruned")}
            if not args.no_memory:
                row.update(
                    vanilla_peak_mb=round(m["vanilla"], 1), pruned_peak_mb=round(m["pruned"], 1),
                    mem_ratio=round(m["pruned"] / max(m["vanilla"], 1e-9), 2),
                )
            row.update(device=str(device), dtype=args.dtype, backward=mode == "candidates")
            print(json.dumps(row), flush=True)
        del suite, batch


if __name__ == "__main__":
    main()
