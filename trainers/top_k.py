"""TopK pretraining of a whole suite at once (Gao et al. 2024, "Scaling and evaluating sparse
autoencoders").

Every dictionary of the suite is trained from one `ActivationBatch`: `attn_<l>` (an SAE) maps
attn_out_l to itself, `mlp_<l>` (a transcoder) maps mlp_in_l to mlp_out_l. Loss per dictionary:
FVU (docs/method.md §5) + auxk_alpha * AuxK, where AuxK reconstructs the main residual from the top
k_aux PRE-TopK activations of dead features (docs/departures.md §4).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F_
from torch import Tensor

from dictionary_learning.dictionary import TopKDictionary, topk_relu
from dictionary_learning.distributed import (
    all_reduce_max_,
    average_gradients,
    broadcast_params,
    world_size,
)
from dictionary_learning.errors import NonFiniteLossError
from dictionary_learning.metrics import fvu
from dictionary_learning.suite_io import check_name, suite_order

logger = logging.getLogger(__name__)

BASE_LR = 2e-4


@dataclass
class TopKTrainerConfig:
    """Hyperparameters of TopK suite pretraining."""

    total_steps: int | None = None
    """Optimisation steps of the whole run (sets the lr decay). None: the training loop sets it
    from TrainConfig.steps, the one source of truth; a value set here must agree with it."""
    lr: float | None = None
    """Learning rate for every dictionary; None = auto: base_lr / sqrt(F / 2**14), per
    dictionary."""
    base_lr: float = BASE_LR
    """Learning rate of an F = 2**14 dictionary in the auto rule (Gao et al.)."""
    warmup_steps: int = 1000
    """Linear lr warmup from ~0 to the full lr over this many steps."""
    decay_start: float = 0.8
    """Fraction of total_steps after which the lr decays linearly to 0 at the end."""
    grad_clip: float = 1.0
    """Max gradient norm, applied to each dictionary's parameters separately (0 = no clipping)."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss."""
    auxk_relu: bool = False
    """ReLU the dead pre-activations in AuxK (Gao et al.: True). False (the default, and what the
    README's figures use) lets dead features whose pre-activations are negative on every token
    still get gradient (measured on the embedded model's attn_0: 65% -> 15-20% dead features);
    see docs/departures.md."""
    k_aux: int | None = None
    """Number of dead features used by AuxK; None = d_out // 2 (clipped to F)."""
    dead_tokens: int = 10_000_000
    """A feature is dead when it has not fired for more than this many tokens (all ranks
    together)."""
    resample_steps: int = 0
    """Every this many steps (0: never), until the lr decay starts, re-initialise each dead
    feature from a token the dictionary reconstructs badly (docs/method.md §5)."""
    geometric_median_iters: int = 100
    """Weiszfeld iterations for the SAE b_dec initialisation."""
    seed: int = 0
    """Seed of dictionary initialisation."""

    def __post_init__(self) -> None:
        if self.total_steps is not None and self.total_steps <= 0:
            raise ValueError(f"TopKTrainerConfig.total_steps={self.total_steps} must be positive")
        if not 0.0 <= self.decay_start <= 1.0:
            raise ValueError(
                f"TopKTrainerConfig.decay_start={self.decay_start} is a fraction of total_steps; "
                "pass a value in [0, 1]"
            )
        if self.warmup_steps < 0 or self.dead_tokens <= 0:
            raise ValueError("TopKTrainerConfig: warmup_steps must be >= 0 and dead_tokens > 0")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"TopKTrainerConfig.lr={self.lr} must be positive (or None for auto)")


def auto_lr(dict_size: int, base_lr: float = BASE_LR) -> float:
    """Gao et al.'s learning-rate scaling: base_lr / sqrt(F / 2**14)."""
    return base_lr / math.sqrt(dict_size / 2**14)


