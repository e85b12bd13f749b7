"""The whole SCAE pipeline: model -> pretrained suite -> connections -> finetuning -> evaluation.

    python run_finetuning.py                      # PRESET "tiny": the embedded Shakespeare GPT-2
    python run_finetuning.py --preset gpt2        # gpt2-small, openwebtext, jacobcd52's suite
    python run_finetuning.py --quick --out DIR    # tiny budgets, a smoke test
    torchrun --standalone --nproc_per_node 2 run_finetuning.py --quick --out DIR

Every stage is cached in $SCAE_CACHE (default ~/.cache/scae) under a key of the settings it
depends on, so a second run only recomputes what changed. The result is DIR/report.json (and a
printed table): the finetuned suite, the same suite before finetuning, and a suite finetuned with
random connections of the same counts. Hyperparameters are the constants below; `#%%` cells let it
run as a notebook.
"""

#%% Hyperparameters
from __future__ import annotations

PRESET = "tiny"  # "tiny" (embedded default, runs anywhere) or "gpt2" (needs a network)
C = None  # connections per transcoder feature (None: the preset's: 32 tiny, 100 gpt2)
VARIANT = "active"  # importance averaged over tokens where the feature is active, or "all"
COEFF = 1.0  # weight of the pruned FVU in the loss
LOSS = "vanilla+pruned"  # or "pruned"
ACT_COEFF = 0.0  # weight of the vanilla-vs-pruned activation difference term
N_THRESHOLD = 32  # candidates after the vanilla top K
N_RANDOM = 0  # random candidates per token for the penalty (off: see README, "Hyperparameters")
RANDOM_COEFF = 0.0  # weight of the random-candidate penalty
FINETUNE_STEPS = None  # None: the preset's
LR = None  # None: base_lr / sqrt(F / 2^14) per dictionary
WANDB_MODE = "disabled"  # "disabled", "offline" or "online" (online needs WANDB_API_KEY)

#%% Imports
import argparse
import copy
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from buffer import AllActivationBuffer
from dictionary_learning.connections import load_connections, save_connections
from dictionary_learning.data import contexts_from
from dictionary_learning.distributed import (
    barrier,
    default_device,
    init_distributed,
    is_main,
    rank,
    world_size,
)
from dictionary_learning.embedded import EMBEDDED_MODEL, cache_root
from dictionary_learning.model import load_model
from dictionary_learning.reproducibility import (
    DEFAULT_THREADS,
    configure_determinism,
    connections_digest,
    suite_digest,
)
from evaluate import format_table, report
from find_top_connections import collect_activations, random_connections, top_connections
from trainers.scae import SCAESuite, SCAETrainerConfig
from dictionary_learning.files import atomic_write_json
from training import TrainConfig, train_scae_suite

logger = logging.getLogger("run_finetuning")


@dataclass
class PipelineConfig:
    """Settings of every stage; the presets below fill them in."""

    model: str = EMBEDDED_MODEL
    """Model name or path (load_model): the embedded default, "gpt2", or a save_pretrained folder."""
    data: str = "embedded"
    """Training text: "embedded", a text file or folder, or a `datasets` name (streamed)."""
    eval_data: str = "embedded"
    """Evaluation text (the validation split of the embedded corpus; else the same source)."""
    eval_skip_docs: int = 0
    """Documents skipped first when eval_data is the training text (to keep evaluation off it)."""
    suite: str | None = None
    """Pretrained suite folder or Hub id; None pretrains one (cached)."""
    connections: str | None = None
    """Connections file or Google Drive file id (fetched with gdown); None computes them (cached)."""
    ctx_len: int = 128
    """Context length, BOS included."""
    dict_size: int = 512
    """Features per dictionary when pretraining."""
    k: int = 16
    """Active features per token when pretraining."""
    pretrain_steps: int = 1000
    """Pretraining steps."""
    C: int = 32
    """Connections per transcoder feature, shared across upstream dictionaries."""
    variant: str = "active"
    """Importance averaged over the feature's active tokens ("active") or all tokens ("all")."""
    connection_tokens: int = 2**17
    """Tokens the importance is averaged over."""
    finetune_steps: int = 400
    """Finetuning steps (each run: top-C and random connections)."""
    batch_tokens: int = 1024
    """Tokens per optimisation step (global, over all ranks)."""
    buffer_tokens: int = 2**16
    """Tokens held and shuffled by the activation buffer."""
    eval_tokens: int = 2**15
    """Evaluation tokens."""
    random_baseline: bool = True
    """Also finetune with random connections of the same counts."""
    finetune: SCAETrainerConfig = field(default_factory=lambda: SCAETrainerConfig(total_steps=600))
    """Finetuning hyperparameters (total_steps is set from finetune_steps)."""
    wandb_mode: str = "disabled"
    """wandb mode of the training runs."""
    device: str = field(default_factory=default_device)
    """Device of the model, the suite and the buffers."""
    dtype: str = "float32"
    """"float32" or "bfloat16" for dictionaries and activations."""
    seed: int = 0
    """Seed of every stage."""
    threads: int | None = DEFAULT_THREADS
    """Intra-op CPU threads (torch.set_num_threads). CPU results depend on this number in the last
    bits (torch's reductions split their work per thread), so it is fixed rather than taken from
    the machine or $OMP_NUM_THREADS; None keeps torch's default. Part of every cache key."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms(True): needed for bitwise-identical runs on CUDA, whose
    atomic scatter/index_add kernels add in a varying order (see dictionary_learning.reproducibility)."""


