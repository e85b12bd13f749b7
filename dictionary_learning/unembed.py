"""The model's head as a module of its own: final norm, unembedding and (Gemma-2) the final
soft-capping (docs/method.md §5).

Evaluation turns rebuilt residuals into logits with it, and the finetuning trainer's KL term
(`SCAETrainerConfig.kl_coeff`) does so in every step, without running the model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dictionary_learning.arch import apply_softcap, architecture
from dictionary_learning.model import hf_model


class Unembed(nn.Module):
    """logits = cap(lm_head(final_norm(r))) for residual rows r [..., D] -> [..., V], with
    cap(z) = c tanh(z / c) when the model soft-caps its logits (else the identity)."""

    def __init__(self, final_norm: nn.Module, lm_head: nn.Module, softcap: float | None = None):
        super().__init__()
        self.final_norm, self.lm_head, self.softcap = final_norm, lm_head, softcap

    @classmethod
    def from_model(cls, model) -> "Unembed":
        """The head of an nnsight-wrapped or plain transformers model, found through its
        architecture description (its modules, not copies: a trainer keeps its own frozen copy)."""
        hf = hf_model(model)
        arch = architecture(hf)
        return cls(hf.get_submodule(arch.final_norm), hf.get_submodule(arch.unembed),
                   arch.softcap_value(hf))

    def forward(self, r_BD: Tensor) -> Tensor:
        w = self.lm_head.weight
        logits = self.lm_head(self.final_norm(r_BD.to(device=w.device, dtype=w.dtype)))
        return apply_softcap(logits, self.softcap)

    @property
    def vocab_size(self) -> int:
        return self.lm_head.weight.shape[0]


@torch.no_grad()
def unembed(model, r_final_STD: Tensor) -> Tensor:
    """logits with the model's own head (`Unembed`), [..., V]."""
    return Unembed.from_model(model)(r_final_STD)
