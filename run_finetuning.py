"""The whole SCAE pipeline: model -> pretrained suite -> connections -> finetuning -> evaluation.

    python run_finetuning.py                      # PRESET "tiny": the embedded Shakespeare GPT-2
    python run_finetuning.py --preset tiny-llama  # the embedded Shakespeare Llama (offline too)
    python run_finetuning.py --preset gpt2        # gpt2-small, openwebtext, jacobcd52's suite
    python run_finetuning.py --preset pythia-70m  # Pythia-70m-deduped, openwebtext (a network)
    python run_finetuning.py --preset qwen2.5-0.5b  # Qwen2.5-0.5B, openwebtext (a network)
    python run_finetuning.py --quick --out DIR    # tiny budgets, a smoke test
    python run_finetuning.py --quick --wandb offline   # also log the runs to OUT/wandb
    torchrun --standalone --nproc_per_node 2 run_finetuning.py --quick --out DIR

Every stage is cached in $SCAE_CACHE (default ~/.cache/scae) under a key of the settings it
depends on, so a second run only recomputes what changed. The result is OUT/report.json (and a
table): the finetuned suite, the same suite before finetuning, and a suite finetuned with random
connections of the same counts.

As a notebook: run the `#%%` cells (VS Code, Jupyter with jupytext), or make one with
`jupytext --to ipynb run_finetuning.py`. In a notebook the constants below rule (no flags are
parsed), the tables render as tables and the plots appear inline (they are saved under OUT too).
"""

#%% Settings: edit these. As a script, a flag overrides its constant (`--help`).
from __future__ import annotations

PRESET = "tiny"  # "tiny", "tiny-llama" (embedded, run anywhere); "gpt2", "pythia-70m",
#                  "qwen2.5-0.5b" (need a network)
QUICK = False  # True: tiny budgets, every stage in about 25 s on a CPU once the model is built
OUT = "runs/finetune"  # report.json, tables, plots and wandb/ go here

# Model and data; None: the preset's
MODEL = None  # a model name ("gpt2"), Hub id or save_pretrained folder (tiny, tiny-llama: embedded)
DATA = None  # training text: "embedded", a .txt file, a folder of .txt/.md, or a datasets name
EVAL_DATA = None  # evaluation text; None: the held-out part of DATA
SUITE = None  # pretrained suite folder or Hub id; None: gpt2's Hub suite, else pretrain one here
CONNECTIONS = None  # connections file or Google Drive id; None: compute the top-C connections

# Sizes; None: the preset's (tiny / QUICK)
DICT_SIZE = None  # features per dictionary when pretraining (512, pythia 8192, qwen 16384 / 256)
K = None  # active features per token when pretraining (16, pythia/qwen 32 / 8)
PRETRAIN_STEPS = None  # pretraining steps (1000, pythia/qwen 20,000 / 60)
FINETUNE_STEPS = None  # finetuning steps (400, gpt2 10,000, pythia/qwen 5,000 / 40)
EVAL_TOKENS = None  # evaluation tokens (32,768, Hub presets 131,072 / 2,048)
CTX_LEN = None  # context length, BOS included (128)

# Finetuning hyperparameters
C = None  # connections per feature (None: the preset's: tiny 32, gpt2 100, pythia/qwen 64)
VARIANT = "active"  # importance averaged over tokens where the feature is active, or "all"
REFINE = 0  # rounds of recomputing the connections on the finetuned suite and finetuning again
COEFF = 1.0  # weight of the pruned FVU in the loss
LOSS = "vanilla+pruned"  # or "pruned"
ACT_COEFF = 0.0  # weight of the vanilla-vs-pruned activation difference term
KL_COEFF = 1.0  # weight of the end-to-end KL(model || rebuilt residual's logits) per token
N_THRESHOLD = 32  # candidates after the vanilla top K (QUICK: 16)
N_RANDOM = 0  # random candidates per token for the penalty (off: see README, "Hyperparameters")
RANDOM_COEFF = 0.0  # weight of the random-candidate penalty
LR = None  # None: base_lr / sqrt(F / 2^14) per dictionary

# Outputs, logging and hardware
EXPORT = ()  # also write the finetuned suite as ("saelens", "sparsify", "dictionary_learning")
WANDB_MODE = "disabled"  # "disabled", "offline" or "online"; $WANDB_MODE overrides it, --wandb both
DEVICE = None  # "cpu", "cuda", "cuda:1", ...; None: cuda when available
DTYPE = "float32"  # "float32" or "bfloat16" for dictionaries and activations

#%% Imports
import argparse
import copy
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path


def in_notebook() -> bool:
    """True inside a Jupyter kernel (Jupyter, VS Code cells, nbclient): no flags to parse there."""
    shell = sys.modules["IPython"].get_ipython() if "IPython" in sys.modules else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def repo_root() -> Path:
    """This file's folder. A kernel has no __file__: it is looked for from the notebook's folder
    (Jupyter's JPY_SESSION_NAME, VS Code's __vsc_ipynb_file__) and from the working directory up."""
    if "__file__" in globals():
        return Path(__file__).resolve().parent
    hints = [os.environ.get("JPY_SESSION_NAME"), globals().get("__vsc_ipynb_file__")]
    starts = [Path(h).resolve().parent for h in hints if h] + [Path.cwd()]
    for start in starts:
        for folder in (start, *start.parents):
            if (folder / "run_finetuning.py").is_file() and (folder / "buffer.py").is_file():
                return folder
    raise ModuleNotFoundError(
        "cannot find the SCAE repository (the folder holding run_finetuning.py and buffer.py) from "
        f"{Path.cwd()}; start the notebook's kernel in the repository or a folder below it"
    )


# a kernel started in a folder below the repository (or elsewhere, from a notebook Jupyter or
# VS Code located) still imports the project's modules
if str(repo_root()) not in sys.path:
    sys.path.insert(0, str(repo_root()))

