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

from dictionary_learning.arch import architecture
from dictionary_learning.model import hf_model


class ActivationBatch(NamedTuple):
    """One batch of B token rows of every layer's activations."""

    initial: Tensor
    """[B, D] x0 = input of block 0 (the token embedding; + position embedding for GPT-2,
    x sqrt(d) for Gemma-2)."""
    src: dict[str, Tensor]
    """{"attn_<l>": attn_out_l, "mlp_<l>": mlp_in_l (the folded MLP-input norm's output)},
    each [B, D]."""
    tgt: dict[str, Tensor]
    """{"attn_<l>": attn_out_l, "mlp_<l>": mlp_out_l}, each [B, D]: what the block adds to the
    residual stream."""
    layernorm_scale: dict[str, Tensor]
    """{"mlp_<l>": sigma_l}, each [B]: the MLP-input norm's scale at its input (docs/method.md
    (2.1): sqrt(biased var + eps) for LayerNorm, sqrt(mean square + eps) for RMSNorm)."""

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
    """One nnsight trace of a folded model: per-position activations of every layer, BOS kept.

    Returns {"initial": x0 (the input of block 0), "attn_<l>": attn_out_l, "mlp_in_<l>",
    "mlp_out_<l>"} each [S, T, D], and {"sigma_<l>"} each [S, T]: sigma_l of the MLP-input norm's
    input (docs/method.md (2.1), in fp32). Which modules these are comes from the model's
    architecture description (attn_out and mlp_out are the vectors added to the residual stream,
    after Gemma-2's post-norms). The trace stops after the last block, so the LM head never runs.
    `toks_ST` must be on the model's device. This is the one tracing implementation (the buffer,
    evaluate.py, circuits.py and feature_pages.py use it).
    """
    hf = hf_model(model)
    arch = architecture(hf)
    n_layers = len(arch.blocks(hf))
    if ln_eps is None:
        ln_eps = [arch.norm_eps(b.get_submodule(arch.mlp_norm)) for b in arch.blocks(hf)]
    saved: dict[str, object] = {}
    with model.trace(toks_ST, use_cache=False) as tracer:  # no KV cache to build
        blocks = model.get(arch.layers)
        saved["initial"] = blocks[0].input.save()
        for l in range(n_layers):
            block = blocks[l]
            # requested in execution order: attention's output, then the MLP's norm and MLP
            attn_out = block.get(arch.attn_out).output
            saved[f"attn_{l}"] = (attn_out[0] if isinstance(attn_out, tuple) else attn_out).save()
            saved[f"resid_mid_{l}"] = block.get(arch.mlp_norm).input.save()
            saved[f"mlp_in_{l}"] = block.get(arch.mlp).input.save()
            saved[f"mlp_out_{l}"] = block.get(arch.mlp_out).output.save()
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
            out[f"sigma_{l}"] = arch.sigma(v.float(), ln_eps[l])
        else:
            out[k] = v
    return out
