"""The model's head as a module of its own: final norm, then unembedding (docs/method.md §5).

Evaluation turns rebuilt residuals into logits with it, and the finetuning trainer's KL term
(`SCAETrainerConfig.kl_coeff`) does so in every step, without running the model.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from dictionary_learning.model import hf_model


class Unembed(nn.Module):
    """logits = lm_head(final_norm(r)) for residual rows r [..., D] -> [..., V]."""

    def __init__(self, final_norm: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.final_norm, self.lm_head = final_norm, lm_head

    @classmethod
    def from_model(cls, model, frozen_copy: bool = False) -> "Unembed":
        """The head of an nnsight-wrapped or plain transformers model. `frozen_copy`: deep copies
        with requires_grad False (a trainer's target: gradients never reach the model, and moving
        the copy to the trainer's device or dtype leaves the model as it is)."""
        hf = hf_model(model)
        head = cls(hf.transformer.ln_f, hf.lm_head)
        if frozen_copy:
            head = copy.deepcopy(head).requires_grad_(False)
        return head

    def forward(self, r_BD: Tensor) -> Tensor:
        w = self.lm_head.weight
        return self.lm_head(self.final_norm(r_BD.to(device=w.device, dtype=w.dtype)))

    @property
    def vocab_size(self) -> int:
        return self.lm_head.weight.shape[0]


@torch.no_grad()
def unembed(model, r_final_STD: Tensor) -> Tensor:
    """logits = lm_head(final_norm(r_final)) with the model's own head, [..., V]."""
    return Unembed.from_model(model)(r_final_STD)