import torch
from tqdm.auto import tqdm

from buffer import AllActivationBuffer
from dictionary_learning.cache import (
    StageRecord, content_hash, run_stage, source_hash, stage_key, tensors_hash,
)
from dictionary_learning.connections import load_connections, save_connections
from dictionary_learning.data import check_text_source, contexts_from, looks_like_path
from dictionary_learning.distributed import (
    barrier,
    default_device,
    init_distributed,
    is_main,
    per_rank,
    rank,
    world_size,
)
from dictionary_learning.embedded import EMBEDDED_LLAMA, EMBEDDED_MODEL, embedded_model_path
from dictionary_learning.logger import (
    WandbSettings,
    replay_metrics,
    resolve_wandb_mode,
    summary_run,
)
from dictionary_learning.model import load_model, model_info
from dictionary_learning.names import is_transcoder
from dictionary_learning.suite import SCAESuite
from dictionary_learning.suite_io import suite_folder
from dictionary_learning.validate import (
    DTYPES, check_cache_root, check_ctx_len, check_device, check_out_dir, parse_dtype,
)
from evaluate import format_table, module_rows, report
from export import FORMATS, export_suite
from dictionary_learning.reproducibility import (
    DEFAULT_THREADS,
    configure_determinism,
    connections_digest,
    suite_digest,
)
from find_top_connections import collect_activations, random_connections, top_connections
from trainers.scae import SCAETrainerConfig
from dictionary_learning.files import atomic_write, atomic_write_json, replace_file
from training import TrainConfig, train_scae_suite, wandb_config

logger = logging.getLogger("run_finetuning")


@dataclass
class PipelineConfig:
    """Settings of every stage; the presets below fill them in."""

    model: str = EMBEDDED_MODEL
    """Model name or path (load_model): an embedded model, a Hub id ("gpt2",
    "EleutherAI/pythia-70m-deduped"), or a save_pretrained folder, of a supported family
    (dictionary_learning/arch.py)."""
    data: str = "embedded"
    """Training text: "embedded", a text file or folder, or a `datasets` name (streamed)."""
    eval_data: str = "embedded"
    """Evaluation text (the validation split of the embedded corpus; else the same source)."""
    eval_skip_docs: int = 0
    """Documents skipped first when eval_data is the training text (to keep evaluation off it)."""
    suite: str | None = None
    """Pretrained suite folder or Hub id; None pretrains one (cached)."""
    connections: str | None = None
    """Connections file or Google Drive file id (fetched with gdown); None computes them
    (cached)."""
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
    refine: int = 0
    """Rounds of refinement after finetuning: recompute the top-C connections on the finetuned
    suite, then finetune again for finetune_steps (each round is cached)."""
    random_baseline: bool = True
    """Also finetune with random connections of the same counts."""
    circuit_prompts: int = 3
    """Prompts from the validation text whose circuits are written to OUT/circuits."""
    prompt_tokens: int = 64
    """Tokens per circuit prompt."""
    page_tokens: int = 2**16
    """Held-out tokens of the finetuned suite's feature pages."""
    export: tuple[str, ...] = ()
    """Formats (export.FORMATS) the finetuned suite is also written in, to OUT/export/<format>."""
    finetune: SCAETrainerConfig = field(default_factory=SCAETrainerConfig)
    """Finetuning hyperparameters (the step count is finetune_steps, given to the training
    loop)."""
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
    atomic scatter/index_add kernels add in a varying order (see
    dictionary_learning.reproducibility)."""


PRESETS = ("tiny", "tiny-llama", "gpt2", "pythia-70m", "qwen2.5-0.5b")
"""The presets: two embedded models that run offline, three Hub models."""
HUB_PRESETS = {"pythia-70m": ("EleutherAI/pythia-70m-deduped", 8192),
               "qwen2.5-0.5b": ("Qwen/Qwen2.5-0.5B", 16384)}
"""Presets whose suite is pretrained here: (Hub model, features per dictionary, 16 x d_model and
about 18 x d_model)."""


FINETUNE_FLAGS = ("kl_coeff",)
"""Flags that set a field of PipelineConfig.finetune (SCAETrainerConfig) rather than of the
pipeline."""


def make_config(preset: str = PRESET, quick: bool = QUICK, **overrides) -> PipelineConfig:
    """The pipeline's settings, built in this order (a later step wins):

    1. PipelineConfig's defaults, with the finetuning constants (COEFF, LOSS, ACT_COEFF,
       KL_COEFF, N_THRESHOLD, N_RANDOM, RANDOM_COEFF, LR) in `finetune`;
    2. the preset (PRESETS; "gpt2": model, data, suite, C and budgets; "pythia-70m",
       "qwen2.5-0.5b": model, data, dictionary sizes, C and budgets; "tiny-llama": the model);
    3. QUICK's budgets (they also set n_threshold=16 and cap C and n_random at 16);
    4. the constants at the top that are not None (MODEL ... DTYPE, EXPORT);
    5. `overrides`, the script's flags (None values are ignored); those named in FINETUNE_FLAGS
       set fields of `finetune`;
    6. derived values: eval_data follows data unless set; the finetuning warmup and dead-feature
       window fit finetune_steps x batch_tokens; the wandb mode is the `wandb_mode` override
       (--wandb), else $WANDB_MODE, else WANDB_MODE.

    The step count is finetune_steps alone: the training loop gives it to the trainer.
    """
    finetune = SCAETrainerConfig(
        coeff=COEFF, loss=LOSS, act_coeff=ACT_COEFF, kl_coeff=KL_COEFF, n_threshold=N_THRESHOLD,
        n_random=N_RANDOM, random_coeff=RANDOM_COEFF, lr=LR,
    )
    if preset == "tiny":
        cfg = PipelineConfig(finetune=finetune)
    elif preset == "tiny-llama":
        cfg = PipelineConfig(model=EMBEDDED_LLAMA, finetune=finetune)
    elif preset in HUB_PRESETS:
        model, dict_size = HUB_PRESETS[preset]
        cfg = PipelineConfig(
            model=model, data="openwebtext", eval_data="openwebtext", eval_skip_docs=100_000,
            dict_size=dict_size, k=32, pretrain_steps=20_000, C=64, connection_tokens=2**20,
            finetune_steps=5_000, batch_tokens=4096, buffer_tokens=2**19, eval_tokens=2**17,
            finetune=finetune,
        )
    elif preset == "gpt2":
        cfg = PipelineConfig(
            model="gpt2", data="openwebtext", eval_data="openwebtext", eval_skip_docs=100_000,
            suite="jacobcd52/gpt2_suite_folded_ln", connections=None, C=100,
            connection_tokens=2**20, finetune_steps=10_000, batch_tokens=4096,
            buffer_tokens=2**19, eval_tokens=2**17, finetune=finetune,
        )
    else:
        raise ValueError(f"unknown preset {preset!r}; use one of {PRESETS}")
    if quick:
        cfg = replace(
            cfg, dict_size=256, k=8, pretrain_steps=60, C=min(cfg.C, 16), connection_tokens=4096,
            finetune_steps=40, batch_tokens=256, buffer_tokens=4096, eval_tokens=2048,
            circuit_prompts=2, prompt_tokens=24, page_tokens=4096,
            finetune=replace(cfg.finetune, n_threshold=16, n_random=min(N_RANDOM, 16)),
        )
    constants = {
        "model": MODEL, "data": DATA, "eval_data": EVAL_DATA, "suite": SUITE,
        "connections": CONNECTIONS, "dict_size": DICT_SIZE, "k": K,
        "pretrain_steps": PRETRAIN_STEPS, "finetune_steps": FINETUNE_STEPS,
        "eval_tokens": EVAL_TOKENS, "ctx_len": CTX_LEN, "C": C, "variant": VARIANT,
        "refine": REFINE,
        "device": DEVICE, "dtype": DTYPE, "export": tuple(EXPORT) or None,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    finetune_overrides = {k: overrides.pop(k) for k in FINETUNE_FLAGS if k in overrides}
    chosen = {k: v for k, v in {**constants, **overrides}.items() if v is not None}
    if "export" in chosen:
        chosen["export"] = tuple(chosen["export"])
        if unknown := [f for f in chosen["export"] if f not in FORMATS]:
            raise ValueError(f"EXPORT / --export: unknown format(s) {unknown}; use {FORMATS}")
    if "data" in chosen and "eval_data" not in chosen:
        chosen["eval_data"] = chosen["data"]  # held-out documents of the same text
    chosen["wandb_mode"] = resolve_wandb_mode(WANDB_MODE, overrides.get("wandb_mode"))
    cfg = replace(cfg, **chosen)
    tokens = cfg.finetune_steps * cfg.batch_tokens
    cfg.finetune = replace(
        cfg.finetune,
        **finetune_overrides,
        warmup_steps=min(cfg.finetune.warmup_steps, max(1, cfg.finetune_steps // 10)),
        # a short run needs a dead-feature window well inside its token budget for AuxK to act
        dead_tokens=min(cfg.finetune.dead_tokens, max(tokens // 20, 4 * cfg.batch_tokens)),
    )
    return cfg


#%% Stages
def dtype_of(cfg: PipelineConfig) -> torch.dtype:
    return parse_dtype(cfg.dtype, "PipelineConfig.dtype")


STAGE_VERSIONS = {"pretrain": 2, "connections": 2, "finetune": 2}
"""Version of each cached stage's output format (part of its key): bump one to recompute it."""


