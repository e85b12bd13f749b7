"""Figures of the circuits tools on a suite: graph build time and size of a prompt of N tokens
before and after pruning, influence retained, and the feature-page pass's time.

    python benchmarks/circuits.py --suite OUT/suite [--tokens 64] [--page-tokens 65536]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import circuits as C  # noqa: E402
from dictionary_learning.data import contexts_from  # noqa: E402
from dictionary_learning.model import hf_model, load_model  # noqa: E402
from feature_pages import PageConfig, compute_pages  # noqa: E402
from dictionary_learning.suite import SCAESuite  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", required=True)
    p.add_argument("--tokens", type=int, default=64, help="prompt tokens")
    p.add_argument("--page-tokens", type=int, default=0, dest="page_tokens",
                   help="also time the feature-page pass over this many tokens (0: skip)")
    p.add_argument("--data", default="embedded")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    suite32 = SCAESuite.from_pretrained(args.suite)
    model = load_model(suite32.meta["model_name"])
    ctx_len = int(suite32.meta.get("buffer", {}).get("ctx_len", 128))
    out: dict = {}
    if args.page_tokens:
        t = time.perf_counter()
        pages = compute_pages(model, suite32, PageConfig(data=args.data, n_tokens=args.page_tokens,
                                                         ctx_len=ctx_len))
        out["pages"] = {"tokens": pages.state["n_tokens"],
                        "seconds": round(time.perf_counter() - t, 1)}
    ctx = next(iter(contexts_from(args.data, model.tokenizer, ctx_len, split="validation")))
    prompt = ctx[1: 1 + args.tokens].tolist()
    hf_model(model).to(torch.float64)
    suite = SCAESuite.from_pretrained(args.suite, dtype=torch.float64)
    cfg = C.GraphConfig()
    t = time.perf_counter()
    graph = C.build_graph(model, suite, prompt, cfg=cfg)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    pruned = C.prune_graph(graph, cfg.node_threshold, cfg.edge_threshold)
    prune_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        files = C.write_graph_files(graph, tmp, "bench", cfg)
        write_s = time.perf_counter() - t
        json_bytes = files.graph_path.stat().st_size
    info = files.data["metadata"]["info"]
    A = graph.adjacency_XX
    out["graph"] = {
        "prompt_tokens": len(graph.tokens), "build_s": round(build_s, 2),
        "prune_s": round(prune_s, 2), "write_s (prune + effects + JSON)": round(write_s, 2),
        "nodes": graph.n_nodes, "feature_nodes": int((graph.kind_X == C.FEATURE).sum()),
        "edges": int((A != 0).sum()),
        "dense_matrix_MB": round(A.numel() * A.element_size() / 2**20),
        "nodes_pruned": int(pruned.node_mask.sum()), "edges_pruned": int(pruned.edge_mask.sum()),
        "json_KB": round(json_bytes / 1024),
        "influence_retained": round(info["influence_retained"], 4),
        "replacement_score": round(info["replacement_score"], 4),
        "completeness_score": round(info["completeness_score"], 4),
        "identity_error": graph.info["identity_error"],
        "target": graph.logit_strs[0], "target_prob": round(float(graph.logit_probs[0]), 4),
    }
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
