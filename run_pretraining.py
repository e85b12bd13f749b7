"""Pretrain a suite of TopK dictionaries: an SAE per attn_<l>, a transcoder per mlp_<l>.

Runs as a script (`python run_pretraining.py [--quick] [--out DIR] [--steps N]`) or cell by cell
as a notebook (`#%%`). Hyperparameters are the constants below; everything else is assembled into
dataclass configs.
"""

#%% Hyperparameters
from __future__ import annotations

MODEL = "scae-shakespeare"  # an embedded model (or "scae-shakespeare-llama"), a model dir or Hub id
DICT_SIZE = 512  # F per dictionary (4x d_model=128; at 1024 layer-0 dictionaries keep 20-65% dead)
K = 16  # active features per token
BATCH_TOKENS = 1024  # tokens per optimisation step
STEPS = 1000
CTX_LEN = 128
BUFFER_TOKENS = 2**16  # tokens held (and shuffled) by the activation buffer
EVAL_TOKENS = 2**17  # held-out (validation split; ~170k tokens) tokens for the quality table
OUT_DIR = "runs/pretrain"

#%% Imports
import argparse
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from buffer import AllActivationBuffer
from dictionary_learning.data import contexts_from
from dictionary_learning.dictionary import AutoEncoderTopK, TopKTranscoder
from dictionary_learning.distributed import (
    init_distributed, is_main, per_rank, rank, world_size,
)
from dictionary_learning.model import load_model, model_info, module_names
from dictionary_learning.names import is_transcoder
from dictionary_learning.suite_io import save_suite
from dictionary_learning.validate import check_out_dir, parse_dtype
from evaluate import DictQuality, evaluate_dictionaries
from trainers.top_k import TopKSuiteTrainer, TopKTrainerConfig
from training import TrainConfig, train

logger = logging.getLogger("run_pretraining")


@dataclass
class PretrainConfig:
    """Everything `pretrain_suite` needs besides the trainer and loop settings."""

    model: str = MODEL
    """Model name or path for load_model."""
    data: str = "embedded"
    """Training text: "embedded", a text file or folder, or a `datasets` name (streamed)."""
    eval_data: str | None = None
    """Held-out text (default: `data`; its "validation" split for the embedded corpus)."""
    eval_skip_docs: int = 0
    """Documents of the held-out text skipped first (to stay off the training text)."""
    dict_size: int = DICT_SIZE
    """Features per dictionary."""
    k: int = K
    """Active features per token."""
    batch_tokens: int = BATCH_TOKENS
    """Tokens per optimisation step (global, over all ranks; each rank takes its share)."""
    ctx_len: int = CTX_LEN
    """Context length, BOS included."""
    buffer_tokens: int = BUFFER_TOKENS
    """Tokens held by the shuffling activation buffers (global, over all ranks)."""
    model_batch_size: int = 32
    """Contexts per model forward pass when filling the buffer."""
    eval_tokens: int = EVAL_TOKENS
    """Validation tokens for the final quality figures."""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """Device of the model, buffer and dictionaries."""
    dtype: str = "float32"
    """'float32' or 'bfloat16' for dictionaries and activations."""
    seed: int = 0
    """Seed of the dictionaries and the buffer shuffle."""
    trainer: TopKTrainerConfig = field(default_factory=TopKTrainerConfig)
    """TopK trainer hyperparameters (its step count comes from `loop.steps`)."""
    loop: TrainConfig = field(default_factory=lambda: TrainConfig(steps=STEPS, out_dir=OUT_DIR))
    """Training-loop settings (steps, checkpoints, logging)."""