def preflight(cfg: PipelineConfig) -> None:
    """Check every argument that can be checked before any work; each error names it and the fix."""
    check_device(cfg.device)
    check_ctx_len(cfg.ctx_len)
    check_text_source(cfg.data)
    check_text_source(cfg.eval_data)
    for spec, what in ((cfg.connections, "connections file"), (cfg.suite, "suite folder")):
        if spec is not None and not Path(spec).expanduser().exists() and looks_like_path(spec):
            raise FileNotFoundError(f"{what} {spec!r} does not exist; pass an existing path")
    if cfg.connections is not None and Path(cfg.connections).is_file():
        load_connections(cfg.connections)  # safe load, structure and integer dtype, before work


def input_hashes(cfg: PipelineConfig) -> dict[str, str]:
    """Content hashes of the model and the texts (their names when they come from a hub)."""
    model = embedded_model_path(cfg.model) or cfg.model
    data = source_hash(cfg.data)
    eval_data = data if cfg.eval_data == cfg.data else source_hash(cfg.eval_data)
    return {"model": source_hash(model), "data": data, "eval_data": eval_data}


def settings_key(stage: str, cfg: PipelineConfig, hashes: dict[str, str], **more) -> str:
    """A stage's cache key: its format version, the model and data contents, the settings every
    stage shares, and `more` (its own settings and the hashes of its other inputs)."""
    return stage_key(stage, STAGE_VERSIONS[stage], model=hashes["model"], data=hashes["data"],
                     ctx_len=cfg.ctx_len, dtype=cfg.dtype, seed=cfg.seed, world_size=world_size(),
                     device=torch.device(cfg.device).type, threads=cfg.threads,
                     deterministic=cfg.deterministic, **more)


def contexts(cfg: PipelineConfig, tokenizer, split: str):
    """This rank's packed contexts: training text repeated, or the held-out text once."""
    if split == "train":
        return contexts_from(cfg.data, tokenizer, cfg.ctx_len, repeat=True, rank=rank(),
                             world_size=world_size())
    skip = cfg.eval_skip_docs if cfg.eval_data == cfg.data else 0
    return contexts_from(cfg.eval_data, tokenizer, cfg.ctx_len, split="validation", skip_docs=skip)


