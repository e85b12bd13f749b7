"""SCAE finetuning (docs/method.md §5): the loss of a connected suite through its pruned pass.

The suite itself (`SCAESuite`, `DictOutput`, the pruned pass) is the model and lives in
dictionary_learning/suite.py; this module holds only the trainer and its config.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from dictionary_learning.candidates import top_indices
from dictionary_learning.dictionary import TopKDictionary
from dictionary_learning.distributed import rank
from dictionary_learning.metrics import fvu, next_token_kl, ratio_across_ranks
from dictionary_learning.unembed import Unembed
from dictionary_learning.validate import check_candidates

# Re-exported: users of the original SCAE fork import the suite as
# `from trainers.scae import SCAESuite, TrainerSCAESuite`.
from dictionary_learning.suite import DictOutput, SCAESuite
from trainers.top_k import TopKSuiteTrainer, TopKTrainerConfig, auxk_loss

__all__ = ["DictOutput", "SCAESuite", "SCAETrainerConfig", "TrainerSCAESuite"]


# --------------------------------------------------------------------------- finetuning


@dataclass
class SCAETrainerConfig(TopKTrainerConfig):
    """Hyperparameters of SCAE finetuning (docs/method.md §5); the TopK fields keep their
    meaning."""

    coeff: float = 1.0
    """Weight of each transcoder's pruned FVU."""
    loss: Literal["vanilla+pruned", "pruned"] = "vanilla+pruned"
    """'vanilla+pruned': sum_attn FVU_v + sum_mlp (FVU_v + coeff FVU_p); 'pruned': the transcoders'
    vanilla term is dropped (attention SAEs keep theirs)."""
    act_coeff: float = 0.0
    """Weight of the activation-difference term ||f_vanilla - f_pruned||^2 / ||f_vanilla||^2."""
    n_threshold: int = 32
    """Candidates after the vanilla top K, by vanilla pre-activation."""
    pruned_top: bool = True
    """Add the pruned pass's own top K (over all features, no gradient) to the candidates, so the
    training step's pruned features are exactly those evaluation's all-features pass picks, and
    features that fire in the pruned pass only get the gradient that turns them down."""
    n_random: int = 0
    """Random other candidates per token, used only by the penalty (0: no penalty)."""
    random_coeff: float = 0.0
    """Weight of the random-candidate penalty sum relu(pre_random - min(pre_top)), averaged over
    tokens. Off by default: its raw scale (~10 at the start of finetuning) dwarfs the FVU terms."""
    kl_coeff: float = 1.0
    """Weight of the end-to-end term: per token, KL(model's next-token distribution || the one
    read from the rebuilt residual x0 + sum of attention reconstructions + sum of pruned
    transcoder reconstructions, through the model's final norm and unembedding)."""
    kl_chunk: int = 256
    """Token rows per chunk of the KL term: only one chunk's [rows, V] logits are held at a time
    (each chunk's logits are recomputed in the backward pass)."""
    warmup_steps: int = 50
    auxk_alpha: float = 1 / 32
    """AuxK on the vanilla pass, as in pretraining, to keep features alive."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in ("vanilla+pruned", "pruned"):
            raise ValueError(
                f"SCAETrainerConfig.loss={self.loss!r}: use 'vanilla+pruned' or 'pruned'"
            )
        counts = (self.n_threshold, self.n_random)
        coeffs = (self.coeff, self.random_coeff, self.act_coeff, self.kl_coeff)
        if min(counts) < 0 or min(coeffs) < 0:
            raise ValueError(
                "SCAETrainerConfig: n_threshold, n_random and the coefficients must be >= 0"
            )
        if self.kl_chunk < 1:
            raise ValueError(f"SCAETrainerConfig.kl_chunk={self.kl_chunk} must be >= 1")


class TrainerSCAESuite(TopKSuiteTrainer):
    """Finetunes every dictionary of a connected suite through the pruned pass (docs/method.md §5).

    Implements the trainer protocol of `training.train`, like `TopKSuiteTrainer`, from which it
    takes the optimizer, the schedule, the unit-norm decoders and the dead-feature tracking.
    """

    def __init__(self, suite: SCAESuite, cfg: SCAETrainerConfig, device="cpu", dtype=torch.float32,
                 unembed: Unembed | None = None):
        """`unembed`: the model's head (`Unembed.from_model(model)`; the trainer keeps a frozen
        copy), needed when cfg.kl_coeff > 0."""
        if not suite.has_connections:
            raise ValueError(
                "TrainerSCAESuite needs a suite with connections: suite.set_connections(...) "
                "with the output of find_top_connections"
            )
        for m in suite.transcoder_names:
            ae = suite.dicts[m]
            check_candidates(m, ae.k, cfg.n_threshold, cfg.n_random, ae.dict_size)
        if cfg.kl_coeff > 0 and unembed is None:
            raise ValueError(
                f"SCAETrainerConfig.kl_coeff={cfg.kl_coeff} needs the model's head: pass "
                "unembed=Unembed.from_model(model) (train_scae_suite does this from the buffer's "
                "model), or set kl_coeff=0"
            )
        self.suite = suite.to(device=device, dtype=dtype)
        # The head is a fixed target, in fp32 whatever the dictionaries' dtype, never trained: a
        # copy, so that moving it leaves the model as it is.
        self.unembed = (copy.deepcopy(unembed).to(device=device, dtype=torch.float32)
                        .requires_grad_(False) if unembed is not None else None)
        super().__init__(dict(suite.dicts.items()), cfg, device, dtype)
        self.initialized = True  # finetuning starts from trained dictionaries
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed + rank())

    def losses(self, batch) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """Per-dictionary losses, scalar metrics, and the indices of fired (vanilla) features."""
        cfg = self.cfg
        batch = batch.to(self.device, self.dtype)
        self.suite._check_batch(batch)
        losses, metrics, fired, vanilla = {}, {}, {}, {}
        for n in self.names:
            # Vanilla pass one dictionary at a time: its [B, F] pre-activations (without gradient)
            # choose a transcoder's TopK and candidates, then are dropped (memory of the training
            # step): the pruned pass needs the candidates' indices only.
            d = self.dicts[n]
            van = self.suite.vanilla_one(n, batch, cfg.n_threshold, cfg.n_random, self.generator)
            x, y = self.io(n, batch)
            aux = auxk_loss(d, x, y.float() - van.recon_BD.float(), self.dead_mask(n),
                            self.k_aux[n], relu=cfg.auxk_relu)
            van = van._replace(pre_BF=None)
            vanilla[n] = van
            fvu_v = fvu(y, van.recon_BD, across_ranks=True)
            losses[n] = cfg.auxk_alpha * aux
            if not d.is_transcoder or cfg.loss == "vanilla+pruned":
                losses[n] = losses[n] + fvu_v
            metrics[f"{n}/fvu"], metrics[f"{n}/auxk"] = fvu_v.detach(), aux.detach()
            active_BK = van.feats.vals_BK > 0
            metrics[f"{n}/l0"] = active_BK.sum(1).float().mean()
            fired[n] = van.feats.idx_BK[active_BK]

        pruned = self.suite.pruned_forward(batch, vanilla, mode="candidates",
                                           n_threshold=cfg.n_threshold, n_random=cfg.n_random,
                                           pruned_top=cfg.pruned_top)
        for n, pr in pruned.items():
            x, y = self.io(n, batch)
            fvu_p = fvu(y, pr.recon_BD, across_ranks=True)
            losses[n] = losses[n] + cfg.coeff * fvu_p
            metrics[f"{n}/fvu_pruned"] = fvu_p.detach()
            if pr.penalty is not None:
                losses[n] = losses[n] + cfg.random_coeff * pr.penalty
                metrics[f"{n}/penalty"] = pr.penalty.detach()
            if cfg.act_coeff > 0:
                diff = self._activation_difference(self.dicts[n], x, vanilla[n], pr)
                losses[n] = losses[n] + cfg.act_coeff * diff
                metrics[f"{n}/act_diff"] = diff.detach()
        if cfg.kl_coeff > 0:
            kl = self._kl(batch, vanilla, pruned)
            losses["kl"] = cfg.kl_coeff * kl
            metrics["kl"] = kl.detach()
        return losses, metrics, fired

    def _kl(self, batch, vanilla: dict[str, DictOutput], pruned: dict[str, DictOutput]) -> Tensor:
        """Mean over tokens of KL(p_model || p_suite) (docs/method.md §5): p_model from the true
        final residual, p_suite from x0 + the attention SAEs' reconstructions + the transcoders'
        pruned reconstructions, both through the model's final norm and unembedding."""
        recons = [pruned[n].recon_BD if n in pruned else vanilla[n].recon_BD for n in self.names]
        rebuilt_BD = batch.initial.float() + sum(r.float() for r in recons)
        true_BD = batch.final_residual()

        def chunk_kl_sum(rebuilt_bD: Tensor, true_bD: Tensor) -> Tensor:
            with torch.no_grad():
                clean_bV = self.unembed(true_bD)
            return next_token_kl(clean_bV, self.unembed(rebuilt_bD)) * rebuilt_bD.shape[0]

        # Chunks with recomputation: memory holds one chunk's [rows, V] logits, not the batch's.
        total = rebuilt_BD.new_zeros(())
        for start in range(0, rebuilt_BD.shape[0], self.cfg.kl_chunk):
            rows = slice(start, start + self.cfg.kl_chunk)
            total = total + checkpoint(chunk_kl_sum, rebuilt_BD[rows], true_BD[rows],
                                       use_reentrant=False)
        return ratio_across_ranks(total, total.new_tensor(float(rebuilt_BD.shape[0])))

    def _activation_difference(
        self, d: TopKDictionary, x_BI: Tensor, van: DictOutput, pr: DictOutput
    ) -> Tensor:
        """||f_vanilla - f_pruned||^2 / ||f_vanilla||^2 over the top and threshold candidates (the
        denominator is a normaliser: no gradient flows through it)."""
        k = d.k
        n_top = k + self.cfg.n_threshold
        # The vanilla activations at the candidates: the top k (the vanilla features, which are
        # the first k candidates), zero at the threshold candidates.
        f_van_BK = van.feats.vals_BK
        f_van_BM = torch.cat([f_van_BK, f_van_BK.new_zeros(f_van_BK.shape[0], n_top - k)], dim=1)
        top_BM = pr.pre_BN[:, :n_top]
        sel_BK = top_indices(top_BM, k)  # the pruned pass's choice
        f_pr_BM = torch.zeros_like(top_BM).scatter(1, sel_BK, top_BM.gather(1, sel_BK).relu())
        return ratio_across_ranks(
            (f_van_BM - f_pr_BM).float().pow(2).sum(), f_van_BM.float().pow(2).sum()
        )

    def local_state_dict(self) -> dict:
        """This rank's own state (the candidate sampler), saved per rank in checkpoints."""
        return {"generator": self.generator.get_state()}

    def load_local_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
