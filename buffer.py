"""AllActivationBuffer: shuffled per-token activations of every layer of a folded model of a
supported family (docs/method.md §2, §7; dictionary_learning/arch.py).

One nnsight trace per model batch reads, for every block l, attn_out_l, the input of the folded
MLP-input norm (to get sigma_l), mlp_in_l and mlp_out_l, plus x0 = input of block 0; the trace
stops after the last block so the LM head never runs. The BOS position (0) of every context is
dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from itertools import chain

import torch
from torch import Tensor

# ActivationBatch, trace_activations and DataExhaustedError are re-exported: code written against
# the original fork (and this library before the batch moved to the base layer) imports them here.
from dictionary_learning.batch import ActivationBatch, trace_activations
from dictionary_learning.errors import DataExhaustedError
from dictionary_learning.arch import architecture
from dictionary_learning.model import hf_model, model_info, module_names
from dictionary_learning.validate import check_context, check_ctx_len

__all__ = ["ActivationBatch", "AllActivationBuffer", "DataExhaustedError", "trace_activations"]

logger = logging.getLogger(__name__)


class AllActivationBuffer:
    """Iterator of shuffled ActivationBatch rows, refilled from a context iterator.

    Memory: a fill takes floor(n_tokens / (ctx_len - 1)) whole contexts, so at most n_tokens token
    rows are ever stored (`peak_stored_tokens`). Of a fill of B rows, floor(B / out_batch_size)
    batches are served, each stored row at most once, in a random order drawn from a
    `torch.Generator` seeded once in __init__; the leftover (< out_batch_size rows) is discarded and
    the buffer refills completely. When the contexts run out before a full batch can be formed,
    `__next__` raises DataExhaustedError (a RuntimeError, never a silent StopIteration, so a
    training loop cannot quietly run fewer steps); bound loops with `zip(range(steps), buffer)`.
    `state_dict()` / `load_state_dict()` give bit-exact resume over the same context iterator.
    """

    def __init__(
        self,
        model,
        contexts: Iterable[Tensor],
        *,
        n_tokens: int,
        out_batch_size: int,
        model_batch_size: int = 32,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ):
        self.arch = architecture(model)
        """The model's architecture description."""
        self.suite_arch = self.arch.suite_arch
        """What a suite trained on this buffer records of it (parallel blocks, centring)."""
        info = model_info(model)
        if out_batch_size < 1 or model_batch_size < 1:
            raise ValueError(
                f"out_batch_size={out_batch_size} and model_batch_size={model_batch_size} "
                "must be >= 1."
            )
        self.model = model
        self.n_layers, self.d_model = info.n_layers, info.d_model
        self.names = module_names(self.n_layers)
        self.n_tokens, self.out_batch_size = int(n_tokens), int(out_batch_size)
        self.model_batch_size = int(model_batch_size)
        self.device, self.dtype, self.seed = torch.device(device), dtype, seed
        self.ln_eps = [self.arch.norm_eps(b.get_submodule(self.arch.mlp_norm))
                       for b in self.arch.blocks(hf_model(model))]
        self._model_device = next(hf_model(model).parameters()).device

        it = iter(contexts)
        first = next(it, None)
        if first is None:
            raise ValueError(
                "the context iterator yielded no complete context; give a text source with at "
                "least ctx_len - 1 tokens (check the dataset / file paths)."
            )
        first = check_context(first, 0)
        self.ctx_len = first.shape[0]
        # Training needs only BOS + 1 token per context (evaluation needs BOS + 2).
        check_ctx_len(self.ctx_len, info.n_ctx, "the contexts' ctx_len", minimum=2)
        self.contexts_per_fill = self.n_tokens // (self.ctx_len - 1)
        if self.contexts_per_fill * (self.ctx_len - 1) < self.out_batch_size:
            raise ValueError(
                f"n_tokens={self.n_tokens} holds {self.contexts_per_fill} whole contexts of "
                f"{self.ctx_len - 1} tokens, fewer than out_batch_size={self.out_batch_size}; "
                "raise n_tokens or lower out_batch_size."
            )
        self._contexts = chain([first], it)
        self._gen = torch.Generator().manual_seed(seed)
        self._store: dict[str, Tensor] | None = None  # flat [B, D] / [B] views of the current fill
        self._alloc: dict[str, Tensor] = {}  # [cap, D] / [cap] storage, allocated once, reused
        self._perm: Tensor | None = None
        self._served = 0  # rows served from the current fill
        self._consumed = 0  # contexts consumed in total
        self._consumed_before_fill = 0
        self._fill_gen_state: Tensor | None = None
        self.peak_stored_tokens = 0

    # ------------------------------------------------------------------------------------ model
    @torch.no_grad()
    def _run_model(self, toks_ST: Tensor) -> dict[str, Tensor]:
        """Trace one model batch; return [S, T-1, D] activation views (BOS dropped) and flat sigmas.

        The views are copied once, straight into the store (no intermediate flattening copy)."""
        acts = trace_activations(self.model, toks_ST.to(self._model_device), ln_eps=self.ln_eps)
        out: dict[str, Tensor] = {}
        for k, v in acts.items():
            v = v[:, 1:]  # drop BOS
            out[k] = v.reshape(-1) if k.startswith("sigma_") else v
        return out

    # ------------------------------------------------------------------------------------- fill
    def _keys(self) -> list[str]:
        ks = ["initial"]
        for l in range(self.n_layers):
            ks += [f"attn_{l}", f"mlp_in_{l}", f"mlp_out_{l}", f"sigma_{l}"]
        return ks

    def _refill(self) -> None:
        """Replace the store by the activations of the next `contexts_per_fill` contexts."""
        self._store = None  # the old fill is overwritten in place (storage reused: no page faults)
        self._perm = None
        self._consumed_before_fill = self._consumed
        n_body = self.ctx_len - 1
        cap = self.contexts_per_fill * n_body
        store = self._alloc
        rows = 0
        taken = 0
        while taken < self.contexts_per_fill:
            batch = []
            for ctx in self._contexts:
                batch.append(check_context(ctx, self._consumed + len(batch), self.ctx_len))
                if len(batch) == min(self.model_batch_size, self.contexts_per_fill - taken):
                    break
            if not batch:
                break
            self._consumed += len(batch)
            taken += len(batch)
            acts = self._run_model(torch.stack(batch))
            n = len(batch) * n_body
            if not store:
                store = self._alloc = {
                    k: torch.empty((cap,) + v.shape[2:], device=self.device, dtype=self.dtype)
                    if v.dim() == 3 else torch.empty(cap, device=self.device, dtype=self.dtype)
                    for k, v in acts.items()
                }
            for k, v in acts.items():
                store[k][rows : rows + n].view(v.shape).copy_(v)
            rows += n
            self.peak_stored_tokens = max(self.peak_stored_tokens, rows)
        n_serve = (rows // self.out_batch_size) * self.out_batch_size
        if n_serve == 0:
            raise DataExhaustedError(
                f"the text source ran out after {self._consumed} contexts (only {rows} tokens "
                f"left, fewer than out_batch_size={self.out_batch_size}); give more data or train "
                "fewer steps."
            )
        self._store = {k: v[:rows] for k, v in store.items()}
        self._fill_gen_state = self._gen.get_state()
        self._perm = torch.randperm(rows, generator=self._gen)[:n_serve].to(self.device)
        self._served = 0
        logger.debug("buffer refilled: %d contexts, %d tokens", taken, rows)

    # --------------------------------------------------------------------------------- iterate
    def __iter__(self) -> Iterator[ActivationBatch]:
        return self

    def __next__(self) -> ActivationBatch:
        if self._perm is None or self._served + self.out_batch_size > self._perm.shape[0]:
            self._refill()
        idx = self._perm[self._served : self._served + self.out_batch_size]
        self._served += self.out_batch_size
        return ActivationBatch.from_trace({k: v[idx] for k, v in self._store.items()},
                                          self.n_layers)

    # ---------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        """Resume state: contexts consumed before the current fill, generator state at its start,
        rows served from it."""
        in_fill = self._perm is not None
        return {
            "contexts_before_fill": self._consumed_before_fill if in_fill else self._consumed,
            "fill_gen_state": (self._fill_gen_state if in_fill else self._gen.get_state()).clone(),
            "served_in_fill": self._served if in_fill else 0,
            "has_fill": self._perm is not None,
            "n_tokens": self.n_tokens,
            "out_batch_size": self.out_batch_size,
            "ctx_len": self.ctx_len,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore on a fresh buffer over the same fresh context iterator: skip the consumed
        contexts, regenerate the current fill and its permutation, and continue bit-identically."""
        if self._consumed != 0 or self._perm is not None:
            raise RuntimeError(
                "load_state_dict needs a freshly built buffer (nothing consumed yet); build a new "
                "AllActivationBuffer over a fresh context iterator."
            )
        for k in ("n_tokens", "out_batch_size", "ctx_len"):
            if state[k] != getattr(self, k):
                raise ValueError(
                    f"state has {k}={state[k]} but this buffer has {getattr(self, k)}; build the "
                    "buffer with the same settings as the saved one."
                )
        skip = int(state["contexts_before_fill"])
        for i in range(skip):
            if next(self._contexts, None) is None:
                raise DataExhaustedError(
                    f"the context iterator ended after {i} contexts while skipping {skip} to "
                    "resume; pass the same text source as the saved run."
                )
        self._consumed = skip
        self._gen.set_state(state["fill_gen_state"].clone())
        if state["has_fill"]:
            self._refill()
            self._served = int(state["served_in_fill"])