def make_buffer(cfg: PipelineConfig, model, seed: int) -> AllActivationBuffer:
    batch = per_rank(cfg.batch_tokens)
    return AllActivationBuffer(
        model, contexts(cfg, model.tokenizer, "train"),
        n_tokens=max(per_rank(cfg.buffer_tokens), batch), out_batch_size=batch,
        model_batch_size=32, device=cfg.device, dtype=dtype_of(cfg), seed=seed + rank(),
    )


def pretrained_suite(
    cfg: PipelineConfig, model, cache: Path, hashes: dict, stages: dict[str, StageRecord],
    wb: WandbSettings | None = None,
) -> tuple[SCAESuite, str]:
    """The suite to finetune and its content hash: cfg.suite, or one pretrained here (cached).
    With `wb`, the pretraining is a wandb run of the group: logged live, or replayed from the
    cached stage's metrics.jsonl."""
    if cfg.suite is not None:
        folder = suite_folder(cfg.suite)
        suite = SCAESuite.from_pretrained(folder, device=cfg.device, dtype=dtype_of(cfg))
        return suite, content_hash(folder)
    from run_pretraining import PretrainConfig, make_config as pretrain_config, pretrain_suite

    pcfg: PretrainConfig = pretrain_config(False, "", cfg.pretrain_steps)
    pcfg = replace(pcfg, model=cfg.model, data=cfg.data, dict_size=cfg.dict_size, k=cfg.k,
                   batch_tokens=cfg.batch_tokens, buffer_tokens=cfg.buffer_tokens,
                   ctx_len=cfg.ctx_len, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed,
                   eval_data=cfg.eval_data,
                   eval_skip_docs=cfg.eval_skip_docs if cfg.eval_data == cfg.data else 0,
                   eval_tokens=min(cfg.eval_tokens, pcfg.eval_tokens))
    k = settings_key("pretrain", cfg, hashes, eval_data=hashes["eval_data"],
                     eval_skip_docs=pcfg.eval_skip_docs, eval_tokens=pcfg.eval_tokens,
                     dict_size=cfg.dict_size, k=cfg.k, pretrain_steps=cfg.pretrain_steps,
                     batch_tokens=cfg.batch_tokens, buffer_tokens=cfg.buffer_tokens,
                     model_batch_size=pcfg.model_batch_size, trainer=asdict(pcfg.trainer))
    out = cache / f"pretrain-{k}"
    wb = wb or WandbSettings("disabled")
    run_cfg = {"pretrain": {k: v for k, v in asdict(pcfg).items() if k not in ("trainer", "loop")},
               "pipeline": asdict(cfg)}
    loop = replace(pcfg.loop, out_dir=str(out), resume=True, wandb_mode=wb.mode,
                   wandb_group=wb.group, wandb_dir=wb.dir, run_name="pretrain",
                   wandb_config=run_cfg)

    def compute() -> None:
        pretrain_suite(replace(pcfg, loop=loop))

    stages["pretrain"] = run_stage(out, k, (out / "suite" / "config.json").is_file, compute,
                                   cache.parent / "locks")
    if stages["pretrain"].cached:
        replay_metrics(out / "metrics.jsonl", wb, name="pretrain", job_type="train",
                       config=wandb_config(pcfg.trainer, loop))
    suite = SCAESuite.from_pretrained(out / "suite", device=cfg.device, dtype=dtype_of(cfg))
    return suite, content_hash(out / "suite")


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
            replace_file(tmp, target)
        barrier()
    return target


def connections_for(cfg: PipelineConfig, suite: SCAESuite, suite_hash: str, model, cache: Path,
                    hashes: dict, stages: dict[str, StageRecord], stage: str = "connections",
                    given: bool = True):
    """cfg.connections if given (and `given`), else the top-C connections of `suite` computed (on
    rank 0) and cached; recorded in `stages[stage]`."""
    if given and cfg.connections is not None:
        return load_connections(fetch_connections(cfg.connections, cache), suite.dict_sizes,
                                suite.parallel)
    k = settings_key("connections", cfg, hashes, suite=suite_hash, C=cfg.C, variant=cfg.variant,
                     connection_tokens=cfg.connection_tokens, buffer_tokens=cfg.buffer_tokens)
    path = cache / f"connections-{k}.pt"

    def compute() -> None:
        if is_main():
            buf = make_buffer(replace(cfg, batch_tokens=1024 * world_size()), model, cfg.seed + 17)
            acts = collect_activations(suite, buf, cfg.connection_tokens)
            save_connections(top_connections(suite, acts, cfg.C, cfg.variant), path)

    stages[stage] = run_stage(path, k, path.is_file, compute, cache.parent / "locks")
    return load_connections(path, suite.dict_sizes, suite.parallel)


