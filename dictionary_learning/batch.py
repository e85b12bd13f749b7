"""The batch every dictionary trains and is evaluated on, and the one trace that produces it.

`trace_activations` runs the model once (nnsight) and returns every layer's activations;
`ActivationBatch.from_trace` turns them, cut to the rows wanted, into an `ActivationBatch`. The
buffer (buffer.py), evaluation (evaluate.py), circuits.py and feature_pages.py all go through these
two functions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from dictionary_learning.model import hf_model


class ActivationBatch(NamedTuple):
    """One batch of B token rows of every layer's activations."""

    initial: Tensor
    """[B, D] x0 = input of block 0 (token + position embedding)."""
    src: dict[str, Tensor]
    """{"attn_<l>": attn_out_l, "mlp_<l>": mlp_in_l (after the folded ln_2)}, each [B, D]."""
    tgt: dict[str, Tensor]
    """{"attn_<l>": attn_out_l, "mlp_<l>": mlp_out_l}, each [B, D]."""
    layernorm_scale: dict[str, Tensor]
    """{"mlp_<l>": sigma_l}, each [B]; sigma_l = sqrt(biased var(resid_mid_l) + ln_2.eps)."""

    @classmethod
    def from_trace(cls, acts: dict[str, Tensor], n_layers: int) -> "ActivationBatch":
        """The batch of `trace_activations` output already cut to the rows wanted ([B, D], [B])."""
        layers = range(n_layers)
        attn = {f"attn_{i}": acts[f"attn_{i}"] for i in layers}
        return cls(
            initial=acts["initial"],
            src={**attn, **{f"mlp_{i}": acts[f"mlp_in_{i}"] for i in layers}},
            tgt={**attn, **{f"mlp_{i}": acts[f"mlp_out_{i}"] for i in layers}},
            layernorm_scale={f"mlp_{i}": acts[f"sigma_{i}"] for i in layers},
        )

    def final_residual(self) -> Tensor:
        """[B, D] the residual stream after the last block, x0 + every module's true output
        (docs/method.md (1.1)), in fp32: what the model's head reads."""
        r_BD = self.initial.float()
        for out_BD in self.tgt.values():
            r_BD = r_BD + out_BD.float()
        return r_BD

    def to(self, device=None, dtype: torch.dtype | None = None) -> "ActivationBatch":
        """Copy of the batch on `device` and/or in `dtype`."""

        def mv(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype)

        return ActivationBatch(
            initial=mv(self.initial),
            src={k: mv(v) for k, v in self.src.items()},
            tgt={k: mv(v) for k, v in self.tgt.items()},
            layernorm_scale={k: mv(v) for k, v in self.layernorm_scale.items()},
        )


@torch.no_grad()
def trace_activations(
    model, toks_ST: Tensor, ln_eps: list[float] | None = None
) -> dict[str, Tensor]:
    """One nnsight trace of a folded GPT-2: per-position activations of every layer, BOS kept.

    Returns {"initial": x0, "attn_<l>": attn_out_l, "mlp_in_<l>", "mlp_out_<l>"} each [S, T, D],
    and {"sigma_<l>"} each [S, T] (sigma_l = sqrt(biased var(resid_mid_l) + ln_2.eps), in fp32).
    The trace stops after the last MLP, so the LM head never runs. `toks_ST` must be on the
    model's device. This is the one tracing implementation (the buffer and evaluate.py use it).
    """
    L = len(hf_model(model).transformer.h)
    if ln_eps is None:
        ln_eps = [float(b.ln_2.eps) for b in hf_model(model).transformer.h]
    saved: dict[str, object] = {}
    with model.trace(toks_ST, use_cache=False) as tracer:  # no KV cache to build
        blocks = model.transformer.h
        saved["initial"] = blocks[0].input.save()
        for l in range(L):
            saved[f"attn_{l}"] = blocks[l].attn.output[0].save()
            saved[f"resid_mid_{l}"] = blocks[l].ln_2.input.save()
            saved[f"mlp_in_{l}"] = blocks[l].mlp.input.save()
            saved[f"mlp_out_{l}"] = blocks[l].mlp.output.save()
        tracer.stop()
    out: dict[str, Tensor] = {}
    for k, v in saved.items():
        if type(v) is not Tensor:
            raise RuntimeError(
                f"nnsight returned a {type(v).__name__} for {k}, not a plain tensor; the "
                "nnsight version is incompatible (pin nnsight==0.8.1)."
            )
        if k.startswith("resid_mid_"):
            l = int(k.rsplit("_", 1)[1])
            out[f"sigma_{l}"] = torch.sqrt(v.float().var(dim=-1, unbiased=False) + ln_eps[l])
        else:
            out[k] = v
    return out