def make_config(preset: str = PRESET, quick: bool = False, **overrides) -> PipelineConfig:
    """The preset's config, the constants at the top of the file, then explicit overrides."""
    finetune = SCAETrainerConfig(
        total_steps=1, coeff=COEFF, loss=LOSS, act_coeff=ACT_COEFF, n_threshold=N_THRESHOLD,
        n_random=N_RANDOM, random_coeff=RANDOM_COEFF, lr=LR, auxk_relu=False,
    )
    if preset == "tiny":
        cfg = PipelineConfig(finetune=finetune)
    elif preset == "gpt2":
        cfg = PipelineConfig(
            model="gpt2", data="openwebtext", eval_data="openwebtext", eval_skip_docs=100_000,
            suite="jacobcd52/gpt2_suite_folded_ln", connections=None, C=100,
            connection_tokens=2**20, finetune_steps=10_000, batch_tokens=4096,
            buffer_tokens=2**19, eval_tokens=2**17, finetune=finetune,
        )
    else:
        raise ValueError(f"unknown preset {preset!r}; use 'tiny' or 'gpt2'")
    if C is not None:
        cfg.C = C
    cfg.variant = VARIANT
    if FINETUNE_STEPS is not None:
        cfg.finetune_steps = FINETUNE_STEPS
    cfg.wandb_mode = WANDB_MODE
    if quick:
        cfg = replace(
            cfg, dict_size=256, k=8, pretrain_steps=60, C=min(cfg.C, 16), connection_tokens=4096,
            finetune_steps=40, batch_tokens=256, buffer_tokens=4096, eval_tokens=2048,
            finetune=replace(cfg.finetune, n_threshold=16, n_random=min(N_RANDOM, 16)),
        )
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    tokens = cfg.finetune_steps * cfg.batch_tokens
    cfg.finetune = replace(
        cfg.finetune, total_steps=cfg.finetune_steps,
        warmup_steps=min(cfg.finetune.warmup_steps, max(1, cfg.finetune_steps // 10)),
        # a short run needs a dead-feature window well inside its token budget for AuxK to act
        dead_tokens=min(cfg.finetune.dead_tokens, max(tokens // 20, 4 * cfg.batch_tokens)),
    )
    return cfg


#%% Stages
def dtype_of(cfg: PipelineConfig) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]


def key(*parts) -> str:
    """A short stable hash of the settings a cached stage depends on."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def contexts(cfg: PipelineConfig, tokenizer, split: str):
    """This rank's packed contexts: training text repeated, or the held-out text once."""
    if split == "train":
        return contexts_from(cfg.data, tokenizer, cfg.ctx_len, repeat=True, rank=rank(),
                             world_size=world_size())
    skip = cfg.eval_skip_docs if cfg.eval_data == cfg.data else 0
    return contexts_from(cfg.eval_data, tokenizer, cfg.ctx_len, split="validation", skip_docs=skip)


def make_buffer(cfg: PipelineConfig, model, seed: int) -> AllActivationBuffer:
    per_rank = max(1, cfg.batch_tokens // world_size())
    return AllActivationBuffer(
        model, contexts(cfg, model.tokenizer, "train"),
        n_tokens=max(cfg.buffer_tokens // world_size(), per_rank), out_batch_size=per_rank,
        model_batch_size=32, device=cfg.device, dtype=dtype_of(cfg), seed=seed + rank(),
    )


def pretrained_suite(cfg: PipelineConfig, model, cache: Path) -> tuple[SCAESuite, str]:
    """The suite to finetune: cfg.suite, or one pretrained here (and cached)."""
    if cfg.suite is not None:
        return SCAESuite.from_pretrained(cfg.suite, device=cfg.device, dtype=dtype_of(cfg)), cfg.suite
    from run_pretraining import PretrainConfig, make_config as pretrain_config, pretrain_suite

    k = key("pretrain", cfg.model, cfg.data, cfg.ctx_len, cfg.dict_size, cfg.k, cfg.pretrain_steps,
            cfg.batch_tokens, cfg.buffer_tokens, cfg.dtype, cfg.seed, world_size(), cfg.threads)
    out = cache / f"pretrain-{k}"
    if not (out / "suite" / "config.json").is_file():
        pcfg: PretrainConfig = pretrain_config(False, str(out), cfg.pretrain_steps)
        pcfg = replace(pcfg, model=cfg.model, data=cfg.data, dict_size=cfg.dict_size, k=cfg.k,
                       batch_tokens=cfg.batch_tokens, buffer_tokens=cfg.buffer_tokens,
                       ctx_len=cfg.ctx_len, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed,
                       eval_data=cfg.eval_data,
                       eval_skip_docs=cfg.eval_skip_docs if cfg.eval_data == cfg.data else 0,
                       eval_tokens=min(cfg.eval_tokens, pcfg.eval_tokens))
        pcfg.loop = replace(pcfg.loop, resume=True, wandb_mode=cfg.wandb_mode)
        pretrain_suite(pcfg)
        barrier()
    suite = SCAESuite.from_pretrained(out / "suite", device=cfg.device, dtype=dtype_of(cfg))
    return suite, str(out / "suite")


def fetch_connections(spec: str, cache: Path) -> Path:
    """A connections file: a local path, or a Google Drive id downloaded once with gdown."""
    if Path(spec).is_file():
        return Path(spec)
    target = cache / f"gdrive-{spec}.pt"
    if not target.is_file():
        if is_main():
            import gdown

            tmp = cache / f".gdrive-{spec}.part"
            if gdown.download(id=spec, output=str(tmp), quiet=False) is None:
                raise FileNotFoundError(
                    f"connections {spec!r} is neither a local file nor a Google Drive id that "
                    f"could be downloaded; pass a path to a connections file"
                )
            os.replace(tmp, target)
        barrier()
    return target


def connections_for(cfg: PipelineConfig, suite: SCAESuite, suite_id: str, model, cache: Path):
    """cfg.connections if given, else the top-C connections computed (on rank 0) and cached."""
    if cfg.connections is not None:
        return load_connections(fetch_connections(cfg.connections, cache), suite.dict_sizes)
    k = key("connections", suite_id, cfg.data, cfg.C, cfg.variant, cfg.connection_tokens, cfg.seed,
            cfg.threads)
    path = cache / f"connections-{k}.pt"
    if not path.is_file() and is_main():
        buf = make_buffer(replace(cfg, batch_tokens=1024 * world_size()), model, cfg.seed + 17)
        acts = collect_activations(suite, buf, cfg.connection_tokens)
        save_connections(top_connections(suite, acts, cfg.C, cfg.variant), path)
    barrier()
    return load_connections(path, suite.dict_sizes)


def finetuned(cfg: PipelineConfig, suite: SCAESuite, suite_id: str, conns, tag: str, model,
              cache: Path) -> SCAESuite:
    """Finetune a copy of `suite` with `conns` (cached; an interrupted run resumes)."""
    # The key names the suite and the connections themselves: without them a run with another C,
    # suite or connections file would silently reuse a suite finetuned for the old ones.
    k = key("finetune", tag, asdict(cfg.finetune), cfg.finetune_steps, cfg.batch_tokens,
            cfg.buffer_tokens, cfg.data, cfg.dtype, cfg.seed, world_size(), cfg.threads,
            cfg.model, cfg.ctx_len, suite_id, connections_digest(conns))
    out = cache / f"finetune-{tag}-{k}"
    if not (out / "suite" / "config.json").is_file():
        loop = TrainConfig(steps=cfg.finetune_steps, out_dir=str(out), resume=True,
                           save_steps=max(1, cfg.finetune_steps // 4),
                           log_steps=max(1, cfg.finetune_steps // 50), wandb_mode=cfg.wandb_mode,
                           run_name=f"scae-{tag}", seed=cfg.seed)
        train_scae_suite(make_buffer(cfg, model, cfg.seed + 1), suite=copy.deepcopy(suite),
                         connections=conns, trainer_cfg=cfg.finetune, train_cfg=loop,
                         device=cfg.device, dtype=dtype_of(cfg))
    return SCAESuite.from_pretrained(out / "suite", device=cfg.device, dtype=dtype_of(cfg))


def run(cfg: PipelineConfig, out_dir: str | os.PathLike) -> dict | None:
    """Run every stage; rank 0 returns the report (also written to out_dir/report.json)."""
    out_dir = Path(out_dir)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = round(now - clock, 2)
        clock = now

    configure_determinism(cfg.threads, cfg.deterministic)
    cache = cache_root() / "pipeline"
    cache.mkdir(parents=True, exist_ok=True)
    model = load_model(cfg.model, device=cfg.device, dtype=torch.float32)
    lap("model")
    suite, suite_id = pretrained_suite(cfg, model, cache)
    lap("pretrain")
    conns = connections_for(cfg, suite, suite_id, model, cache)
    lap("connections")
    tuned = finetuned(cfg, suite, suite_id, conns, "top", model, cache)
    lap("finetune")
    rnd = None
    if cfg.random_baseline:
        rnd_conns = random_connections(suite, conns, seed=cfg.seed)
        rnd = finetuned(cfg, suite, suite_id, rnd_conns, "random", model, cache)
        lap("finetune_random")
    if not is_main():
        return None

    def evaluate(s: SCAESuite, name: str) -> dict:
        ctxs = contexts(cfg, model.tokenizer, "validation")
        return report(s, model, ctxs, n_tokens=cfg.eval_tokens, out_dir=out_dir / name,
                      device=cfg.device, dtype=dtype_of(cfg))

    suite.set_connections(conns)
    before = evaluate(suite, "before_finetuning")
    main_report = evaluate(tuned, "finetuned")
    result = {
        **{k: main_report[k] for k in ("n_tokens", "n_predictions", "n_contexts", "ctx_len")},
        "modules": main_report["modules"],
        "ce": main_report["ce"],
        "before_finetuning": {"modules": before["modules"], "ce": before["ce"]},
    }
    if rnd is not None:
        r = evaluate(rnd, "random_connections")
        result["random_connections"] = {"modules": r["modules"], "ce": r["ce"]}
    lap("evaluate")
    # Two runs reproduce each other exactly iff these agree (stage by stage).
    result["digests"] = {"pretrained": suite_digest(suite), "connections": connections_digest(conns),
                         "finetuned": suite_digest(tuned)}
    if rnd is not None:
        result["digests"].update(random_connections=connections_digest(rnd_conns),
                                 finetuned_random=suite_digest(rnd))
    result["config"] = asdict(cfg)
    result["timings_s"] = timings
    atomic_write_json(out_dir / "report.json", result)
    return result


def summary(result: dict) -> str:
    """The finetuned suite's table, then mean transcoder FVUs and CE recovered of each variant."""
    lines = [format_table(result), "", f"{'suite':<22} {'mean mlp FVU vanilla':>21} "
             f"{'mean mlp FVU pruned':>20} {'CE rec. pruned':>15}"]
    for label, r in (("before finetuning", result["before_finetuning"]), ("finetuned (top-C)", result),
                     ("finetuned (random)", result.get("random_connections"))):
        if r is None:
            continue
        mlp = [m for n, m in r["modules"].items() if n.startswith("mlp_")]
        fv = sum(m["fvu_vanilla"] for m in mlp) / len(mlp)
        fp = sum(m["fvu_pruned"] for m in mlp) / len(mlp)
        lines.append(f"{label:<22} {fv:21.4f} {fp:20.4f} {r['ce']['recovered_pruned']:15.3f}")
    return "\n".join(lines)


#%% Main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=PRESET, choices=["tiny", "gpt2"])
    p.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test of every stage")
    p.add_argument("--out", default="runs/finetune", help="folder for report.json and plots")
    p.add_argument("--model", help="override the preset's model (name or save_pretrained folder)")
    p.add_argument("--suite", help="override the pretrained suite (folder or Hub id)")
    p.add_argument("--connections", help="connections file or Google Drive id")
    p.add_argument("--data", help="training text: 'embedded', a file/folder, or a datasets name")
    p.add_argument("--eval-data", dest="eval_data", help="evaluation text (default: --data)")
    p.add_argument("--steps", type=int, dest="finetune_steps", help="finetuning steps")
    p.add_argument("--ctx-len", type=int, dest="ctx_len", help="context length, BOS included")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["float32", "bfloat16"])
    p.add_argument("--seed", type=int, help="seed of every stage (default 0)")
    p.add_argument("--threads", type=int,
                   help=f"intra-op CPU threads; results depend on it (default {DEFAULT_THREADS})")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="torch.use_deterministic_algorithms: bitwise-reproducible CUDA runs (slower)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    init_distributed()
    overrides = {k: v for k, v in vars(args).items() if k not in ("preset", "quick", "out")}
    if args.data and not args.eval_data:
        overrides["eval_data"] = args.data
    cfg = make_config(args.preset, args.quick, **overrides)
    result = run(cfg, args.out)
    if result is not None:
        print(summary(result))
        print(f"\nreport: {Path(args.out) / 'report.json'}; timings (s): {result['timings_s']}")


if __name__ == "__main__":
    main()