def pretrain_suite(cfg: PretrainConfig) -> tuple[dict, dict[str, DictQuality]]:
    """Train, save (`<out_dir>/suite`) and evaluate a TopK suite. Returns (dicts, quality)."""
    dtype = parse_dtype(cfg.dtype, "PretrainConfig.dtype")
    batch = per_rank(cfg.batch_tokens)  # this rank's tokens per step
    t0 = time.perf_counter()
    model = load_model(cfg.model, device=cfg.device, dtype=torch.float32)
    info = model_info(model)
    buffer = AllActivationBuffer(
        model,
        contexts_from(cfg.data, model.tokenizer, cfg.ctx_len, repeat=True, rank=rank(),
                      world_size=world_size()),
        n_tokens=per_rank(cfg.buffer_tokens), out_batch_size=batch,
        model_batch_size=cfg.model_batch_size, device=cfg.device, dtype=dtype, seed=cfg.seed,
    )
    torch.manual_seed(cfg.seed)
    dicts = {}
    for name in module_names(info.n_layers):
        if is_transcoder(name):
            dicts[name] = TopKTranscoder(info.d_model, info.d_model, cfg.dict_size, cfg.k)
        else:
            dicts[name] = AutoEncoderTopK(info.d_model, cfg.dict_size, cfg.k)
    trainer = TopKSuiteTrainer(dicts, cfg.trainer, device=cfg.device, dtype=dtype)
    train(trainer, buffer, cfg.loop)
    train_s = time.perf_counter() - t0

    val_buffer = AllActivationBuffer(
        model,
        contexts_from(cfg.eval_data or cfg.data, model.tokenizer, cfg.ctx_len, split="validation",
                      skip_docs=cfg.eval_skip_docs),
        n_tokens=cfg.eval_tokens, out_batch_size=batch,
        model_batch_size=cfg.model_batch_size, device=cfg.device, dtype=dtype, seed=cfg.seed + 1,
    )
    n_batches = max(1, cfg.eval_tokens // batch)
    quality = evaluate_dictionaries(
        trainer.dicts, (b for _, b in zip(range(n_batches), val_buffer)), cfg.device, dtype
    )
    if is_main():
        meta = {
            "model_name": cfg.model,
            "model_info": info._asdict(),
            "architecture": buffer.suite_arch.to_meta(),
            "dtype": cfg.dtype,
            "buffer": {"ctx_len": cfg.ctx_len, "n_tokens": cfg.buffer_tokens,
                       "out_batch_size": cfg.batch_tokens, "model_batch_size": cfg.model_batch_size,
                       "seed": cfg.seed, "data": cfg.data},
            "trainer": asdict(trainer.cfg),
            "steps": cfg.loop.steps,
            "train_seconds": train_s,
            "quality": {n: q._asdict() for n, q in quality.items()},
        }
        save_suite(Path(cfg.loop.out_dir) / "suite", trainer.dicts, meta)
    return trainer.dicts, quality


def quality_table(quality: dict[str, DictQuality]) -> str:
    lines = [f"{'dictionary':<10} {'FVU':>8} {'L0':>6} {'dead':>7}"]
    for n, q in quality.items():
        lines.append(f"{n:<10} {q.fvu:8.4f} {q.l0:6.2f} {100 * q.dead_frac:6.1f}%")
    return "\n".join(lines)


def make_config(quick: bool, out: str, steps: int | None) -> PretrainConfig:
    """Assemble the run's config from the constants and flags."""
    if quick:
        steps = steps or 40
        cfg = PretrainConfig(dict_size=512, k=16, batch_tokens=512, buffer_tokens=2**13,
                             eval_tokens=2**12)
    else:
        steps = steps or STEPS
        cfg = PretrainConfig()
    tokens = steps * cfg.batch_tokens
    cfg.trainer = TopKTrainerConfig(
        warmup_steps=max(1, min(100, steps // 10)),
        decay_start=0.8,
        # Gao et al. use 10M tokens; a short run needs a window well inside its token budget
        dead_tokens=min(10_000_000, max(tokens // 20, 4 * cfg.batch_tokens)),
        seed=cfg.seed,
    )
    cfg.loop = TrainConfig(steps=steps, out_dir=out, save_steps=max(1, steps // 4),
                           log_steps=max(1, steps // 50), resume=False)
    return cfg


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny budget (< 60 s) smoke run")
    parser.add_argument("--out", default=OUT_DIR, help="output folder")
    parser.add_argument("--steps", type=int, default=None, help="optimisation steps")
    parser.add_argument("--resume", action="store_true", help="resume from OUT/checkpoint.pt")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    check_out_dir(args.out)
    init_distributed()  # under torchrun: join the process group (like run_finetuning.py)
    cfg = make_config(args.quick, args.out, args.steps)
    cfg.loop.resume = args.resume
    t0 = time.perf_counter()
    _, quality = pretrain_suite(cfg)
    if is_main():
        print(quality_table(quality))
        print(f"total time {time.perf_counter() - t0:.0f} s; suite saved to {args.out}/suite")


#%% Run
if __name__ == "__main__":
    main()