def finetuned(cfg: PipelineConfig, suite: SCAESuite, conns, tag: str, model, cache: Path,
              suite_hash: str, hashes: dict, stages: dict[str, StageRecord],
              wb: WandbSettings | None = None) -> SCAESuite:
    """Finetune a copy of `suite` with `conns` (cached; an interrupted run resumes). With `wb`,
    the finetuning is a wandb run of the group: logged live, or replayed from the cache."""
    k = settings_key("finetune", cfg, hashes, tag=tag, suite=suite_hash,
                     connections=tensors_hash(conns), C=cfg.C, variant=cfg.variant,
                     finetune=asdict(cfg.finetune), finetune_steps=cfg.finetune_steps,
                     batch_tokens=cfg.batch_tokens, buffer_tokens=cfg.buffer_tokens)
    out = cache / f"finetune-{tag}-{k}"
    wb = wb or WandbSettings("disabled")
    loop = TrainConfig(steps=cfg.finetune_steps, out_dir=str(out), resume=True,
                       save_steps=max(1, cfg.finetune_steps // 4),
                       log_steps=max(1, cfg.finetune_steps // 50), wandb_mode=wb.mode,
                       run_name=f"finetune-{tag}", seed=cfg.seed, wandb_group=wb.group,
                       wandb_dir=wb.dir, wandb_config={"pipeline": asdict(cfg), "connections": tag})

    def compute() -> None:
        train_scae_suite(make_buffer(cfg, model, cfg.seed + 1), suite=copy.deepcopy(suite),
                         connections=conns, trainer_cfg=cfg.finetune, train_cfg=loop,
                         device=cfg.device, dtype=dtype_of(cfg))

    stages[f"finetune_{tag}"] = run_stage(out, k, (out / "suite" / "config.json").is_file, compute,
                                          cache.parent / "locks")
    if stages[f"finetune_{tag}"].cached:
        replay_metrics(out / "metrics.jsonl", wb, name=loop.run_name, job_type="train",
                       config=wandb_config(cfg.finetune, loop))
    return SCAESuite.from_pretrained(out / "suite", device=cfg.device, dtype=dtype_of(cfg))


def refined(cfg: PipelineConfig, tuned: SCAESuite, r: int, model, cache: Path, hashes: dict,
            stages: dict[str, StageRecord], wb: WandbSettings | None = None):
    """Refinement round r: the top-C connections of the suite finetuned in round r - 1 (round 0:
    the main finetuning), then finetune_steps more with them. Returns (suite, connections)."""
    prev = stages["finetune_top" if r == 1 else f"finetune_refine{r - 1}"].dir
    tuned_hash = content_hash(Path(prev) / "suite")
    conns = connections_for(cfg, tuned, tuned_hash, model, cache, hashes, stages,
                            stage=f"connections_refine{r}", given=False)
    return finetuned(cfg, tuned, conns, f"refine{r}", model, cache, tuned_hash, hashes, stages,
                     wb), conns


def training_curves(stages: dict[str, StageRecord], out_dir: Path) -> dict[str, str]:
    """Copies of each training stage's curves.png (loss, FVU and dead fraction against step),
    named after the stage: the cached stages keep theirs in the cache, out of the user's sight."""
    copied = {}
    for name, rec in stages.items():
        png = Path(rec.dir) / "curves.png"
        if png.is_file():
            data = png.read_bytes()
            copied[name] = str(atomic_write(out_dir / f"{name}.png", lambda fh: fh.write(data)))
    return copied


def write_products(cfg: PipelineConfig, tuned: SCAESuite, model, out_dir: Path) -> dict[str, str]:
    """OUT/suite (the finetuned suite, loadable by SCAESuite.from_pretrained, evaluate.py and
    circuits.py), its feature pages, and OUT/circuits (graphs of validation prompts + viewer)."""
    from circuits import GraphConfig, write_circuits
    from dictionary_learning.model import hf_model
    from feature_pages import PageConfig, compute_pages

    suite_dir = out_dir / "suite"
    buffer_meta = {**tuned.meta.get("buffer", {}), "ctx_len": cfg.ctx_len, "data": cfg.data}
    tuned.save_pretrained(suite_dir, {**tuned.meta, "model_name": cfg.model, "buffer": buffer_meta})
    pages = compute_pages(model, tuned, PageConfig(
        data=cfg.eval_data, n_tokens=cfg.page_tokens, ctx_len=cfg.ctx_len, device=cfg.device))
    pages_path = pages.save(out_dir / "circuits" / "feature_pages.pt")
    # prompts: the starts of the first validation contexts (BOS dropped)
    ctxs = contexts(cfg, model.tokenizer, "validation")
    prompts = [c[1 : 1 + cfg.prompt_tokens].tolist()
               for _, c in zip(range(cfg.circuit_prompts), ctxs)]
    graph_cfg = GraphConfig()
    hf_model(model).to(graph_cfg.dtype)  # the graphs' one run per prompt, in float64
    index = write_circuits(model, copy.deepcopy(tuned).to(graph_cfg.dtype), prompts,
                           out_dir / "circuits", cfg=graph_cfg, pages=pages)
    return {"suite": str(suite_dir), "feature_pages": str(pages_path),
            "circuits": str(out_dir / "circuits"), "viewer": str(index)}


def start(cfg: PipelineConfig):
    """What every pipeline entry point sets up first: threads and determinism, the stage cache,
    the model (its context length checked) and the content hashes of the inputs. Returns
    (cache folder, model, hashes)."""
    configure_determinism(cfg.threads, cfg.deterministic)
    cache = check_out_dir(check_cache_root() / "pipeline", "SCAE_CACHE")
    model = load_model(cfg.model, device=cfg.device, dtype=torch.float32)
    check_ctx_len(cfg.ctx_len, model_info(model).n_ctx)
    return cache, model, input_hashes(cfg)


def run(cfg: PipelineConfig, out_dir: str | os.PathLike) -> dict | None:
    """Run every stage; rank 0 returns the report (also written to out_dir/report.json).

    With cfg.wandb_mode not "disabled", the run is one wandb group under out_dir/wandb: a run per
    training stage (replayed from metrics.jsonl when the stage came from the cache) and an
    "evaluation" run whose summary holds the evaluation.
    """
    preflight(cfg)
    out_dir = check_out_dir(out_dir)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = round(now - clock, 2)
        clock = now

    wb = WandbSettings(cfg.wandb_mode, group=f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}",
                       dir=str(out_dir))
    cache, model, hashes = start(cfg)
    stages: dict[str, StageRecord] = {}
    lap("model")
    suite, suite_hash = pretrained_suite(cfg, model, cache, hashes, stages, wb)
    lap("pretrain")
    conns = connections_for(cfg, suite, suite_hash, model, cache, hashes, stages)
    lap("connections")
    tuned = finetuned(cfg, suite, conns, "top", model, cache, suite_hash, hashes, stages, wb)
    lap("finetune")
    tuned_conns = conns
    for r in range(1, cfg.refine + 1):
        tuned, tuned_conns = refined(cfg, tuned, r, model, cache, hashes, stages, wb)
        lap(f"refine_{r}")
    rnd = None
    if cfg.random_baseline:
        rnd_conns = random_connections(suite, conns, seed=cfg.seed)
        rnd = finetuned(cfg, suite, rnd_conns, "random", model, cache, suite_hash, hashes, stages,
                        wb)
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
    notes = [f"before_finetuning: {n}" for n in before["notes"]] + main_report["notes"]
    if rnd is not None:
        r = evaluate(rnd, "random_connections")
        result["random_connections"] = {"modules": r["modules"], "ce": r["ce"]}
        notes += [f"random_connections: {n}" for n in r["notes"]]
    result["notes"] = notes
    lap("evaluate")
    artifacts = write_products(cfg, tuned, model, out_dir)
    lap("circuits")
    result["artifacts"] = {
        **artifacts, "report": str(out_dir / "report.json"),
        "training_curves": training_curves(stages, out_dir / "training_curves"),
        **{name: str(out_dir / name) for name in ("before_finetuning", "finetuned")},
        **({"random_connections": str(out_dir / "random_connections")} if rnd is not None else {}),
        "pretrained_suite": stages["pretrain"].dir if "pretrain" in stages else cfg.suite,
        "finetune_cache": stages[f"finetune_refine{cfg.refine}" if cfg.refine else
                                 "finetune_top"].dir,
    }
    # Two runs reproduce each other exactly iff these agree (stage by stage).
    result["digests"] = {"pretrained": suite_digest(suite),
                         "connections": connections_digest(conns),
                         "finetuned": suite_digest(tuned)}
    if cfg.refine:
        result["digests"]["refined_connections"] = connections_digest(tuned_conns)
    if rnd is not None:
        result["digests"].update(random_connections=connections_digest(rnd_conns),
                                 finetuned_random=suite_digest(rnd))
    result["config"] = asdict(cfg)
    result["inputs"] = {**hashes, "suite": suite_hash, "connections": tensors_hash(conns)}
    result["stages"] = {name: r._asdict() for name, r in stages.items()}
    result["timings_s"] = timings
    for fmt in cfg.export:
        exported = export_suite(tuned, out_dir / "export" / fmt, fmt, model_name=cfg.model,
                                ctx_len=cfg.ctx_len)
        result.setdefault("exports", {})[fmt] = {
            "dir": str(exported.out_dir), "written": sorted(exported.written),
            "skipped": exported.skipped}
    atomic_write_json(out_dir / "report.json", result)
    log_evaluation(wb, result, out_dir)
    return result


#%% The C trade-off: --sweep-C 8,16,32,64,128
SWEEP_EVAL_VERSION = 1
"""Version of a sweep evaluation's cached format (part of its key)."""


def sweep_eval(cfg: PipelineConfig, s: SCAESuite, model, cache: Path, hashes: dict) -> dict:
    """Transcoder FVUs, dead fractions and CE of suite `s` (with its connections) on the evaluation
    tokens, cached under the digests of its weights and connections."""
    k = stage_key("sweep_eval", SWEEP_EVAL_VERSION, suite=suite_digest(s),
                  connections=connections_digest(s.connections), eval_data=hashes["eval_data"],
                  eval_tokens=cfg.eval_tokens, ctx_len=cfg.ctx_len, dtype=cfg.dtype,
                  threads=cfg.threads)
    path = cache / f"sweep-eval-{k}.json"
    if path.is_file():
        return json.loads(path.read_text())
    rep = report(s, model, contexts(cfg, model.tokenizer, "validation"), n_tokens=cfg.eval_tokens,
                 splice=False, plots=False, device=cfg.device, dtype=dtype_of(cfg),
                 progress=False)
    mlp = {n: m for n, m in rep["modules"].items() if is_transcoder(n)}
    row = {
        "mean_fvu_pruned": sum(m["fvu_pruned"] for m in mlp.values()) / len(mlp),
        "mean_fvu_vanilla": sum(m["fvu_vanilla"] for m in mlp.values()) / len(mlp),
        "ce_recovered_pruned": rep["ce"]["recovered_pruned"],
        "ce_pruned": rep["ce"]["pruned"], "ce_vanilla": rep["ce"]["vanilla"],
        "modules": {n: {k: m[k] for k in ("fvu_vanilla", "fvu_pruned", "dead_frac")}
                    for n, m in rep["modules"].items()},
    }
    atomic_write_json(path, row)
    return row


SWEEPS = {"C": "sweep", "finetune_steps": "sweep_steps"}
"""The settings a sweep can vary, and the stem of its output files."""


def sweep(cfg: PipelineConfig, values: list[int], out_dir: str | os.PathLike, param: str = "C",
          random: bool = True) -> dict | None:
    """For each value of `param` (C, or finetune_steps): top-C connections and, with `random`,
    random connections of the same counts, each evaluated before and after finetuning (mean
    transcoder FVUs, CE recovered, dead fractions). Every connection set, finetuning and
    evaluation is cached per value, so a longer list computes only the new values. Writes
    OUT/<stem>.json, OUT/<stem>.md (the table) and OUT/<stem>.png (stem: SWEEPS[param]); rank 0
    returns the dict."""
    if param not in SWEEPS:
        raise ValueError(f"cannot sweep {param!r}; sweep one of {sorted(SWEEPS)}")
    if not values or min(values) < 1:
        raise ValueError(f"sweep of {param} over {values}: give positive values, e.g. 8,16,32")
    if cfg.connections is not None:
        raise ValueError(
            f"a sweep computes the top-C connections of every value, but connections "
            f"{cfg.connections!r} were given: drop --connections / CONNECTIONS"
        )
    preflight(cfg)
    out_dir = check_out_dir(out_dir)
    cache, model, hashes = start(cfg)
    stages: dict[str, StageRecord] = {}
    suite, suite_hash = pretrained_suite(cfg, model, cache, hashes, stages)
    tags = ("top", "random") if random else ("top",)
    rows = []
    for value in tqdm(sorted(set(values)), desc=f"sweep {param}", disable=not is_main()):
        v_cfg = replace(cfg, **{param: value})
        conns = connections_for(v_cfg, suite, suite_hash, model, cache, hashes, stages)
        row: dict = {param: value}
        for tag in tags:
            cs = conns if tag == "top" else random_connections(suite, conns, cfg.seed)
            tuned = finetuned(v_cfg, suite, cs, tag, model, cache, suite_hash, hashes, stages)
            if is_main():
                before = copy.deepcopy(suite)
                before.set_connections(cs)
                row[tag] = {"before": sweep_eval(v_cfg, before, model, cache, hashes),
                            "after": sweep_eval(v_cfg, tuned, model, cache, hashes)}
        row["cached"] = {name: stages[name].cached
                         for name in ("connections", *(f"finetune_{t}" for t in tags))}
        rows.append(row)
    if not is_main():
        return None
    result = {"param": param, "rows": rows, "config": asdict(cfg)}
    stem = SWEEPS[param]
    atomic_write_json(out_dir / f"{stem}.json", result)
    atomic_write(out_dir / f"{stem}.md", lambda fh: fh.write((sweep_table(result) + "\n").encode()))
    save_sweep_plot(result, out_dir / f"{stem}.png")
    return result


def sweep_rows(result: dict) -> tuple[list[str], list[list]]:
    """The sweep as (columns, rows): a row per value and connection kind."""
    param = result["param"]
    cols = [param, "connections", "mean mlp FVU pruned: before", "after",
            "mean mlp FVU vanilla: before", "after", "CE recovered pruned: before", "after"]
    rows = []
    for r in result["rows"]:
        for tag in ("top", "random"):
            if tag in r:
                b, a = r[tag]["before"], r[tag]["after"]
                rows.append([r[param], tag, b["mean_fvu_pruned"], a["mean_fvu_pruned"],
                             b["mean_fvu_vanilla"], a["mean_fvu_vanilla"],
                             b["ce_recovered_pruned"], a["ce_recovered_pruned"]])
    return cols, rows


def sweep_table(result: dict) -> str:
    """The sweep as a Markdown table."""
    cols, rows = sweep_rows(result)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for value, tag, *nums in rows:
        lines.append(f"| {value} | {tag} | " + " | ".join(f"{v:.4f}" for v in nums) + " |")
    return "\n".join(lines)


def save_sweep_plot(result: dict, path: Path) -> None:
    """Two panels against the swept value (log scale): mean transcoder FVU (pruned, and vanilla
    after finetuning), and CE recovered by the pruned suite; before and after finetuning."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    param, rows = result["param"], result["rows"]
    xs = [r[param] for r in rows]
    fig = Figure(figsize=(10, 3.8))
    FigureCanvasAgg(fig)
    for i, (key, label) in enumerate((("mean_fvu_pruned", "mean transcoder FVU"),
                                      ("ce_recovered_pruned", "CE recovered, pruned suite"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for tag, color in (("top", "C0"), ("random", "C3")):
            if tag not in rows[0]:
                continue
            for when, style in (("before", "o--"), ("after", "o-")):
                ax.plot(xs, [r[tag][when][key] for r in rows], style, color=color,
                        label=f"pruned, {tag} connections, {when} finetuning")
        if key == "mean_fvu_pruned":
            ax.plot(xs, [r["top"]["after"]["mean_fvu_vanilla"] for r in rows], "s:", color="k",
                    label="vanilla, after finetuning (top)")
            ax.set_yscale("log")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("C (connections per transcoder feature)" if param == "C" else
                      "finetuning steps")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100, bbox_inches="tight"))


#%% Results: tables, plots, wandb
def variants(result: dict) -> dict[str, dict]:
    """The evaluated suites of a report, each {"modules", "ce"}: finetuned first."""
    out = {"finetuned": result, "before_finetuning": result["before_finetuning"]}
    if result.get("random_connections") is not None:
        out["random_connections"] = result["random_connections"]
    return out


VARIANT_COLUMNS = ["suite", "mean mlp FVU vanilla", "mean mlp FVU pruned", "CE vanilla",
                   "CE pruned", "CE recovered pruned"]


def variant_rows(result: dict) -> tuple[list[str], list[list]]:
    """Mean transcoder FVUs and CE of each evaluated suite, as (columns, rows)."""
    rows = []
    for name, r in variants(result).items():
        mlp = [m for n, m in r["modules"].items() if is_transcoder(n)]
        rows.append([name, sum(m["fvu_vanilla"] for m in mlp) / len(mlp),
                     sum(m["fvu_pruned"] for m in mlp) / len(mlp), r["ce"]["vanilla"],
                     r["ce"]["pruned"], r["ce"]["recovered_pruned"]])
    return VARIANT_COLUMNS, rows


def summary(result: dict) -> str:
    """The finetuned suite's table, then mean transcoder FVUs and CE recovered of each variant."""
    _, rows = variant_rows(result)
    lines = [format_table(result), "", f"{'suite':<20} {'mean mlp FVU vanilla':>21} "
             f"{'mean mlp FVU pruned':>20} {'CE rec. pruned':>15}"]
    for name, fv, fp, _, _, rec in rows:
        lines.append(f"{name:<20} {fv:21.4f} {fp:20.4f} {rec:15.3f}")
    return "\n".join(lines)


def html_table(columns: list[str], rows: list[list], caption: str = "") -> str:
    """A plain HTML table (floats to 4 significant digits, None as "-") for a notebook."""
    def cell(v) -> str:
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    head = "".join(f"<th>{c}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><caption>{caption}</caption><tr>{head}</tr>{body}</table>"


def show(result: dict, out_dir: str | os.PathLike) -> None:
    """In a notebook: both tables rendered, the finetuned suite's plots inline. Else: print them."""
    if not in_notebook():
        print(summary(result))
        print(f"\nreport: {Path(out_dir) / 'report.json'}; timings (s): {result['timings_s']}")
        print(f"finetuned suite: {result['artifacts']['suite']}")
        print(f"circuits viewer: {Path(result['artifacts']['viewer']).resolve()}")
        return
    from IPython.display import HTML, Image, display

    display(HTML(html_table(*module_rows(result), caption="finetuned suite (top-C connections)")))
    display(HTML(html_table(*variant_rows(result), caption="every evaluated suite")))
    for png in sorted((Path(out_dir) / "finetuned").glob("*.png")):
        display(Image(filename=str(png)))


def log_evaluation(wb: WandbSettings, result: dict, out_dir: Path) -> None:
    """The evaluation as the group's "evaluation" run: CE and per-module figures of every suite in
    its summary, a wandb.Table of the modules per suite and of the suites, the plots as images."""
    scalars, tables, images = {}, {"suites": variant_rows(result)}, {}
    for name, rep in variants(result).items():
        ce = {k: v for k, v in rep["ce"].items() if not isinstance(v, dict)}  # splice: a table
        scalars.update({f"{name}/ce/{k}": v for k, v in ce.items()})
        cols, rows = module_rows(rep)
        tables[f"{name}/modules"] = (cols, rows)
        for row in rows:
            scalars.update({f"{name}/{row[0]}/{c}": v for c, v in zip(cols[1:], row[1:])})
        images.update({f"{name}/{p.stem}": p for p in sorted((out_dir / name).glob("*.png"))})
    summary_run(wb, name="evaluation", job_type="evaluate", config={"pipeline": result["config"]},
                scalars=scalars, tables=tables, images=images, default_dir=out_dir)


#%% Main: the script's flags (a notebook never parses any)
def int_list(text: str) -> list[int]:
    """"8,16,32" -> [8, 16, 32], for argparse (its error names the flag)."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers")


def main(argv: list[str] | None = None) -> dict | None:
    """Parse the flags (each defaults to its constant at the top), run, show the results."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=PRESET, choices=PRESETS)
    p.add_argument("--quick", action="store_true", default=QUICK,
                   help="tiny budgets: a smoke test of every stage")
    p.add_argument("--out", default=OUT, help="folder for report.json, plots and wandb/")
    p.add_argument("--model", help="override the preset's model (name or save_pretrained folder)")
    p.add_argument("--suite", help="override the pretrained suite (folder or Hub id)")
    p.add_argument("--connections", help="connections file or Google Drive id")
    p.add_argument("--data", help="training text: 'embedded', a file/folder, or a datasets name")
    p.add_argument("--eval-data", dest="eval_data", help="evaluation text (default: --data)")
    p.add_argument("--steps", type=int, dest="finetune_steps", help="finetuning steps")
    p.add_argument("--ctx-len", type=int, dest="ctx_len", help="context length, BOS included")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--export", action="append", choices=FORMATS,
                   help="also write the finetuned suite in this format to OUT/export/ (repeatable)")
    p.add_argument("--wandb", dest="wandb_mode", choices=["disabled", "offline", "online"],
                   help="wandb mode; overrides $WANDB_MODE, which overrides WANDB_MODE in the file")
    p.add_argument("--sweep-C", dest="sweep_C", type=int_list, metavar="C1,C2,...",
                   help="instead of one run: the C trade-off (top-C vs random connections, "
                        "before and after finetuning) written to OUT/sweep.{json,md,png}")
    p.add_argument("--sweep-steps", dest="sweep_steps", type=int_list, metavar="S1,S2,...",
                   help="instead of one run: pruned and vanilla FVU against the finetuning "
                        "length (top-C connections), to OUT/sweep_steps.{json,md,png}")
    p.add_argument("--refine", type=int,
                   help="rounds of recomputing the connections on the finetuned suite and "
                        "finetuning again (default 0)")
    p.add_argument("--kl-coeff", type=float, dest="kl_coeff",
                   help=f"weight of the end-to-end KL term per token (default {KL_COEFF})")
    p.add_argument("--seed", type=int, help="seed of every stage (default 0)")
    p.add_argument("--threads", type=int,
                   help=f"intra-op CPU threads; results depend on it (default {DEFAULT_THREADS})")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="torch.use_deterministic_algorithms: bitwise-reproducible CUDA runs "
                        "(slower)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    init_distributed()
    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("preset", "quick", "out", "sweep_C", "sweep_steps")}
    cfg = make_config(args.preset, args.quick, **overrides)
    for param, values in (("C", args.sweep_C), ("finetune_steps", args.sweep_steps)):
        if values:
            result = sweep(cfg, values, args.out, param, random=param == "C")
            if result is not None:
                print(sweep_table(result))
                print(f"\n{Path(args.out) / SWEEPS[param]}.json, .md, .png written")
            return result
    result = run(cfg, args.out)
    if result is not None:
        show(result, args.out)
    return result


#%% Run: as a script, with its flags; in a notebook, with the constants at the top
if __name__ == "__main__":
    if in_notebook():
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        result = run(make_config(PRESET, QUICK), OUT)
        show(result, OUT)
    else:
        main()
