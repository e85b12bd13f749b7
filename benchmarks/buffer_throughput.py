"""Throughput of AllActivationBuffer fills vs a plain forward to the last block (target ratio
>= 0.85).

Prints one JSON line per case: {"case", "tokens", "buffer_tokens_per_s", "plain_tokens_per_s",
"ratio"}. Cases: the embedded model (built if needed) and a random gpt2-small-sized GPT-2.
Usage: python benchmarks/buffer_throughput.py [--device cuda] [--dtype bf16] [--repeats 3]
       [--cases embedded,random-gpt2-small] [--small-contexts 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from buffer import AllActivationBuffer  # noqa: E402
from dictionary_learning.embedded import EMBEDDED_MODEL  # noqa: E402
from dictionary_learning.model import hf_model, load_model  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_case(name, model, ctx_len, n_ctx, model_batch_size, device, dtype, repeats, seed=0):
    """Best-of-`repeats` tokens/s of a buffer fill and of plain hf.transformer on the same
    contexts."""
    device = torch.device(device)
    vocab = hf_model(model).config.vocab_size
    g = torch.Generator().manual_seed(seed)
    toks_ST = torch.randint(1, vocab, (n_ctx, ctx_len), generator=g)
    toks_ST[:, 0] = model.tokenizer.eos_token_id
    tokens = n_ctx * (ctx_len - 1)
    hf = hf_model(model)

    # one buffer over enough copies of the contexts for every timed fill; fills after the first
    # reuse the store (the steady state of training), each fill runs every context once
    buf = AllActivationBuffer(
        model, iter(list(toks_ST) * (repeats + 2)), n_tokens=tokens, out_batch_size=ctx_len - 1,
        model_batch_size=model_batch_size, device=device, dtype=dtype,
    )

    def run_buffer():
        _sync(device)
        t = time.perf_counter()
        buf._refill()  # one full fill: trace, sigma, copy into the store, permutation
        _sync(device)
        return time.perf_counter() - t

    @torch.no_grad()
    def run_plain():
        _sync(device)
        t = time.perf_counter()
        for i in range(0, n_ctx, model_batch_size):
            hf.transformer(toks_ST[i : i + model_batch_size].to(device), use_cache=False)
        _sync(device)
        return time.perf_counter() - t

    run_buffer(), run_plain()  # warm-up
    tb, tp = [], []
    for _ in range(repeats):  # interleave so both see the same machine load
        tb.append(run_buffer())
        tp.append(run_plain())
    b, p = tokens / min(tb), tokens / min(tp)
    return {"case": name, "tokens": tokens, "buffer_tokens_per_s": round(b, 1),
            "plain_tokens_per_s": round(p, 1), "ratio": round(b / p, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small-contexts", type=int, default=8,
                        help="contexts for gpt2-small case")
    parser.add_argument("--cases", default="embedded,random-gpt2-small",
                        help="comma-separated: embedded (the embedded model, built if needed), "
                             "random-gpt2-small (12 layers, d 768, random weights)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    dtype = DTYPES[args.dtype]
    cases = args.cases.split(",")
    unknown = set(cases) - {"embedded", "random-gpt2-small"}
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose from embedded, random-gpt2-small")

    if "embedded" in cases:
        model = load_model(EMBEDDED_MODEL, device=args.device, dtype=dtype)
        row = bench_case(EMBEDDED_MODEL, model, 128, 128, 32, args.device, dtype, args.repeats)
        print(json.dumps({**row, "device": args.device, "dtype": args.dtype}), flush=True)

    if "random-gpt2-small" in cases:
        from transformers import GPT2Config, GPT2LMHeadModel

        from tests.helpers import tiny_tokenizer

        torch.manual_seed(0)
        cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257,
                         bos_token_id=0, eos_token_id=0)
        # any tokenizer with an eos id serves: the contexts are random token ids
        small = load_model(GPT2LMHeadModel(cfg), device=args.device, dtype=dtype,
                           tokenizer=tiny_tokenizer())
        row = bench_case("random-gpt2-small", small, 128, args.small_contexts, 8, args.device,
                         dtype, args.repeats)
        print(json.dumps({**row, "device": args.device, "dtype": args.dtype}), flush=True)


if __name__ == "__main__":
    main()
