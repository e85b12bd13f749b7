"""The metrics of a suite (docs/method.md §5, §6), one definition each.

FVU in one batch (`fvu`, also the training loss, exact under torch.distributed) and over a stream
of chunks (`FVUAccumulator`); L0, fired and dead features, pruned-vs-vanilla agreement; and the
next-token cross-entropy helpers. evaluate.py runs them over a model; the trainers use `fvu` and
`ratio_across_ranks` as losses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F_
from torch import Tensor

from dictionary_learning.dictionary import Features
from dictionary_learning.distributed import all_reduce_sum_, world_size

# ------------------------------------------------------------------------------------ FVU


def fvu(y_BD: Tensor, yhat_BD: Tensor, *, across_ranks: bool = False) -> Tensor:
    """sum ||y - yhat||^2 / sum ||y - mean_batch(y)||^2 (docs/method.md §5), in fp32.

    across_ranks: under torch.distributed, the batch is the union of every rank's batch. The value
    is then the global FVU on every rank, and the gradient is world_size x this rank's share, so
    that averaging gradients over ranks gives exactly the gradient of the global FVU.
    """
    y_BD, yhat_BD = y_BD.float(), yhat_BD.float()
    num = (y_BD - yhat_BD).pow(2).sum()
    n_ranks = world_size()
    if not across_ranks or n_ranks == 1:
        den = (y_BD - y_BD.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12)
        return num / den
    stats = torch.cat([
        y_BD.sum(0), y_BD.pow(2).sum()[None], y_BD.new_tensor([y_BD.shape[0]]), num.detach()[None],
    ]).detach()
    all_reduce_sum_(stats)
    s1, s2, n, num_all = stats[:-3], stats[-3], stats[-2], stats[-1]
    den = (s2 - s1.pow(2).sum() / n).clamp_min(1e-12)
    return (n_ranks * num + (num_all - n_ranks * num).detach()) / den


def ratio_across_ranks(num: Tensor, den: Tensor) -> Tensor:
    """(sum of num over ranks) / (sum of den over ranks), with den held constant.

    The gradient is world_size x this rank's share of num, so that averaging gradients over ranks
    gives the gradient of the global ratio (see `fvu`).
    """
    num, den = num.float(), den.detach().float()
    n_ranks = world_size()
    if n_ranks == 1:
        return num / den.clamp_min(1e-12)
    both = all_reduce_sum_(torch.stack([num.detach(), den]))
    return (n_ranks * num + (both[0] - n_ranks * num).detach()) / both[1].clamp_min(1e-12)


class FVUAccumulator:
    """sum ||y - yhat||^2 / sum ||y - mean(y)||^2 over all tokens seen, from chunks (float64).

    The mean and the centred sum of squares are merged chunk by chunk (Chan et al.), so the result
    equals `fvu` on the concatenation without storing it and without cancellation.
    """

    def __init__(self):
        self.n = 0
        self.err = 0.0
        self.mean_D: Tensor | None = None
        self.m2 = 0.0

    def update(self, y_BD: Tensor, yhat_BD: Tensor) -> None:
        """Add a chunk of targets and reconstructions, [B, D] each."""
        y = y_BD.double()
        nb = y.shape[0]
        if nb == 0:
            return
        self.err += float((y - yhat_BD.double()).pow(2).sum())
        mean_b = y.mean(0)
        m2_b = float((y - mean_b).pow(2).sum())
        if self.mean_D is None:
            self.n, self.mean_D, self.m2 = nb, mean_b, m2_b
            return
        n = self.n + nb
        delta = mean_b - self.mean_D
        self.m2 += m2_b + float(delta.pow(2).sum()) * self.n * nb / n
        self.mean_D = self.mean_D + delta * (nb / n)
        self.n = n

    def value(self) -> float:
        if self.n == 0:
            return math.nan
        return self.err / max(self.m2, 1e-12)


# ------------------------------------------------------------- features and agreement


def l0(feats: Features) -> Tensor:
    """Mean number of active (> 0) features per token, a scalar (fp32)."""
    return (feats.vals_BK > 0).sum(1).float().mean()


def fired_features(feats: Features, n_features: int) -> Tensor:
    """BoolTensor [F]: which features are active (> 0) on at least one token of the batch."""
    fired_F = torch.zeros(n_features, dtype=torch.bool, device=feats.idx_BK.device)
    fired_F[feats.idx_BK[feats.vals_BK > 0]] = True
    return fired_F


def dead_fraction(fired_F: Tensor) -> float:
    """Fraction of features never active, from the OR of `fired_features` over all tokens."""
    return 1.0 - float(fired_F.float().mean())


def agreement_per_token(vanilla: Features, pruned: Features) -> Tensor:
    """[B]: |A_pruned ∩ A_vanilla| / |A_vanilla| per token, A = indices with value > 0.

    NaN for tokens with no active vanilla feature (the ratio is undefined there).
    """
    van_BK = torch.where(vanilla.vals_BK > 0, vanilla.idx_BK, -1)
    pr_BK = torch.where(pruned.vals_BK > 0, pruned.idx_BK, -2)
    # indices within one TopK set are distinct, so the pairwise match count is |A_p ∩ A_v|
    inter_B = (van_BK[:, :, None] == pr_BK[:, None, :]).sum((1, 2)).float()
    n_van_B = (vanilla.vals_BK > 0).sum(1).float()
    return torch.where(n_van_B > 0, inter_B / n_van_B.clamp_min(1), torch.nan)


def agreement(vanilla: Features, pruned: Features) -> Tensor:
    """Mean over tokens of |A_pruned ∩ A_vanilla| / |A_vanilla| (tokens with A_vanilla empty are
    left out); 1 means the pruned pass activates every vanilla-active feature."""
    return agreement_per_token(vanilla, pruned).nanmean()


# ---------------------------------------------------------------------- cross-entropy


def scored_predictions(logits_STV: Tensor, toks_ST: Tensor) -> tuple[Tensor, Tensor]:
    """The scored (logits [Q, V], targets [Q]) of full-context logits: predictions made from
    positions 1..T-2 of tokens 2..T-1 (the prediction from BOS is left out, docs/method.md §7)."""
    if logits_STV.shape[:2] != toks_ST.shape:
        raise ValueError(
            f"logits {tuple(logits_STV.shape)} and tokens {tuple(toks_ST.shape)} disagree; pass "
            "logits for every position of the contexts, [S, T, V] with tokens [S, T]."
        )
    if toks_ST.shape[1] < 3:
        raise ValueError(
            f"contexts of {toks_ST.shape[1]} tokens have no scored prediction; CE needs BOS + 2 "
            "tokens at least (use ctx_len >= 3)."
        )
    logits_QV = logits_STV[:, 1:-1].reshape(-1, logits_STV.shape[-1])
    return logits_QV, toks_ST[:, 2:].reshape(-1).to(logits_STV.device)


def next_token_ce(logits_STV: Tensor, toks_ST: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy over the scored predictions (see `scored_predictions`), in fp32."""
    logits_QV, tgt_Q = scored_predictions(logits_STV, toks_ST)
    return F_.cross_entropy(logits_QV.float(), tgt_Q, reduction=reduction)


def ce_recovered(ce_ablated: float, ce_suite: float, ce_clean: float) -> float:
    """(CE_ablated - CE_suite) / (CE_ablated - CE_clean): 1 = as good as the model, 0 = as bad as
    removing every block. NaN when CE_ablated == CE_clean."""
    den = ce_ablated - ce_clean
    return (ce_ablated - ce_suite) / den if den != 0 else math.nan


def next_token_kl(clean_logits_BV: Tensor, logits_BV: Tensor) -> Tensor:
    """Mean over token rows of KL(p_clean || p), the next-token distributions of two logits, in
    fp32 (docs/method.md §5). The clean distribution is a target: no gradient flows into it."""
    logp_clean_BV = F_.log_softmax(clean_logits_BV.detach().float(), dim=-1)
    logp_BV = F_.log_softmax(logits_BV.float(), dim=-1)
    return F_.kl_div(logp_BV, logp_clean_BV, log_target=True, reduction="batchmean")
