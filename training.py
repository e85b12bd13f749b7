"""The training loop shared by TopK pretraining and SCAE finetuning, with exact checkpoint resume.

A trainer implements `update(step, batch) -> dict[str, float]`, `state_dict()`,
`load_state_dict(state)` and has `dicts`; a buffer is an iterator of ActivationBatch with
`state_dict()` / `load_state_dict()`.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dictionary_learning.distributed import all_gather_object, barrier, is_main, rank, world_size
from dictionary_learning.errors import DataExhaustedError, UnsafeFileError
from dictionary_learning.files import atomic_torch_save
from dictionary_learning.logger import MetricsLogger
from dictionary_learning.safe_load import check_finite, flat_state, load_tensor_file

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "scae-checkpoint"
CHECKPOINT_VERSION = 2
"""Version 2: only tensors and plain containers (they load with weights_only=True)."""


@dataclass
class TrainConfig:
    """Settings of the training loop (not of the model or the optimiser)."""

    steps: int
    """Total optimisation steps of the run (a resumed run continues up to this). The one source of
    the step count: `train` gives it to the trainer, whose lr schedule follows it."""
    out_dir: str
    """Folder for checkpoint.pt, metrics.jsonl and curves.png."""
    save_steps: int = 0
    """Checkpoint every this many steps (0 = only at the end)."""
    log_steps: int = 10
    """Log metrics every this many steps."""
    resume: bool = False
    """Continue from out_dir/checkpoint.pt if it exists (bit-identical on CPU)."""
    wandb_mode: str = "disabled"
    """'disabled', 'offline' or 'online' (online without an API key logs locally only)."""
    wandb_project: str = "scae"
    """wandb project name."""
    run_name: str | None = None
    """wandb run name."""
    wandb_group: str | None = None
    """wandb group (a pipeline puts all its runs in one)."""
    wandb_dir: str | None = None
    """Folder wandb writes its run folders into (None: out_dir)."""
    wandb_config: dict | None = None
    """More entries for the wandb run's config (e.g. the whole pipeline's settings)."""
    seed: int = 0
    """Seed of torch / random / numpy at the start of a fresh run."""
    max_steps_this_run: int | None = None
    """Stop after this many steps in this call (e.g. to fit a time slot); the run can be resumed."""

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ValueError(f"TrainConfig.steps={self.steps} must be positive")
        if self.save_steps < 0 or self.log_steps <= 0:
            raise ValueError("TrainConfig: save_steps must be >= 0 and log_steps > 0")


# ---------------------------------------------------------------------------- checkpoint I/O
def rng_state() -> dict:
    """RNG states of torch, python, numpy (if imported) and CUDA (if present), as tensors and plain
    containers so a checkpoint loads with weights_only=True."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if "numpy" in sys.modules:
        name, keys, pos, has_gauss, gauss = sys.modules["numpy"].random.get_state()
        state["numpy"] = {"name": name, "keys": torch.from_numpy(keys.astype("int64")), "pos": pos,
                          "has_gauss": has_gauss, "cached_gaussian": gauss}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"],
                             s["has_gauss"], s["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(seed)


def save_checkpoint(path, trainer, buffer, step: int, cfg: TrainConfig) -> None:
    """Collective: every rank contributes its buffer position and RNG states; rank 0 writes."""
    local = {"buffer": buffer.state_dict(), "rng": rng_state(),
             "trainer": trainer.local_state_dict() if hasattr(trainer, "local_state_dict") else {}}
    ranks = all_gather_object(local)
    if is_main():
        atomic_torch_save(
            {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "step": step,
             "trainer": trainer.state_dict(), "ranks": ranks, "train_config": asdict(cfg)},
            path,
        )
    barrier()


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a training checkpoint on CPU (trainers move state to their device) without running
    code from it; refuse old or foreign files and non-finite dictionary weights, naming them."""
    fix = (f"Delete {str(path)!r} to restart this run from step 0 (the pipeline then recomputes "
           "the stage).")
    ckpt = load_tensor_file(path, "training checkpoint", fix)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UnsafeFileError(
            f"refusing to resume from {str(path)!r}: it is not a {CHECKPOINT_FORMAT} file (written "
            f"by another program, or by a version before checkpoint format {CHECKPOINT_VERSION}). "
            f"{fix}"
        )
    if ckpt.get("format_version") != CHECKPOINT_VERSION:
        raise UnsafeFileError(
            f"refusing to resume from {str(path)!r}: checkpoint format version "
            f"{ckpt.get('format_version')} but this code reads version {CHECKPOINT_VERSION}. {fix}"
        )
    dicts = ckpt.get("trainer", {}).get("dicts", {})
    check_finite(flat_state(dicts), f"training checkpoint {str(path)!r}", fix)
    return ckpt


def restore_checkpoint(ckpt: dict, trainer, buffer) -> int:
    """Load a checkpoint's state into this rank's trainer and buffer; returns its step."""
    ranks = ckpt["ranks"]
    if len(ranks) != world_size():
        raise ValueError(
            f"the checkpoint was written by {len(ranks)} process(es) but this run has "
            f"{world_size()}; resume with the same number of processes (torchrun --nproc_per_node)"
        )
    mine = ranks[rank()]
    trainer.load_state_dict(ckpt["trainer"])
    if mine["trainer"]:
        trainer.load_local_state_dict(mine["trainer"])
    buffer.load_state_dict(mine["buffer"])
    set_rng_state(mine["rng"])
    return int(ckpt["step"])


# ------------------------------------------------------------------------------------ loop
def wandb_config(trainer_cfg, cfg: TrainConfig) -> dict:
    """A run's wandb config: the loop settings, the trainer's hyperparameters (a dataclass, e.g.
    `trainer.cfg`) and cfg.wandb_config."""
    out = {"loop": {k: v for k, v in asdict(cfg).items() if k != "wandb_config"}}
    if is_dataclass(trainer_cfg):
        out["trainer"] = asdict(trainer_cfg)
    return {**out, **(cfg.wandb_config or {})}


def train(
    trainer,
    buffer,
    cfg: TrainConfig,
    callback: Callable[[int, dict], None] | None = None,
):
    """Run `trainer.update` over `buffer` for cfg.steps steps; log, checkpoint, resume.

    `callback(step, metrics)` runs after every step (on every rank). Returns the trainer.
    """
    out = Path(cfg.out_dir)
    ckpt_path = out / CHECKPOINT
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
    # The loop's step count is the one source of truth: the trainer's lr schedule follows it.
    if hasattr(trainer, "set_total_steps"):
        trainer.set_total_steps(cfg.steps)
    start = 0
    if cfg.resume and ckpt_path.is_file():
        start = restore_checkpoint(load_checkpoint(ckpt_path), trainer, buffer)
        logger.info("resumed from %s at step %d", ckpt_path, start)
    else:
        if cfg.resume:
            logger.info("resume=True but %s does not exist: starting a fresh run", ckpt_path)
        seed_everything(cfg.seed)
    if start >= cfg.steps:
        logger.info("checkpoint is already at step %d >= steps=%d; nothing to do", start, cfg.steps)
        return trainer

    mlog = MetricsLogger(
        out, wandb_mode=cfg.wandb_mode, project=cfg.wandb_project, run_name=cfg.run_name,
        config=wandb_config(getattr(trainer, "cfg", None), cfg),
        resume_step=start if start > 0 else None,
        wandb_group=cfg.wandb_group, wandb_dir=cfg.wandb_dir, job_type="train",
    )
    end = cfg.steps
    if cfg.max_steps_this_run is not None:
        end = min(cfg.steps, start + cfg.max_steps_this_run)
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, disable=not is_main(),
               desc="train", dynamic_ncols=True)
    try:
        for step in bar:
            t0 = time.perf_counter()
            try:
                batch = next(buffer)
            except StopIteration:
                raise DataExhaustedError(
                    f"the activation buffer ran out of data at step {step} of {cfg.steps}; give it "
                    "more tokens (a longer text source) or lower TrainConfig.steps"
                ) from None
            metrics = trainer.update(step, batch)
            if callback is not None:
                callback(step, metrics)
            done = step + 1
            if done % cfg.log_steps == 0 or step == start or done == cfg.steps:
                mlog.log({**metrics, "step_time": time.perf_counter() - t0}, step=done)
                bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4g}")
            if cfg.save_steps and done % cfg.save_steps == 0 and done < end:
                save_checkpoint(ckpt_path, trainer, buffer, done, cfg)
        save_checkpoint(ckpt_path, trainer, buffer, end, cfg)
    finally:
        bar.close()
        mlog.finish()
    return trainer


def train_scae_suite(
    buffer,
    *,
    trainer_cfg,
    train_cfg: TrainConfig,
    suite=None,
    repo_id_in: str | None = None,
    connections=None,
    repo_id_out: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
):
    """Finetune a connected suite through the pruned pass (docs/method.md §5); returns the suite.

    The suite is `suite` (an SCAESuite) or loaded from `repo_id_in` (a local folder or a Hub id);
    `connections` (exchange format, or a file path) replaces the suite's own. The finetuned suite is
    saved to `<train_cfg.out_dir>/suite` and, with `repo_id_out`, pushed to the Hub (token from the
    environment or `huggingface-cli login`).
    """
    from dictionary_learning.connections import load_connections
    from dictionary_learning.suite import SCAESuite
    from dictionary_learning.unembed import Unembed
    from trainers.scae import TrainerSCAESuite

    if (suite is None) == (repo_id_in is None):
        raise ValueError(
            "train_scae_suite needs exactly one of suite= (an SCAESuite) or repo_id_in= (a suite "
            "folder or Hub id, e.g. 'jacobcd52/gpt2_suite_folded_ln')"
        )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if suite is None:
        suite = SCAESuite.from_pretrained(repo_id_in, device=device, dtype=dtype)
    if connections is not None:
        if isinstance(connections, (str, os.PathLike)):
            connections = load_connections(connections, suite.dict_sizes, suite.parallel)
        suite.set_connections(connections)
    if not suite.has_connections:
        raise ValueError(
            "the suite has no connections: pass connections= (a file from find_top_connections.py "
            "or its exchange-format dict)"
        )
    if hasattr(buffer, "d_model"):
        suite.check_fits(buffer.n_layers, buffer.d_model, "the buffer's model",
                         getattr(buffer, "suite_arch", None))
    unembed = None
    if getattr(trainer_cfg, "kl_coeff", 0) > 0:
        if not hasattr(buffer, "model"):
            raise ValueError(
                "kl_coeff > 0 needs the model's head: use an AllActivationBuffer (it holds the "
                "model), set kl_coeff=0, or build TrainerSCAESuite yourself with "
                "unembed=Unembed.from_model(model)"
            )
        unembed = Unembed.from_model(buffer.model)
    trainer = TrainerSCAESuite(suite, trainer_cfg, device=device, dtype=dtype, unembed=unembed)
    train(trainer, buffer, train_cfg)
    out = Path(train_cfg.out_dir) / "suite"
    if is_main():
        meta = {**suite.meta, "finetune": asdict(trainer.cfg), "steps": train_cfg.steps}
        suite.save_pretrained(out, meta)
        if repo_id_out:
            push_to_hub(out, repo_id_out)
    barrier()
    return suite


def push_to_hub(folder: str | os.PathLike, repo_id: str) -> None:
    """Upload a suite folder to a Hub model repo (created if needed; private by default)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True, private=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id)
    logger.info("pushed %s to https://huggingface.co/%s", folder, repo_id)
