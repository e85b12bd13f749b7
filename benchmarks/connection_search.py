"""Time and peak memory of the connection search (find_top_connections), extrapolated to 1 M tokens.

For each token count N (small enough to run here) a fresh subprocess builds a random suite
(d 768, 2 layers, F 12288, K 32 by default), runs `collect_activations` over random batches and
`top_connections(C=100, variant="active")`, and reports the time of each phase and the peak RSS
above the process's baseline (VmHWM after resetting it through /proc/self/clear_refs).

Both phases are linear in N apart from fixed costs that do not depend on N (the dense
virtual-weight blocks, top-C per block); memory is the stored sparse activations (linear in N)
plus the per-block buffers (fixed by memory_budget_bytes). The last line fits
    time(N) = a + b N,   memory(N) = m0 + m1 N
to the two largest runs and prints the prediction at --target tokens (default 1 M). With
--method auto (the default) each transcoder takes the route `plan_method` picks, which changes with
the token count (co-active at few tokens, dense at many): each row lists the routes
(`search_route`: "coactive-kernel" where the co-active top C runs in the C kernel; SCAE_NATIVE=0
for the torch route), and the fit says whether both runs took the same ones; `--method dense`
gives the many-token fit.

Usage: python benchmarks/connection_search.py [--tokens 8192,32768] [--F 12288] [--target 1000000]
       [--layers 12] [--method auto|dense|coactive] [--budget-gb 1.0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.pruned_forward import _status_kb  # noqa: E402
from dictionary_learning.batch import ActivationBatch  # noqa: E402
from dictionary_learning.dictionary import AutoEncoderTopK, TopKTranscoder  # noqa: E402
from find_top_connections import collect_activations, search_route, top_connections  # noqa: E402
from dictionary_learning.suite import SCAESuite  # noqa: E402


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def batches(d: int, layers: int, n_tokens: int, batch_size: int, g: torch.Generator, dtype):
    """Random activation batches, drawn on the generator's device."""
    kw = dict(generator=g, device=g.device, dtype=dtype)
    for _ in range(0, n_tokens, batch_size):
        src, tgt, scale = {}, {}, {}
        for layer in range(layers):
            a = torch.randn(batch_size, d, **kw)
            src[f"attn_{layer}"] = tgt[f"attn_{layer}"] = a
            src[f"mlp_{layer}"] = torch.randn(batch_size, d, **kw)
            tgt[f"mlp_{layer}"] = torch.randn(batch_size, d, **kw)
            scale[f"mlp_{layer}"] = 1.0 + torch.rand(batch_size, **kw)
        yield ActivationBatch(torch.randn(batch_size, d, **kw), src, tgt, scale)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_here(n_tokens: int, d: int, layers: int, F: int, k: int, C: int, device: str,
             dtype_name: str = "fp32", budget_gb: float = 1.0, method: str = "auto") -> dict:
    device, dtype = torch.device(device), DTYPES[dtype_name]
    torch.manual_seed(0)
    g = torch.Generator(device=device).manual_seed(0)
    dicts = {}
    for layer in range(layers):
        dicts[f"attn_{layer}"] = AutoEncoderTopK(d, F, k)
        dicts[f"mlp_{layer}"] = TopKTranscoder(d, d, F, k)
    suite = SCAESuite(dicts).to(device=device, dtype=dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    acts = collect_activations(suite, batches(d, layers, n_tokens, 1024, g, dtype), n_tokens)
    _sync(device)
    t1 = time.perf_counter()
    budget = int(budget_gb * 2**30)
    conns = top_connections(suite, acts, C, memory_budget_bytes=budget, method=method)
    _sync(device)
    t2 = time.perf_counter()
    n_conn = sum(int((i >= 0).sum()) for ups in conns.values() for i in ups.values())
    row = {
        "tokens": n_tokens, "layers": layers, "F": F, "C": C, "collect_s": round(t1 - t0, 2),
        "top_connections_s": round(t2 - t1, 2),
        "peak_rss_mb": round((_status_kb("VmHWM") - before) / 1024, 1),
        "connections": n_conn, "device": str(device), "dtype": dtype_name,
        "memory_budget_gb": budget_gb, "method": method,
        # the route each transcoder took
        "routes": [search_route(suite, acts, m, "active", method, budget)
                   for m in suite.transcoder_names],
    }
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - cuda_before
        row["cuda_peak_mb"] = round(peak / 2**20, 1)
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="8192,32768", help="comma-separated token counts to run")
    p.add_argument("--F", type=int, default=12288)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--C", type=int, default=100)
    p.add_argument("--target", type=int, default=1_000_000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--budget-gb", type=float, default=1.0,
                   help="memory_budget_bytes of top_connections, in GiB (fewer, larger blocks)")
    p.add_argument("--method", choices=["auto", "dense", "coactive"], default="auto",
                   help="top_connections' route for V (auto: per transcoder, by plan_method)")
    p.add_argument("--_here", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._here is not None:
        print(json.dumps(run_here(args._here, args.d, args.layers, args.F, args.k, args.C,
                                  args.device, args.dtype, args.budget_gb, args.method)))
        return
    rows = []
    for n in [int(t) for t in args.tokens.split(",")]:
        cmd = [sys.executable, __file__, "--_here", str(n), "--F", str(args.F), "--d", str(args.d),
               "--layers", str(args.layers), "--k", str(args.k), "--C", str(args.C),
               "--device", args.device, "--dtype", args.dtype, "--budget-gb", str(args.budget_gb),
               "--method", args.method]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.stderr.write(out.stderr)
            raise SystemExit(f"connection search at {n} tokens failed (exit {out.returncode})")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    if len(rows) >= 2:
        a, b = rows[-2], rows[-1]
        dn = b["tokens"] - a["tokens"]
        pred = {}
        keys = ["collect_s", "top_connections_s", "peak_rss_mb"]
        if "cuda_peak_mb" in b:
            keys.append("cuda_peak_mb")
        for key in keys:
            slope = (b[key] - a[key]) / dn
            pred[key] = round(b[key] + slope * (args.target - b["tokens"]), 1)
        # a fit across runs whose transcoders took different routes describes neither route:
        # run with --method dense for the many-token extrapolation (auto's route there)
        print(json.dumps({"extrapolated_to_tokens": args.target, "layers": args.layers,
                          "F": args.F, **pred, "fit_from_tokens": [a["tokens"], b["tokens"]],
                          "same_routes": a["routes"] == b["routes"]}),
              flush=True)


if __name__ == "__main__":
    main()