def lr_schedule(total_steps: int, warmup_steps: int, decay_start: float):
    """Multiplier of the lr after `s` steps: linear warmup, constant, linear decay to 0 at the
    end."""
    decay_from = int(decay_start * total_steps)

    def factor(s: int) -> float:
        warm = min(1.0, (s + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        if s < decay_from or total_steps <= decay_from:
            return warm
        return warm * max(0.0, (total_steps - s) / (total_steps - decay_from))

    return factor


@torch.no_grad()
def geometric_median(points_BD: Tensor, n_iter: int = 100, tol: float = 1e-7) -> Tensor:
    """Geometric median of the rows by Weiszfeld iterations (in float64)."""
    pts = points_BD.double()
    guess = pts.mean(0)
    for _ in range(n_iter):
        w_B = 1.0 / (pts - guess).norm(dim=1).clamp_min(1e-12)
        new = (w_B[:, None] * pts).sum(0) / w_B.sum()
        done = (new - guess).norm() <= tol * (guess.norm() + 1e-12)
        guess = new
        if done:
            break
    return guess.to(points_BD.dtype)


def auxk_loss(
    d: TopKDictionary,
    x_BI: Tensor,
    residual_BD: Tensor,
    dead_F: Tensor,
    k_aux: int,
    relu: bool = False,
) -> Tensor:
    """AuxK: reconstruct the residual e = y - yhat from the top k_aux dead PRE-TopK activations.

    The aux reconstruction W_dec TopK(ReLU(pre restricted to dead)) (no b_dec) approximates +e;
    the loss is normalised by the residual's variance. Zero when no feature is dead.
    `relu=False` (the default) uses the raw pre-activations, so dead features whose
    pre-activations are negative on every token (which the ReLU cuts off from any gradient) still
    learn; True is Gao et al.'s ReLU.
    """
    n_dead = int(dead_F.sum())
    if n_dead == 0:
        return residual_BD.new_zeros((), dtype=torch.float32)
    dead_idx = dead_F.nonzero().squeeze(1)
    # The dead features' pre-activations from their encoder rows alone: the product and its
    # backward cost n_dead / F of the dense encoder's (the vanilla pass keeps no gradient of
    # the [B, F] pre-activations; see TopKDictionary.encode_with_pre_acts).
    W_enc_ZI, b_enc_Z = d.encoder.weight.index_select(0, dead_idx), d.encoder.bias[dead_idx]
    pre_dead_BZ = F_.linear(x_BI, W_enc_ZI, b_enc_Z)
    dead_feats = topk_relu(pre_dead_BZ, min(k_aux, n_dead), relu=relu)
    # Dense over the dead columns only: faster than embedding_bag for k_aux ~ D/2, and [B, n_dead].
    aux_BD = dead_feats.dense(n_dead).to(d.decoder.weight.dtype) @ d.decoder.weight[:, dead_idx].T
    return fvu(residual_BD.detach(), aux_BD, across_ranks=True)


class TopKSuiteTrainer:
    """Trains every dictionary of a suite at once; implements the trainer protocol of
    `training.train`."""

    def __init__(
        self,
        dicts: dict[str, TopKDictionary],
        cfg: TopKTrainerConfig,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if not dicts:
            raise ValueError("TopKSuiteTrainer: `dicts` is empty")
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        self.names = suite_order(dicts)
        for n in self.names:
            check_name(n, dicts[n])
        self.dicts = {n: dicts[n].to(device=self.device, dtype=dtype) for n in self.names}
        self.k_aux = {}
        self.lrs = {}
        for n, d in self.dicts.items():
            k_aux = cfg.k_aux if cfg.k_aux is not None else d.d_out // 2
            if k_aux <= 0:
                raise ValueError(f"TopKTrainerConfig.k_aux={k_aux} must be positive")
            self.k_aux[n] = min(k_aux, d.dict_size)
            self.lrs[n] = cfg.lr if cfg.lr is not None else auto_lr(d.dict_size, cfg.base_lr)
        self.optimizer = torch.optim.Adam(
            [{"params": list(self.dicts[n].parameters()), "lr": self.lrs[n], "name": n}
             for n in self.names],
            betas=(0.9, 0.999),
        )
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        if cfg.total_steps is not None:
            self.set_total_steps(cfg.total_steps)
        self.tokens_since_fired = {
            n: torch.zeros(d.dict_size, dtype=torch.long, device=self.device)
            for n, d in self.dicts.items()
        }
        self.initialized = False

    # ---- data ----
    def io(self, name: str, batch) -> tuple[Tensor, Tensor]:
        """(input, target) of dictionary `name` from an ActivationBatch, validated."""
        kind, _ = check_name(name)
        if name not in batch.src or (kind == "mlp" and name not in batch.tgt):
            raise KeyError(
                f"dictionary {name!r} has no activations in the batch "
                f"(src has {sorted(batch.src)}, tgt has {sorted(batch.tgt)}); build the buffer "
                "for the suite's layers"
            )
        x = batch.src[name]
        y = x if kind == "attn" else batch.tgt[name]
        d = self.dicts[name]
        if x.ndim != 2 or x.shape[-1] != d.d_in or y.ndim != 2 or y.shape[-1] != d.d_out:
            raise ValueError(
                f"dictionary {name!r} expects input [B, {d.d_in}] and target [B, {d.d_out}], got "
                f"{tuple(x.shape)} and {tuple(y.shape)}; match d_in/d_out to the model's d_model"
            )
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{name!r}: input has {x.shape[0]} rows but target {y.shape[0]}")
        return x.to(self.device, self.dtype), y.to(self.device, self.dtype)

    @torch.no_grad()
    def init_from_batch(self, batch) -> None:
        """b_dec = geometric median of the targets (SAEs) or their mean (transcoders).

        The encoder bias is set to -W_enc c, with c the same centre of the input, so features
        initially see a centred input (dictionary_learning's W_enc (x - b_dec) with b_enc = 0).
        """
        for n, d in self.dicts.items():
            x, y = self.io(n, batch)
            if d.is_transcoder:
                d.b_dec.copy_(y.float().mean(0).to(d.b_dec.dtype))
                c = x.float().mean(0)
            else:
                d.b_dec.copy_(geometric_median(y.float(), self.cfg.geometric_median_iters))
                c = d.b_dec.float()
            d.encoder.bias.copy_((-(d.encoder.weight.float() @ c)).to(d.encoder.bias.dtype))
        broadcast_params(p for d in self.dicts.values() for p in d.parameters())
        self.initialized = True

    # ---- training ----
    def parameters(self):
        return [p for n in self.names for p in self.dicts[n].parameters()]

    def sync_grads(self) -> None:
        """Average gradients over ranks (no-op on one process). Called before optimizer.step()."""
        average_gradients(self.parameters())

    def dead_mask(self, name: str) -> Tensor:
        return self.tokens_since_fired[name] > self.cfg.dead_tokens

    def losses(self, batch) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """Per-dictionary losses, scalar metrics (tensors), and the indices of fired features."""
        losses, metrics, fired = {}, {}, {}
        for n in self.names:
            d = self.dicts[n]
            x, y = self.io(n, batch)
            feats = d.encode(x)
            recon = d.decode(feats)
            main = fvu(y, recon, across_ranks=True)
            aux = auxk_loss(
                d, x, y.float() - recon.float(), self.dead_mask(n), self.k_aux[n],
                relu=self.cfg.auxk_relu,
            )
            losses[n] = main + self.cfg.auxk_alpha * aux
            active_BK = feats.vals_BK > 0
            fired[n] = feats.idx_BK[active_BK]
            metrics[f"{n}/fvu"], metrics[f"{n}/auxk"] = main.detach(), aux.detach()
            metrics[f"{n}/l0"] = active_BK.sum(1).float().mean()
        return losses, metrics, fired

    def set_total_steps(self, steps: int) -> None:
        """Build the lr schedule of a `steps`-step run. `training.train` calls this with
        TrainConfig.steps, so the step count has one source of truth; a cfg.total_steps set by
        hand must agree with it."""
        if self.scheduler is not None:
            if steps != self.cfg.total_steps:
                raise ValueError(
                    f"{type(self.cfg).__name__}.total_steps={self.cfg.total_steps} disagrees with "
                    f"the training loop's steps={steps}; leave total_steps None (the loop sets it)"
                )
            return
        self.cfg = replace(self.cfg, total_steps=steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_schedule(steps, self.cfg.warmup_steps, self.cfg.decay_start)
        )

    def update(self, step: int, batch) -> dict[str, float]:
        """One optimisation step on every dictionary; returns scalar metrics."""
        if self.scheduler is None:
            raise ValueError(
                "the trainer has no step count: call set_total_steps(steps) (training.train does) "
                "or set TopKTrainerConfig.total_steps"
            )
        if not self.initialized:
            self.init_from_batch(batch)
        losses, metrics, fired = self.losses(batch)
        # one entry per dictionary, plus suite-level terms (the finetuning trainer's "kl")
        loss_names = list(losses)
        loss_values = torch.stack([losses[n].detach().float() for n in loss_names]).tolist()
        for n, v in zip(loss_names, loss_values):
            if not math.isfinite(v):
                raise NonFiniteLossError(n, step, v)

        self.optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        for n in self.names:
            self.dicts[n].remove_parallel_decoder_grad()
        self.sync_grads()
        if self.cfg.grad_clip > 0:
            for n in self.names:
                torch.nn.utils.clip_grad_norm_(self.dicts[n].parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        for n in self.names:
            self.dicts[n].normalize_decoder()
        self._update_dead(batch_size=batch.initial.shape[0], fired_idx=fired)
        every, decay_from = self.cfg.resample_steps, self.cfg.decay_start * self.cfg.total_steps
        if every > 0 and (step + 1) % every == 0 and step + 1 < decay_from:
            for n in self.names:
                metrics[f"{n}/resampled"] = torch.tensor(float(self.resample_dead(n, batch)))

        for n in self.names:
            metrics[f"{n}/dead_frac"] = self.dead_mask(n).float().mean()
        keys = list(metrics)
        values = torch.stack([metrics[k].float() for k in keys]).tolist()
        out: dict[str, Any] = dict(zip(keys, values))
        out["loss"] = float(sum(loss_values))
        out["lr"] = self.optimizer.param_groups[0]["lr"]
        out["lr_factor"] = self.scheduler.get_last_lr()[0] / self.lrs[self.names[0]]
        return out

    @torch.no_grad()
    def resample_dead(self, name: str, batch) -> int:
        """Re-initialise the dead features of dictionary `name` from this batch; returns their
        number.

        Each dead feature j takes a token t drawn with probability proportional to the squared
        error ||y_t - yhat_t||^2 of the vanilla reconstruction: its decoder column becomes that
        error's direction, its encoder row the direction of the token's centred input scaled to
        0.2 x the mean norm of the live encoder rows, its encoder bias 0. Its Adam moments and its
        dead counter restart from zero. Every rank draws the same tokens from the same seed only
        if the batches agree, so under torch.distributed the new weights are rank 0's.
        """
        d = self.dicts[name]
        dead_F = self.dead_mask(name)
        n_dead = int(dead_F.sum())
        if n_dead == 0:
            return 0
        x, y = self.io(name, batch)
        err_BD = (y - d(x)).float()
        weight_B = err_BD.pow(2).sum(1)
        if float(weight_B.sum()) <= 0:
            return 0
        gen = torch.Generator(device=weight_B.device).manual_seed(self.cfg.seed + n_dead)
        t_Z = torch.multinomial(weight_B, n_dead, replacement=n_dead > weight_B.shape[0],
                                generator=gen)
        idx_Z = dead_F.nonzero().squeeze(1)
        dec_DZ = err_BD[t_Z].T / err_BD[t_Z].norm(dim=1).clamp_min(1e-12)
        x_ZI = (x.float() - x.float().mean(0))[t_Z]
        live = ~dead_F
        scale = float(d.encoder.weight[live].float().norm(dim=1).mean()) if live.any() else 1.0
        enc_ZI = 0.2 * scale * x_ZI / x_ZI.norm(dim=1, keepdim=True).clamp_min(1e-12)
        d.decoder.weight[:, idx_Z] = dec_DZ.to(d.decoder.weight.dtype)
        d.encoder.weight[idx_Z] = enc_ZI.to(d.encoder.weight.dtype)
        d.encoder.bias[idx_Z] = 0
        broadcast_params(d.parameters())
        # the features' slices of each parameter: decoder columns, encoder rows and biases
        for p, dim in ((d.decoder.weight, 1), (d.encoder.weight, 0), (d.encoder.bias, 0)):
            state = self.optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key].index_fill_(dim, idx_Z, 0)
        self.tokens_since_fired[name][idx_Z] = 0
        return n_dead

    @torch.no_grad()
    def _update_dead(self, batch_size: int, fired_idx: dict[str, Tensor]) -> None:
        """Count tokens since each feature last fired (all ranks together)."""
        for n in self.names:
            hit_F = torch.zeros(self.dicts[n].dict_size, dtype=torch.int32, device=self.device)
            hit_F[fired_idx[n]] = 1
            all_reduce_max_(hit_F)
            self.tokens_since_fired[n] += batch_size * world_size()
            self.tokens_since_fired[n][hit_F.bool()] = 0

    def state_dict(self) -> dict:
        """Dictionaries, optimizer, scheduler, dead counters and config (for exact resume)."""
        return {
            "dicts": {n: self.dicts[n].state_dict() for n in self.names},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "tokens_since_fired": {n: t.clone() for n, t in self.tokens_since_fired.items()},
            "initialized": self.initialized,
            "config": asdict(self.cfg),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`; the suite's names must match."""
        names = list(state["dicts"])
        if sorted(names) != sorted(self.names):
            raise KeyError(
                f"checkpoint holds dictionaries {sorted(names)} but the trainer has "
                f"{sorted(self.names)}; build the trainer with the same suite"
            )
        for n in self.names:
            self.dicts[n].load_state_dict(state["dicts"][n], strict=True)
        # deepcopy: Adam keeps same-device tensors by reference, which would alias another trainer
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.scheduler.load_state_dict(state["scheduler"])
        for n in self.names:
            self.tokens_since_fired[n].copy_(state["tokens_since_fired"][n])
        self.initialized = bool(state["initialized"])
