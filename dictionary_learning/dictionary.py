"""TopK dictionaries: an SAE (`AutoEncoderTopK`) and a transcoder (`TopKTranscoder`).

Both compute (docs/method.md §1)

    f = TopK_K(ReLU(W_enc x + b_enc)),    recon = W_dec f + b_dec,

with unit-norm decoder columns. `b_enc` is the b_enc of docs/method.md §1: the encoder never
subtracts b_dec from its input (a transcoder's input and output live in different spaces).
Exports to dictionary_learning's own format convert to its `W_enc (x - b_dec)` convention exactly.

Features are passed around sparsely as `Features(vals_BK, idx_BK)`: the K active values and their
indices. Decoding uses `embedding_bag`, so no dense [B, F] activation tensor is built.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F_
from torch import Tensor, nn

from .candidates import top_indices
from .sparse_ops import accumulation_dtype, dot_at_candidates, rows_sum, take_rows


class Features(NamedTuple):
    """Sparse TopK activations: values [B, K] (after ReLU, may contain zeros) and indices [B, K]."""

    vals_BK: Tensor
    idx_BK: Tensor

    def dense(self, n_features: int) -> Tensor:
        """The dense [B, F] activation tensor (for tests and small evaluations)."""
        out_BF = self.vals_BK.new_zeros(self.vals_BK.shape[0], n_features)
        return out_BF.scatter(1, self.idx_BK, self.vals_BK)


def topk_relu(pre_BF: Tensor, k: int, relu: bool = True) -> Features:
    """TopK_K(ReLU(pre)) as sparse features (without the ReLU if not `relu`), the k chosen by
    `top_indices`. Taking top k before the ReLU gives the same set."""
    idx_BK = top_indices(pre_BF, k)
    vals_BK = pre_BF.gather(1, idx_BK)
    return Features(vals_BK.relu() if relu else vals_BK, idx_BK)


def sparse_decode(feats: Features, W_dec_DF: Tensor, b_dec_D: Tensor) -> Tensor:
    """W_dec f + b_dec from sparse features, without a dense [B, F] or [B, K, D] tensor: the
    decoder rows' weighted sums (`rows_sum`: embedding_bag, with a C backward on the CPU).

    The weights and the values share one dtype; half-precision suites sum in fp32.
    """
    acc = accumulation_dtype(W_dec_DF.dtype)
    # The table must be contiguous [F, D] rows: embedding_bag reads a strided view (each row F
    # elements apart) 13x slower, forward and backward, on CPU (RESULTS.md, issue 17). A
    # dictionary's decoder is stored that way (TopKDictionary), so this makes no copy.
    out_BD = rows_sum(feats.idx_BK, W_dec_DF.T.to(acc).contiguous(), feats.vals_BK.to(acc))
    return (out_BD + b_dec_D.to(acc)).to(W_dec_DF.dtype)


def check_k(k: int, dict_size: int, what: str = "dictionary") -> None:
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"{what}: k must be an int, got {type(k).__name__}")
    if k <= 0:
        raise ValueError(f"{what}: k={k} must be positive; pick 1 <= k <= dict_size={dict_size}")
    if k > dict_size:
        raise ValueError(
            f"{what}: k={k} is larger than dict_size={dict_size}; lower k or raise dict_size"
        )


class TopKDictionary(nn.Module):
    """A TopK map from a d_in-dimensional input to a d_out-dimensional reconstruction.

    Parameters follow dictionary_learning's names: `encoder` (Linear d_in -> F, with bias b_enc),
    `decoder` (Linear F -> d_out, no bias; weight [d_out, F]) and `b_dec` [d_out].
    """

    is_transcoder: bool = False

    def __init__(self, d_in: int, d_out: int, dict_size: int, k: int):
        super().__init__()
        check_k(k, dict_size)
        self.d_in, self.d_out, self.dict_size, self.k = d_in, d_out, dict_size, k
        self.encoder = nn.Linear(d_in, dict_size)
        self.decoder = nn.Linear(dict_size, d_out, bias=False)
        # The [d_out, F] decoder weight is stored feature-major ([F, d_out] in memory, strides
        # (1, d_out)): the sparse decode and the virtual weights read its columns as contiguous
        # rows, so no step makes a transposed copy of it, and its gradients arrive in the same
        # layout. Values, shape, files and the optimiser are as for a row-major weight.
        self.decoder.weight = nn.Parameter(self.decoder.weight.detach().T.contiguous().T)
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm decoder columns; encoder initialised to the decoder's transpose."""
        W_DF = torch.randn(self.d_out, self.dict_size, generator=generator)
        W_DF /= W_DF.norm(dim=0, keepdim=True)
        self.decoder.weight.copy_(W_DF)
        if self.d_in == self.d_out:
            self.encoder.weight.copy_(W_DF.T)
        else:
            W_FI = torch.randn(self.dict_size, self.d_in, generator=generator)
            self.encoder.weight.copy_(W_FI / W_FI.norm(dim=1, keepdim=True))
        self.encoder.bias.zero_()
        self.b_dec.zero_()

    @property
    def W_enc_FI(self) -> Tensor:
        return self.encoder.weight

    @property
    def b_enc_F(self) -> Tensor:
        return self.encoder.bias

    @property
    def W_dec_DF(self) -> Tensor:
        return self.decoder.weight

    def config(self) -> dict:
        return {
            "class": type(self).__name__,
            "d_in": self.d_in,
            "d_out": self.d_out,
            "dict_size": self.dict_size,
            "k": self.k,
        }

    def pre_acts(self, x_BI: Tensor) -> Tensor:
        """Encoder pre-activations W_enc x + b_enc, [B, F] (before ReLU and TopK)."""
        return F_.linear(x_BI, self.encoder.weight, self.encoder.bias)

    def pre_acts_at(self, x_BI: Tensor, cand_BN: Tensor) -> Tensor:
        """The pre-activations of N features per token only (`cand`: candidates, the top K, any
        features; they may repeat), [B, N]: the entries of pre_acts(x) there, and a gradient
        that touches those entries only (no [B, F] gradient, no dense backward product where
        N << F; see `dot_at_candidates`)."""
        return dot_at_candidates(x_BI, self.encoder.weight, cand_BN) + take_rows(
            self.encoder.bias, cand_BN
        )

    def features_at(self, x_BI: Tensor, idx_BK: Tensor, pre_BF: Tensor) -> Features:
        """The features idx_BK of x as `Features`, chosen from pre_BF = pre_acts(x) (computed
        without gradient). Under autograd, the values are recomputed at those features only
        (`pre_acts_at`): the encoder's gradient is non-zero there only, so the backward pass
        needs no [B, F] gradient and no dense [F, B] x [B, D] product, the largest item of a wide
        dictionary's training step on CPU (benchmarks/RESULTS.md, issue 17). Without autograd
        they are pre_BF's."""
        needs_grad = torch.is_grad_enabled() and (
            x_BI.requires_grad or self.encoder.weight.requires_grad
            or self.encoder.bias.requires_grad
        )
        if needs_grad:
            return Features(self.pre_acts_at(x_BI, idx_BK).relu(), idx_BK)
        return Features(pre_BF.gather(1, idx_BK).relu(), idx_BK)

    def encode_with_pre_acts(self, x_BI: Tensor) -> tuple[Features, Tensor]:
        """TopK features of x, and every feature's pre-activation [B, F] without gradient (to
        choose other features from: AuxK's dead ones, the pruned pass's candidates); the
        features' values carry the gradient (`features_at`)."""
        with torch.no_grad():
            pre_BF = self.pre_acts(x_BI)
        idx_BK = top_indices(pre_BF, self.k)
        return self.features_at(x_BI, idx_BK, pre_BF), pre_BF

    def encode(self, x_BI: Tensor) -> Features:
        return self.encode_with_pre_acts(x_BI)[0]

    def decode(self, feats: Features) -> Tensor:
        return sparse_decode(feats, self.decoder.weight, self.b_dec)

    def forward(self, x_BI: Tensor, output_features: bool = False):
        feats = self.encode(x_BI)
        recon_BD = self.decode(feats)
        return (recon_BD, feats) if output_features else recon_BD

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder columns to unit norm (after each optimizer step, as dictionary_learning
        does)."""
        self.decoder.weight.div_(self.decoder.weight.norm(dim=0, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the gradient component parallel to each (unit-norm) decoder column."""
        W_DF, g_DF = self.decoder.weight, self.decoder.weight.grad
        if g_DF is None:
            return
        g_DF -= (g_DF * W_DF).sum(0, keepdim=True) * W_DF


class AutoEncoderTopK(TopKDictionary):
    """A TopK SAE: input and target are the same activation (attn_out)."""

    def __init__(self, activation_dim: int, dict_size: int, k: int):
        super().__init__(activation_dim, activation_dim, dict_size, k)

    @property
    def activation_dim(self) -> int:
        return self.d_in


class TopKTranscoder(TopKDictionary):
    """A TopK transcoder from mlp_in (after the folded ln_2) to mlp_out."""

    is_transcoder = True

    def __init__(self, input_dim: int, output_dim: int, dict_size: int, k: int):
        super().__init__(input_dim, output_dim, dict_size, k)


def build_dictionary(cfg: dict) -> TopKDictionary:
    """Rebuild a dictionary from `TopKDictionary.config()`."""
    cls = cfg.get("class")
    if cls == "AutoEncoderTopK":
        return AutoEncoderTopK(cfg["d_in"], cfg["dict_size"], cfg["k"])
    if cls == "TopKTranscoder":
        return TopKTranscoder(cfg["d_in"], cfg["d_out"], cfg["dict_size"], cfg["k"])
    raise ValueError(
        f"unknown dictionary class {cls!r}; expected 'AutoEncoderTopK' or 'TopKTranscoder'"
    )
